"""Declarative failover: `infermesh failover drain|restore` changes one line of the stack file; the
plan moves the provider's weight to the others and adds replacement capacity (N+1 again)."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import yaml

from fleet import plan as plan_mod
from fleet import policy
from fleet import spec as spec_mod
from infermesh_cli.main import main

REPO = Path(__file__).resolve().parent.parent
PROD = REPO / "stacks" / "Pulumi.prod.yaml"


@pytest.fixture()
def stacks(tmp_path: Path) -> Path:
    d = tmp_path / "stacks"
    d.mkdir()
    shutil.copy(PROD, d / "Pulumi.prod.yaml")
    shutil.copy(REPO / "stacks" / "Pulumi.staging.yaml", d / "Pulumi.staging.yaml")
    return d


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def fo(action: str, provider: str, d: Path, stack: str = "prod") -> int:
    return main(["failover", action, provider, "--stack", stack, "--stacks-dir", str(d)])


def routing_pools(p: plan_mod.Plan) -> dict[str, dict]:
    return {q["name"]: q for m in p.routing["models"] for q in m["pools"]}


def test_drain_then_restore_prod(stacks, capsys):
    before_files = snapshot(stacks)
    before = plan_mod.build_plan(spec_mod.load("prod", stacks))

    assert fo("drain", "vast", stacks) == 0
    out = capsys.readouterr().out
    assert out.startswith("drained vast in Pulumi.prod.yaml: leases +5 -7")

    # Only the stack file changed, by exactly one added line; comments and layout are kept.
    after_files = snapshot(stacks)
    assert set(after_files) == set(before_files)
    assert after_files["Pulumi.staging.yaml"] == before_files["Pulumi.staging.yaml"]
    old_lines = before_files["Pulumi.prod.yaml"].decode().splitlines()
    new_lines = after_files["Pulumi.prod.yaml"].decode().splitlines()
    assert len(new_lines) == len(old_lines) + 1
    i = next(i for i, (a, b) in enumerate(zip(old_lines, new_lines, strict=False)) if a != b)
    assert new_lines[i].startswith("      drained: true")
    assert new_lines[:i] + new_lines[i + 1:] == old_lines
    assert old_lines[i - 1] == "      credentials: vastai-api-key"     # inside vast's entry

    spec = spec_mod.load("prod", stacks)
    assert spec.provider("vast").drained
    after = plan_mod.build_plan(spec)
    assert after.drained == ("vast",)

    # Its leases are gone; every lease that stays keeps its name and mesh address.
    assert not [x for x in after.leases if x.provider == "vast"]
    kept = {x.name: x for x in after.leases if not x.failover}
    assert {n: x.mesh_address for n, x in kept.items()} == \
        {x.name: x.mesh_address for x in before.leases if x.provider != "vast"}
    # Replacement capacity, by hand: qwen eu-west needs 2 GPUs (2 x 850 / 1125 x 1.3 = 1.96 -> 2);
    # akash 2 + runpod 1 loses N+1 when akash goes, so runpod gets +1 -> 2 + 2.
    assert sorted(x.name for x in after.leases if x.failover) == [
        "llama-eu-akash-1", "llama-eu-runpod-1", "qwen-eu-runpod-1", "qwen-us-akash-1", "qwen-us-runpod-1"]

    # Weights moved: vast pools are drained with weight 0 and no endpoints; the rest carry all of it.
    rb, ra = routing_pools(before), routing_pools(after)
    for name in ("qwen-eu-vast", "llama-eu-vast", "qwen-us-vast", "llama-us-vast"):
        assert (ra[name]["role"], ra[name]["weight"], ra[name]["endpoints"]) == ("drained", 0.0, [])
    for m in after.routing["models"]:
        live = [q for q in m["pools"] if q["role"] == "primary"]
        assert live and all(q["provider"] != "vast" for q in live)
    share = lambda rp, n: rp[n]["weight"] / sum(q["weight"] for q in rp.values()  # noqa: E731
                                                if q["role"] == "primary" and q["name"].startswith(n.split("-")[0]))
    assert share(ra, "qwen-eu-akash") > share(rb, "qwen-eu-akash")

    # Capacity is N+1 everywhere again, and the stack passes every rule.
    assert all(c.ok and c.n_plus_1 for c in after.capacity)
    assert policy.check(spec, after) == []
    assert after.costs.monthly_total == pytest.approx(before.costs.monthly_total - 496.40)

    # Second drain refused, file untouched.
    assert fo("drain", "vast", stacks) == 2
    assert "already drained" in capsys.readouterr().err
    assert snapshot(stacks) == after_files

    # Restore: byte-identical file, identical plan.
    assert fo("restore", "vast", stacks) == 0
    capsys.readouterr()
    assert snapshot(stacks) == before_files
    assert plan_mod.build_plan(spec_mod.load("prod", stacks)).to_json() == before.to_json()


def test_drain_diff_is_exactly_leases_and_routing(stacks, capsys):
    before = plan_mod.build_plan(spec_mod.load("prod", stacks))
    assert fo("drain", "akash", stacks) == 0
    after = plan_mod.build_plan(spec_mod.load("prod", stacks))
    d = plan_mod.diff(before, after)
    assert d["leases"]["changed"] == [] and d["mesh"]["readdressed"] == []
    assert {x["provider"] for x in d["leases"]["removed"]} == {"akash"}
    assert {x["provider"] for x in d["leases"]["added"]} <= {"vast", "runpod"}
    assert all(x["failover"] for x in d["leases"]["added"])
    assert set(d["mesh"]["removed"]) == {x["name"] for x in d["leases"]["removed"]}
    assert set(d["mesh"]["added"]) == {x["name"] for x in d["leases"]["added"]}
    assert all(c.ok and c.n_plus_1 for c in after.capacity)


def test_refusals_leave_the_file_untouched(stacks, capsys):
    files = snapshot(stacks)
    assert fo("drain", "nope", stacks) == 2
    assert "unknown provider 'nope'; declared: vast, akash, runpod, gonka" in capsys.readouterr().err
    assert fo("restore", "runpod", stacks) == 2
    assert "is not drained" in capsys.readouterr().err
    assert snapshot(stacks) == files


def test_drain_to_a_single_provider_warns(stacks, capsys):
    # staging has vast + runpod (reserved): draining vast leaves runpod alone: capacity ok, N+1 impossible.
    assert fo("drain", "vast", stacks, "staging") == 0
    out = capsys.readouterr().out
    assert "warning: capacity-n-plus-1 capacity/qwen2.5-7b-instruct@eu-west: losing runpod leaves 0 GPUs" in out
    assert "warning: multi-provider model/qwen2.5-7b-instruct" in out
    p = plan_mod.build_plan(spec_mod.load("staging", stacks))
    assert {x.provider for x in p.leases} == {"runpod"}
    assert all(c.ok for c in p.capacity)
    # ...and the last provider cannot be drained.
    assert fo("drain", "runpod", stacks, "staging") == 2
    assert "last provider in service" in capsys.readouterr().err


def _write(d: Path, cfg: dict, stack: str = "prod") -> None:
    (d / f"Pulumi.{stack}.yaml").write_text(yaml.safe_dump({"config": {f"infermesh:{k}": v for k, v in cfg.items()}},
                                                         sort_keys=False))


def test_drain_adds_a_pool_on_the_reserved_provider_when_one_provider_would_be_left(stacks, capsys):
    cfg = copy.deepcopy(spec_mod.read_config(PROD))
    cfg["pools"] = [p for p in cfg["pools"] if p["name"] != "qwen-eu-runpod"]   # qwen eu-west on vast + akash only
    _write(stacks, cfg)
    assert fo("drain", "vast", stacks) == 0
    capsys.readouterr()
    p = plan_mod.build_plan(spec_mod.load("prod", stacks))
    added = next(q for q in p.pools if q.name == "qwen-eu-vast-via-runpod")
    assert added.added_by_failover and added.provider == "runpod" and added.region == "eu-west"
    # akash 2 + runpod 2 (2 GPUs required, N+1)
    assert added.replicas == 2
    assert [x.name for x in p.leases if x.pool == added.name] == \
        ["qwen-eu-vast-via-runpod-0", "qwen-eu-vast-via-runpod-1"]
    cap = next(c for c in p.capacity if (c.model, c.region) == ("qwen2.5-7b-instruct", "eu-west"))
    assert cap.ok and cap.n_plus_1
    assert "qwen-eu-vast-via-runpod" in routing_pools(p)


def test_drain_without_forecast_replaces_gpus_one_for_one(stacks, capsys):
    cfg = copy.deepcopy(spec_mod.read_config(PROD))
    cfg["forecast"] = []
    _write(stacks, cfg)
    before = plan_mod.build_plan(spec_mod.load("prod", stacks))
    assert fo("drain", "vast", stacks) == 0
    capsys.readouterr()
    after = plan_mod.build_plan(spec_mod.load("prod", stacks))
    gpus = lambda p, m, r: sum(x.gpu_count for x in p.leases if x.model == m and x.region == r)  # noqa: E731
    for m in ("qwen2.5-7b-instruct", "llama-3.1-8b-instruct"):
        for r in ("eu-west", "us-east"):
            assert gpus(after, m, r) == gpus(before, m, r)


def test_drain_preserves_crlf_and_explicit_false(stacks, capsys):
    path = stacks / "Pulumi.prod.yaml"
    text = path.read_text().replace("      credentials: akash-api-key\n",
                                    "      credentials: akash-api-key\n      drained: false   # keep\n")
    path.write_bytes(text.replace("\n", "\r\n").encode())
    assert fo("drain", "akash", stacks) == 0
    capsys.readouterr()
    raw = path.read_bytes()
    assert b"\r\n      drained: true  #" in raw and raw.count(b"\n") == raw.count(b"\r\n")
    assert b"drained: false" not in raw
    assert spec_mod.load("prod", stacks).provider("akash").drained


def test_drain_and_restore_on_a_running_local_stack(stack_factory):
    """The local stack runs what the plan would lease (fleet.failover.effective_spec): after `failover
    drain`, the stack-file follower stops the drained provider's workers, starts the replacement
    capacity the plan adds, and the gateway routes around the provider; `restore` undoes it.
    Every request in between is answered."""
    import json
    import urllib.request

    from openai import OpenAI

    from fleet.local_apply import apply
    from fleet.failover import effective_spec
    from fleet.routing import local_endpoints

    stack = stack_factory()
    running = stack.stack

    def endpoints() -> dict[str, dict]:
        req = urllib.request.Request(stack.root_url + "/admin/endpoints",
                                     headers={"authorization": f"Bearer {stack.admin_token()}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return {p["pool"]: p for p in json.loads(r.read())["pools"]}

    def served(n: int) -> None:
        c = OpenAI(base_url=stack.base_url, api_key=key, max_retries=0)
        for i in range(n):
            assert c.chat.completions.create(model="demo-chat", max_tokens=2,
                                             messages=[{"role": "user", "content": f"q{i}"}]).choices

    def worker_requests(pool: str, replica: int) -> int:
        port = local_endpoints(running.spec, effective_spec(running.spec))[(pool, replica)]
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/sim/stats", timeout=5) as r:
            return json.loads(r.read())["requests"]

    key = stack.key("failover", "pro")
    west = next(p for n, p in running.procs if n == "demo-chat-west-0")
    assert fo("drain", "sim-west", stack.stacks_dir, "test") == 0
    apply(running, spec_mod.load("test", stack.stacks_dir), log=lambda line: None)

    pools = endpoints()
    assert pools["demo-chat-west"]["role"] == "drained" and pools["demo-chat-west"]["weight"] == 0
    assert west.poll() is not None, "the drained provider's worker still runs"
    # the replacement capacity the plan adds (one for one here: the reserve pool 1 -> 2) runs and is healthy
    plan = {p.name: p.replicas for p in effective_spec(running.spec).pools if p.role != "drained"}
    assert plan["demo-chat-reserve"] == 2
    for name, replicas in plan.items():
        assert [e["healthy"] for e in pools[name]["endpoints"]] == [True] * replicas, name
    east = sum(worker_requests("demo-chat-east", i) for i in (0, 1))
    served(30)
    assert sum(worker_requests("demo-chat-east", i) for i in (0, 1)) == east + 30

    assert fo("restore", "sim-west", stack.stacks_dir, "test") == 0
    apply(running, spec_mod.load("test", stack.stacks_dir), log=lambda line: None)
    pools = endpoints()
    assert pools["demo-chat-west"]["role"] == "primary" and pools["demo-chat-west"]["weight"] == 1
    assert len(pools["demo-chat-reserve"]["endpoints"]) == 1
    assert not any(n == "demo-chat-reserve-1" and p.poll() is None for n, p in running.procs)
    before = worker_requests("demo-chat-west", 0)
    served(30)
    assert worker_requests("demo-chat-west", 0) > before, "the restored provider takes no traffic"
