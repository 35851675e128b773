"""The on-call signals on /metrics (gateway/metrics.py: endpoint load, GPU, ledger lag) and the
Grafana dashboards in monitoring/dashboards/: every metric a dashboard query names exists."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.ledger import Ledger, UsageRecord
from gateway.metrics import Metrics
from gateway.router import Router
from gateway.state.health import Health

REPO = Path(__file__).resolve().parent.parent

VLLM_PAGE = """\
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 7.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="m"} 0.625
"""
DCGM_PAGE = """\
# TYPE DCGM_FI_DEV_GPU_UTIL gauge
DCGM_FI_DEV_GPU_UTIL{gpu="0",UUID="GPU-a",modelName="NVIDIA H100 80GB HBM3",Hostname="w"} 40
DCGM_FI_DEV_GPU_UTIL{gpu="1",UUID="GPU-b",modelName="NVIDIA H100 80GB HBM3",Hostname="w"} 60 1700000000000
# TYPE DCGM_FI_DEV_FB_USED gauge
DCGM_FI_DEV_FB_USED{gpu="0",UUID="GPU-a"} 1024
DCGM_FI_DEV_FB_USED{gpu="1",UUID="GPU-b"} 3072
# TYPE DCGM_FI_DEV_FB_FREE gauge
DCGM_FI_DEV_FB_FREE{gpu="0",UUID="GPU-a"} 80896
DCGM_FI_DEV_FB_FREE{gpu="1",UUID="GPU-b"} 78848
"""


def samples(metrics: Metrics) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def ep_labels(pool: str, endpoint: str, provider: str = "vast") -> tuple:
    return tuple(sorted({"model": "m", "pool": pool, "provider": provider, "region": "eu",
                         "endpoint": endpoint}.items()))


async def _serve(pages: dict[str, str]) -> tuple[web.AppRunner, int]:
    app = web.Application()
    for path, text in pages.items():
        async def page(request: web.Request, text: str = text) -> web.Response:
            return web.Response(text=text)
        app.router.add_get(path, page)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


def test_endpoint_signals_from_the_workers_metrics_page():
    async def run():
        vllm, p1 = await _serve({"/health": "ok", "/metrics": VLLM_PAGE})
        gpu, p2 = await _serve({"/health": "ok", "/metrics": VLLM_PAGE + DCGM_PAGE})
        ext, p3 = await _serve({"/v1/models": "{}"})
        config = {"models": [{"id": "m", "pools": [
            {"name": "a", "provider": "vast", "region": "eu", "endpoints": [
                {"id": "a-0", "url": f"http://127.0.0.1:{p1}"}, {"id": "a-1", "url": f"http://127.0.0.1:{p2}"}]},
            {"name": "x", "provider": "gonka", "region": "eu", "role": "standby", "endpoints": [
                {"id": "x-0", "url": f"http://127.0.0.1:{p3}/v1", "credentials": "gonka-key"}]}]}]}
        router = Router(config)
        metrics = Metrics()
        metrics.watch(router)
        try:
            async with aiohttp.ClientSession() as session:
                await router.check_all(session)
            s = samples(metrics)
            next(router.endpoints()).outstanding = 2
            s2 = samples(metrics)
            router.apply({"models": [{"id": "m", "pools": [config["models"][0]["pools"][0]]}]})
            s3 = samples(metrics)
        finally:
            for r in (vllm, gpu, ext):
                await r.cleanup()
        return s, s2, s3

    s, s2, s3 = asyncio.run(run())
    a0, a1, x0 = ep_labels("a", "a-0"), ep_labels("a", "a-1"), ep_labels("x", "x-0", "gonka")
    for ep in (a0, a1):
        assert s[("infermesh_endpoint_requests_waiting", ep)] == 7.0
        assert s[("infermesh_endpoint_kv_cache_usage_ratio", ep)] == 0.625
        assert s[("infermesh_endpoint_available", ep)] == 1.0
        assert s[("infermesh_endpoint_outstanding", ep)] == 0.0
    # DCGM names only on a-1's page: mean utilisation, memory summed over GPUs in bytes
    assert s[("infermesh_endpoint_gpu_utilization_ratio", a1)] == 0.5
    assert s[("infermesh_endpoint_gpu_memory_used_bytes", a1)] == 4096 * 2**20
    assert s[("infermesh_endpoint_gpu_memory_total_bytes", a1)] == (4096 + 80896 + 78848) * 2**20
    assert ("infermesh_endpoint_gpu_utilization_ratio", a0) not in s
    assert ("infermesh_endpoint_gpu_memory_used_bytes", a0) not in s
    # an external upstream: health, no vLLM or GPU figures
    assert s[("infermesh_endpoint_available", x0)] == 1.0
    assert not any(k[1] == x0 for k in s if k[0] != "infermesh_endpoint_available"
                   and k[0] != "infermesh_endpoint_outstanding")
    assert s2[("infermesh_endpoint_outstanding", a0)] == 2.0
    # an endpoint that leaves the routing config leaves /metrics
    assert ("infermesh_endpoint_available", x0) not in s3
    assert ("infermesh_endpoint_available", a1) in s3
    # the embedded ledger ships nothing: no lag
    assert s[("infermesh_ledger_unshipped_rows", ())] == 0
    assert s[("infermesh_ledger_oldest_unshipped_age_seconds", ())] == 0


def test_an_unhealthy_endpoint_reads_zero_available():
    async def run():
        router = Router({"models": [{"id": "m", "pools": [{"name": "a", "provider": "vast", "region": "eu",
                                                            "endpoints": [{"id": "a-0", "url": "http://127.0.0.1:9"}]}]}]})
        metrics = Metrics()
        metrics.watch(router)
        async with aiohttp.ClientSession() as session:
            await router.check_all(session)
        return samples(metrics)

    s = asyncio.run(run())
    assert s[("infermesh_endpoint_available", ep_labels("a", "a-0"))] == 0.0
    assert ("infermesh_endpoint_requests_waiting", ep_labels("a", "a-0")) in s   # last known (none: 0)


def _record(ledger: Ledger, created_at: float) -> None:
    ledger.record(UsageRecord("r", "t", "k", "pro", "chat", "m", status=200, created_at=created_at))


def test_ledger_lag_counts_unshipped_rows_and_the_oldest_ones_age(tmp_path):
    from gateway.state.pg_ledger import PgShipper

    spool = tmp_path / "ledger.db"
    ledger = Ledger(spool)
    now = time.time()
    for _ in range(3):                    # from before this start: shipped or not, unknown until connected
        _record(ledger, now - 3600)
    shipper = PgShipper(spool, "postgresql://127.0.0.1:9/none", Health())
    metrics = Metrics()
    metrics.watch(shipper=shipper)
    try:
        _record(ledger, now - 120)
        _record(ledger, now - 30)
        shipper._gauge()
        s = samples(metrics)
        assert s[("infermesh_ledger_unshipped_rows", ())] == 2
        assert 119 <= s[("infermesh_ledger_oldest_unshipped_age_seconds", ())] < 130
        shipper.hwm = 1                       # connected: PostgreSQL holds row 1
        shipper._gauge()
        s = samples(metrics)
        assert s[("infermesh_ledger_unshipped_rows", ())] == 4
        assert 3599 <= s[("infermesh_ledger_oldest_unshipped_age_seconds", ())] < 3610
        shipper.hwm = 5                       # all shipped
        shipper._gauge()
        s = samples(metrics)
        assert s[("infermesh_ledger_unshipped_rows", ())] == 0
        assert s[("infermesh_ledger_oldest_unshipped_age_seconds", ())] == 0
    finally:
        shipper._reader.close()
        ledger.close()
