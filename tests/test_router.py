"""The router on its own: weights, roles, outlier ejection and the TTFT outlier test."""

from __future__ import annotations

import random
import time
from collections import Counter

from gateway.router import EJECT_AFTER_FAILURES, EJECT_BASE_S, Router


def config(east_w: float = 2, west_w: float = 1, west_role: str = "primary") -> dict:
    def pool(name, n, weight, role="primary"):
        return {"name": name, "provider": name, "region": "r", "role": role, "weight": weight,
                "endpoints": [{"id": f"{name}/{i}", "url": f"http://{name}-{i}"} for i in range(n)]}
    return {"models": [{"id": "m", "fallback": None, "pools": [
        pool("east", 2, east_w), pool("west", 1, west_w, west_role), pool("reserve", 1, 1, "standby")]}]}


def shares(router: Router, n: int = 6000) -> dict[str, float]:
    c = Counter(router.pick("m").pool.name for _ in range(n))
    return {k: v / n for k, v in c.items()}


def eps(router: Router) -> dict:
    return {ep.id: ep for ep in router.endpoints()}


def test_pool_weights_hold_whatever_the_pool_sizes():
    r = Router(config(east_w=1, west_w=3), rng=random.Random(1))
    s = shares(r)
    assert abs(s["west"] - 0.75) < 0.03 and "reserve" not in s
    # under equal load on every endpoint the weights still hold (no double counting of weight)
    for ep in r.endpoints():
        ep.outstanding = 5
    assert abs(shares(r)["west"] - 0.75) < 0.03


def test_saturated_pool_spills_to_another():
    r = Router(config(east_w=1, west_w=3), rng=random.Random(2))
    e = eps(r)
    e["west/0"].waiting, e["west/0"].outstanding = 20, 20
    assert shares(r)["east"] > 0.9


def test_drained_gets_nothing_and_standby_only_without_primaries():
    r = Router(config(west_role="drained", west_w=0), rng=random.Random(3))
    assert set(shares(r, 500)) == {"east"}
    e = eps(r)
    for i in (0, 1):
        e[f"east/{i}"].healthy = False
    assert set(shares(r, 200)) == {"reserve"}
    e["reserve/0"].healthy = False
    assert r.pick("m") is None


def test_ejection_grows_is_capped_per_pool_and_returns_after_a_check():
    r = Router(config(), rng=random.Random(4))
    e = eps(r)
    for _ in range(EJECT_AFTER_FAILURES):
        r.failure(e["east/0"])
        r.failure(e["east/1"])
    now = time.monotonic()
    assert not e["east/0"].available(now) and e["east/1"].available(now)     # half the pool at most
    assert abs(e["east/0"].ejected_until - now - EJECT_BASE_S) < 0.5
    for _ in range(EJECT_AFTER_FAILURES):                                    # a one-endpoint pool can go
        r.failure(e["west/0"])
    assert not e["west/0"].available(now)
    # after its time it still waits for a passing check
    e["west/0"].ejected_until = now - 1
    assert not e["west/0"].available(time.monotonic())
    e["west/0"].checked_at = time.monotonic()
    assert e["west/0"].available(time.monotonic())
    for _ in range(EJECT_AFTER_FAILURES):                                    # the second time: twice as long
        r.failure(e["west/0"])
    assert e["west/0"].ejected_until - time.monotonic() > 1.5 * EJECT_BASE_S


def test_slow_is_an_outlier_test():
    r = Router(config(), rng=random.Random(5))
    r.slow_s = {"m": 1.0}
    e = eps(r)
    for name in ("east/0", "east/1"):
        assert not r.observe_ttft(e[name], 0.05)
    assert not r.observe_ttft(e["west/0"], 0.5)          # under the limit
    assert r.observe_ttft(e["west/0"], 1.5)              # over it, and 30x its peers
    # the whole model slows at once: once the peers answered slowly too, nothing is an outlier
    for name in ("east/0", "east/1"):
        r.observe_ttft(e[name], 1.4)
    assert not r.observe_ttft(e["west/0"], 1.5)
    # an idle standby's fast answers (probes) are not a primary's peers
    r.observe_ttft(e["reserve/0"], 0.05)
    r.observe_ttft(e["east/1"], 1.4)
    assert not r.observe_ttft(e["east/0"], 1.5)
    # stale samples do not count: with no fresh peer only the absolute limit is left
    for name in ("east/0", "east/1"):
        e[name].ttft_at -= 60
    assert r.observe_ttft(e["west/0"], 1.5)


def test_a_slow_verdict_is_judged_again_when_the_stream_ends():
    """Everything slows at once: the first slow answer is compared with the peers' fast figures
    from before the change. By the time that stream ends the peers' own slow answers are in,
    and the relay's second look (Router.outlier) clears it, so no endpoint is ejected for it."""
    r = Router(config(), rng=random.Random(5))
    r.slow_s = {"m": 1.0}
    e = eps(r)
    for name in ("east/0", "east/1"):
        r.observe_ttft(e[name], 0.05)
    assert r.observe_ttft(e["west/0"], 1.5)             # first look: 30x the peers' old figures
    for name in ("east/0", "east/1"):
        r.observe_ttft(e[name], 1.4)                     # the peers slow down too
    assert not r.outlier(e["west/0"], 1.5)               # second look at the stream's end
    r.observe_ttft(e["east/1"], 0.05)
    r.observe_ttft(e["east/0"], 0.05)
    for name in ("east/0", "east/1"):
        e[name].ttft_ewma = e[name].ttft_last = 0.05
    assert r.outlier(e["west/0"], 1.5)                   # a real outlier stays one


def test_panic_mode_tries_ejected_endpoints_but_never_refused_ones():
    r = Router(config(), rng=random.Random(3))
    e = eps(r)
    now = time.monotonic()
    for ep in e.values():                         # every endpoint ejected by passive detection
        ep.ejections, ep.ejected_until = 1, now + 60
    e["reserve/0"].healthy, e["reserve/0"].refused = False, True   # this one refused its check
    assert r.pick("m") is None
    picked = {r.pick_panic("m").id for _ in range(200)}
    assert picked == {"east/0", "east/1", "west/0"}
    assert r.pick_panic("m", exclude={e["east/0"], e["east/1"], e["west/0"]}) is None


def two_region_router() -> Router:
    """``local`` (pools a and b) with backup ``far`` (pool c), and ``other`` (pool d)."""
    def pool(name, region):
        return {"name": name, "provider": name, "region": region, "role": "primary", "weight": 1,
                "endpoints": [{"id": f"{name}/0", "url": f"http://{name}-0"}]}
    return Router({"region_backups": {"local": "far"}, "models": [{"id": "m", "fallback": None, "pools": [
        pool("a", "local"), pool("b", "local"), pool("c", "far"), pool("d", "other")]}]}, rng=random.Random(5))


def test_before_a_model_fallback_ejected_endpoints_that_pass_checks_are_tried_region_first():
    """Router.pick_ejected: an endpoint ejected by requests (a refused connection, a reset, a 5xx)
    whose active checks still pass is tried before the request leaves its model, in its region, then
    the backup region, then anywhere; one ejected for a missed deadline, or refusing its checks, is not;
    a success ends the ejection."""
    r = Router(config(), rng=random.Random(6))
    e = eps(r)
    for ep in e.values():
        r.failure(ep, at_once=True, cause="connect: ClientConnectorError (ECONNREFUSED)")
    # at most half a pool is ejected by passive detection: east/1 stays in, so eject it by hand
    e["east/1"].ejected_until, e["east/1"].eject_cause = time.monotonic() + 60, "timeout"
    assert r.pick("m") is None
    assert {ep.eject_cause.split(":")[0] for ep in e.values()} == {"connect", "timeout"}
    picked = {r.pick_ejected("m").id for _ in range(200)}
    assert picked == {"east/0", "west/0", "reserve/0"}           # east/1 missed a deadline: not tried
    e["west/0"].healthy, e["west/0"].refused = False, True         # its check was refused: really down
    assert {r.pick_ejected("m").id for _ in range(200)} == {"east/0", "reserve/0"}
    r.success(e["east/0"])
    assert r.pick("m") is e["east/0"]

    g = two_region_router()
    e = eps(g)
    for ep in e.values():
        g.failure(ep, at_once=True, cause="reset: ServerDisconnectedError")
    assert g.pick("m", region="local") is None
    assert {g.pick_ejected("m", region="local").id for _ in range(100)} == {"a/0", "b/0"}
    assert g.pick_ejected("m", exclude={e["a/0"], e["b/0"]}, region="local").id == "c/0"   # the backup
    assert g.pick_ejected("m", exclude={e["a/0"], e["b/0"], e["c/0"]}, region="local").id == "d/0"
    assert g.pick_ejected("m", exclude=set(e.values()), region="local") is None
    g.failure(e["c/0"], at_once=True)
    e["c/0"].ejected_until, e["c/0"].eject_cause = time.monotonic() + 60, "status_429"  # overloaded: left alone
    assert g.pick_ejected("m", exclude={e["a/0"], e["b/0"]}, region="local").id == "d/0"


def test_prometheus_text_is_read_by_exact_name_with_labels_timestamps_and_junk():
    """fleet.prometheus, as the router reads a worker's load: exact names only, spaces inside label
    values, a timestamp after the value, comments and unparsable values skipped."""
    from fleet import prometheus

    text = "\n".join([
        "# HELP vllm:num_requests_waiting Requests waiting.",
        'vllm:num_requests_waiting{model_name="a b"} 3 1700000000000',
        'vllm:num_requests_waiting{model_name="c"} 2',
        "vllm:num_requests_waiting_total 99",
        "vllm:kv_cache_usage_perc 0.5",
        "vllm:kv_cache_usage_perc NaNish",
        "DCGM_FI_DEV_GPU_UTIL{gpu=\"0\"} 80",
    ])
    found = prometheus.collect(text, ("vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                                      "DCGM_FI_DEV_GPU_UTIL", "vllm:gpu_cache_usage_perc"))
    assert found == {"vllm:num_requests_waiting": [3.0, 2.0], "vllm:kv_cache_usage_perc": [0.5],
                     "DCGM_FI_DEV_GPU_UTIL": [80.0], "vllm:gpu_cache_usage_perc": []}
    assert prometheus.metric_sum(text, "vllm:num_requests_waiting") == 5.0
