"""`infermesh canary start|status|evaluate|promote|rollback`: a new image reaches a pool only through a canary.

Every step that changes the service is an edit of the stack file (stacks/Pulumi.<S>.yaml) and
nothing else; `pulumi up` (or a running `infermesh up`, which follows its stack file) applies it:

    start     adds the `infermesh:canary:` block: a one-replica copy of POOL running IMAGE, taking
              WEIGHT percent of POOL's traffic (sim pools: `--sim key=value` sets the new build's knobs)
    promote   sets POOL's image (and sim knobs) to the canary's and removes the block
    rollback  removes the block

`status` and `evaluate` compare the canary with its base pool (fleet/canary.py has the rules) on
SLIs that cover every gateway replica, read from one of:

    --replica URL ...  each replica's /metrics (default for a local stack: its gateway processes)
    --kube-api URL     every running gateway pod of the stack's namespace, through the Kubernetes API
                       (`kubectl proxy` gives such a URL)
    --prometheus URL   a Prometheus scraping every pod (default for a cluster stack: its
                       delivery.prometheus_url; bearer token from $PROMETHEUS_TOKEN if set)
    --gateway URL      one gateway's ``GET /admin/sli`` (ledger and attempt log): a one-replica stack only

Both print one line, or JSON with ``--json``, and exit 0 promote, 3 wait, 4 rollback (2: bad input).
`evaluate` that cannot read the SLIs decides rollback (a canary nobody can measure is not left
live); with ``--follow`` it tries three times in a row first. `status` says so and exits 2.
`evaluate --apply` also makes the promote or rollback edit; `--follow` evaluates every
``--interval`` seconds until the decision is not wait or ``--timeout`` passes (then: 3).
With ``--replica``/``--kube-api``, a one-shot evaluation counts everything the replicas saw since
they started; ``--follow`` counts from its first reading on, for canary and baseline alike.
The admin token comes from ``--admin-token``, ``INFERMESH_ADMIN_TOKEN``, or the stack's state
dir: ``--gateway`` needs it; ``--replica`` and ``--kube-api`` send it to /metrics, which is the
operator's (without one, the gateways refuse and the canary is rolled back).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from fleet import canary as rules
from fleet import spec as spec_mod
from fleet import stackfile
from infermesh_cli.errors import UserError
from fleet import paths
from fleet.kinds import LOCAL_KINDS
from fleet.paths import state_dir
from fleet.spec import SimKnobs

IMAGE_RE = re.compile(r"^[a-z0-9][a-z0-9._/:-]*@sha256:[0-9a-f]{64}$")
START_COMMENT = "a canary (`infermesh canary start`); end it with `infermesh canary promote|rollback`"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("canary", help="start, evaluate, promote or roll back a canary (edits the stack file)")
    csub = p.add_subparsers(dest="action", required=True)

    def common(a: argparse.ArgumentParser) -> None:
        a.add_argument("--stack", required=True)
        a.add_argument("--stacks-dir", type=Path, default=None, help=argparse.SUPPRESS)

    a = csub.add_parser("start", help="add a canary block: POOL's copy running IMAGE at WEIGHT%% of POOL's traffic")
    common(a)
    a.add_argument("--pool", required=True)
    a.add_argument("--image", required=True, help="the new image, pinned by digest: name@sha256:<64 hex>")
    a.add_argument("--weight", type=float, default=5.0,
                   help=f"percent of the pool's traffic, >0 to {spec_mod.CANARY_MAX_WEIGHT} (default 5)")
    a.add_argument("--sim", action="append", default=[], metavar="KNOB=VALUE",
                   help="sim pools only: the new build's behaviour (ttft_ms, itl_ms, output_tokens, error_rate, seed)")
    a.set_defaults(func=start)

    for action, text in (("status", "compare canary and baseline now"),
                         ("evaluate", "decide promote / rollback / wait (exit 0 / 4 / 3)")):
        a = csub.add_parser(action, help=text)
        common(a)
        src = a.add_mutually_exclusive_group()
        src.add_argument("--replica", action="append", default=None, metavar="URL",
                         help="a gateway replica's base URL (repeat for each; its /metrics is read)")
        src.add_argument("--kube-api", default=None, metavar="URL",
                         help="Kubernetes API (e.g. `kubectl proxy`'s http://127.0.0.1:8001): every gateway pod")
        src.add_argument("--prometheus", default=None, metavar="URL", help="default: the stack's "
                         "delivery.prometheus_url")
        src.add_argument("--gateway", default=None, help="one gateway's base URL (/admin/sli; one-replica stacks)")
        a.add_argument("--admin-token", default=None, help="for /admin/sli and /metrics; default: "
                       "$INFERMESH_ADMIN_TOKEN or the state dir's")
        a.add_argument("--window", type=float, default=600.0, help="seconds of SLIs (default 600; --gateway "
                       "and --prometheus)")
        a.add_argument("--json", action="store_true", help="print the decision as JSON")
        a.add_argument("--min-samples", type=int, default=rules.Thresholds.min_samples)
        a.add_argument("--alpha", type=float, default=rules.Thresholds.alpha)
        a.add_argument("--error-margin", type=float, default=rules.Thresholds.error_margin)
        a.add_argument("--ttft-ratio", type=float, default=rules.Thresholds.ttft_ratio)
        a.add_argument("--ttlt-ratio", type=float, default=rules.Thresholds.ttlt_ratio)
        if action == "evaluate":
            a.add_argument("--apply", action="store_true", help="make the promote or rollback edit")
            a.add_argument("--follow", action="store_true", help="repeat while the decision is wait")
            a.add_argument("--interval", type=float, default=30.0)
            a.add_argument("--timeout", type=float, default=1800.0)
        a.set_defaults(func=evaluate)

    for action, text in (("promote", "make the canary's image the pool's and remove the block"),
                         ("rollback", "remove the canary block")):
        a = csub.add_parser(action, help=text)
        common(a)
        a.add_argument("--reason", default=None, help=argparse.SUPPRESS)
        a.set_defaults(func=promote if action == "promote" else rollback)


# ---- stack-file edits ------------------------------------------------------------------------------

def _load(args: argparse.Namespace) -> tuple[Path, spec_mod.Spec, str]:
    path = spec_mod.stack_path(args.stack, args.stacks_dir)
    spec = spec_mod.load(args.stack, args.stacks_dir)
    return path, spec, path.read_bytes().decode("utf-8")


def _sim_knobs(pairs: list[str], base: SimKnobs | None) -> SimKnobs | None:
    if not pairs:
        return None
    values = (base or SimKnobs()).model_dump()
    for pair in pairs:
        k, sep, v = pair.partition("=")
        if not sep or k not in SimKnobs.model_fields:
            raise UserError(f"--sim {pair!r}: use KNOB=VALUE with KNOB one of {', '.join(SimKnobs.model_fields)}")
        values[k] = v
    try:
        return SimKnobs.model_validate({k: (None if v in ("null", "none") else v) for k, v in values.items()})
    except Exception as e:  # pydantic ValidationError: one line
        raise UserError(f"--sim: {str(e).splitlines()[1:3]}") from None


def start_text(text: str, spec: spec_mod.Spec, pool: str, image: str, weight: float,
               sim: list[str] | None = None) -> tuple[str, spec_mod.Spec]:
    """The stack file with a canary block, and the spec it gives. Refuses bad or conflicting input."""
    names = [p.name for p in spec.pools]
    if pool not in names:
        raise UserError(f"no pool {pool!r} in stack {spec.stack}; pools: {', '.join(names)}")
    if spec.canary is not None:
        raise UserError(f"a canary is already running in stack {spec.stack} (pool {spec.canary.pool}, "
                        f"image {spec.canary.image}); promote or roll it back first")
    if not IMAGE_RE.match(image):
        raise UserError(f"image {image!r} is not pinned by digest; use name@sha256:<64 hex digits>")
    if not 0 < weight <= spec_mod.CANARY_MAX_WEIGHT:
        raise UserError(f"--weight {weight:g} is out of range: a canary takes more than 0 and at most "
                        f"{spec_mod.CANARY_MAX_WEIGHT} percent of its pool's traffic")
    base = spec.pool(pool)
    prov = spec.provider(base.provider)
    if base.role != "primary" or prov.drained:
        state = "drained" if prov.drained else base.role
        raise UserError(f"pool {pool!r} is {state}: a canary takes a share of a primary pool's traffic")
    if prov.kind == "openai":
        raise UserError(f"pool {pool!r} is an external upstream ({prov.name}); there is no image to canary")
    if base.image == image:
        raise UserError(f"{image} is already pool {pool!r}'s image")
    knobs = None
    if sim:
        if prov.kind != "sim":
            raise UserError(f"--sim applies only to sim pools; {pool!r} runs on {prov.kind}")
        knobs = _sim_knobs(sim, base.sim)
    block: dict = {"pool": pool, "image": image, "weight": int(weight) if weight == int(weight) else weight}
    if knobs is not None:
        block["sim"] = knobs.model_dump(exclude_none=True)
    expected = spec.model_copy(update={"canary": spec_mod.Canary(pool=pool, image=image, weight=weight, sim=knobs)})
    try:
        return stackfile.add_key(text, "canary", block, START_COMMENT), expected
    except stackfile.StackEditError as e:
        raise UserError(str(e)) from None


def end_text(text: str, spec: spec_mod.Spec, promote: bool) -> tuple[str, spec_mod.Spec]:
    if spec.canary is None:
        raise UserError(f"no canary is running in stack {spec.stack}; nothing to "
                        f"{'promote' if promote else 'roll back'}")
    c = spec.canary
    expected = spec.model_copy(update={"canary": None})
    try:
        if promote:
            base = spec.pool(c.pool)
            update: dict[str, object] = {"image": c.image}
            text = stackfile.set_item_field(text, "pools", c.pool, "image", c.image)
            if c.sim is not None and c.sim != base.sim:
                text = stackfile.set_item_field(text, "pools", c.pool, "sim", c.sim.model_dump(exclude_none=True))
                update["sim"] = c.sim
            pools = [p.model_copy(update=update) if p.name == c.pool else p for p in spec.pools]
            expected = expected.model_copy(update={"pools": pools})
        return stackfile.remove_key(text, "canary"), expected
    except stackfile.StackEditError as e:
        raise UserError(str(e)) from None


def _write(path: Path, args: argparse.Namespace, new_text: str, expected: spec_mod.Spec) -> spec_mod.Spec:
    try:
        after = stackfile.verify(new_text, args.stack, path, expected)
    except stackfile.StackEditError as e:
        raise UserError(str(e)) from None
    stackfile.write_atomically(path, new_text)
    return after


def start(args: argparse.Namespace) -> int:
    path, spec, text = _load(args)
    new_text, expected = start_text(text, spec, args.pool, args.image, args.weight, args.sim)
    _write(path, args, new_text, expected)
    print(f"canary started in {path.name}: pool {args.pool} -> {args.image} at {args.weight:g}% of its traffic; "
          f"apply with `pulumi up -s {args.stack}` (a running `infermesh up` follows the file)")
    return 0


def _end(args: argparse.Namespace, promote: bool) -> int:
    path, spec, text = _load(args)
    new_text, expected = end_text(text, spec, promote)
    _write(path, args, new_text, expected)
    c = spec.canary
    assert c is not None
    if promote:
        print(f"canary promoted in {path.name}: pool {c.pool} now runs {c.image}; canary block removed")
    else:
        print(f"canary rolled back in {path.name}: block removed, pool {c.pool} keeps "
              f"{spec.pool(c.pool).image or 'its image'}" + (f" ({args.reason})" if args.reason else ""))
    return 0


def promote(args: argparse.Namespace) -> int:
    return _end(args, True)


def rollback(args: argparse.Namespace) -> int:
    return _end(args, False)


# ---- evaluation --------------------------------------------------------------------------------------

def optional_admin_token(args: argparse.Namespace) -> str | None:
    try:
        return admin_token(args)
    except UserError:
        return None


def admin_token(args: argparse.Namespace) -> str:
    if args.admin_token:
        return args.admin_token
    state = state_dir(args.stack)
    try:
        return paths.admin_token(state)
    except FileNotFoundError:
        raise UserError(f"no admin token: pass --admin-token, set {paths.ADMIN_TOKEN_ENV}, or run where "
                        f"{paths.admin_token_path(state)} exists") from None


def fetch_sli(gateway: str, token: str, window: float, since: float | None = None) -> dict:
    query = {"since": f"{since:.3f}"} if since is not None else {"window": window}
    url = gateway.rstrip("/").removesuffix("/v1") + "/admin/sli?" + urllib.parse.urlencode(query)
    req = urllib.request.Request(url, headers={"authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        detail = ""
        try:
            detail = json.loads(e.read()).get("error", {}).get("message", "")
        except (ValueError, AttributeError):
            pass
        raise UserError(f"gateway answered {e.code} for /admin/sli{': ' + detail if detail else ''}") from None
    except (urllib.error.URLError, OSError) as e:
        raise UserError(f"cannot reach the gateway at {gateway} ({getattr(e, 'reason', e)})") from None


def canary_slis(gateway: str, token: str, window: float, pool: str) -> dict:
    """SLIs over the window, or only since the canary's first request when it is younger: canary and
    baseline are compared over the same period (load, time of day, a cold start: both saw the same)."""
    sli = fetch_sli(gateway, token, window)
    first = ((sli.get("pools") or {}).get(f"{pool}-canary") or {}).get("first_at")
    if first is not None and first > sli.get("since", 0) + 1:
        sli = fetch_sli(gateway, token, window, since=first)
    return sli


def thresholds(args: argparse.Namespace) -> rules.Thresholds:
    return rules.Thresholds(min_samples=args.min_samples, alpha=args.alpha, error_margin=args.error_margin,
                            ttft_ratio=args.ttft_ratio, ttlt_ratio=args.ttlt_ratio)


UNREACHABLE_TRIES = 3          # --follow: consecutive failed readings before the canary is rolled back


class SliUnavailable(Exception):
    """The SLIs could not be read (a replica, the Kubernetes API or Prometheus did not answer)."""


def _get(url: str, headers: dict[str, str] | None = None, timeout: float = 10.0) -> bytes:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read()
    except urllib.error.HTTPError as e:
        raise SliUnavailable(f"{url} answered {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        raise SliUnavailable(f"{url}: {getattr(e, 'reason', e)}") from None


class AdminSli:
    """One gateway's ``GET /admin/sli``: exact for a one-replica stack, blind to other replicas."""

    def __init__(self, gateway: str, token: str, window: float) -> None:
        self.gateway, self.token, self.window = gateway, token, window
        self.info: dict = {"kind": "admin-sli", "gateway": gateway}

    def decide(self, pool: str, t: rules.Thresholds) -> rules.Decision:
        try:
            sli = canary_slis(self.gateway, self.token, self.window, pool)
        except UserError as e:
            raise SliUnavailable(str(e)) from None
        return rules.decide(sli, pool, t)


class Replicas:
    """Every gateway replica's /metrics, summed (fleet/canary.py: fleet_sides)."""

    kind = "replicas"

    def __init__(self, urls: list[str], follow: bool, token: str | None = None) -> None:
        self.urls = urls
        self.follow = follow
        # /metrics is the operator's: the admin token, as a bearer and in the header the Kubernetes
        # API's pod proxy passes on (it drops Authorization)
        self.headers = {"authorization": f"Bearer {token}", "x-infermesh-admin-token": token} if token else {}
        self.first: dict[str, dict] = {}       # --follow: each replica's first reading
        self.info: dict = {"kind": self.kind, "replicas": []}

    def targets(self) -> list[tuple[str, str]]:
        """(name, metrics URL) of every replica."""
        return [(u, u.rstrip("/").removesuffix("/v1") + "/metrics") for u in self.urls]

    def decide(self, pool: str, t: rules.Thresholds) -> rules.Decision:
        total: dict = {}
        per: list[dict] = []
        targets = self.targets()
        if not targets:
            raise SliUnavailable("no gateway replica found")
        for name, url in targets:
            now = rules.parse_metrics(_get(url, self.headers).decode("utf-8", "replace"))
            if self.follow:
                self.first.setdefault(name, now)
            inc = rules.increase(now, self.first.get(name) if self.follow else None)
            rules.add(total, inc)
            c, b = rules.fleet_sides(inc, pool)
            per.append({"replica": name, "canary_attempts": c.attempts, "canary_errors": c.errors,
                        "baseline_attempts": b.attempts, "baseline_errors": b.errors})
        self.info = {"kind": self.kind, "replicas": per}
        return rules.evaluate(*rules.fleet_sides(total, pool), t)


class KubePods(Replicas):
    """Every running, ready gateway pod of the stack's namespace, read through the Kubernetes API's
    pod proxy (`kubectl proxy` serves it on loopback with the job's credentials)."""

    kind = "kubernetes-pods"

    def __init__(self, api: str, namespace: str, port: int, follow: bool, token: str | None = None) -> None:
        super().__init__([], follow, token)
        self.api, self.namespace, self.port = api.rstrip("/"), namespace, port

    def targets(self) -> list[tuple[str, str]]:
        base = f"{self.api}/api/v1/namespaces/{urllib.parse.quote(self.namespace)}/pods"
        selector = urllib.parse.urlencode({"labelSelector": "app.kubernetes.io/name=infermesh-gateway"})
        try:
            pods = json.loads(_get(f"{base}?{selector}")).get("items") or []
        except ValueError:
            raise SliUnavailable(f"{base}: not a pod list") from None
        out = []
        for pod in pods:
            status = pod.get("status") or {}
            ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
            if status.get("phase") == "Running" and ready:
                name = pod["metadata"]["name"]
                out.append((name, f"{base}/{name}:{self.port}/proxy/metrics"))
        return out


class Prometheus:
    """Per-pool increases over the window from a Prometheus that scrapes every gateway pod."""

    QUERIES = {
        "infermesh_requests_total": "sum by (pool, status_class) (increase(infermesh_requests_total{{{m}}}[{w}s]))",
        "infermesh_upstream_errors_total":
            "sum by (pool, error_class) (increase(infermesh_upstream_errors_total{{{m}}}[{w}s]))",
        "infermesh_ttft_seconds_bucket": "sum by (pool, le) (increase(infermesh_ttft_seconds_bucket{{{m}}}[{w}s]))",
        "infermesh_ttlt_seconds_bucket": "sum by (pool, le) (increase(infermesh_ttlt_seconds_bucket{{{m}}}[{w}s]))",
    }

    def __init__(self, url: str, namespace: str | None, window: float, token: str | None) -> None:
        self.url, self.window, self.token = url.rstrip("/"), window, token
        self.matcher = f'namespace="{namespace}"' if namespace else ""
        self.info: dict = {"kind": "prometheus", "url": self.url, "window_s": window}

    def samples(self) -> dict:
        headers = {"authorization": f"Bearer {self.token}"} if self.token else {}
        out: dict = {}
        for name, q in self.QUERIES.items():
            query = q.format(m=self.matcher, w=int(self.window))
            body = _get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": query}), headers)
            try:
                data = json.loads(body)
                result = data["data"]["result"] if data.get("status") == "success" else None
            except (ValueError, KeyError, TypeError):
                result = None
            if result is None:
                raise SliUnavailable(f"{self.url}: no answer to {query}")
            for r in result:
                labels = tuple(sorted((k, v) for k, v in r.get("metric", {}).items() if k != "__name__"))
                out[(name, labels)] = float(r["value"][1])
        return out

    def decide(self, pool: str, t: rules.Thresholds) -> rules.Decision:
        return rules.evaluate(*rules.fleet_sides(self.samples(), pool), t)


def sli_source(args: argparse.Namespace, spec: spec_mod.Spec, follow: bool):
    if args.gateway:
        if spec.gateway.replicas > 1:
            raise UserError(f"stack {spec.stack} runs {spec.gateway.replicas} gateway replicas: one gateway's "
                            "/admin/sli sees only its own attempts; use --replica for each, --kube-api or "
                            "--prometheus")
        return AdminSli(args.gateway, admin_token(args), args.window)
    if args.replica:
        return Replicas(args.replica, follow, optional_admin_token(args))
    if args.kube_api:
        return KubePods(args.kube_api, spec.gateway.namespace, spec.gateway.port, follow, optional_admin_token(args))
    prometheus = args.prometheus or spec.delivery.prometheus_url
    if prometheus:
        return Prometheus(prometheus, spec.gateway.namespace, args.window, os.environ.get("PROMETHEUS_TOKEN"))
    if all(spec.provider(p.provider).kind in LOCAL_KINDS for p in spec.pools):
        port = spec.gateway.port
        ports = [port] if spec.gateway.replicas == 1 else [port + 1 + i for i in range(spec.gateway.replicas)]
        return Replicas([f"http://127.0.0.1:{p}" for p in ports], follow, optional_admin_token(args))
    raise UserError(f"stack {spec.stack}: say where its SLIs are: --kube-api (with `kubectl proxy`), --prometheus "
                    "or delivery.prometheus_url in the stack file (docs/ci.md#canary)")


def evaluate(args: argparse.Namespace) -> int:
    spec = spec_mod.load(args.stack, args.stacks_dir)
    if spec.canary is None:
        raise UserError(f"no canary is running in stack {args.stack}")
    if args.window <= 0:
        raise UserError("--window must be positive (seconds)")
    t = thresholds(args)
    deciding = args.action == "evaluate"
    follow = getattr(args, "follow", False)
    source = sli_source(args, spec, follow)
    pool = spec.canary.pool
    deadline = time.monotonic() + getattr(args, "timeout", 0)
    misses = 0
    while True:
        try:
            decision = source.decide(pool, t)
            misses = 0
        except SliUnavailable as e:
            if not deciding:
                raise UserError(f"cannot read the canary's SLIs: {e}") from None
            misses += 1
            decision = rules.unreachable(pool, str(e))
            if follow and misses < UNREACHABLE_TRIES and time.monotonic() + args.interval <= deadline:
                print(f"cannot read the canary's SLIs ({e}); trying again", file=sys.stderr, flush=True)
                time.sleep(args.interval)
                continue
        if not follow or decision.action != "wait" or time.monotonic() + args.interval > deadline:
            break
        if not args.json:
            print(decision.line(), file=sys.stderr, flush=True)
        time.sleep(args.interval)
    applied = None
    if getattr(args, "apply", False) and decision.action in ("promote", "rollback"):
        path, now_spec, text = _load(args)
        if now_spec.canary != spec.canary:
            raise UserError("the canary block changed while it was evaluated; nothing applied")
        new_text, expected = end_text(text, now_spec, decision.action == "promote")
        _write(path, args, new_text, expected)
        applied = decision.action
    if args.json:
        print(json.dumps({**decision.to_json(), "pool": spec.canary.pool, "image": spec.canary.image,
                          "applied": applied, "source": source.info}, indent=2))
    else:
        print(decision.line() + (f" [{applied} written to the stack file]" if applied else ""))
    return decision.exit_code
