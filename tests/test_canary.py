"""Canaries: decision rules (pure), CLI refusals, stack-file edits, and end to end on the local stack.

End to end, as the pipeline runs it: `infermesh canary start` edits the stack file; the running
local stack follows the file (the watcher `infermesh up` runs, fleet/local_apply.py) and starts
the canary's worker; clients keep calling the gateway; `infermesh canary evaluate --apply`
decides on the gateway's SLIs and writes promote or rollback into the file; the stack follows
again. Short windows and small sample minimums keep it quick; nothing asserts timings.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from fleet import canary as rules
from infermesh_cli import main as cli
from fleet import spec as spec_mod
from fleet.local import LocalStack
from fleet.local_apply import StackWatcher
from fleet.failover import effective_spec
from fleet.routing import canary_share, local_endpoints, routing_config
from gateway import ledger
from gateway.sli import AttemptLog, pool_slis

from .conftest import free_port_range, local_config

IMAGE = "registry.example/infermesh/worker@sha256:" + "ab" * 32
POOL = "demo-chat-east"


# ---- decision rules: hand-checked numbers -------------------------------------------------------

def test_z_test_matches_hand_computation():
    # p1 = .3, p2 = .1, pooled .2: se = sqrt(.2 * .8 * (1/100 + 1/100)) = .056569; z = .2 / se = 3.5355
    z, p = rules.z_test(30, 100, 10, 100)
    assert z == pytest.approx(3.5355, abs=1e-4)
    assert p == pytest.approx(0.000203, abs=2e-6)          # 1 - Phi(3.5355)
    assert rules.z_test(10, 100, 30, 100)[1] == pytest.approx(1 - 0.000203, abs=2e-6)  # one-sided
    assert rules.z_test(0, 100, 0, 100) == (0.0, 1.0)       # no errors anywhere: no evidence


def test_fisher_exact_matches_hand_computation():
    # N=20, K=3 errors, 10 drawn for the canary: P(X >= 3) = C(3,3) C(17,7) / C(20,10) = 19448 / 184756
    assert rules.fisher_greater(3, 10, 0, 10) == pytest.approx(19448 / 184756, rel=1e-9)
    assert rules.fisher_greater(5, 5, 0, 5) == pytest.approx(1 / 252, rel=1e-9)
    assert rules.fisher_greater(0, 10, 3, 10) == pytest.approx(1.0)
    # small expected counts pick Fisher, large ones the z-test
    assert rules.error_test(3, 10, 0, 10)[0] == "fisher"
    assert rules.error_test(30, 100, 10, 100)[0] == "z-test"


def side(pool: str, attempts: int, errors: int = 0, ttft: float = 100.0, ttlt: float = 300.0, **kw) -> rules.Side:
    return rules.Side(pool, attempts, errors, latency_samples=attempts - errors, ttft_p95_ms=ttft,
                      ttlt_p95_ms=ttlt, **kw)


def test_a_canary_like_its_baseline_is_promoted():
    d = rules.evaluate(side("p-canary", 200, 1), side("p", 2000, 8))
    assert d.action == "promote" and d.exit_code == 0
    assert "error rate 0.5% vs 0.4%" in d.reason


def test_too_few_samples_waits_and_never_promotes():
    t = rules.Thresholds(min_samples=100)
    d = rules.evaluate(side("p-canary", 99), side("p", 5000))
    assert d.action == "wait" and d.exit_code == 3 and "too few samples: canary 99" in d.reason
    # even a canary that looks better than its baseline waits
    assert rules.evaluate(side("p-canary", 50, 0, ttft=50), side("p", 5000, 50), t).action == "wait"
    assert rules.evaluate(side("p-canary", 0), side("p", 0), t).action == "wait"


def test_significantly_more_errors_roll_back_and_name_the_reason():
    d = rules.evaluate(side("p-canary", 200, 60), side("p", 2000, 20))
    assert d.action == "rollback" and d.exit_code == 4
    assert d.reason.startswith("error rate 30.0% vs 1.0%") and "z-test" in d.reason


def test_a_difference_within_noise_does_not_roll_back():
    # 12/400 vs 100/5000: pooled 112/5400 = .020741, se = sqrt(.020741 * .979259 * (1/400 + 1/5000))
    # = .0074055, z = .01 / se = 1.3503, p = .0885 > .01
    d = rules.evaluate(side("p-canary", 400, 12), side("p", 5000, 100))
    assert d.action == "promote"
    check = next(c for c in d.checks if c["check"] == "error_rate")
    assert check["method"] == "z-test"
    assert check["z"] == pytest.approx(1.3503, abs=1e-3) and check["p_value"] == pytest.approx(0.0885, abs=1e-3)
    # 3/150 vs 20/2000: an expected canary error count of 1.6 is too small for z: Fisher, and no rollback
    d = rules.evaluate(side("p-canary", 150, 3), side("p", 2000, 20))
    check = next(c for c in d.checks if c["check"] == "error_rate")
    assert d.action == "promote" and check["method"] == "fisher" and check["p_value"] > 0.1


def test_a_significant_but_negligible_difference_is_within_the_margin():
    # .15% vs .05% over huge samples: significant, but below the 0.2-point margin
    d = rules.evaluate(side("p-canary", 200_000, 300), side("p", 2_000_000, 1000))
    assert d.action == "promote"


def test_an_overwhelmingly_broken_canary_rolls_back_before_the_minimum_sample():
    d = rules.evaluate(side("p-canary", 20, 10), side("p", 400, 0), rules.Thresholds(min_samples=100))
    assert d.action == "rollback" and "error rate 50.0% vs 0.0%" in d.reason and "fisher" in d.reason
    # the same share with fewer than early_min_attempts waits
    assert rules.evaluate(side("p-canary", 10, 5), side("p", 400, 0)).action == "wait"


def test_slower_p95_ttft_or_ttlt_rolls_back():
    d = rules.evaluate(side("p-canary", 200, ttft=130), side("p", 2000, ttft=100))
    assert d.action == "rollback" and d.reason == "TTFT p95 130 ms vs 100 ms (1.30x, limit 1.2x)"
    d = rules.evaluate(side("p-canary", 200, ttlt=400), side("p", 2000, ttlt=300))
    assert d.action == "rollback" and d.reason.startswith("TTLT p95 400 ms vs 300 ms (1.33x")
    # 1.19x passes; a large ratio of tiny latencies (3 ms vs 2 ms) is within the slack
    assert rules.evaluate(side("p-canary", 200, ttft=119), side("p", 2000, ttft=100)).action == "promote"
    assert rules.evaluate(side("p-canary", 200, ttft=3, ttlt=3), side("p", 2000, ttft=2, ttlt=2)).action == "promote"


def test_probe_pass_rate_rolls_back_and_is_skipped_without_data():
    d = rules.evaluate(side("p-canary", 200, probes=10, probe_pass_rate=0.8),
                       side("p", 2000, probes=10, probe_pass_rate=1.0))
    assert d.action == "rollback" and d.reason.startswith("probe pass rate 80.0% vs 100.0%")
    d = rules.evaluate(side("p-canary", 200), side("p", 2000))
    assert next(c for c in d.checks if c["check"] == "probes")["result"] == "skipped"


def test_decide_reads_the_gateway_sli_shape():
    sli = {"pools": {"p": {"attempts": 500, "errors": 0, "latency_samples": 500, "ttft_p95_ms": 50,
                           "ttlt_p95_ms": 90},
                     "p-canary": {"attempts": 120, "errors": 0, "latency_samples": 120, "ttft_p95_ms": 51,
                                  "ttlt_p95_ms": 91}}}
    d = rules.decide(sli, "p", rules.Thresholds(min_samples=100))
    assert d.action == "promote"
    j = d.to_json()
    assert j["decision"] == "promote" and j["exit_code"] == 0 and j["canary"]["pool"] == "p-canary"
    assert rules.decide({"pools": {}}, "p").action == "wait"


# ---- SLIs from the ledger and the attempt log ----------------------------------------------------

def test_pool_slis_count_retried_failures_against_the_pool_that_failed():
    rows = [
        {"pool": "a", "status": 200, "error": None, "ttft_ms": 10, "ttlt_ms": 20, "retries": 0},
        {"pool": "a", "status": 200, "error": None, "ttft_ms": 30, "ttlt_ms": 40, "retries": 1},  # canary failed first
        {"pool": "a-canary", "status": 200, "error": None, "ttft_ms": 12, "ttlt_ms": 22, "retries": 0},
        {"pool": "a-canary", "status": 502, "error": "stream_interrupted", "ttft_ms": 12, "ttlt_ms": 30, "retries": 0},
        {"pool": "a", "status": 502, "error": "upstream_error", "ttft_ms": None, "ttlt_ms": 5, "retries": 3},
        {"pool": "", "status": 429, "error": "rate_limit_exceeded", "ttft_ms": None, "ttlt_ms": 1, "retries": 0},
    ]
    failed = {"a-canary": {"status_5xx": 1}, "a": {"status_5xx": 1, "connect": 2}}
    s = pool_slis(rows, failed)
    assert set(s) == {"a", "a-canary"}
    # canary: 2 answered rows + 1 failed attempt = 3 attempts; errors: 1 stream break + 1 failed attempt
    assert s["a-canary"]["attempts"] == 3 and s["a-canary"]["errors"] == 2
    assert s["a-canary"]["error_rate"] == pytest.approx(2 / 3, abs=1e-6)
    # baseline: 2 answered (the exhausted row's last attempt is already among the 3 failed ones)
    assert s["a"]["attempts"] == 5 and s["a"]["errors"] == 3 and s["a"]["requests"] == 3
    assert s["a"]["errors_5xx"] == 1
    # latency only from first-attempt successes
    assert s["a"]["latency_samples"] == 1 and s["a"]["ttft_p95_ms"] == 10
    assert s["a"]["probe_pass_rate"] is None


def test_attempt_log_windows():
    log = AttemptLog()
    log.failed("x", "connect", now=100.0)
    log.failed("x", "status_5xx", now=200.0)
    log.failed("y", "timeout", now=250.0)
    assert log.counts(150.0) == {"x": {"status_5xx": 1}, "y": {"timeout": 1}}


# ---- routing: the canary's share and port --------------------------------------------------------

def _spec(mutate=None) -> spec_mod.Spec:
    cfg = local_config()
    if mutate:
        mutate(cfg)
    return spec_mod.parse(cfg, "t")


def test_canary_takes_its_weight_of_the_base_pools_traffic_only():
    spec = _spec(lambda c: c.update(canary={"pool": POOL, "image": IMAGE, "weight": 30}))
    # demo-chat: east weight 2, west 1. Canary share of the model = .3 * 2/3 = .2; east keeps 2 * .7 = 1.4,
    # so east serves (1 - .2) * 1.4 / 2.4 = .4667 = .7 * 2/3 and west (1 - .2) * 1 / 2.4 = 1/3, as before.
    share, east = canary_share(spec)
    assert share == pytest.approx(0.2) and east == pytest.approx(1.4)
    ports = local_endpoints(spec, effective_spec(spec))
    plain = local_endpoints(_spec(), effective_spec(_spec()))
    assert {k: v for k, v in ports.items() if k in plain} == plain          # no existing port moved
    assert ports[(f"{POOL}-canary", 0)] == max(plain.values()) + 1
    cfg = routing_config(spec, lambda p, i: f"http://127.0.0.1:{ports[(p.name, i)]}")
    pools = {p["name"]: p for m in cfg["models"] for p in m["pools"]}
    assert pools[f"{POOL}-canary"]["weight"] == pytest.approx(0.2) and pools[POOL]["weight"] == pytest.approx(1.4)


# ---- CLI: refusals and stack-file edits ------------------------------------------------------------

@pytest.fixture
def stack_file(tmp_path) -> Path:
    d = tmp_path / "stacks"
    d.mkdir()
    src = spec_mod.stack_path("local")
    (d / "Pulumi.local.yaml").write_bytes(src.read_bytes())
    return d / "Pulumi.local.yaml"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def canary_cli(stack_file: Path, action: str, *extra: str) -> list[str]:
    return ["canary", action, "--stack", "local", "--stacks-dir", str(stack_file.parent), *extra]


@pytest.mark.parametrize("extra, message", [
    (["--pool", "nope", "--image", IMAGE], "no pool 'nope' in stack local; pools: demo-chat-east"),
    (["--pool", POOL, "--image", "registry.example/infermesh/worker:latest"], "is not pinned by digest"),
    (["--pool", POOL, "--image", "worker@sha256:abc"], "is not pinned by digest"),
    (["--pool", POOL, "--image", IMAGE, "--weight", "0"], "--weight 0 is out of range"),
    (["--pool", POOL, "--image", IMAGE, "--weight", "51"], "--weight 51 is out of range"),
    (["--pool", "demo-chat-reserve", "--image", IMAGE], "pool 'demo-chat-reserve' is standby"),
    (["--pool", POOL, "--image", IMAGE, "--sim", "speed=3"], "--sim 'speed=3': use KNOB=VALUE"),
])
def test_start_refuses_bad_input_with_one_line_and_leaves_the_file(capsys, stack_file, extra, message):
    before = stack_file.read_bytes()
    rc, out, err = run_cli(capsys, *canary_cli(stack_file, "start", *extra))
    assert rc == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert stack_file.read_bytes() == before


def test_start_then_rollback_gives_back_the_same_file(capsys, stack_file):
    before = stack_file.read_bytes()
    rc, out, _ = run_cli(capsys, *canary_cli(stack_file, "start", "--pool", POOL, "--image", IMAGE,
                                              "--weight", "10", "--sim", "error_rate=0.3"))
    assert rc == 0 and "canary started" in out
    text = stack_file.read_text()
    assert text.startswith(before.decode())          # comments and layout kept: only a block appended
    spec = spec_mod.load("local", stack_file.parent)
    assert spec.canary.pool == POOL and spec.canary.image == IMAGE and spec.canary.weight == 10
    assert spec.canary.sim.error_rate == 0.3 and spec.canary.sim.ttft_ms == spec.pool(POOL).sim.ttft_ms
    # a second canary is refused
    rc, _, err = run_cli(capsys, *canary_cli(stack_file, "start", "--pool", "demo-chat-west", "--image", IMAGE))
    assert rc == 2 and "a canary is already running in stack local (pool demo-chat-east" in err
    rc, out, _ = run_cli(capsys, *canary_cli(stack_file, "rollback"))
    assert rc == 0 and "rolled back" in out
    assert stack_file.read_bytes() == before
    for action in ("rollback", "promote"):
        rc, _, err = run_cli(capsys, *canary_cli(stack_file, action))
        assert rc == 2 and "no canary is running in stack local" in err
    assert stack_file.read_bytes() == before


def test_promote_sets_the_pools_image_and_knobs_and_removes_the_block(capsys, stack_file):
    run_cli(capsys, *canary_cli(stack_file, "start", "--pool", POOL, "--image", IMAGE, "--sim", "ttft_ms=30"))
    rc, out, _ = run_cli(capsys, *canary_cli(stack_file, "promote"))
    assert rc == 0 and "promoted" in out
    spec = spec_mod.load("local", stack_file.parent)
    assert spec.canary is None and spec.pool(POOL).image == IMAGE and spec.pool(POOL).sim.ttft_ms == 30
    assert spec.pool("demo-chat-west") == spec_mod.load("local").pool("demo-chat-west")
    text = stack_file.read_text()
    assert "infermesh:canary" not in text and text.startswith("# The local stack")


def test_edits_work_on_a_file_pyyaml_wrote(capsys, tmp_path):
    """Block lists at the key's indent, sorted keys, nested mappings: the shape tests/conftest writes."""
    d = tmp_path / "stacks"
    d.mkdir()
    path = d / "Pulumi.local.yaml"
    path.write_text(yaml.safe_dump({"config": {f"infermesh:{k}": v for k, v in local_config().items()}}))
    cmd = ["canary", "start", "--stack", "local", "--stacks-dir", str(d), "--pool", POOL, "--image", IMAGE,
           "--sim", "itl_ms=4"]
    assert run_cli(capsys, *cmd)[0] == 0
    assert run_cli(capsys, "canary", "promote", "--stack", "local", "--stacks-dir", str(d))[0] == 0
    pool = spec_mod.load("local", d).pool(POOL)
    assert pool.image == IMAGE and pool.sim.itl_ms == 4 and pool.sim.ttft_ms == 40


def test_evaluate_needs_a_canary_and_a_reachable_gateway(capsys, stack_file):
    rc, _, err = run_cli(capsys, *canary_cli(stack_file, "evaluate", "--gateway", "http://127.0.0.1:9",
                                              "--admin-token", "x"))
    assert rc == 2 and "no canary is running" in err
    run_cli(capsys, *canary_cli(stack_file, "start", "--pool", POOL, "--image", IMAGE))
    rc, _, err = run_cli(capsys, *canary_cli(stack_file, "status", "--gateway", "http://127.0.0.1:9",
                                              "--admin-token", "x"))
    assert rc == 2 and "cannot reach the gateway" in err


# ---- end to end on the local stack ----------------------------------------------------------------

def mutate_for_load(ttft_ms: float = 200):
    """Roomy limits for a load test; sim pools slow enough that scheduling noise is small next to TTFT."""
    def mutate(cfg: dict) -> None:
        for t in cfg["tiers"]:
            t["rpm"], t["tpm"] = 1_000_000, 1_000_000_000
        for p in cfg["pools"]:
            p["sim"] = {"ttft_ms": ttft_ms, "itl_ms": 4, "output_tokens": 6}
        cfg["gateway"] = {**cfg.get("gateway", {}), "drain_timeout_s": 10}
    return mutate


class Load:
    """Clients streaming chat completions at the gateway until stopped; every answer is checked."""

    def __init__(self, base_url: str, key: str, threads: int = 12) -> None:
        self.base_url, self.key = base_url, key
        self.results: list[tuple[int, str]] = []
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        self.lock = threading.Lock()

    def _one(self) -> tuple[int, str]:
        body = json.dumps({"model": "demo-chat", "stream": True, "max_tokens": 6,
                           "messages": [{"role": "user", "content": "hello canary"}]}).encode()
        req = urllib.request.Request(self.base_url + "/chat/completions", data=body, method="POST",
                                     headers={"authorization": f"Bearer {self.key}",
                                              "content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                text = r.read().decode()
            if '"error"' in text or not text.rstrip().endswith("data: [DONE]"):
                return 200, "error event: " + text[-200:]
            return 200, ""
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()[:200]
        except OSError as e:
            return 0, repr(e)

    def _run(self) -> None:
        while not self.stop_event.is_set():
            res = self._one()
            with self.lock:
                self.results.append(res)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(30)

    def failures(self) -> list[tuple[int, str]]:
        with self.lock:
            return [r for r in self.results if r != (200, "")]


@contextlib.contextmanager
def following(running):
    """What `infermesh up` does: poll the stack file and apply changes to the running stack."""
    lines: list[str] = []
    path = spec_mod.stack_path("test", running.stacks_dir)
    watcher = StackWatcher(running.stack, path, lambda: spec_mod.load("test", running.stacks_dir), lines.append)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            watcher.poll()
            time.sleep(0.2)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield watcher, lines
    finally:
        stop.set()
        t.join(60)


def admin_get(running, path: str) -> dict:
    req = urllib.request.Request(running.root_url + path, headers={"authorization": f"Bearer {running.admin_token()}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def routed_pools(running) -> set[str]:
    return {p["pool"] for p in admin_get(running, "/admin/endpoints")["pools"]}


def wait_for(cond, timeout: float = 60.0, what: str = "condition", explain=None) -> None:
    """Wait for ``cond()``; on timeout, fail naming ``what`` and what ``explain()`` says of the state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}" + (f"\n{explain()}" if explain else ""))


def cli_args(running, action: str, *extra: str) -> list[str]:
    return ["canary", action, "--stack", "test", "--stacks-dir", str(running.stacks_dir), *extra]


def evaluate_until_decided(capsys, running, min_samples: int, timeout: float = 90.0) -> tuple[int, dict]:
    """`infermesh canary evaluate --apply --json` every second while it says wait (exit 3)."""
    deadline = time.monotonic() + timeout
    while True:
        rc = cli.main(cli_args(running, "evaluate", "--gateway", running.root_url, "--admin-token",
                               running.admin_token(), "--window", "120", "--min-samples", str(min_samples),
                               "--json", "--apply"))
        out, err = capsys.readouterr()
        assert rc in (0, 3, 4), err
        decision = json.loads(out)
        if rc != 3 or time.monotonic() > deadline:
            return rc, decision
        assert decision["decision"] == "wait" and decision["applied"] is None
        time.sleep(1.0)


def start_canary(capsys, running, *extra: str) -> float:
    rc = cli.main(cli_args(running, "start", "--pool", POOL, "--image", IMAGE, *extra))
    out = capsys.readouterr()
    assert rc == 0 and "canary started" in out.out, out.err
    wait_for(lambda: f"{POOL}-canary" in routed_pools(running), what="the canary in the gateway's routing")
    return time.time()


def canary_gone(running) -> bool:
    return (f"{POOL}-canary" not in routed_pools(running)
            and not any(n.startswith(f"{POOL}-canary") for n, _ in running.stack.procs))


def test_good_canary_gets_its_share_and_is_promoted_with_no_failed_request(capsys, stack_factory):
    running = stack_factory(mutate_for_load())
    key = running.key("acme", "business")
    with following(running) as (watcher, lines), Load(running.base_url, key) as load:
        wait_for(lambda: len(load.results) > 30, what="traffic before the canary")
        started = start_canary(capsys, running, "--weight", "30")
        rc, decision = evaluate_until_decided(capsys, running, min_samples=80)
        ended = time.time()
        assert (rc, decision["decision"]) == (0, "promote"), decision
        assert decision["applied"] == "promote" and decision["canary"]["attempts"] >= 80
        wait_for(lambda: canary_gone(running), what="the canary worker to drain and stop")
        time.sleep(1.0)
    assert watcher.last_error is None, lines
    assert load.failures() == [], load.failures()[:5]       # no client request failed across both switches
    spec = spec_mod.load("test", running.stacks_dir)
    assert spec.canary is None and spec.pool(POOL).image == IMAGE
    # The canary's share of demo-chat while it ran: .3 x (2 / 3) = .2 of the model's requests.
    # Binomial tolerance: |observed - n p| <= 4 sigma, sigma = sqrt(n p (1 - p)).
    rows = [r for r in ledger.query(running.state / "ledger.db", since=started + 0.5)
            if r["created_at"] < ended and r["requested_model"] == "demo-chat" and r["status"] == 200]
    n = len(rows)
    k = sum(1 for r in rows if r["pool"] == f"{POOL}-canary")
    p = 0.2
    print(f"canary share {k}/{n} = {k / max(n, 1):.3f} (expected {p}); decision: {decision['reason']}")
    assert n >= 200
    assert abs(k - n * p) <= 4 * math.sqrt(n * p * (1 - p)), (k, n)


@pytest.mark.parametrize("knobs, reason", [
    (["error_rate=0.3"], "error rate"),
    (["ttft_ms=280"], "TTFT p95"),                # 1.4x the baseline knob (200 ms): 1.3x+ measured
], ids=["errors", "slow-ttft"])
def test_bad_canary_is_rolled_back_automatically_and_names_the_reason(capsys, stack_factory, knobs, reason):
    running = stack_factory(mutate_for_load())
    key = running.key("acme", "business")
    with following(running) as (watcher, lines), Load(running.base_url, key) as load:
        wait_for(lambda: len(load.results) > 30, what="traffic before the canary")
        start_canary(capsys, running, "--weight", "40", *[a for k in knobs for a in ("--sim", k)])
        rc, decision = evaluate_until_decided(capsys, running, min_samples=60)
        assert (rc, decision["decision"]) == (4, "rollback"), decision
        print(f"decision: {decision['reason']}")
        assert decision["reason"].startswith(reason) and decision["applied"] == "rollback"
        wait_for(lambda: canary_gone(running), what="the canary worker to drain and stop")
    assert watcher.last_error is None, lines
    # the canary's failures were retried on the baseline before the first byte: no client saw one
    assert load.failures() == [], load.failures()[:5]
    spec = spec_mod.load("test", running.stacks_dir)
    assert spec.canary is None and spec.pool(POOL).image is None


def test_too_little_traffic_waits_and_never_promotes(capsys, stack_factory):
    running = stack_factory(mutate_for_load(ttft_ms=20))
    key = running.key("acme", "business")
    with following(running):
        start_canary(capsys, running, "--weight", "50")
        with Load(running.base_url, key, threads=2) as load:
            wait_for(lambda: len(load.results) >= 40, what="a little traffic")
        for _ in range(3):
            rc = cli.main(cli_args(running, "evaluate", "--gateway", running.root_url, "--admin-token",
                                   running.admin_token(), "--window", "120", "--min-samples", "500", "--apply"))
            out = capsys.readouterr().out
            assert rc == 3 and out.startswith("wait: too few samples: canary ") and "written" not in out
        rc = cli.main(cli_args(running, "status", "--gateway", running.root_url, "--admin-token",
                               running.admin_token(), "--min-samples", "500", "--json"))
        status = json.loads(capsys.readouterr().out)
        assert rc == 3 and status["decision"] == "wait" and 0 < status["canary"]["attempts"] < 500
        assert spec_mod.load("test", running.stacks_dir).canary is not None     # nothing promoted
        assert cli.main(cli_args(running, "rollback")) == 0
        wait_for(lambda: canary_gone(running), what="the canary to stop")
    assert load.failures() == []


def test_a_broken_stack_file_keeps_the_running_stack(capsys, stack_factory):
    running = stack_factory()
    path = spec_mod.stack_path("test", running.stacks_dir)
    with following(running) as (watcher, lines):
        good = path.read_text()
        path.write_text(good.replace("infermesh:pools:", "infermesh:poolz:"))
        wait_for(lambda: watcher.last_error is not None, what="the bad file to be noticed")
        assert len(lines) == 1 and "keeping the running stack" in lines[0] and "\n" not in lines[0]
        assert POOL in routed_pools(running)
        path.write_text(good)


def test_admin_sli_needs_the_admin_token_and_a_sane_window(local_stack):
    req = urllib.request.Request(local_stack.root_url + "/admin/sli")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as e:
        admin_get(local_stack, "/admin/sli?window=0")
    assert e.value.code == 400
    body = admin_get(local_stack, "/admin/sli?window=60")
    assert body["window_s"] == 60 and isinstance(body["pools"], dict) and body["probes_available"] in (True, False)


def test_infermesh_up_follows_its_stack_file(capsys, tmp_path):
    """The real `infermesh up`: a canary start and a rollback in the file start and stop the canary's
    worker; a broken file is reported in one line and changes nothing; SIGTERM still stops all."""
    import os
    import queue
    import signal
    import subprocess
    import sys

    from .conftest import REPO, free_port, free_port_range, kill_tree

    stacks = tmp_path / "stacks"
    stacks.mkdir()
    path = stacks / "Pulumi.local.yaml"
    path.write_bytes(spec_mod.stack_path("local").read_bytes())
    env = {**os.environ, "INFERMESH_STATE_DIR": str(tmp_path / "state")}
    port, base = free_port(), free_port_range(12)
    proc = subprocess.Popen([sys.executable, "-m", "infermesh_cli", "up", "--stack", "local",
                             "--stacks-dir", str(stacks), "--port", str(port), "--port-base", str(base)],
                            cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()

    def expect(pred, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                assert proc.poll() is None, "infermesh up exited"
                continue
            if pred(line):
                return line
        raise AssertionError("expected line not printed")

    def children() -> list[int]:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True).stdout
        return [int(x) for x in out.split()]

    # the shipped local stack's workers (however many pools it declares) and the gateway
    workers = sum(p.replicas for p in spec_mod.load("local", stacks).pools)
    try:
        expect(lambda ln: ln.startswith("{"))
        assert len(children()) == workers + 1
        args = ["canary", "start", "--stack", "local", "--stacks-dir", str(stacks), "--pool", POOL, "--image", IMAGE]
        assert cli.main(args) == 0
        expect(lambda ln: f"started {POOL}-canary-0" in ln)
        assert len(children()) == workers + 2
        worker = f"https://127.0.0.1:{base + workers}/health"        # after the declared workers, on mutual TLS
        [tls] = (tmp_path / "state").rglob("tls")                         # the certificates `infermesh up` made
        from fleet.channel import CLIENT_CERT, CLIENT_KEY, client_context
        ctx = client_context(tls / "ca.crt", tls / CLIENT_CERT, tls / CLIENT_KEY)
        with urllib.request.urlopen(worker, timeout=5, context=ctx) as r:
            assert r.status == 200
        assert cli.main(["canary", "rollback", "--stack", "local", "--stacks-dir", str(stacks)]) == 0
        expect(lambda ln: f"stopped {POOL}-canary-0 (drained)" in ln)
        wait_for(lambda: len(children()) == workers + 1, what="the canary worker to exit")
        good = path.read_text()
        path.write_text(good.replace("replicas: 2", "replicas: -2"))
        line = expect(lambda ln: "keeping the running stack" in ln)
        assert "replicas" in line and len(children()) == workers + 1
        capsys.readouterr()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        kill_tree(proc)          # with the workers and the gateway it started, whatever failed above


def test_promoting_new_knobs_replaces_the_pools_workers_without_a_failed_request(capsys, stack_factory):
    """A promotion that changes how the pool's workers run (new sim knobs, as a new image would)
    replaces them one by one under load: parked on a spare port, switched, drained, moved back."""
    running = stack_factory(mutate_for_load(ttft_ms=50))
    key = running.key("acme", "business")
    with following(running) as (watcher, lines), Load(running.base_url, key, threads=8) as load:
        start_canary(capsys, running, "--weight", "20", "--sim", "itl_ms=3")
        assert cli.main(cli_args(running, "promote")) == 0
        wait_for(lambda: any("replaced demo-chat-east-0, demo-chat-east-1" in ln for ln in lines),
                 what="the pool's workers to be replaced")
        wait_for(lambda: canary_gone(running), what="the canary to stop")
        time.sleep(1.0)
    assert watcher.last_error is None, lines
    assert load.failures() == [], load.failures()[:5]
    for i in (0, 1):       # back on their declared ports, running the promoted knobs
        with urllib.request.urlopen(running.worker_url(POOL, i) + "/sim/faults", timeout=5) as r:
            assert json.loads(r.read())["effective"]["itl_ms"] == 3
    eps = {p["pool"]: p for p in admin_get(running, "/admin/endpoints")["pools"]}
    assert [e["url"] for e in eps[POOL]["endpoints"]] == [running.worker_url(POOL, i) for i in (0, 1)]


# ---- fleet-wide SLIs: every replica's /metrics ---------------------------------------------------------

METRICS_TEXT = """\
# TYPE infermesh_requests counter
infermesh_requests_total{model="m",pool="p",provider="x",route="chat",status_class="2xx",tier="pro"} 90
infermesh_requests_total{model="m",pool="p",provider="x",route="chat",status_class="5xx",tier="pro"} 4
infermesh_requests_total{model="m",pool="p-canary",provider="x",route="chat",status_class="2xx",tier="pro"} 20
# TYPE infermesh_upstream_errors counter
infermesh_upstream_errors_total{error_class="http_500",model="m",pool="p-canary",provider="x",region="r"} 9
infermesh_upstream_errors_total{error_class="connect",model="m",pool="p",provider="x",region="r"} 3
infermesh_upstream_errors_total{error_class="stream_reset",model="m",pool="p",provider="x",region="r"} 1
infermesh_upstream_errors_total{error_class="slow_ttft",model="m",pool="p",provider="x",region="r"} 7
# TYPE infermesh_ttft_seconds histogram
infermesh_ttft_seconds_bucket{le="0.1",model="m",pool="p",tier="pro"} 0
infermesh_ttft_seconds_bucket{le="0.25",model="m",pool="p",tier="pro"} 90
infermesh_ttft_seconds_bucket{le="+Inf",model="m",pool="p",tier="pro"} 90
infermesh_ttft_seconds_count{model="m",pool="p",tier="pro"} 90
"""


def test_fleet_sides_follow_the_sli_definitions():
    samples = rules.parse_metrics(METRICS_TEXT)
    canary, base = rules.fleet_sides(samples, "p")
    # baseline: 94 served, 4 of them 5xx of which 1 a broken stream -> 3 retried-out requests whose last
    # attempt is among the 3 connect failures: attempts 94 - 3 + 3 = 94, errors 3 + 1; slow_ttft is no error
    assert (base.attempts, base.errors) == (94, 4)
    assert (canary.attempts, canary.errors) == (29, 9)
    assert base.latency_samples == 90 and base.ttft_p95_ms == pytest.approx(100 + 150 * 0.95)
    # two replicas' counters add up before any rate is taken; a restarted replica's counter counts whole
    twice = rules.add(rules.add({}, samples), samples)
    assert rules.fleet_sides(twice, "p")[0].attempts == 58
    later = {k: v * 3 for k, v in samples.items()}
    assert rules.increase(later, samples) == {k: v * 2 for k, v in samples.items()}
    assert rules.increase(samples, later) == samples


def test_histogram_quantile_matches_prometheus():
    assert rules.histogram_quantile(0.95, {0.1: 0, 0.25: 100, math.inf: 100}) == pytest.approx(0.2425)
    assert rules.histogram_quantile(0.5, {0.1: 50, 0.25: 100, math.inf: 100}) == pytest.approx(0.1)
    assert rules.histogram_quantile(0.95, {0.1: 0, math.inf: 10}) == 0.1          # +Inf: the last finite bound
    assert rules.histogram_quantile(0.95, {0.1: 0, math.inf: 0}) is None


def test_evaluate_that_cannot_reach_its_slis_rolls_the_canary_back(capsys, stack_file):
    run_cli(capsys, *canary_cli(stack_file, "start", "--pool", POOL, "--image", IMAGE))
    for source in (["--gateway", "http://127.0.0.1:9", "--admin-token", "x"],
                   ["--replica", "http://127.0.0.1:9"]):
        rc, out, err = run_cli(capsys, *canary_cli(stack_file, "evaluate", *source, "--json"))
        decision = json.loads(out)
        assert rc == 4 and decision["decision"] == "rollback" and "cannot read the canary's SLIs" in decision["reason"]
        assert "127.0.0.1:9" in decision["reason"] and decision["applied"] is None and "Traceback" not in err
    rc, out, _ = run_cli(capsys, *canary_cli(stack_file, "evaluate", "--replica", "http://127.0.0.1:9", "--apply"))
    assert rc == 4 and out.startswith("rollback: cannot read the canary's SLIs") and "[rollback written" in out
    assert spec_mod.load("local", stack_file.parent).canary is None


def test_a_cluster_stack_without_an_sli_source_is_one_line(capsys, tmp_path):
    d = tmp_path / "stacks"
    d.mkdir()
    text = spec_mod.stack_path("staging").read_text()
    (d / "Pulumi.staging.yaml").write_text(text)
    rc = cli.main(["canary", "start", "--stack", "staging", "--stacks-dir", str(d), "--pool",
                   spec_mod.load("staging").pools[0].name, "--image", IMAGE])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    rc, _, err = run_cli(capsys, "canary", "evaluate", "--stack", "staging", "--stacks-dir", str(d))
    assert rc == 2 and err.count("\n") == 1 and "--kube-api" in err and "docs/ci.md#canary" in err


def test_prometheus_answers_become_the_same_sides(monkeypatch):
    """The four PromQL queries' answers (the documented /api/v1/query vector shape) feed the same sums."""
    from infermesh_cli.commands import canary as cmd

    samples = rules.parse_metrics(METRICS_TEXT)
    asked: list[str] = []

    def fake_get(url, headers=None, timeout=10.0):
        import urllib.parse as up
        query = up.parse_qs(up.urlparse(url).query)["query"][0]
        asked.append(query)
        assert headers == {"authorization": "Bearer tok"}
        name = next(n for n in cmd.Prometheus.QUERIES if f"({n}{{" in query)
        by = query.split("sum by (")[1].split(")")[0].split(", ")
        agg: dict = {}
        for (n, labels), v in samples.items():
            if n == name:
                key = tuple((k, val) for k, val in labels if k in by)
                agg[key] = agg.get(key, 0.0) + v
        return json.dumps({"status": "success", "data": {"resultType": "vector", "result": [
            {"metric": dict(k), "value": [1.0, str(v)]} for k, v in agg.items()]}}).encode()

    monkeypatch.setattr(cmd, "_get", fake_get)
    prom = cmd.Prometheus("http://prom.example", "infermesh", 600, "tok")
    assert rules.fleet_sides(prom.samples(), "p") == rules.fleet_sides(samples, "p")
    assert all('namespace="infermesh"' in q and "[600s]" in q for q in asked) and len(asked) == 4


# ---- end to end on a local-ha stack: three gateway replicas on shared state -----------------------------

HA = "ha-canary"


@dataclass
class HaStack:
    stack: LocalStack
    stacks_dir: Path
    key: str

    def replica_root(self, i: int) -> str:
        return self.stack.replica_url(i).removesuffix("/v1")


@pytest.fixture(scope="module")
def ha(tmp_path_factory):
    """stacks/Pulumi.local-ha.yaml's shape: three gateway processes on a redis-server of the test's own
    and a database of its own on the machine's PostgreSQL (as tests/test_shared_state.py runs them)."""
    shared = pytest.importorskip("tests.test_shared_state")
    import shutil as _shutil
    if _shutil.which("redis-server") is None or not shared._pg_available():
        pytest.skip("needs redis-server and PostgreSQL on 127.0.0.1:5432")
    import secrets as _secrets

    from gateway.state import key_admin

    tmp = tmp_path_factory.mktemp("ha-canary")
    db = f"im_test_{_secrets.token_hex(4)}"
    redis = shared.RedisServer(tmp)
    redis.start()
    config = spec_mod.read_config(spec_mod.stack_path("local-ha"))
    for t in config["tiers"]:
        t["rpm"], t["tpm"] = 1_000_000, 1_000_000_000
    for p in config["pools"]:
        p["sim"] = {"ttft_ms": 60, "itl_ms": 4, "output_tokens": 6}
    workers = sum(p.get("replicas", 1) for p in config["pools"])
    base = free_port_range(workers + 8)
    config["local_port_base"] = base
    config["gateway"] = {**config["gateway"], "port": base + workers + 3, "health_interval_s": 1,
                         "drain_timeout_s": 10,
                         "state": {"limits": "redis", "ledger": "postgres",
                                   "redis_url": f"redis://127.0.0.1:{redis.port}/0",
                                   "postgres_dsn": f"postgresql://postgres@127.0.0.1:5432/{db}"}}
    stacks_dir = tmp / "stacks"
    stacks_dir.mkdir()
    (stacks_dir / f"Pulumi.{HA}.yaml").write_text(
        yaml.safe_dump({"config": {f"infermesh:{k}": v for k, v in config.items()}}))
    spec = spec_mod.load(HA, stacks_dir)
    stack = LocalStack(spec, tmp / "state", stacks_dir=stacks_dir)    # replicas on the gateway port + 1 + i
    try:
        stack.start()
        admin = key_admin(spec, stack.state)
        try:
            key = admin.create("acme", "business")[0]
        finally:
            admin.close()
        running = HaStack(stack, stacks_dir, key)
        wait_for(lambda: all(key_works(running, i) for i in range(3)), what="every replica to know the key")
        # the canary CLI reads /metrics with the stack's admin token, as the deploy job does
        old = os.environ.get("INFERMESH_ADMIN_TOKEN")
        os.environ["INFERMESH_ADMIN_TOKEN"] = (stack.state / "admin.token").read_text().strip()
        try:
            yield running
        finally:
            if old is None:
                os.environ.pop("INFERMESH_ADMIN_TOKEN", None)
            else:
                os.environ["INFERMESH_ADMIN_TOKEN"] = old
    finally:
        stack.stop()
        redis.stop()
        psycopg = pytest.importorskip("psycopg")
        with psycopg.connect(shared.PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def key_works(ha: HaStack, i: int) -> bool:
    """Replicas read new keys from PostgreSQL within about a second (docs/shared-state.md)."""
    req = urllib.request.Request(ha.stack.replica_url(i) + "/models", headers={"authorization": f"Bearer {ha.key}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


class SpreadLoad(Load):
    """Load sent to each replica's own port in turn, so every replica makes attempts of its own."""

    def __init__(self, urls: list[str], key: str, threads: int = 12) -> None:
        super().__init__(urls[0], key, threads)
        self.urls = urls
        self.turn = 0

    def _one(self) -> tuple[int, str]:
        with self.lock:
            self.turn += 1
            url = self.urls[self.turn % len(self.urls)]
        self.base_url = url
        return super()._one()


def ha_cli(ha: HaStack, action: str, *extra: str) -> list[str]:
    return ["canary", action, "--stack", HA, "--stacks-dir", str(ha.stacks_dir), *extra]


@contextlib.contextmanager
def ha_following(ha: HaStack):
    path = spec_mod.stack_path(HA, ha.stacks_dir)
    lines: list[str] = []
    watcher = StackWatcher(ha.stack, path, lambda: spec_mod.load(HA, ha.stacks_dir), lines.append)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            watcher.poll()
            time.sleep(0.2)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield watcher, lines
    finally:
        stop.set()
        t.join(60)


def replica_pools(ha: HaStack, i: int) -> set[str]:
    token = (ha.stack.state / "admin.token").read_text().strip()
    req = urllib.request.Request(ha.replica_root(i) + "/admin/endpoints", headers={"authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return {p["pool"] for p in json.loads(r.read())["pools"]}


def test_bad_canary_on_three_replicas_is_judged_on_all_their_counters_and_rolled_back(capsys, ha):
    urls = [ha.stack.replica_url(i) for i in range(3)]
    with ha_following(ha) as (watcher, lines), SpreadLoad(urls, ha.key) as load:
        wait_for(lambda: len(load.results) > 30, what="traffic before the canary")
        rc = cli.main(ha_cli(ha, "start", "--pool", POOL, "--image", IMAGE, "--weight", "40",
                             "--sim", "error_rate=0.3"))
        assert rc == 0, capsys.readouterr().err
        wait_for(lambda: all(f"{POOL}-canary" in replica_pools(ha, i) for i in range(3)),
                 what="the canary in every replica's routing")
        # one gateway's /admin/sli cannot judge a three-replica canary: refused in one line
        rc = cli.main(ha_cli(ha, "evaluate", "--gateway", ha.replica_root(0), "--admin-token", "x"))
        err = capsys.readouterr().err
        assert rc == 2 and "runs 3 gateway replicas" in err and err.count("\n") == 1
        deadline = time.monotonic() + 120
        while True:
            # no source named: a local stack's SLIs come from every one of its gateway processes
            rc = cli.main(ha_cli(ha, "evaluate", "--min-samples", "60", "--json", "--apply"))
            out, err = capsys.readouterr()
            assert rc in (3, 4), err
            decision = json.loads(out)
            if rc == 4 or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        assert (rc, decision["decision"]) == (4, "rollback"), decision
        with capsys.disabled():
            print(f"\ndecision: {decision['reason']}; per replica: {decision['source']['replicas']}")
        assert decision["reason"].startswith("error rate") and decision["applied"] == "rollback"
        replicas = decision["source"]["replicas"]
        assert decision["source"]["kind"] == "replicas" and len(replicas) == 3
        assert [r["replica"] for r in replicas] == [ha.replica_root(i) for i in range(3)]
        # every replica made canary attempts of its own, and the decision counted all of them
        assert all(r["canary_attempts"] > 0 and r["baseline_attempts"] > 0 for r in replicas), replicas
        assert sum(r["canary_attempts"] for r in replicas) == decision["canary"]["attempts"]
        assert sum(r["canary_errors"] for r in replicas) == decision["canary"]["errors"]
        assert sum(r["baseline_attempts"] for r in replicas) == decision["baseline"]["attempts"]
        assert max(r["canary_attempts"] for r in replicas) < decision["canary"]["attempts"]
        wait_for(lambda: not any(f"{POOL}-canary" in replica_pools(ha, i) for i in range(3)),
                 what="the canary out of every replica's routing")
    assert watcher.last_error is None, lines
    assert spec_mod.load(HA, ha.stacks_dir).canary is None
    assert load.failures() == [], load.failures()[:5]      # the canary's failures were retried before a byte


@pytest.fixture(scope="module")
def prometheus(ha, tmp_path_factory):
    """A Prometheus of the test's own scraping the three gateway processes every second, with the
    `namespace` label a Kubernetes scrape config keeps (the queries filter on it)."""
    import shutil as _shutil

    exe = _shutil.which("prometheus")
    if exe is None:
        pytest.skip("prometheus is not installed (scripts/install-system-deps.sh installs it)")
    import subprocess as _sp

    from .conftest import free_port

    tmp = tmp_path_factory.mktemp("prometheus")
    targets = [ha.replica_root(i).removeprefix("http://") for i in range(3)]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "infermesh-gateway",
                            "authorization": {"credentials": (ha.stack.state / "admin.token").read_text().strip()},
                            "static_configs": [
            {"targets": targets, "labels": {"namespace": ha.stack.spec.gateway.namespace}}]}]}))
    port = free_port()
    proc = _sp.Popen([exe, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
                      f"--web.listen-address=127.0.0.1:{port}"], stdout=_sp.DEVNULL, stderr=_sp.DEVNULL,
                     start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def scraping() -> bool:
        try:
            with urllib.request.urlopen(url + "/api/v1/targets", timeout=2) as r:
                active = json.loads(r.read())["data"]["activeTargets"]
            return len(active) == 3 and all(t["health"] == "up" for t in active)
        except (OSError, ValueError, KeyError):
            return False

    try:
        wait_for(scraping, timeout=60, what="Prometheus scraping the three replicas")
        yield url
    finally:
        proc.terminate()
        proc.wait(15)


def test_a_bad_canary_judged_through_the_stacks_prometheus_is_rolled_back(capsys, ha, prometheus):
    """The production path: a real Prometheus scrapes every replica; `evaluate` asks it for the
    per-pool increases over the window, summed over the replicas, and decides on them."""
    urls = [ha.stack.replica_url(i) for i in range(3)]
    with ha_following(ha) as (watcher, lines), SpreadLoad(urls, ha.key) as load:
        wait_for(lambda: len(load.results) > 30, what="traffic before the canary")
        rc = cli.main(ha_cli(ha, "start", "--pool", POOL, "--image", IMAGE, "--weight", "40",
                             "--sim", "error_rate=0.3"))
        assert rc == 0, capsys.readouterr().err
        wait_for(lambda: all(f"{POOL}-canary" in replica_pools(ha, i) for i in range(3)),
                 what="the canary in every replica's routing")
        capsys.readouterr()
        deadline = time.monotonic() + 120
        while True:
            rc = cli.main(ha_cli(ha, "evaluate", "--prometheus", prometheus, "--window", "60", "--min-samples", "60",
                                 "--json", "--apply"))
            out, err = capsys.readouterr()
            assert rc in (3, 4), err
            decision = json.loads(out)
            if rc == 4 or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        with capsys.disabled():
            print(f"\ndecision through Prometheus: {decision['reason']}")
        assert (rc, decision["decision"], decision["applied"]) == (4, "rollback", "rollback"), decision
        assert decision["reason"].startswith("error rate")
        assert decision["source"] == {"kind": "prometheus", "url": prometheus, "window_s": 60.0}
        wait_for(lambda: not any(f"{POOL}-canary" in replica_pools(ha, i) for i in range(3)),
                 what="the canary out of every replica's routing")
    assert watcher.last_error is None, lines
    assert load.failures() == [], load.failures()[:5]
    # a Prometheus that does not answer: the evaluation cannot read its SLIs and rolls back
    rc = cli.main(ha_cli(ha, "start", "--pool", POOL, "--image", IMAGE, "--weight", "10"))
    assert rc == 0
    capsys.readouterr()
    rc = cli.main(ha_cli(ha, "evaluate", "--prometheus", "http://127.0.0.1:9", "--json", "--apply"))
    decision = json.loads(capsys.readouterr().out)
    assert rc == 4 and decision["applied"] == "rollback" and "cannot read the canary's SLIs" in decision["reason"]
    assert spec_mod.load(HA, ha.stacks_dir).canary is None


class FakeKubeApi:
    """The two Kubernetes API paths `--kube-api` reads (the namespace's pod list by label, and the pod
    proxy to a pod's port), as `kubectl proxy` serves them, with the stack's real gateway processes as
    the pods. A fourth pod is Running but not Ready (a rollout's new pod): it must not be read."""

    def __init__(self, ha: HaStack) -> None:
        import http.server

        spec = ha.stack.spec
        self.ns, self.port = spec.gateway.namespace, spec.gateway.port
        self.pods = {f"infermesh-gateway-{i}": ha.replica_root(i) for i in range(3)}
        self.asked: list[str] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a) -> None:
                pass

            def do_GET(self) -> None:
                fake.asked.append(self.path)
                base = f"/api/v1/namespaces/{fake.ns}/pods"
                if self.path == f"{base}?labelSelector=app.kubernetes.io%2Fname%3Dinfermesh-gateway":
                    items = [{"metadata": {"name": n}, "status": {"phase": "Running", "conditions": [
                        {"type": "Ready", "status": "True"}]}} for n in fake.pods]
                    items.append({"metadata": {"name": "infermesh-gateway-new"}, "status": {
                        "phase": "Running", "conditions": [{"type": "Ready", "status": "False"}]}})
                    body, code = json.dumps({"kind": "PodList", "items": items}).encode(), 200
                else:
                    m = re.fullmatch(rf"{base}/([\w-]+):(\d+)/proxy/metrics", self.path)
                    if m and m.group(1) in fake.pods and int(m.group(2)) == fake.port:
                        # the API server drops Authorization (it authenticated the caller); other headers pass
                        token = self.headers.get("x-infermesh-admin-token")
                        req = urllib.request.Request(fake.pods[m.group(1)] + "/metrics",
                                                     headers={"x-infermesh-admin-token": token} if token else {})
                        with urllib.request.urlopen(req, timeout=10) as r:
                            body, code = r.read(), 200
                    else:
                        body, code = b'{"kind":"Status","code":404}', 404
                self.send_response(code)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_all_pods_through_the_kubernetes_api_read_the_same_counters(capsys, ha):
    """`--kube-api` (what the canary workflow uses with `kubectl proxy`) finds the ready gateway pods by
    the label GatewayFleet gives them and reads each one: the same sums as reading the replicas."""
    rc = cli.main(ha_cli(ha, "start", "--pool", POOL, "--image", IMAGE, "--weight", "10"))
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    api = FakeKubeApi(ha)
    try:
        rc = cli.main(ha_cli(ha, "status", "--kube-api", api.url, "--json"))
        kube = json.loads(capsys.readouterr().out)
        rc_local = cli.main(ha_cli(ha, "status", "--json"))
        local = json.loads(capsys.readouterr().out)
    finally:
        api.close()
        assert cli.main(ha_cli(ha, "rollback")) == 0
        capsys.readouterr()
    assert rc == rc_local and kube["source"]["kind"] == "kubernetes-pods"
    assert [r["replica"] for r in kube["source"]["replicas"]] == list(api.pods)        # not the unready pod
    assert not any("infermesh-gateway-new" in p for p in api.asked)
    assert kube["baseline"] == local["baseline"] and kube["canary"] == local["canary"]
    assert kube["baseline"]["attempts"] > 0          # the first test's traffic, counted on all three


def test_a_replica_that_cannot_be_read_rolls_the_canary_back(capsys, ha):
    with ha_following(ha) as (watcher, lines):
        rc = cli.main(ha_cli(ha, "start", "--pool", POOL, "--image", IMAGE, "--weight", "10"))
        assert rc == 0, capsys.readouterr().err
        wait_for(lambda: all(f"{POOL}-canary" in replica_pools(ha, i) for i in range(3)),
                 what="the canary in every replica's routing")
        capsys.readouterr()
        # one replica stops answering (SIGSTOP: alive, its port open, nothing answers) while the others are fine
        proc = next(p for n, p in ha.stack.procs if n == "gateway-2")
        proc.send_signal(signal.SIGSTOP)
        try:
            rc = cli.main(ha_cli(ha, "evaluate", "--json", "--apply", "--follow", "--interval", "0.2",
                                 "--timeout", "30"))
            out, err = capsys.readouterr()
        finally:
            proc.send_signal(signal.SIGCONT)
        decision = json.loads(out)
        assert rc == 4 and decision["decision"] == "rollback" and decision["applied"] == "rollback", decision
        assert "cannot read the canary's SLIs" in decision["reason"]
        assert str(ha.stack.replica_port(2)) in decision["reason"]
        assert err.count("trying again") == 2                 # three readings in a row, then the rollback
        wait_for(lambda: not any(f"{POOL}-canary" in replica_pools(ha, i) for i in range(3)),
                 what="the canary out of every replica's routing",
                 explain=lambda: (f"replicas' pools: {[sorted(replica_pools(ha, i)) for i in range(3)]}; "
                                  f"the stack file follower said: {lines[-10:]}; "
                                  f"its last error: {watcher.last_error}"))
    assert spec_mod.load(HA, ha.stacks_dir).canary is None
