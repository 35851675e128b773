"""The gateway benchmark: direct upstream vs the infermesh gateway vs LiteLLM's proxy, on pinned cores.

    .venv/bin/python bench/run.py [--quick] [--scenarios S1,S2,S3,S4] [--soak-seconds 600]
                                  [--no-litellm] [--litellm-s3] [--profile] [--s3-itl-ms 20]
                                  [--baseline-rev REV [--rounds N]]

One session, one machine, loopback only. Core 0 runs the proxy under test alone (the gateway,
or LiteLLM's proxy): "one gateway core". Core 1 runs the fake upstreams and the load client.
Scenarios (see bench/README.md):

  S1  non-stream saturation, concurrency 16 and 64 (req/s per gateway core), plus a 32-token
      stream at concurrency 16 (the issue's LiteLLM reference figures)
  S2  concurrency 1: latency added over calling the upstream directly (p50, p99)
  S3  1,000 concurrent streams of 64 tokens at 50 tokens/s: added TTFT, inter-token gaps,
      stalls, gateway CPU and RSS; also through bench/passthru.py, the floor: what any Python
      byte relay on this event loop costs per event (skip with --no-floor)
  S4  soak at moderate load: RSS growth after warm-up, errors

With --baseline-rev REV the gateway of this tree and the gateway of REV (a git worktree in the
run's temp dir, removed at the end) take turns on core 0 for --rounds rounds; the table gives
each one's medians and this tree's ratio to REV.

Results: printed as one table per scenario and written to bench/results/<date>-<scenario>.md
and .json. Every process started here is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
RESULTS = BENCH / "results"
PY = REPO / ".venv" / "bin" / "python"
BENCH_VENV = REPO / ".venv-bench"
LITELLM_PIN = "1.100.0"     # newest release whose dependencies resolve from this workplace's PyPI mirror
PYSPY_PIN = "0.4.3"
GATEWAY_CORE, HARNESS_CORE = "0", "1"
LITELLM_MASTER_KEY = "sk-bench-master-key"
PROMPT_MODEL, STREAM_MODEL = "demo-chat", "demo-mini"

TARGETS = {
    "S1": "gateway >= 2,000 req/s and >= 25x LiteLLM (non-stream, one core)",
    "S2": "added latency <= 1 ms p50 and <= 3 ms p99 over direct (concurrency 1)",
    "S3": "1,000 streams x 64 tokens at 50 tok/s: added TTFT p99 <= 10 ms, no stream stalled (gap > 1 s)",
    "S4": "RSS growth < 5% after warm-up, zero errors",
}

sys.path.insert(0, str(REPO))
from bench.load import core_pcts, cores  # noqa: E402  (after the path is set)


# ---------------------------------------------------------------------------- processes
class Procs:
    """Every process this run starts, stopped by PID (SIGTERM, then SIGKILL) at the end."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], core: str | None, log: Path, env: dict | None = None,
              cwd: Path | None = None) -> subprocess.Popen:
        if core is not None and shutil.which("taskset"):
            argv = ["taskset", "-c", core] + argv
        f = open(log, "wb")
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        f.close()
        self.procs.append((name, p))
        return p

    def stop(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(8)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.procs = [(n, q) for n, q in self.procs if q is not p]

    def stop_all(self) -> None:
        for _, p in reversed(list(self.procs)):
            self.stop(p)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen, headers: dict | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} not up after {timeout:.0f}s")


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def post_json(url: str, body: dict, key: str) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json", "authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# ---------------------------------------------------------------------------- setup
def write_stack(tmp: Path, max_loop_lag_ms: float | None = None) -> tuple[str, Path]:
    """The local stack's shape with limits that never bite: the benchmark measures the path, not the
    limiter. The event-loop shedding (gateway.max_loop_lag_ms) stays at the shipped default unless given."""
    import yaml
    from fleet import spec as spec_mod

    config = copy.deepcopy(spec_mod.read_config(spec_mod.stack_path("local")))
    for t in config["tiers"]:
        t.update(rpm=10_000_000, tpm=10_000_000_000, max_output_tokens=max(int(t.get("max_output_tokens", 0)), 256))
    config["gateway"] = {**config.get("gateway", {}), "max_in_flight": 8192, "health_interval_s": 5}
    if max_loop_lag_ms is not None:
        config["gateway"]["max_loop_lag_ms"] = max_loop_lag_ms
    stacks = tmp / "stacks"
    stacks.mkdir(parents=True, exist_ok=True)
    (stacks / "Pulumi.bench.yaml").write_text(
        yaml.safe_dump({"config": {f"infermesh:{k}": v for k, v in config.items()}}))
    spec_mod.load("bench", stacks)      # fail early, with the spec's own message
    return "bench", stacks


def write_routing(tmp: Path, fast_port: int, paced_port: int, tls_dir: Path | None = None) -> Path:
    """The bench's routing; with ``tls_dir`` the endpoints are on the mTLS channel (fleet/channel.py)."""
    from fleet.channel import tls_ref

    def endpoint(mid: str, port: int) -> dict:
        if tls_dir is None:
            return {"id": f"bench-{mid}/0", "url": f"http://127.0.0.1:{port}"}
        return {"id": f"bench-{mid}/0", "url": f"https://127.0.0.1:{port}", "channel": "mtls",
                "tls": tls_ref("bench", f"bench-{mid}-0")}

    def model(mid: str, port: int) -> dict:
        return {"id": mid, "fallback": None, "pools": [{
            "name": f"bench-{mid}", "provider": "bench", "region": "local", "role": "primary", "weight": 1,
            "endpoints": [endpoint(mid, port)]}]}
    path = tmp / ("routing.json" if tls_dir is None else "routing-mtls.json")
    doc = {"stack": "bench", "models": [model(PROMPT_MODEL, fast_port), model(STREAM_MODEL, paced_port)]}
    if tls_dir is not None:
        doc["tls_dir"] = str(tls_dir)
    path.write_text(json.dumps(doc))
    return path


def ensure_bench_venv(log) -> tuple[bool, str]:
    """LiteLLM and py-spy in .venv-bench (gitignored), installed from PyPI if missing."""
    litellm = BENCH_VENV / "bin" / "litellm"
    if litellm.exists() and (BENCH_VENV / "bin" / "py-spy").exists():
        return True, ""
    log(f"installing litellm[proxy]=={LITELLM_PIN} and py-spy into {BENCH_VENV.name} (a few minutes, once)")
    try:
        if not (BENCH_VENV / "bin" / "pip").exists():
            subprocess.run(["python3", "-m", "venv", str(BENCH_VENV)], check=True, capture_output=True, timeout=300)
        r = subprocess.run([str(BENCH_VENV / "bin" / "pip"), "install", "-q", f"litellm[proxy]=={LITELLM_PIN}",
                            f"py-spy=={PYSPY_PIN}"], capture_output=True, text=True, timeout=1200)
    except (subprocess.SubprocessError, OSError) as e:
        return False, f"bench venv could not be created: {e}"
    if r.returncode != 0 or not litellm.exists():
        tail = "\n".join(line for line in r.stderr.splitlines() if "is ignored" not in line)[-600:]
        return False, f"pip install litellm[proxy]=={LITELLM_PIN} failed: {tail}"
    return True, ""


def litellm_config(tmp: Path, fast_port: int, paced_port: int) -> tuple[Path, Path]:
    """LiteLLM's proxy as a team would run it here: master key (auth on), no database, no callbacks,
    no telemetry, no request logging."""
    cfg = tmp / "litellm.yaml"
    cfg.write_text(f"""model_list:
  - model_name: {PROMPT_MODEL}
    litellm_params:
      model: openai/{PROMPT_MODEL}
      api_base: http://127.0.0.1:{fast_port}/v1
      api_key: x
  - model_name: {STREAM_MODEL}
    litellm_params:
      model: openai/{STREAM_MODEL}
      api_base: http://127.0.0.1:{paced_port}/v1
      api_key: x
litellm_settings:
  telemetry: false
  set_verbose: false
  turn_off_message_logging: true
  callbacks: []
  success_callback: []
  failure_callback: []
general_settings:
  master_key: {LITELLM_MASTER_KEY}
  disable_spend_logs: true
  disable_error_logs: true
""")
    logcfg = tmp / "litellm-logging.json"
    logcfg.write_text(json.dumps({
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(levelname)s %(name)s %(message)s"}},
        "handlers": {"err": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}},
        "loggers": {"uvicorn": {"handlers": ["err"], "level": "WARNING", "propagate": False},
                    "uvicorn.error": {"handlers": ["err"], "level": "WARNING", "propagate": False},
                    "uvicorn.access": {"handlers": [], "level": "CRITICAL", "propagate": False}},
        "root": {"handlers": ["err"], "level": "ERROR"}}))
    return cfg, logcfg


# ---------------------------------------------------------------------------- load
def load(url: str, key: str, *, model: str = PROMPT_MODEL, stream: bool = False, tokens: int = 32,
         concurrency: int = 16, duration: float = 10, warmup: float = 2, rate: float = 0, ramp: float = 0,
         watch: list[int] = (), rss_every: float = 0, timeout: float = 60, grace: float = 10) -> dict:
    argv = [str(PY), str(BENCH / "load.py"), "--url", url, "--key", key, "--model", model,
            "--tokens", str(tokens), "--concurrency", str(concurrency), "--duration", str(duration),
            "--warmup", str(warmup), "--rate", str(rate), "--ramp", str(ramp), "--timeout", str(timeout),
            "--grace", str(grace), "--rss-every", str(rss_every)]
    if stream:
        argv.append("--stream")
    for pid in watch:
        argv += ["--watch-pid", str(pid)]
    if shutil.which("taskset"):
        argv = ["taskset", "-c", HARNESS_CORE] + argv
    r = subprocess.run(argv, capture_output=True, text=True,
                       timeout=warmup + duration + ramp + grace + timeout + 60)
    if r.returncode != 0:
        raise RuntimeError(f"load client failed: {r.stderr[-800:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def wrk_load(url: str, key: str, body: dict, concurrency: int, duration: float, warmup: float,
             tmp: Path, watch: int | None) -> dict:
    """Non-stream saturation with wrk (C, one thread, pinned to the harness core): less client
    CPU per request than any Python client."""
    lua = tmp / "post.lua"
    lua.write_text('wrk.method = "POST"\n'
                   f"wrk.body = '{json.dumps(body)}'\n"
                   'wrk.headers["Content-Type"] = "application/json"\n'
                   f'wrk.headers["Authorization"] = "Bearer {key}"\n')
    base = (["taskset", "-c", HARNESS_CORE] if shutil.which("taskset") else []) + ["wrk", "-t1", f"-c{concurrency}"]
    if warmup:
        subprocess.run(base + [f"-d{max(1, int(warmup))}s", "-s", str(lua), url], capture_output=True, timeout=120)
    cpu0 = proc_cpu_s(watch) if watch else 0.0
    cores0 = cores()
    t0 = time.monotonic()
    r = subprocess.run(base + [f"-d{int(duration)}s", "--latency", "--timeout", "10s", "-s", str(lua), url],
                       capture_output=True, text=True, timeout=duration + 120)
    wall = time.monotonic() - t0
    cores1 = cores()
    out = r.stdout
    res: dict = {"client": "wrk", "concurrency": concurrency, "duration_s": duration, "latency_ms": {},
                 "errors": {}}
    for line in out.splitlines():
        s = line.strip()
        if s.startswith("Requests/sec:"):
            res["rps"] = round(float(s.split()[1]), 1)
        elif s.split(" ", 1)[0] in ("50%", "90%", "99%"):
            q, v = s.split()
            res["latency_ms"]["p" + q.rstrip("%")] = _wrk_ms(v)
        elif s.startswith("Non-2xx"):
            res["errors"]["non_2xx"] = int(s.split()[-1])
        elif s.startswith("Socket errors"):
            for part in s.split(":", 1)[1].split(","):
                k, v = part.split()
                if int(v):
                    res["errors"]["socket_" + k] = int(v)
        elif "requests in" in s:
            res["ok"] = int(s.split()[0])
    res["error_count"] = sum(res["errors"].values())
    res["core_busy_pct"], res["core_steal_pct"] = core_pcts(cores0, cores1)
    if watch:
        res["procs"] = {str(watch): {"cpu_pct": round(100 * (proc_cpu_s(watch) - cpu0) / wall, 1),
                                     "rss_mb_end": proc_rss_mb(watch)}}
    return res


def _wrk_ms(v: str) -> float:
    for unit, f in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if v.endswith(unit):
            return round(float(v[:-len(unit)]) * f, 3)
    return float(v)


# ---------------------------------------------------------------------------- the run
class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.procs = Procs()
        self.tmp = Path(tempfile.mkdtemp(prefix="infermesh-bench-"))
        self.notes: list[str] = []
        self.results: dict[str, dict] = {}
        self.litellm_ok = False
        self.litellm_failed: str | None = None
        self.litellm_proc = None
        self.use_wrk = shutil.which("wrk") is not None and not args.no_wrk

    def log(self, msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    # ---- processes
    def start_upstreams(self) -> None:
        self.fast_port, self.paced_port = free_port(), free_port()
        self.fast = self.procs.start("upstream-fast", [
            str(PY), "-m", "engines.sim", "--host", "127.0.0.1", "--port", str(self.fast_port), "--model",
            PROMPT_MODEL, "--ttft-ms", "0", "--itl-ms", "0", "--output-tokens", "32", "--max-concurrency", "100000"],
            HARNESS_CORE, self.tmp / "upstream-fast.log", cwd=REPO)
        self.paced = self.procs.start("upstream-paced", [
            str(PY), str(BENCH / "fakeup.py"), "--port", str(self.paced_port), "--model", STREAM_MODEL,
            "--ttft-ms", "0", "--itl-ms", str(self.args.s3_itl_ms), "--output-tokens", "64"],
            HARNESS_CORE, self.tmp / "upstream-paced.log", cwd=REPO)
        wait_http(f"http://127.0.0.1:{self.fast_port}/health", 30, self.fast)
        wait_http(f"http://127.0.0.1:{self.paced_port}/health", 30, self.paced)
        self.direct = f"http://127.0.0.1:{self.fast_port}/v1/chat/completions"
        self.direct_paced = f"http://127.0.0.1:{self.paced_port}/v1/chat/completions"
        if self.args.channel:
            self.start_tls_upstreams()

    def start_tls_upstreams(self) -> None:
        """The same two upstreams serving mutual TLS (as vLLM with --ssl-*), certificates from a bench CA."""
        from fleet.channel import LocalCerts
        self.certs = LocalCerts(self.tmp, "bench")
        tls = {}
        for mid in (PROMPT_MODEL, STREAM_MODEL):
            cert, key = self.certs.worker(f"bench-{mid}-0")
            tls[mid] = ["--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--ssl-ca-certs", str(self.certs.ca)]
        self.certs.client()
        self.fast_tls_port, self.paced_tls_port = free_port(), free_port()
        self.fast_tls = self.procs.start("upstream-fast-tls", [
            str(PY), "-m", "engines.sim", "--host", "127.0.0.1", "--port", str(self.fast_tls_port), "--model",
            PROMPT_MODEL, "--ttft-ms", "0", "--itl-ms", "0", "--output-tokens", "32", "--max-concurrency", "100000",
            *tls[PROMPT_MODEL], "--ssl-cert-reqs", "2"], HARNESS_CORE, self.tmp / "upstream-fast-tls.log", cwd=REPO)
        self.paced_tls = self.procs.start("upstream-paced-tls", [
            str(PY), str(BENCH / "fakeup.py"), "--port", str(self.paced_tls_port), "--model", STREAM_MODEL,
            "--ttft-ms", "0", "--itl-ms", str(self.args.s3_itl_ms), "--output-tokens", "64", *tls[STREAM_MODEL]],
            HARNESS_CORE, self.tmp / "upstream-paced-tls.log", cwd=REPO)
        for port, proc in ((self.fast_tls_port, self.fast_tls), (self.paced_tls_port, self.paced_tls)):
            deadline = time.monotonic() + 30
            while not _listening(port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"TLS upstream on {port} did not start; see {self.tmp}")
                time.sleep(0.1)

    def start_gateway(self, mtls: bool = False, root: Path = REPO) -> None:
        """The gateway on core 0; with ``mtls`` a second one (its own state) whose upstreams are the
        mutual-TLS copies: started only for its own runs, so core 0 holds one proxy at a time. With
        ``root`` another tree's gateway (--baseline-rev's worktree), its own state and key."""
        stack, stacks = write_stack(self.tmp, self.args.max_loop_lag_ms)
        if mtls:
            routing = write_routing(self.tmp, self.fast_tls_port, self.paced_tls_port, tls_dir=self.certs.dir)
        else:
            routing = write_routing(self.tmp, self.fast_port, self.paced_port)
        name = "gateway-mtls" if mtls else "gateway" if root == REPO else "gateway-base"
        state = Path(tempfile.mkdtemp(prefix=name.replace("gateway", "state") + "-", dir=self.tmp))
        # the key made by the tree's own code (`python -m gateway` from root imports root's packages)
        key = subprocess.run([str(PY), "-c", "import sys, pathlib; from gateway.keys import KeyAdmin; print(KeyAdmin("
                              "pathlib.Path(sys.argv[1])).create('bench', 'business')[0])", str(state / "keys.db")],
                             cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        port = free_port()
        proc = self.procs.start(name, [
            str(PY), "-m", "gateway", "--stack", stack, "--stacks-dir", str(stacks), "--routing", str(routing),
            "--host", "127.0.0.1", "--port", str(port), "--state-dir", str(state), "--log-level", "warning"],
            GATEWAY_CORE, self.tmp / f"{name}.log", cwd=root)
        wait_http(f"http://127.0.0.1:{port}/health", 60, proc)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        for model in (PROMPT_MODEL, STREAM_MODEL):   # both routes answer before anything is measured
            status, body = post_json(url, {"model": model, "max_tokens": 4,
                                           "messages": [{"role": "user", "content": "hi"}]}, key)
            if status != 200:
                raise RuntimeError(f"{name} smoke request for {model}: {status} {body[:300]!r}")
        if mtls:
            self.gw_mtls, self.gateway_mtls, self.key_mtls = proc, url, key
            return
        if root != REPO:
            self.gw_base, self.gateway_base, self.key_base = proc, url, key
            proc.send_signal(signal.SIGSTOP)       # core 0 holds one running proxy at a time
            return
        self.gw, self.gw_port, self.gateway, self.key = proc, port, url, key
        self.state_dir = state

    def start_baseline(self) -> None:
        """--baseline-rev: REV checked out as a git worktree in the run's temp dir (removed at the end),
        and its gateway started beside this tree's, on the same upstreams, stack and routing."""
        rev = self.args.baseline_rev
        sha = subprocess.run(["git", "rev-parse", "--verify", rev + "^{commit}"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.strip()
        self.baseline_tree = self.tmp / f"baseline-{sha[:10]}"
        subprocess.run(["git", "worktree", "add", "--detach", str(self.baseline_tree), sha], cwd=REPO,
                       capture_output=True, check=True)
        self.baseline = {"rev": rev, "commit": sha,
                         "subject": subprocess.run(["git", "log", "-1", "--format=%s", sha], cwd=REPO,
                                                   capture_output=True, text=True).stdout.strip()[:120]}
        self.log(f"baseline {rev} ({sha[:10]}) in {self.baseline_tree}")
        self.start_gateway(root=self.baseline_tree)

    def remove_baseline(self) -> None:
        tree = getattr(self, "baseline_tree", None)
        if tree is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, capture_output=True)
            subprocess.run(["git", "worktree", "prune"], cwd=REPO, capture_output=True)

    def start_litellm(self) -> None:
        self.litellm_ok = False
        ok, why = ensure_bench_venv(self.log)
        if not ok:
            self.litellm_failed = f"LiteLLM could not be installed here, so it is not measured: {why}"
            self.notes.append(self.litellm_failed)
            self.log(self.notes[-1])
            return
        cfg, logcfg = litellm_config(self.tmp, self.fast_port, self.paced_port)
        self.ll_port = free_port()
        env = {**os.environ, "LITELLM_TELEMETRY": "False", "LITELLM_LOG": "ERROR", "DISABLE_SCHEMA_UPDATE": "true",
               "LITELLM_DONT_SHOW_FEEDBACK_BOX": "true"}
        env.pop("DATABASE_URL", None)
        self.litellm_proc = self.procs.start("litellm", [
            str(BENCH_VENV / "bin" / "litellm"), "--config", str(cfg), "--host", "127.0.0.1",
            "--port", str(self.ll_port), "--num_workers", "1", "--log_config", str(logcfg)],
            GATEWAY_CORE, self.tmp / "litellm.log", env=env, cwd=self.tmp)
        try:
            wait_http(f"http://127.0.0.1:{self.ll_port}/health/liveliness", 180, self.litellm_proc)
            self.litellm = f"http://127.0.0.1:{self.ll_port}/v1/chat/completions"
            status, body = post_json(self.litellm, {"model": PROMPT_MODEL, "messages": [{"role": "user",
                                                                                          "content": "hi"}]},
                                     LITELLM_MASTER_KEY)
            if status != 200:
                raise RuntimeError(f"smoke request {status}: {body[:300]!r}")
            status, _ = post_json(self.litellm, {"model": PROMPT_MODEL, "messages": [{"role": "user",
                                                                                      "content": "hi"}]}, "sk-wrong")
            if status == 200:
                raise RuntimeError("LiteLLM accepted a wrong key: auth is not on")
            self.litellm_ok = True
            # its first requests are slow (lazy imports): warm it before anything is measured
            load(self.litellm, LITELLM_MASTER_KEY, concurrency=4, duration=3, warmup=0)
        except (RuntimeError, OSError) as e:
            tail = (self.tmp / "litellm.log").read_text(errors="replace")[-600:]
            self.litellm_failed = f"LiteLLM's proxy did not start here, so it is not measured: {e} ... {tail}"
            self.notes.append(self.litellm_failed)
            self.log(self.notes[-1])
            self.procs.stop(self.litellm_proc)
            self.litellm_proc = None

    def stop_litellm(self) -> None:
        if self.litellm_proc is not None:
            self.procs.stop(self.litellm_proc)
            self.litellm_proc = None

    # ---- paths
    def paths(self, litellm: bool = True):
        """direct, gateway, then LiteLLM: started only for its own runs, so that core 0 holds one proxy."""
        yield "direct", self.direct, "", self.fast.pid
        if self.args.baseline_rev:
            yield from self.baseline_rounds()
            return
        yield "gateway", self.gateway, self.key, self.gw.pid
        # the same gateway code with the channel on, alternating with it for --rounds (medians compared);
        # core 0 holds one proxy at a time (the plain one is stopped while the mTLS one runs)
        for k in range(self.args.rounds if self.args.channel else 0):
            suffix = "" if k == 0 else f"@{k + 1}"
            if k > 0:
                yield f"gateway{suffix}", self.gateway, self.key, self.gw.pid
            self.gw.send_signal(signal.SIGSTOP)
            self.start_gateway(mtls=True)
            try:
                yield f"gateway-mtls{suffix}", self.gateway_mtls, self.key_mtls, self.gw_mtls.pid
            finally:
                self.procs.stop(self.gw_mtls)
                self.gw.send_signal(signal.SIGCONT)
        if litellm and not self.args.no_litellm and self.litellm_failed is None:
            self.start_litellm()
            if self.litellm_ok:
                try:
                    yield "litellm", self.litellm, LITELLM_MASTER_KEY, self.litellm_proc.pid
                finally:
                    self.stop_litellm()

    def baseline_rounds(self):
        """This tree's gateway and REV's, in turns for --rounds rounds (ABBA: each round starts with the
        one the previous round ended with, so a drift of the machine falls on both); the one not
        measured is SIGSTOPped."""
        mine = ("gateway", self.gateway, self.key, self.gw)
        base = ("gateway-base", self.gateway_base, self.key_base, self.gw_base)
        for k in range(self.args.rounds):
            suffix = "" if k == 0 else f"@{k + 1}"
            for name, url, key, proc in ((mine, base) if k % 2 == 0 else (base, mine)):
                other = self.gw_base if proc is self.gw else self.gw
                other.send_signal(signal.SIGSTOP)
                proc.send_signal(signal.SIGCONT)
                yield f"{name}{suffix}", url, key, proc.pid
        self.gw_base.send_signal(signal.SIGSTOP)
        self.gw.send_signal(signal.SIGCONT)

    # ---- scenarios
    def s1(self) -> dict:
        q = self.args.quick
        dur, warm = (5, 2) if q else (15, 3)
        body = {"model": PROMPT_MODEL, "messages": [{"role": "user", "content": "Say hello to the benchmark."}]}
        res: dict = {"target": TARGETS["S1"], "runs": {}}
        for name, url, key, pid in self.paths():
            for c in (16, 64):
                if name == "litellm" and c == 64 and q:
                    continue
                self.log(f"S1 {name} non-stream c{c}")
                if self.use_wrk:
                    r = wrk_load(url, key, body, c, dur, warm, self.tmp, pid)
                else:
                    r = load(url, key, concurrency=c, duration=dur, warmup=warm, watch=[pid] if pid else [])
                res["runs"][f"{name}/nonstream-c{c}"] = r
                if name == "gateway" and c == 64 and self.args.profile:
                    res["profile"] = self.profile(url, key)
            self.log(f"S1 {name} stream(32 tokens) c16")
            res["runs"][f"{name}/stream32-c16"] = load(url, key, stream=True, tokens=32, concurrency=16,
                                                       duration=dur, warmup=warm, watch=[pid] if pid else [])
        return res

    def profile(self, url: str, key: str) -> dict:
        """py-spy on the gateway under S1 (c64): a flame graph and the top functions by own time."""
        spy = BENCH_VENV / "bin" / "py-spy"
        if not spy.exists():
            ok, why = ensure_bench_venv(self.log)
            if not ok:
                return {"error": why}
        secs = 12
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = {}
        for fmt, path in (("flamegraph", RESULTS / "profile-s1.svg"), ("raw", self.tmp / "profile-s1.txt")):
            self.log(f"S1 profiling the gateway with py-spy ({fmt}, {secs}s under c64 load)")
            spy_argv = (["taskset", "-c", HARNESS_CORE] if shutil.which("taskset") else []) + [
                str(spy), "record", "--pid", str(self.gw.pid), "--duration", str(secs), "--rate", "200",
                "--nonblocking", "--format", fmt, "-o", str(path)]
            p = subprocess.Popen(spy_argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                if self.use_wrk:
                    wrk_load(url, key, {"model": PROMPT_MODEL, "messages": [{"role": "user", "content": "hi"}]},
                             64, secs + 2, 0, self.tmp, None)
                else:
                    load(url, key, concurrency=64, duration=secs + 2, warmup=0)
                p.wait(60)
            finally:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        out["flamegraph"] = str((RESULTS / "profile-s1.svg").relative_to(REPO))
        out["top"] = top_costs(self.tmp / "profile-s1.txt")
        return out

    def s2(self) -> dict:
        dur = 5 if self.args.quick else 20
        res: dict = {"target": TARGETS["S2"], "runs": {}}
        for name, url, key, pid in self.paths():
            self.log(f"S2 {name} non-stream c1")
            res["runs"][f"{name}/nonstream-c1"] = load(url, key, concurrency=1, duration=dur, warmup=1,
                                                       watch=[pid] if pid else [])
            self.log(f"S2 {name} stream(32 tokens) c1")
            res["runs"][f"{name}/stream32-c1"] = load(url, key, stream=True, tokens=32, concurrency=1,
                                                      duration=dur, warmup=1, watch=[pid] if pid else [])
        return res

    def s3(self) -> dict:
        q = self.args.quick
        conc = self.args.s3_streams
        dur, warm = (8, 3) if q else (30, 5)
        res: dict = {"target": TARGETS["S3"], "runs": {}, "itl_ms": self.args.s3_itl_ms, "streams": conc}
        for name, url, key, pid in self.s3_paths():
            if name == "direct":
                url, pid = self.direct_paced, self.paced.pid

            self.log(f"S3 {name}: {conc} streams x 64 tokens, itl {self.args.s3_itl_ms} ms")
            spy = None
            if name == "gateway" and self.args.profile_s3:
                spy = self.spy("s3", int(warm + dur))
                res["profile"] = {"note": "py-spy ran on the harness core during this run"}
            try:
                res["runs"][f"{name}/streams{conc}"] = load(
                    url, key, model=STREAM_MODEL, stream=True, tokens=64, concurrency=conc, duration=dur,
                    warmup=warm, ramp=64 * self.args.s3_itl_ms / 1000, watch=[pid], timeout=30, grace=15)
            finally:
                if spy is not None:
                    res["profile"].update(self.spy_done(spy, "s3"))
        return res

    def s3_paths(self):
        """direct, then the floor (bench/passthru.py: a Python byte relay on the gateway's core,
        no HTTP), then the gateway (and LiteLLM with --litellm-s3)."""
        for path in self.paths(litellm=self.args.litellm_s3):
            yield path
            if path[0] == "direct" and not self.args.no_floor:
                port = free_port()
                floor = self.procs.start("passthru", [str(PY), str(BENCH / "passthru.py"), "--port", str(port),
                                                      "--upstream-port", str(self.paced_port)],
                                         GATEWAY_CORE, self.tmp / "passthru.log", cwd=REPO)
                try:
                    wait_http(f"http://127.0.0.1:{port}/health", 30, floor)
                    yield "floor", f"http://127.0.0.1:{port}/v1/chat/completions", "", floor.pid
                finally:
                    self.procs.stop(floor)

    def spy(self, name: str, secs: int) -> subprocess.Popen:
        """py-spy (raw stacks) on the gateway for `secs`, on the harness core."""
        ok, why = ensure_bench_venv(self.log)
        if not ok:
            raise RuntimeError(why)
        argv = (["taskset", "-c", HARNESS_CORE] if shutil.which("taskset") else []) + [
            str(BENCH_VENV / "bin" / "py-spy"), "record", "--pid", str(self.gw.pid), "--duration", str(secs),
            "--rate", "100", "--nonblocking", "--format", "raw", "-o", str(self.tmp / f"profile-{name}.txt")]
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def spy_done(self, p: subprocess.Popen, name: str) -> dict:
        try:
            p.wait(60)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        return {"top": top_costs(self.tmp / f"profile-{name}.txt", 25)}

    def s4(self) -> dict:
        secs = self.args.soak_seconds if not self.args.quick else min(self.args.soak_seconds, 40)
        warm = max(10.0, min(60.0, secs * 0.2))
        res: dict = {"target": TARGETS["S4"], "seconds": secs, "warmup_s": warm, "runs": {}}
        self.log(f"S4 soak {secs}s on the gateway (non-stream 200 req/s + stream 100 req/s)")
        argv_common = dict(duration=secs - warm, warmup=warm, watch=[self.gw.pid], rss_every=5)
        import concurrent.futures as cf
        with cf.ThreadPoolExecutor(2) as ex:
            f1 = ex.submit(load, self.gateway, self.key, concurrency=8, rate=200, **argv_common)
            f2 = ex.submit(load, self.gateway, self.key, stream=True, tokens=32, concurrency=8, rate=100,
                           **argv_common)
            res["runs"]["gateway/soak-nonstream"] = f1.result()
            res["runs"]["gateway/soak-stream"] = f2.result()
        samples = res["runs"]["gateway/soak-nonstream"]["procs"][str(self.gw.pid)]["rss_kb_samples"]
        first, last = samples[0][1], samples[-1][1]
        res["rss_mb_after_warmup"] = round(first / 1024, 1)
        res["rss_mb_end"] = round(last / 1024, 1)
        res["rss_mb_max"] = round(max(s[1] for s in samples) / 1024, 1)
        res["rss_growth_pct"] = round(100 * (last - first) / first, 2)
        res["errors"] = sum(r["error_count"] for r in res["runs"].values())
        res["requests"] = sum(r["ok"] for r in res["runs"].values())
        return res

    # ---- all
    def run(self) -> int:
        wanted = [s.strip().upper() for s in self.args.scenarios.split(",") if s.strip()]
        try:
            if not shutil.which("taskset"):
                self.notes.append("taskset missing: processes were not pinned to cores.")
            if not self.use_wrk:
                self.notes.append("wrk not found: non-stream saturation used the Python load client.")
            self.log(f"tmp dir {self.tmp}")
            self.start_upstreams()
            self.start_gateway()
            if self.args.baseline_rev:
                self.start_baseline()
                self.notes.append(f"Baseline: {self.baseline['rev']} ({self.baseline['commit'][:10]}: "
                                  f"{self.baseline['subject']}), {self.args.rounds} alternating rounds.")
            if self.args.no_litellm:
                self.notes.append("LiteLLM not measured (--no-litellm).")
            for s in wanted:
                fn = getattr(self, s.lower(), None)
                if fn is None:
                    raise SystemExit(f"unknown scenario {s}")
                t0 = time.monotonic()
                res = fn()
                res["wall_s"] = round(time.monotonic() - t0, 1)
                res["loadavg_after"] = open("/proc/loadavg").read().split()[:3]
                if self.args.baseline_rev:
                    res["baseline"] = self.baseline
                self.results[s] = res
                self.write(s, res)
        finally:
            for _, p in self.procs.procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGCONT)       # a stopped process would not see the SIGTERM
            self.procs.stop_all()
            self.remove_baseline()
            if not self.args.keep_tmp:
                shutil.rmtree(self.tmp, ignore_errors=True)
        return 0

    def write(self, scenario: str, res: dict) -> None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        stamp = dt.date.today().isoformat()
        streams = f"-{self.args.s3_streams}streams" if scenario == "S3" and self.args.s3_streams != 1000 else ""
        if self.args.max_loop_lag_ms is not None:
            streams += f"-lag{self.args.max_loop_lag_ms:g}ms"
        streams += "-channel" if self.args.channel else ""
        streams += "-baseline" if self.args.baseline_rev else ""
        name = f"{stamp}-{scenario}{streams}{'-quick' if self.args.quick else ''}"
        meta = {"scenario": scenario, "date": stamp, "command": " ".join(["bench/run.py"] + sys.argv[1:]),
                "quick": self.args.quick, "cores": {"gateway": GATEWAY_CORE, "harness": HARNESS_CORE},
                "litellm": LITELLM_PIN if self.litellm_ok else None, "client_s1": "wrk" if self.use_wrk else "python",
                "notes": self.notes, "machine": machine()}
        doc = {**meta, **res}
        table = render(scenario, res)
        (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
        md = [f"# {scenario}{' (quick)' if self.args.quick else ''}: {stamp}", "",
              f"Command: `.venv/bin/python {meta['command']}`", "",
              f"Target: {TARGETS[scenario]}", "", table, ""]
        if self.notes:
            md += ["Notes:", ""] + [f"- {n}" for n in self.notes] + [""]
        md += [f"Machine: {meta['machine']}; load average after: {' '.join(res['loadavg_after'])}", ""]
        (RESULTS / f"{name}.md").write_text("\n".join(md))
        print("\n" + f"== {scenario} ==  ({TARGETS[scenario]})\n" + table + "\n", flush=True)


def machine() -> str:
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {model}, Python {sys.version.split()[0]}"


def top_costs(raw: Path, n: int = 15) -> list[dict]:
    """From py-spy's collapsed stacks: the functions with the most samples on top of the stack (own
    time) and on the stack at all (inclusive)."""
    if not raw.exists():
        return []
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        total += c
        frames = stack.split(";")
        leaf = _frame(frames[-1])
        own[leaf] = own.get(leaf, 0) + c
        for f in {_frame(x) for x in frames}:
            incl[f] = incl.get(f, 0) + c
    if not total:
        return []
    rows = sorted(own.items(), key=lambda kv: -kv[1])[:n]
    return [{"function": f, "own_pct": round(100 * c / total, 1), "inclusive_pct": round(100 * incl[f] / total, 1)}
            for f, c in rows] + [{"function": f"(inclusive) {f}", "inclusive_pct": round(100 * c / total, 1)}
                                 for f, c in sorted(incl.items(), key=lambda kv: -kv[1])[:n]]


def _frame(f: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py)"; the line number splits one function into many
    name, _, where = f.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0]
    parts = path.split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{name} ({short})"


# ---------------------------------------------------------------------------- tables
def _g(d: dict | None, *keys):
    for k in keys:
        if d is None:
            return None
        d = d.get(k) if isinstance(d, dict) else None
    return d


def _fmt(v, unit: str = "") -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        v = f"{v:,.1f}" if abs(v) >= 100 else f"{v:,.2f}"
    elif isinstance(v, int):
        v = f"{v:,}"
    return f"{v}{unit}"


def _us_per_token(r: dict | None) -> float | None:
    """The watched process's CPU per token delivered, in microseconds (the SSE events per
    stream are the 64 tokens plus 4: role, finish, usage, [DONE])."""
    pr = next(iter((r or {}).get("procs", {}).values()), None)
    if not pr or not r.get("tokens_per_s"):
        return None
    return round(pr["cpu_pct"] / 100 / r["tokens_per_s"] * 1e6, 1)


def _ratio(a, b) -> str:
    if a is None or b is None or not b:
        return "—"
    return f"{a / b:.2f}x" if a / b < 10 else f"{a / b:.1f}x"


def _delta(a, b) -> str:
    if a is None or b is None:
        return "—"
    return f"+{a - b:.2f} ms" if a >= b else f"{a - b:.2f} ms"


def render_channel(scenario: str, res: dict) -> str:
    """The channel's cost: the same gateway with plain HTTP and with mutual TLS to its upstreams."""
    return render_pair(scenario, res, "gateway", "gateway-mtls",
                       ("gateway (plain HTTP)", "gateway (mTLS)", "mTLS/plain"))


def render_baseline(scenario: str, res: dict) -> str:
    """This tree's gateway against --baseline-rev's, alternating: medians and this/baseline."""
    rev = (res.get("baseline") or {}).get("commit", "baseline")[:10]
    return render_pair(scenario, res, "gateway-base", "gateway", (f"gateway at {rev}", "gateway (this tree)",
                                                                   "this/baseline"))


def render_pair(scenario: str, res: dict, a_path: str, b_path: str, titles: tuple[str, str, str]) -> str:
    """Two gateways measured in alternating rounds: the median of each metric, and b/a."""
    runs = res.get("runs", {})
    labels = {"S1": ("nonstream-c16", "nonstream-c64", "stream32-c16"),
              "S2": ("nonstream-c1", "stream32-c1"), "S3": (f"streams{res.get('streams')}",)}.get(scenario, ())
    import re
    import statistics

    pattern = rf"(?:{re.escape(a_path)}|{re.escape(b_path)})@(\d+)/"
    rounds = max([1] + [int(m.group(1)) for k in runs if (m := re.match(pattern, k))])
    lines = [f"Medians of {rounds} alternating runs of each.", ""] if rounds > 1 else []
    lines += [f"| run | metric | {titles[0]} | {titles[1]} | {titles[2]} |", "|---|---|---|---|---|"]

    def per_core(r: dict) -> float | None:
        pr = next(iter(r.get("procs", {}).values()), None)
        return round(r["rps"] / (pr["cpu_pct"] / 100), 0) if pr and pr.get("cpu_pct") and r.get("rps") else None

    def median(path: str, label: str, f) -> float | None:
        vals = [f(r) for k in range(rounds)
                if (r := runs.get(f"{path}{'' if k == 0 else f'@{k + 1}'}/{label}")) and f(r) is not None]
        return round(statistics.median(vals), 2) if vals else None

    for label in labels:
        if not runs.get(f"{a_path}/{label}") or not runs.get(f"{b_path}/{label}"):
            continue
        metrics = [("req/s", lambda r: r.get("rps"), "ratio"), ("req/s per server CPU-second", per_core, "ratio")]
        if scenario == "S3":
            metrics += [("CPU µs per token", _us_per_token, "ratio"),
                        ("TTFT p99", lambda r: _g(r, "ttft_ms", "p99"), "delta"),
                        ("inter-token gap p99", lambda r: _g(r, "gap_ms", "p99"), "delta")]
        else:
            metrics += [("latency p50", lambda r: _g(r, "latency_ms", "p50"), "delta"),
                        ("latency p99", lambda r: _g(r, "latency_ms", "p99"), "delta")]
        metrics.append(("errors", lambda r: r.get("error_count"), "none"))
        rows = [(m, median(a_path, label, f), median(b_path, label, f), kind) for m, f, kind in metrics]
        for metric, a, b, kind in rows:
            r = _ratio(b, a) if kind == "ratio" else _delta(b, a) if kind == "delta" else ""
            lines.append(f"| {label} | {metric} | {_fmt(a)} | {_fmt(b)} | {r} |")
    return "\n".join(lines)


def render(scenario: str, res: dict) -> str:
    if any(k.startswith("gateway-mtls/") for k in res.get("runs", {})):
        return render_base(scenario, res) + "\n\nThe channel (gateway to upstream on mutual TLS):\n\n" + \
            render_channel(scenario, res)
    if any(k.startswith("gateway-base/") for k in res.get("runs", {})):
        return render_base(scenario, res) + "\n\nThis tree against the baseline:\n\n" + \
            render_baseline(scenario, res)
    return render_base(scenario, res)


def render_base(scenario: str, res: dict) -> str:
    runs = res.get("runs", {})
    lines = ["| run | metric | direct | gateway | LiteLLM | gateway/direct | gateway/LiteLLM |",
             "|---|---|---|---|---|---|---|"]

    def row(label: str, metric: str, path: tuple, kind: str = "ratio", unit: str = "") -> None:
        d, g, ll = (_g(runs.get(f"{p}/{label}"), *path) for p in ("direct", "gateway", "litellm"))
        if kind == "ratio":
            r1, r2 = _ratio(g, d), _ratio(g, ll)
        elif kind == "delta":
            r1, r2 = _delta(g, d), _delta(g, ll)
        else:
            r1 = r2 = ""
        lines.append(f"| {label} | {metric} | {_fmt(d, unit)} | {_fmt(g, unit)} | {_fmt(ll, unit)} | {r1} | {r2} |")

    def procs(label: str) -> None:
        vals = []
        for p in ("direct", "gateway", "litellm"):
            r = runs.get(f"{p}/{label}")
            pr = next(iter((r or {}).get("procs", {}).values()), None) if r else None
            vals.append(None if pr is None else f"{pr['cpu_pct']:.0f}% / {pr.get('rss_mb_end', 0):.0f} MB")
        lines.append(f"| {label} | server CPU / RSS | {_fmt(vals[0])} | {_fmt(vals[1])} | {_fmt(vals[2])} | | |")

    def per_core(label: str) -> None:
        vals = []
        for p in ("direct", "gateway", "litellm"):
            r = runs.get(f"{p}/{label}")
            pr = next(iter((r or {}).get("procs", {}).values()), None) if r else None
            vals.append(round(r["rps"] / (pr["cpu_pct"] / 100), 0) if pr and pr.get("cpu_pct") and r.get("rps")
                        else None)
        lines.append(f"| {label} | req/s per server CPU-second | {_fmt(vals[0])} | {_fmt(vals[1])} | "
                     f"{_fmt(vals[2])} | {_ratio(vals[1], vals[0])} | {_ratio(vals[1], vals[2])} |")

    def contention(label: str) -> None:
        vals = []
        for p in ("direct", "gateway", "litellm"):
            r = runs.get(f"{p}/{label}")
            c = (r or {}).get("core_busy_pct") or {}
            vals.append(f"{c.get('cpu' + GATEWAY_CORE, 0):.0f}% / {c.get('cpu' + HARNESS_CORE, 0):.0f}%" if c else None)
        lines.append(f"| {label} | core 0 / core 1 busy (all processes) | {_fmt(vals[0])} | {_fmt(vals[1])} | "
                     f"{_fmt(vals[2])} | | |")

    if scenario == "S1":
        for label in ("nonstream-c16", "nonstream-c64", "stream32-c16"):
            row(label, "req/s", ("rps",))
            per_core(label)
            row(label, "latency p50", ("latency_ms", "p50"), "delta", " ms")
            row(label, "latency p99", ("latency_ms", "p99"), "delta", " ms")
            row(label, "errors", ("error_count",), "none")
            procs(label)
            contention(label)
    elif scenario == "S2":
        for label in ("nonstream-c1", "stream32-c1"):
            row(label, "req/s", ("rps",))
            row(label, "latency p50", ("latency_ms", "p50"), "delta", " ms")
            row(label, "latency p99", ("latency_ms", "p99"), "delta", " ms")
            if label.startswith("stream"):
                row(label, "TTFT p50", ("ttft_ms", "p50"), "delta", " ms")
                row(label, "TTFT p99", ("ttft_ms", "p99"), "delta", " ms")
            row(label, "errors", ("error_count",), "none")
            procs(label)
            contention(label)
    elif scenario == "S3":
        label = f"streams{res['streams']}"
        row(label, "streams completed/s", ("rps",))
        row(label, "tokens/s delivered", ("tokens_per_s",))
        row(label, "TTFT p50", ("ttft_ms", "p50"), "delta", " ms")
        row(label, "TTFT p99", ("ttft_ms", "p99"), "delta", " ms")
        row(label, "inter-token gap p50", ("gap_ms", "p50"), "delta", " ms")
        row(label, "inter-token gap p99", ("gap_ms", "p99"), "delta", " ms")
        row(label, "inter-token gap max", ("gap_ms", "max"), "delta", " ms")
        row(label, "stalled streams (gap > 1 s)", ("stalled",), "none")
        row(label, "errors", ("error_count",), "none")
        row(label, "of which 429 (shed; the client waits 2 s)", ("errors", "status_429"), "none")
        row(label, "load client CPU %", ("client_cpu_pct",), "none")
        row(label, "harness core busy %", ("core_busy_pct", "cpu" + HARNESS_CORE), "none")
        row(label, "gateway core busy %", ("core_busy_pct", "cpu" + GATEWAY_CORE), "none")
        row(label, "gateway core steal % (hypervisor)", ("core_steal_pct", "cpu" + GATEWAY_CORE), "none")
        row(label, "harness core steal %", ("core_steal_pct", "cpu" + HARNESS_CORE), "none")
        procs(label)
        lines += ["", "Cost per relayed token on the relay's core, against the floor (bench/passthru.py: a Python "
                  "byte relay with no HTTP; direct: the fake upstream's own cost):", "",
                  "| path | tokens/s | TTFT p99 | gap p99 | process CPU | CPU µs per token | / floor |",
                  "|---|---|---|---|---|---|---|"]
        floor_us = _us_per_token(runs.get(f"floor/{label}"))
        for p in ("direct", "floor", "gateway", "litellm"):
            r = runs.get(f"{p}/{label}")
            if r is None:
                continue
            pr = next(iter(r.get("procs", {}).values()), {})
            us = _us_per_token(r)
            lines.append(f"| {p} | {_fmt(r.get('tokens_per_s'))} | {_fmt(_g(r, 'ttft_ms', 'p99'), ' ms')} | "
                         f"{_fmt(_g(r, 'gap_ms', 'p99'), ' ms')} | {_fmt(pr.get('cpu_pct'), '%')} | {_fmt(us)} | "
                         f"{_ratio(us, floor_us) if p not in ('direct', 'floor') else ''} |")
    elif scenario == "S4":
        lines = ["| metric | gateway |", "|---|---|",
                 f"| duration | {res['seconds']} s (warm-up {res['warmup_s']:.0f} s) |",
                 f"| requests completed after warm-up | {res['requests']:,} |",
                 f"| errors | {res['errors']} |",
                 f"| RSS after warm-up | {res['rss_mb_after_warmup']} MB |",
                 f"| RSS at end (max) | {res['rss_mb_end']} MB ({res['rss_mb_max']} MB) |",
                 f"| RSS growth after warm-up | {res['rss_growth_pct']}% |"]
        for k, r in res["runs"].items():
            pr = next(iter(r.get("procs", {}).values()), {})
            lines.append(f"| {k} | {r['rps']} req/s, p50 {r['latency_ms']['p50']} ms, p99 "
                         f"{r['latency_ms']['p99']} ms, errors {r['error_count']}, gateway CPU {pr.get('cpu_pct')}% |")
    if res.get("profile", {}).get("top"):
        what = "under S1 c64" if scenario == "S1" else "during " + scenario
        lines += ["", f"py-spy, gateway {what} (own time, top 12):", "",
                  "| function | own % | inclusive % |", "|---|---|---|"]
        for t in res["profile"]["top"][:12]:
            lines.append(f"| `{t['function']}` | {t.get('own_pct', '')} | {t['inclusive_pct']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short windows (a smoke run of the harness)")
    p.add_argument("--scenarios", default="S1,S2,S3,S4")
    p.add_argument("--soak-seconds", type=int, default=600)
    p.add_argument("--s3-streams", type=int, default=1000)
    p.add_argument("--s3-itl-ms", type=float, default=20.0)
    p.add_argument("--no-litellm", action="store_true")
    p.add_argument("--litellm-s3", action="store_true", help="also run S3 through LiteLLM (slow)")
    p.add_argument("--no-floor", action="store_true", help="skip S3's pass-through floor (bench/passthru.py)")
    p.add_argument("--max-loop-lag-ms", type=float, default=None,
                   help="the gateway's event-loop shedding limit (default: the stack's, 100 ms; 0: off)")
    p.add_argument("--profile", action="store_true", help="py-spy the gateway under S1 c64")
    p.add_argument("--profile-s3", action="store_true", help="py-spy the gateway during S3 (perturbs S3's figures)")
    p.add_argument("--no-wrk", action="store_true", help="use the Python client for S1 even if wrk is installed")
    p.add_argument("--keep-tmp", action="store_true")
    p.add_argument("--channel", action="store_true",
                   help="also run the gateway with its upstreams on mutual TLS (gateway-mtls), side by side")
    p.add_argument("--rounds", type=int, default=1,
                   help="with --channel or --baseline-rev: the two gateways alternate this many times; the table "
                        "compares medians")
    p.add_argument("--baseline-rev", metavar="REV",
                   help="also run the gateway of git revision REV (a worktree in the temp dir), alternating with "
                        "this tree's (S1, S2, S3)")
    args = p.parse_args(argv)
    if args.baseline_rev and args.channel:
        p.error("--baseline-rev and --channel each alternate two gateways: one at a time")
    if not PY.exists():
        print("bench: .venv missing: run `make install` first", file=sys.stderr)
        return 2
    return Bench(args).run()


if __name__ == "__main__":
    sys.exit(main())
