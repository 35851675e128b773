"""The plan: formulas checked by hand against the seeds' worked examples, and the shipped stacks."""

from __future__ import annotations

import copy
import ipaddress
import json
import subprocess
from pathlib import Path

import pytest

from fleet import capacity
from fleet import plan as plan_mod
from fleet import spec as spec_mod
from infermesh_cli.main import main

REPO = Path(__file__).resolve().parent.parent
BASE = REPO / "tests" / "policy_fixtures" / "base.yaml"


def config(path: Path = BASE) -> dict:
    return copy.deepcopy(spec_mod.read_config(path))


def spec_of(cfg: dict, stack: str = "test") -> spec_mod.Spec:
    return spec_mod.parse(cfg, stack)


def pool(cfg: dict, name: str) -> dict:
    return next(p for p in cfg["pools"] if p["name"] == name)


# ---- the seeds' worked examples --------------------------------------------------------------------

def test_gpus_formula_worked_example():
    # 2 QPS x 850 tokens / (1,500 x 0.75) = 1.51 -> 2 GPUs
    exact = capacity.gpus_needed(2, 600, 250, 1500, 0.75)
    assert exact == pytest.approx(1.5111, abs=1e-4)
    assert capacity.round_up(exact) == 2
    assert capacity.round_up(2.0000000000004) == 2     # float dust does not buy a GPU
    assert capacity.round_up(2.001) == 3


def test_cogs_formula_worked_example():
    # $2.80/h at 1,600 tok/s and 60 % utilisation = $0.81 per 1M tokens
    assert plan_mod.cogs_per_1m(2.80, 1600, 0.6) == pytest.approx(0.8102, abs=1e-4)
    assert round(plan_mod.cogs_per_1m(2.80, 1600, 0.6), 2) == 0.81
    assert plan_mod.cogs_per_1m(2.80, 1600, 0.6, overhead=0.05) == pytest.approx(0.8602, abs=1e-4)


def test_monthly_cost_formula():
    assert plan_mod.monthly_cost(0.40, 1, 2) == pytest.approx(584.0)      # 0.40 x 1 x 2 x 730
    assert plan_mod.monthly_cost(2.0, 8, 3) == pytest.approx(35040.0)


def test_capacity_worked_example_in_a_stack():
    cfg = config()
    cfg["forecast"][0]["qps"] = 2.0
    cfg["planning"] = {"headroom": 1.0}
    cap = plan_mod.build_plan(spec_of(cfg)).capacity[0]
    assert cap.gpus_exact == pytest.approx(1.5111, abs=1e-4)
    assert cap.required_gpus == 2
    assert cap.declared_gpus == 2 and cap.ok
    # Losing either provider leaves 1 GPU < 2: N+1 broken.
    assert cap.after_loss == 1 and not cap.n_plus_1


def test_capacity_headroom_rounds_up():
    cfg = config()
    cfg["forecast"][0]["qps"] = 3.0                 # 3 x 850 / 1125 = 2.267; x 1.3 = 2.947 -> 3
    cap = plan_mod.build_plan(spec_of(cfg)).capacity[0]
    assert cap.required_gpus == 3 and cap.headroom == 1.3
    assert cap.declared_gpus == 2 and not cap.ok


def test_capacity_n_plus_1_after_losing_largest_provider():
    cfg = config()
    pool(cfg, "qwen-vast")["replicas"] = 3      # vast 3, runpod 1, required 1 -> after losing vast: 1 >= 1
    cap = plan_mod.build_plan(spec_of(cfg)).capacity[0]
    assert cap.largest_provider == "vast" and cap.after_loss == 1 and cap.n_plus_1
    cfg["forecast"][0]["qps"] = 2.0             # required 2: after losing vast 1 < 2
    cap = plan_mod.build_plan(spec_of(cfg)).capacity[0]
    assert cap.required_gpus == 2 and cap.ok and not cap.n_plus_1


def test_capacity_mixed_gpus_counts_in_reference_units():
    cfg = config()
    pool(cfg, "qwen-runpod").update(gpu={"type": "L40S", "count": 1})
    cfg["throughput"].append({"gpu": "L40S", "model": "qwen2.5-7b-instruct", "tokens_per_s": 3000,
                              "efficiency": 0.75})
    cap = plan_mod.build_plan(spec_of(cfg)).capacity[0]
    # One GPU of each type (a tie: the reference is picked by name, RTX4090); one L40S at
    # 3,000 x 0.75 counts as 2,250 / 1,125 = 2 reference GPUs.
    assert cap.gpu_type == "RTX4090"
    assert dict(cap.by_provider) == {"vast": 1.0, "runpod": 2.0}
    assert cap.declared_gpus == 2 and cap.declared_equivalent == 3.0


def test_capacity_missing_throughput_is_reported():
    cfg = config()
    cfg["throughput"] = []
    cap = plan_mod.build_plan(spec_of(cfg)).capacity[0]
    assert cap.required_gpus is None and not cap.ok
    assert set(cap.missing_throughput) == {"qwen-vast", "qwen-runpod"}


# ---- VRAM --------------------------------------------------------------------------------------------

def test_vram_qwen_by_hand():
    # Qwen2.5-7B: 28 layers x 4 KV heads x 2 x 128 x 2 bytes = 57,344 B/token;
    # x 8,192 tokens x 16 sequences = 7,516,192,768 B = 7.0 GiB; + 14.2 GiB weights = 21.2 <= 24.
    v = plan_mod.build_plan(spec_of(config())).vram[0]
    assert v.kv_bytes_per_token == 57344
    assert v.kv_cache_gb == pytest.approx(7.0)
    assert v.total_gb == pytest.approx(21.2)
    assert v.gpu_vram_gb == 24 and v.fits


def test_vram_llama_by_hand_in_prod():
    # Llama-3.1-8B: 32 x 8 x 2 x 128 x 2 = 131,072 B/token; x 8,192 x 24 = 24 GiB; + 15 = 39 <= 48 (L40S).
    p = plan_mod.build_plan(spec_mod.load("prod"))
    v = next(x for x in p.vram if x.pool == "llama-eu-vast")
    assert (v.kv_bytes_per_token, v.kv_cache_gb, v.total_gb, v.gpu_vram_gb, v.fits) == (131072, 24.0, 39.0, 48, True)


def test_vram_too_many_sequences_does_not_fit_and_more_gpus_do():
    cfg = config()
    pool(cfg, "qwen-vast")["max_concurrency"] = 64      # 14.2 + 28 = 42.2 GiB > 24
    v = plan_mod.build_plan(spec_of(cfg)).vram[0]
    assert v.kv_cache_gb == pytest.approx(28.0) and not v.fits
    pool(cfg, "qwen-vast")["gpu"] = {"type": "RTX4090", "count": 2}    # 48 GiB
    assert plan_mod.build_plan(spec_of(cfg)).vram[0].fits


def test_vram_context_length_when_no_max_model_len_and_no_arch_flagged():
    cfg = config()
    del pool(cfg, "qwen-vast")["max_model_len"]          # 32,768 tokens x 16 x 57,344 B = 28 GiB
    assert plan_mod.build_plan(spec_of(cfg)).vram[0].kv_cache_gb == pytest.approx(28.0)
    del cfg["models"][0]["arch"]
    v = plan_mod.build_plan(spec_of(cfg)).vram[0]
    assert v.weights_only and v.kv_cache_gb == 0 and v.total_gb == pytest.approx(14.2) and v.fits


# ---- costs -------------------------------------------------------------------------------------------

def test_costs_staging_by_hand():
    p = plan_mod.build_plan(spec_mod.load("staging"))
    rows = {c.pool: c for c in p.costs.pools}
    assert rows["qwen-vast"].monthly == pytest.approx(292.0)          # 0.40 x 1 x 1 x 730
    assert rows["llama-runpod"].monthly == pytest.approx(722.70)      # 0.99 x 730
    # 0.40 / (1,500 x 0.6 x 3,600) x 1e6 = 0.1235, + 0.02 overhead
    assert rows["qwen-vast"].cogs_per_1m == pytest.approx(0.1435, abs=1e-4)
    assert dict(p.costs.providers) == {"vast": pytest.approx(292.0 + 620.5), "runpod": pytest.approx(503.7 + 722.7)}
    assert p.costs.monthly_total == pytest.approx(2138.9)
    hobby = next(t for t in p.costs.tiers if t.tier == "hobby")
    # hobby serves qwen only; its primary pool is qwen-vast (runpod is standby)
    assert hobby.cogs_per_1m == pytest.approx(0.1435, abs=1e-4)
    assert hobby.margin_per_1m == pytest.approx(0.0565, abs=1e-4)
    assert hobby.margin_pct == pytest.approx(28.3, abs=0.1)


def test_costs_price_falls_back_to_provider_cap():
    cfg = config()
    del pool(cfg, "qwen-vast")["price_per_gpu_hour"]
    c = next(r for r in plan_mod.build_plan(spec_of(cfg)).costs.pools if r.pool == "qwen-vast")
    assert (c.price_per_gpu_hour, c.price_source, c.monthly) == (1.0, "cap", 730.0)


def test_costs_prod_totals():
    p = plan_mod.build_plan(spec_mod.load("prod"))
    prov = dict(p.costs.providers)
    # vast: qwen 2 x 0.40 x 2 regions... 584 + 584 + llama 2 x 0.85 x 730 = 1241 + 620.5
    assert prov["vast"] == pytest.approx(584 + 584 + 1241 + 620.5)
    assert prov["gonka"] == 0       # billed per token
    gonka = next(r for r in p.costs.pools if r.pool == "qwen-eu-gonka")
    assert gonka.cogs_per_1m == pytest.approx(0.35 + 0.02)


# ---- leases, mesh, routing ----------------------------------------------------------------------------

def test_prod_leases():
    spec = spec_mod.load("prod")
    p = plan_mod.build_plan(spec)
    leased = [x for x in spec.pools if spec.provider(x.provider).kind != "openai"]
    assert len(p.leases) == sum(x.replicas for x in leased) == 16
    assert not any(x.provider == "gonka" for x in p.leases)
    x = p.lease("qwen-eu-vast-1")
    assert (x.pool, x.provider_kind, x.region, x.gpu_type, x.gpu_count, x.price_cap, x.connection) == \
        ("qwen-eu-vast", "vastai", "eu-west", "RTX4090", 1, 1.10, "container")
    assert x.image.startswith("registry.example/infermesh/worker@sha256:")


def test_local_stack_has_no_leases_and_loopback_routing():
    p = plan_mod.build_plan(spec_mod.load("local"))
    assert p.leases == () and [n.role for n in p.mesh] == ["gateway"]
    urls = [e["url"] for m in p.routing["models"] for q in m["pools"] for e in q["endpoints"]]
    assert urls and all(u.startswith("https://127.0.0.1:") for u in urls)      # sim workers serve mutual TLS


def test_mesh_addresses_gateways_first_unique_in_cidr_and_peers():
    spec = spec_mod.load("prod")
    p = plan_mod.build_plan(spec)
    net = ipaddress.ip_network(spec.mesh.cidr)
    gws = [n for n in p.mesh if n.role == "gateway"]
    workers = [n for n in p.mesh if n.role == "worker"]
    # one identity per gateway pod the HPA may start (gateway.max_replicas), the first addresses of the mesh
    assert spec.gateway.max_replicas == 9 > spec.gateway.replicas
    assert [n.name for n in gws] == [f"gateway-{i}" for i in range(9)]
    assert [n.address for n in gws] == [f"10.90.0.{i}" for i in range(1, 10)]
    assert len(workers) == len(p.leases)
    addrs = [n.address for n in p.mesh]
    assert len(set(addrs)) == len(addrs)
    assert all(ipaddress.ip_address(a) in net for a in addrs)
    # Workers sit outside the reserved gateway block.
    assert all(int(ipaddress.ip_address(n.address)) > int(net.network_address) + 64 for n in workers)
    assert all(set(g.peers) == {w.name for w in workers} for g in gws)
    assert all(set(w.peers) == {g.name for g in gws} for w in workers)
    assert {x.name: x.mesh_address for x in p.leases} == {w.name: w.address for w in workers}


def test_mesh_addresses_are_stable_when_adding_pools_replicas_and_gateways():
    cfg = config(REPO / "stacks" / "Pulumi.prod.yaml")
    before = {n.name: n.address for n in plan_mod.build_plan(spec_of(cfg, "prod")).mesh}
    new = copy.deepcopy(pool(cfg, "qwen-eu-vast"))
    new["name"] = "qwen-eu-vast-b"
    cfg["pools"].insert(0, new)                          # declared first, the worst place
    pool(cfg, "llama-us-akash")["replicas"] = 3
    cfg["gateway"]["replicas"] = 5
    cfg["gateway"]["max_replicas"] = 11
    after = {n.name: n.address for n in plan_mod.build_plan(spec_of(cfg, "prod")).mesh}
    assert {k: after[k] for k in before} == before
    assert {"qwen-eu-vast-b-0", "qwen-eu-vast-b-1", "llama-us-akash-1", "llama-us-akash-2",
            "gateway-9", "gateway-10"} == set(after) - set(before)


def test_gateway_identities_follow_the_most_replicas_the_fleet_can_scale_to():
    """One mesh identity per gateway pod the autoscaler may start: max_replicas (default: replicas);
    a ceiling below the floor is refused."""
    cfg = config(REPO / "stacks" / "Pulumi.prod.yaml")
    cfg["gateway"].pop("max_replicas")
    plan = plan_mod.build_plan(spec_of(cfg, "prod"))
    assert [n.name for n in plan.mesh if n.role == "gateway"] == ["gateway-0", "gateway-1", "gateway-2"]
    cfg["gateway"]["max_replicas"] = 2
    with pytest.raises(spec_mod.SpecError, match=r"max_replicas 2 is below replicas 3"):
        spec_of(cfg, "prod")


def test_assign_addresses_probes_on_collision_and_refuses_overflow():
    # A /29 leaves 6 hosts: 4 reserved for gateways, 2 for workers; any 2 workers fit, a 3rd does not.
    got = plan_mod.assign_addresses("10.0.0.0/29", ["gateway-0"], ["a", "b"])
    assert got["gateway-0"] == "10.0.0.1"
    assert {got["a"], got["b"]} == {"10.0.0.5", "10.0.0.6"}
    with pytest.raises(ValueError, match="do not fit"):
        plan_mod.assign_addresses("10.0.0.0/29", ["gateway-0"], ["a", "b", "c"])


def test_routing_uses_mesh_addresses_for_leased_workers():
    p = plan_mod.build_plan(spec_mod.load("prod"))
    pools = {q["name"]: q for m in p.routing["models"] for q in m["pools"]}
    eps = pools["qwen-eu-vast"]["endpoints"]
    # a marketplace container is on the mTLS channel: https, the worker's certificate name; the Pulumi
    # program replaces the address with the lease's forwarded one (fleet/components/workers.py with_endpoints)
    assert [e["url"] for e in eps] == [f"https://{p.lease(f'qwen-eu-vast-{i}').mesh_address}:8000" for i in range(2)]
    assert [e["tls"]["server_name"] for e in eps] == [f"qwen-eu-vast-{i}.prod.workers.infermesh" for i in range(2)]
    assert pools["qwen-eu-gonka"]["endpoints"][0]["url"] == "https://api.gonkagate.com/v1"
    assert pools["qwen-eu-gonka"]["role"] == "standby"        # overflow never primary


def test_canary_gets_its_own_lease_and_mesh_address():
    cfg = config()
    digest = "registry.example/infermesh/worker@sha256:" + "a" * 64
    cfg["canary"] = {"pool": "qwen-vast", "image": digest, "weight": 5}
    p = plan_mod.build_plan(spec_of(cfg))
    c = p.lease("qwen-vast-canary-0")
    assert c.image == digest and c.role == "canary"
    pools = {q["name"]: q for m in p.routing["models"] for q in m["pools"]}
    assert pools["qwen-vast-canary"]["endpoints"][0]["url"] == f"https://{c.mesh_address}:8000"
    assert next(r for r in p.costs.pools if r.pool == "qwen-vast").monthly == pytest.approx(0.40 * 2 * 730)


def test_to_json_holds_everything_and_is_json():
    p = plan_mod.build_plan(spec_mod.load("prod"))
    doc = json.loads(json.dumps(p.to_json()))
    for key in ("providers", "pools", "capacity", "mesh", "routing", "costs", "leases", "vram"):
        assert key in doc
    assert doc["costs"]["monthly_total"] == p.costs.monthly_total
    assert plan_mod.build_plan(spec_mod.load("prod")).to_json() == doc   # deterministic


# ---- diff and the CLI ----------------------------------------------------------------------------------

def test_diff_reports_leases_routing_and_cost():
    cfg = config()
    old = plan_mod.build_plan(spec_of(cfg))
    pool(cfg, "qwen-vast")["replicas"] = 2
    pool(cfg, "qwen-vast")["weight"] = 3
    d = plan_mod.diff(old, plan_mod.build_plan(spec_of(cfg)))
    assert [x["name"] for x in d["leases"]["added"]] == ["qwen-vast-1"]
    assert d["leases"]["removed"] == [] and d["leases"]["changed"] == []
    r = d["routing"][0]
    assert (r["pool"], r["weight"], r["endpoints"]) == ("qwen-vast", [1, 3], [1, 2])
    assert d["cost"]["monthly_delta"] == pytest.approx(292.0)
    assert d["mesh"]["readdressed"] == []


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                   env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t", "HOME": str(cwd), "PATH": "/usr/bin:/bin"})


def test_plan_diff_command_against_a_git_revision(tmp_path, capsys):
    stacks = tmp_path / "stacks"
    stacks.mkdir()
    path = stacks / "Pulumi.prod.yaml"
    path.write_text((REPO / "stacks" / "Pulumi.prod.yaml").read_text())
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "prod")
    text = path.read_text()
    path.write_text(text.replace("      replicas: 2\n      weight: 2\n", "      replicas: 3\n      weight: 2\n", 1))
    assert main(["plan", "--stack", "prod", "--stacks-dir", str(stacks), "--diff", "HEAD"]) == 0
    out = capsys.readouterr().out
    assert "+ qwen-eu-vast-2" in out and "cost: $7,343.80 -> $7,635.80 per month (+$292.00)" in out
    assert main(["plan", "--stack", "prod", "--stacks-dir", str(stacks), "--diff", "HEAD", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [x["name"] for x in d["leases"]["added"]] == ["qwen-eu-vast-2"]


def test_plan_diff_errors_are_one_line(tmp_path, capsys):
    stacks = tmp_path / "stacks"
    stacks.mkdir()
    (stacks / "Pulumi.prod.yaml").write_text((REPO / "stacks" / "Pulumi.prod.yaml").read_text())
    (tmp_path / "README").write_text("x")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "README")
    _git(tmp_path, "commit", "-qm", "first")
    assert main(["plan", "--stack", "prod", "--stacks-dir", str(stacks), "--diff", "nosuchrev"]) == 2
    assert "no such git revision" in capsys.readouterr().err
    assert main(["plan", "--stack", "prod", "--stacks-dir", str(stacks), "--diff", "HEAD"]) == 2
    err = capsys.readouterr().err
    assert "stacks/Pulumi.prod.yaml does not exist at that revision" in err and "Traceback" not in err


def test_plan_command_human_and_json(capsys):
    assert main(["plan", "--stack", "prod"]) == 0
    out = capsys.readouterr().out
    assert "16 GPU leases" in out and "$7,343.80" in out and "qwen2.5-7b-instruct@eu-west" in out
    assert main(["plan", "--stack", "staging", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stack"] == "staging"
