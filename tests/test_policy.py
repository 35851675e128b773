"""Each policy rule with a passing and a failing fixture (mutations of tests/policy_fixtures/base.yaml),
the `check` command, and the CrossGuard pack calling the same rules."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from fleet import plan as plan_mod
from fleet import policy
from fleet import spec as spec_mod
from infermesh_cli.main import main

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "policy_fixtures"
BASE = spec_mod.read_config(FIXTURES / "base.yaml")
TAG_IMAGE = "registry.example/infermesh/worker:latest"


def _pool(cfg: dict, name: str) -> dict:
    return next(p for p in cfg["pools"] if p["name"] == name)


def _tier(cfg: dict, name: str) -> dict:
    return next(t for t in cfg["tiers"] if t["name"] == name)


def violations(mutate: Callable[[dict], None] | None = None, rule: str | None = None,
               plan_edit: Callable[[plan_mod.Plan], plan_mod.Plan] | None = None) -> list[policy.Violation]:
    cfg = copy.deepcopy(BASE)
    if mutate:
        mutate(cfg)
    spec = spec_mod.parse(cfg, "fixture")
    plan = plan_mod.build_plan(spec)
    if plan_edit:
        plan = plan_edit(plan)
    return policy.check(spec, plan, rules=[rule] if rule else None)


def test_base_fixture_passes_every_rule():
    assert violations() == []


# ---- one failing fixture per rule (and the passing neighbour) -------------------------------------------

def _one_provider(cfg):            # drop the runpod pool: qwen on vast only
    cfg["pools"] = [p for p in cfg["pools"] if p["provider"] == "vast"]


def _free_tiers_only(cfg):
    _one_provider(cfg)
    cfg["tiers"] = [_tier(cfg, "hobby")]
    _tier(cfg, "hobby")["price_per_1m_tokens"] = 0


def _short_capacity(cfg):          # 3 QPS x 850 / 1125 x 1.3 = 2.95 -> 3 GPUs > 2 declared
    cfg["forecast"][0]["qps"] = 3.0


def _not_n_plus_1(cfg):            # vast 3 + runpod 1 = 4 >= 3, but losing vast leaves 1 < 3
    cfg["forecast"][0]["qps"] = 3.0
    _pool(cfg, "qwen-vast")["replicas"] = 3


def _no_reserved(cfg):
    cfg["providers"][1]["role"] = "marketplace"


def _public_mesh(cfg):
    cfg["mesh"] = {"cidr": "44.0.0.0/16"}


def _tag_image(cfg):
    _pool(cfg, "qwen-vast")["image"] = TAG_IMAGE


def _log_prompts(cfg):
    cfg["gateway"]["privacy"] = {"log_prompts": True}


def _no_tls(cfg):
    del cfg["gateway"]["tls_issuer"]


def _vram_overflow(cfg):           # 14.2 + 57,344 x 8,192 x 64 / 2^30 = 14.2 + 28 = 42.2 GiB > 24
    _pool(cfg, "qwen-vast")["max_concurrency"] = 64


def _no_arch(cfg):
    del cfg["models"][0]["arch"]


def _no_cap(cfg):
    del cfg["providers"][0]["price_cap_per_gpu_hour"]


def _slo_inverted(cfg):
    _tier(cfg, "business")["slo"] = {"availability": 99.9, "ttft_p95_ms": 2000}   # looser than pro's 1500


def _availability_inverted(cfg):
    _tier(cfg, "pro")["slo"] = {"availability": 98.0, "ttft_p95_ms": 1500}      # below hobby's 99.0


def _lease_over_cap(plan: plan_mod.Plan) -> plan_mod.Plan:
    # The spec refuses a pool price above its cap; a lease resolved above it (e.g. a changed offer) is caught here.
    leases = tuple(dataclasses.replace(x, price_per_gpu_hour=1.25) if x.pool == "qwen-vast" else x for x in plan.leases)
    return dataclasses.replace(plan, leases=leases)


def _public_endpoint(plan: plan_mod.Plan) -> plan_mod.Plan:
    routing = copy.deepcopy(plan.routing)
    routing["models"][0]["pools"][0]["endpoints"][0]["url"] = "http://203.0.113.7:8000"
    return dataclasses.replace(plan, routing=routing)


CAP = "capacity/qwen2.5-7b-instruct@eu-west"
FAILING = [
    # rule, mutate, plan edit, expected (resource, substring of message)
    ("multi-provider", _one_provider, None, ("model/qwen2.5-7b-instruct", "served by vast")),
    ("capacity-n-plus-1", _short_capacity, None, (CAP, "declared 2 GPUs < required 3")),
    ("capacity-n-plus-1", _not_n_plus_1, None, (CAP, "losing vast leaves 1 GPUs < required 3")),
    ("reserved-fallback", _no_reserved, None, ("tier/pro", "no pool on a reserved provider")),
    ("workers-mesh-only", _public_mesh, None, ("mesh", "44.0.0.0/16 is public")),
    ("workers-mesh-only", None, _public_endpoint, ("endpoint/qwen-vast/0", "203.0.113.7")),
    ("image-digest", _tag_image, None, ("pool/qwen-vast", "not pinned by digest")),
    ("prompt-logging-off", _log_prompts, None, ("gateway", "log_prompts is on")),
    ("ingress-tls", _no_tls, None, ("gateway", "no TLS issuer")),
    ("vram-fits", _vram_overflow, None, ("pool/qwen-vast", "needs 42.2 GiB")),
    ("vram-fits", _no_arch, None, ("pool/qwen-vast", "declares no arch")),
    ("price-under-cap", _no_cap, None, ("provider/vast", "without price_cap_per_gpu_hour")),
    ("price-under-cap", None, _lease_over_cap, ("pool/qwen-vast", "price 1.25/GPU-hour is above the cap 1")),
    ("slo-order", _slo_inverted, None, ("tier/business", "ttft_p95_ms 2000 is looser than lower tier pro's 1500")),
    ("slo-order", _availability_inverted, None, ("tier/pro", "availability 98% is below lower tier hobby's 99%")),
    # the fixture's fleet: qwen-vast 0.40 x 1 x 730 + qwen-runpod 0.69 x 1 x 730 = $795.70 over 1 QPS x 850 x 3,600 x
    # 730 = 2,233.8M tokens = $0.3562 per 1M: hobby at $0.20 is below it
    ("tier-margin", lambda c: _tier(c, "hobby").update(price_per_1m_tokens=0.20), None,
     ("tier/hobby", "price $0.2 per 1M tokens is below its fully loaded cost $0.3562")),
]


@pytest.mark.parametrize("rule,mutate,plan_edit,expected", FAILING,
                         ids=[f"{r}-{(m or p).__name__.strip('_')}" for r, m, p, _ in FAILING])
def test_failing_fixture(rule, mutate, plan_edit, expected):
    found = violations(mutate, rule, plan_edit)
    assert found, f"{rule} did not fire"
    assert all(v.rule == rule for v in found)
    resource, text = expected
    hit = [v for v in found if v.resource == resource]
    assert hit and text in hit[0].message, [v.line() for v in found]
    assert hit[0].fix
    line = hit[0].line()
    assert line.startswith(f"{rule} {resource}: ") and line.endswith(")") and "(fix: " in line


@pytest.mark.parametrize("rule", [r.id for r in policy.RULES])
def test_every_rule_has_a_failing_fixture(rule):
    assert rule in {r for r, *_ in FAILING}


PASSING = [
    # a neighbour of each failing fixture that must still pass its rule
    ("multi-provider", _free_tiers_only),                  # a free tier may use one provider
    ("capacity-n-plus-1", lambda c: (c["forecast"][0].update(qps=1.4), _pool(c, "qwen-vast").update(replicas=2),
                                     _pool(c, "qwen-runpod").update(replicas=2))),  # 1.4x850/1125x1.3 = 1.375 -> 2: 2+2
    ("reserved-fallback", lambda c: [_tier(c, t).update(monthly_fee=0) for t in ("pro", "business")]
     and None),                                           # still pro/business by name: must keep passing via runpod
    ("workers-mesh-only", lambda c: c.update(mesh={"cidr": "172.20.0.0/16"})),
    # a drained pool is not deployed: its image does not matter
    ("image-digest", lambda c: _pool(c, "qwen-runpod").update(role="drained", image=TAG_IMAGE)),
    ("prompt-logging-off", lambda c: c["gateway"].update(privacy={"log_prompts": False, "debug_log_ttl_hours": 1})),
    ("ingress-tls", None),
    ("vram-fits", lambda c: _pool(c, "qwen-vast").update(max_concurrency=19)),   # 14.2 + 8.3125 = 22.5 GiB <= 24
    ("price-under-cap", lambda c: _pool(c, "qwen-vast").update(price_per_gpu_hour=1.0)),   # at the cap
    ("slo-order", lambda c: _tier(c, "business").update(slo={"availability": 99.5, "ttft_p95_ms": 1500})),  # equal
    ("tier-margin", lambda c: _tier(c, "hobby").update(price_per_1m_tokens=0.3562)),    # at the cost, margin 0
]


@pytest.mark.parametrize("rule,mutate", PASSING, ids=[r for r, _ in PASSING])
def test_passing_fixture(rule, mutate):
    assert violations(mutate, rule) == []


def test_capacity_passing_neighbour_fails_when_one_gpu_short():
    # 1.4 QPS needs 2 GPUs: 2 + 2 keeps N+1 (the passing fixture); 1 + 1 carries it but not after a loss.
    c2 = lambda c: c["forecast"][0].update(qps=1.4)  # noqa: E731
    assert [v.message for v in violations(c2, "capacity-n-plus-1")] == ["losing vast leaves 1 GPUs < required 2"]


def test_reserved_fallback_via_fallback_model_when_tier_allows_it():
    def mutate(c):
        c["models"].append({"id": "qwen-big", "weights": "Qwen/Qwen2.5-14B-Instruct", "weights_gb": 20,
                            "arch": {"layers": 48, "kv_heads": 8, "head_dim": 128}, "fallback": "qwen2.5-7b-instruct",
                            "context_length": 8192})
        big = copy.deepcopy(_pool(c, "qwen-vast"))
        big.update(name="big-vast", model="qwen-big", gpu={"type": "A100-80G", "count": 1}, max_concurrency=8)
        c["pools"].append(big)
        _tier(c, "pro")["models"] = ["qwen-big"]
    found = violations(mutate, "reserved-fallback")
    assert [v.resource for v in found] == ["tier/pro"]
    found = violations(lambda c: (mutate(c), _tier(c, "pro").update(allow_fallback=True)), "reserved-fallback")
    assert found == []


def test_local_stack_passes_and_is_exempt_from_supply_redundancy():
    spec = spec_mod.load("local")
    assert policy.check(spec) == []
    assert plan_mod.is_local_only(spec) and spec.gateway.tls_issuer is None


@pytest.mark.parametrize("stack", ["local", "staging", "prod"])
def test_shipped_stacks_pass(stack):
    spec = spec_mod.load(stack)
    assert [v.line() for v in policy.check(spec)] == []


# ---- per-resource rules ----------------------------------------------------------------------------------

def test_worker_service_must_not_be_public():
    props = {"metadata": {"name": "qwen-workers", "labels": {"app.kubernetes.io/component": "worker"}},
             "spec": {"type": "LoadBalancer"}}
    [v] = policy.check_resource("kubernetes:core/v1:Service", props)
    assert v.rule == "workers-mesh-only" and v.resource == "service/qwen-workers"
    props["spec"]["type"] = "ClusterIP"
    assert policy.check_resource("kubernetes:core/v1:Service", props) == []
    gw = {"metadata": {"name": "gateway"}, "spec": {"type": "LoadBalancer"}}
    assert policy.check_resource("kubernetes:core/v1:Service", gw) == []


def test_ingress_needs_tls():
    [v] = policy.check_resource("kubernetes:networking.k8s.io/v1:Ingress", {"metadata": {"name": "gw"}, "spec": {}})
    assert (v.rule, v.resource) == ("ingress-tls", "ingress/gw")
    ok = {"metadata": {"name": "gw"}, "spec": {"tls": [{"hosts": ["api.x"], "secretName": "gw-tls"}]}}
    assert policy.check_resource("kubernetes:networking.k8s.io/v1:Ingress", ok) == []


def test_lease_resource_digest_and_cap():
    good = {"name": "qwen-vast-0", "gpu_type": "RTX4090", "provider_kind": "vastai", "price_cap": 1.0,
            "price_per_gpu_hour": 0.4, "image": "r/w@sha256:" + "b" * 64}
    assert policy.check_resource("pulumi-python:dynamic:Resource", good) == []
    bad = dict(good, image=TAG_IMAGE, price_per_gpu_hour=1.3)
    assert sorted(v.rule for v in policy.check_resource("infermesh:fleet:GpuLease", bad)) == \
        ["image-digest", "price-under-cap"]
    assert policy.check_resource("kubernetes:apps/v1:Deployment", {"spec": {}}) == []


# ---- the check command -----------------------------------------------------------------------------------

@pytest.mark.parametrize("stack", ["local", "staging", "prod"])
def test_check_command_ok(stack, capsys):
    assert main(["check", "--stack", stack]) == 0
    assert capsys.readouterr().out.startswith(f"{stack}: OK")


def test_check_command_lists_violations(tmp_path, capsys):
    text = (FIXTURES / "base.yaml").read_text()
    text = text.replace("    tls_issuer: letsencrypt-staging\n", "    privacy: {log_prompts: true}\n")
    (tmp_path / "Pulumi.bad.yaml").write_text(text)
    assert main(["check", "--stack", "bad", "--stacks-dir", str(tmp_path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "prompt-logging-off gateway: privacy.log_prompts is on for every tenant "
        "(fix: set gateway.privacy.log_prompts: false; tenants opt in one by one)",
        "ingress-tls gateway: ingress api.test.example has no TLS issuer "
        "(fix: set gateway.tls_issuer to a cert-manager ClusterIssuer)",
    ]
    assert main(["check", "--stack", "bad", "--stacks-dir", str(tmp_path), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert not doc["ok"] and [v["rule"] for v in doc["violations"]] == ["prompt-logging-off", "ingress-tls"]


def test_check_command_bad_stack_is_one_line(tmp_path, capsys):
    (tmp_path / "Pulumi.bad.yaml").write_text((FIXTURES / "base.yaml").read_text().replace("provider: runpod",
                                                                                         "provider: nope"))
    assert main(["check", "--stack", "bad", "--stacks-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown provider 'nope'" in err and len(err.strip().splitlines()) == 1


# ---- the CrossGuard pack ---------------------------------------------------------------------------------

@pytest.fixture()
def pack(monkeypatch):
    """policies/__main__.py imported as a module: building the policies must not start the analyzer."""
    spec = importlib.util.spec_from_file_location("infermesh_policy_pack", REPO / "policies" / "__main__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config_env(path: Path) -> dict[str, str]:
    """What Pulumi hands a policy pack: `infermesh:<key>` -> JSON text (secrets decrypted to plain text)."""
    out = {}
    for key, value in spec_mod.read_config(path).items():
        if isinstance(value, dict) and set(value) == {"secure"}:
            out[f"infermesh:{key}"] = "plain-secret"
        else:
            out[f"infermesh:{key}"] = json.dumps(value)
    return out


def _run_stack_policies(pack, resources=()) -> list[str]:
    reported: list[str] = []
    args = SimpleNamespace(resources=list(resources), get_config=lambda: {})
    for p in pack.POLICIES:
        if p.__class__.__name__ == "StackValidationPolicy":
            p.validate(args, lambda msg, urn=None: reported.append(msg))
    return reported


def test_pack_has_a_policy_per_rule(pack):
    names = [p.name for p in pack.POLICIES]
    assert names[:len(policy.RULES)] == [r.id for r in policy.RULES]
    assert len(set(names)) == len(names)


def test_pack_stack_policies_pass_prod_and_report_violations(pack, monkeypatch):
    monkeypatch.setattr(pack, "_config_env", lambda: _config_env(REPO / "stacks" / "Pulumi.prod.yaml"))
    assert _run_stack_policies(pack) == []

    pack._cache.clear()
    env = _config_env(FIXTURES / "base.yaml")
    gw = json.loads(env["infermesh:gateway"])
    gw["privacy"] = {"log_prompts": True}
    env["infermesh:gateway"] = json.dumps(gw)
    monkeypatch.setattr(pack, "_config_env", lambda: env)
    assert _run_stack_policies(pack) == [
        "prompt-logging-off gateway: privacy.log_prompts is on for every tenant "
        "(fix: set gateway.privacy.log_prompts: false; tenants opt in one by one)"]


def test_pack_falls_back_to_the_stack_file(pack, monkeypatch):
    monkeypatch.setattr(pack, "_config_env", lambda: {})
    monkeypatch.setenv("PULUMI_STACK", "staging")
    assert pack.load_spec().stack == "staging"
    assert _run_stack_policies(pack) == []


def test_pack_routing_configmap_must_equal_the_plan(pack, monkeypatch):
    monkeypatch.setattr(pack, "_config_env", lambda: _config_env(REPO / "stacks" / "Pulumi.prod.yaml"))
    routing = plan_mod.build_plan(pack.load_spec()).routing

    def cm(doc):
        return SimpleNamespace(resource_type="kubernetes:core/v1:ConfigMap", name="routing", urn="urn:cm",
                               props={"data": {"routing.json": json.dumps(doc)}})
    assert _run_stack_policies(pack, [cm(routing)]) == []
    edited = copy.deepcopy(routing)
    edited["models"][0]["pools"][0]["weight"] = 99
    [msg] = _run_stack_policies(pack, [cm(edited)])
    assert msg.startswith("routing-matches-plan configmap/routing:")


def test_pack_resource_policy(pack):
    [res] = [p for p in pack.POLICIES if p.__class__.__name__ == "ResourceValidationPolicy"]
    reported: list[str] = []
    args = SimpleNamespace(resource_type="kubernetes:core/v1:Service", name="w",
                           props={"metadata": {"name": "w-worker"}, "spec": {"type": "NodePort"}})
    res.validate(args, lambda msg, urn=None: reported.append(msg))
    assert reported == ["workers-mesh-only service/w-worker: worker Service is NodePort "
                        "(fix: workers are reached over the mesh only: use ClusterIP or no Service)"]
