"""The on-call signals on /metrics (gateway/metrics.py: endpoint load, GPU, ledger lag) and the
Grafana dashboards in monitoring/dashboards/: every metric a dashboard query names exists."""

from __future__ import annotations

import asyncio
import json
import re
import runpy
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web
from openai import NotFoundError, OpenAI
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


# ---- the dashboards ---------------------------------------------------------------------------------

DASHBOARDS = REPO / "monitoring" / "dashboards"
_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset",
             "bool", "inf", "nan", "le"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (Grafana variables allowed) reads."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                   # strings
    text = re.sub(r"\{[^}]*\}", "", text)                               # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)                              # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)   # label lists
    text = re.sub(r"\$\w+", "", text)
    names = set()
    for m in re.finditer(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?", text):
        name, call = m.group(1), m.group(2)
        if call or name in _KEYWORDS:
            continue
        names.add(name)
    return names


def queries(board: dict) -> list[str]:
    out = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    out += [v["query"]["query"] for v in board["templating"]["list"] if v["type"] == "query"]
    return out


def _label_values(q: str) -> str:
    m = re.fullmatch(r"label_values\((\w+), \w+\)", q)
    return m.group(1) if m else q


def test_metric_names_of_promql():
    assert metric_names('histogram_quantile(0.95, sum by (le, model) (rate(a_bucket{model=~"$m",x="y(z)"}[5m])))'
                        ' * on (model, pool) group_left (region) (0 * max by (model) (b{r="1"}) + 1)') == \
        {"a_bucket", "b"}
    assert metric_names("tier:x:rate1h{tier=~\"$tier\"} / on (tier) (1 - c) and d unless e offset 5m") == \
        {"tier:x:rate1h", "c", "d", "e"}


def test_dashboards_are_the_generators_output_and_well_formed():
    gen = runpy.run_path(str(DASHBOARDS / "generate.py"))
    made = gen["dashboards"]()
    assert sorted(made) == sorted(p.name for p in DASHBOARDS.glob("*.json"))
    uids = set()
    for name, text in made.items():
        assert (DASHBOARDS / name).read_text() == text, \
            f"{name} differs from monitoring/dashboards/generate.py's output: run it"
        board = json.loads(text)
        assert board["uid"] not in uids
        uids.add(board["uid"])
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids))
        assert board["templating"]["list"][0]["type"] == "datasource"
        for p in board["panels"]:
            if p["type"] == "row":
                continue
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"} and p["targets"], p["title"]
            g = p["gridPos"]
            assert g["x"] + g["w"] <= 24
    titles = {json.loads(t)["title"] for t in made.values()}
    assert titles == {"infermesh / SLO", "infermesh / Latency", "infermesh / Providers", "infermesh / Gateway"}


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_every_dashboard_query_parses(tmp_path):
    """promtool parses each query (Grafana's variables replaced by values) as a recording rule."""
    rules = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        for q in queries(json.loads(path.read_text())):
            expr = _label_values(q).replace("$__rate_interval", "5m").replace("$__range", "30d")
            expr = re.sub(r"\$\w+", ".*", expr)
            rules.append({"record": f"dashboard:q{len(rules)}", "expr": expr})
    (tmp_path / "q.yml").write_text(yaml.safe_dump({"groups": [{"name": "q", "rules": rules}]}))
    r = subprocess.run(["promtool", "check", "rules", str(tmp_path / "q.yml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def scrape(url: str, token: str) -> str:
    """GET /metrics: without a token first, then with the admin token if it is asked for."""
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.read().decode()
    except urllib.error.HTTPError as e:
        if e.code not in (401, 403):
            raise
    req = urllib.request.Request(url, headers={"authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read().decode()


def exposed(text: str) -> tuple[set[str], set[str]]:
    """Metric names /metrics declares (families and the sample names they imply), and those with samples."""
    declared, with_samples = set(), set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            declared |= {name} | ({f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else set())
            if kind == "counter":
                declared.add(name if name.endswith("_total") else f"{name}_total")
        elif line and not line.startswith("#"):
            with_samples.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
    return declared | with_samples, with_samples


def test_every_metric_a_dashboard_reads_exists_on_a_running_gateway(local_stack):
    from fleet import alerts

    client = OpenAI(base_url=local_stack.base_url, api_key=local_stack.key("dash", "pro"))
    for stream in (False, True):
        r = client.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=8, stream=stream)
        if stream:
            assert "".join(c.choices[0].delta.content or "" for c in r if c.choices)
        else:
            assert r.choices[0].message.content
    with pytest.raises(NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    names, sampled = exposed(scrape(local_stack.root_url + "/metrics", local_stack.admin_token()))
    # what the request path and the health checks write is there with samples
    for name in ("infermesh_requests_total", "infermesh_ttft_seconds_bucket", "infermesh_ttlt_seconds_bucket",
                 "infermesh_tokens_total", "infermesh_pool_healthy_endpoints", "infermesh_in_flight",
                 "infermesh_event_loop_lag_seconds", "infermesh_ledger_unshipped_rows",
                 "infermesh_ledger_oldest_unshipped_age_seconds"):
        assert name in sampled, name
    recorded = {r["record"]: r["expr"] for g in alerts.rule_groups(local_stack.spec) for r in g["rules"]
                if "record" in r}
    used: dict[str, set[str]] = {}
    for path in sorted(DASHBOARDS.glob("*.json")):
        for q in queries(json.loads(path.read_text())):
            for name in metric_names(_label_values(q)):
                used.setdefault(name, set()).add(path.name)
    assert len(used) > 25
    missing = {}
    for name, files in sorted(used.items()):
        # a recording rule of fleet/alerts.py: its inputs must exist instead
        for metric in (metric_names(recorded[name]) if name in recorded else {name}):
            if metric not in names:
                missing[metric] = sorted(files)
    assert not missing, f"dashboards read metrics the gateway does not export: {missing}"
    assert {n for n in used if ":" in n} <= set(recorded)
