"""One worker launch (fleet/launch.py): Pulumi's lease args, the Ansible role's rendered command and
the local stack's command carry the same decided flags for one pool."""

from __future__ import annotations

import copy
import shlex
import subprocess
from pathlib import Path

import jinja2
import pytest
import yaml

from fleet import spec as spec_mod
from fleet.inventory import build_inventory, host_vars, load_hosts
from fleet.launch import TlsFiles, worker_launch
from fleet.local import LocalStack
from fleet.plan import build_plan

ROOT = Path(__file__).resolve().parent.parent
ROLE = ROOT / "playbooks" / "roles" / "worker"
POOL = "qwen-eu-vast"


def _config(**pool_changes) -> dict:
    config = copy.deepcopy(spec_mod.read_config(spec_mod.stack_path("prod")))
    for m in config["models"]:
        if m["id"] == "qwen2.5-7b-instruct":
            m["quantization"] = "awq"
    for p in config["pools"]:
        if p["name"] == POOL:
            p["gpu"] = {**p["gpu"], "count": 2}
            p.update(pool_changes)
    return config


def _spec(config: dict, stack: str = "prod") -> spec_mod.Spec:
    raw = spec_mod.read_config(spec_mod.stack_path("prod"))
    secrets = {k: "x" for k, v in raw.items() if isinstance(v, dict) and set(v) == {"secure"}}
    return spec_mod.parse({k: v for k, v in config.items() if k not in secrets}, stack, secrets=secrets)


def _flags(argv: list[str]) -> dict[str, str | None]:
    """--flag value pairs (a flag followed by another flag, or last, is a switch: None)."""
    out: dict[str, str | None] = {}
    for i, a in enumerate(argv):
        if a.startswith("--"):
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            out[a] = None if nxt is None or nxt.startswith("--") else nxt
    return out


def pulumi_args(monkeypatch, tmp_path: Path) -> list[str]:
    """The GpuLease's args as the Pulumi program registers them (under mocks)."""
    from tests.test_pulumi_program import LEASE_TYPE, run_program, unwrap

    raw = spec_mod.read_config(spec_mod.stack_path("prod"))
    config = {**raw, **_config()}
    (tmp_path / "Pulumi.prod.yaml").write_text(yaml.safe_dump({"config": {f"infermesh:{k}": v
                                                                         for k, v in config.items()}}))
    run = run_program("prod", monkeypatch, stacks_dir=tmp_path)
    lease = next(r for r in run.mocks.of_type(LEASE_TYPE) if unwrap(r.inputs["name"]) == f"{POOL}-0")
    return list(unwrap(lease.inputs["args"]))


def ansible_command(tmp_path: Path) -> list[str]:
    """The worker role's run.sh for the same pool on an SSH host, rendered from bootstrap's host vars."""
    raw = spec_mod.read_config(spec_mod.stack_path("prod"))
    spec = _spec({**raw, **_config(connection="ssh")})
    plan = build_plan(spec)
    from fleet.inventory import bootstrapped_nodes
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text(yaml.safe_dump({"hosts": {n.name: f"192.0.2.{i + 10}"
                                               for i, n in enumerate(bootstrapped_nodes(plan))}}))
    inv = build_inventory(spec, plan, load_hosts(hosts), keys_file=tmp_path / "keys.json")
    hv = {**yaml.safe_load((ROLE / "defaults" / "main.yml").read_text()), **host_vars(inv, f"{POOL}-0"),
          "worker_engine": "vllm", "worker_image": "registry.example/worker@sha256:" + "0" * 64,
          "ansible_managed": "managed"}
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True)    # as Ansible renders templates
    env.filters["quote"] = lambda v: shlex.quote(str(v))
    text = env.from_string((ROLE / "templates" / "run.sh.j2").read_text()).render(**hv)
    # a script sh runs: its first command is the exec (not swallowed by a comment line above it)
    code = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert code and code[0].startswith("exec "), text
    subprocess.run(["sh", "-n"], input=text, text=True, check=True)
    argv = shlex.split(text.replace("\\\n", " "), comments=True)
    return argv[argv.index(hv["worker_image"]) + 1:]


def local_command() -> list[str]:
    """The local stack's command for the same pool on a sim provider (what `infermesh up` runs)."""
    raw = spec_mod.read_config(spec_mod.stack_path("prod"))
    config = {**raw, **_config(provider="sim-eu", sim={}, gpu={"type": "cpu"})}
    config["providers"] = [*config["providers"], {"name": "sim-eu", "kind": "sim",
                                                       "regions": [next(p for p in config["pools"]
                                                                        if p["name"] == POOL)["region"]]}]
    spec = _spec(config)
    stack = LocalStack(spec, Path("/nonexistent"))
    stack.tls_files = lambda lease: TlsFiles(f"/s/{lease}.crt", f"/s/{lease}.key", "/s/ca.crt")   # no disk here
    return next(cmd for name, _, cmd in stack.worker_commands() if name == f"{POOL}-0")


def test_the_three_launches_carry_the_same_decided_flags(monkeypatch, tmp_path):
    pulumi, ansible, local = _flags(pulumi_args(monkeypatch, tmp_path)), _flags(ansible_command(tmp_path)), \
        _flags(local_command())
    decided = {"--max-num-seqs": pulumi["--max-num-seqs"], "--max-model-len": pulumi["--max-model-len"],
               "--tensor-parallel-size": "2", "--quantization": "awq", "--enable-prompt-tokens-details": None}
    assert {k: pulumi.get(k, "missing") for k in decided} == decided
    assert {k: ansible.get(k, "missing") for k in decided} == decided          # SSH hosts: the same launch
    # the local sim: the same limits in its vocabulary (it has no GPUs to split or weights to quantize)
    assert local["--max-concurrency"] == decided["--max-num-seqs"]
    assert local["--max-model-len"] == decided["--max-model-len"] and "--enable-prompt-tokens-details" in local
    # the channel: mutual TLS (client certificates required) in a container and on the local stack;
    # WireGuard on the SSH host, no TLS there
    assert pulumi["--ssl-cert-reqs"] == local["--ssl-cert-reqs"] == "2"
    assert {"--ssl-keyfile", "--ssl-certfile", "--ssl-ca-certs"} <= set(pulumi) & set(local)
    assert not any(k.startswith("--ssl") for k in ansible)


def test_launch_is_a_pure_function_of_the_spec():
    raw = spec_mod.read_config(spec_mod.stack_path("prod"))
    spec = _spec({**raw, **_config()})
    lease = next(x for x in build_plan(spec).leases if x.pool == POOL)
    a, b = worker_launch(spec, lease), worker_launch(spec, lease)
    assert a == b and a["channel"] == "mtls" and a["env"]["INFERMESH_CHANNEL"] == "mtls"
    assert a["disk_gb"] == int(spec.model(lease.model).weights_gb * 1.1) + 20


@pytest.mark.parametrize("kind,connection,channel", [("vastai", "container", "mtls"), ("runpod", "ssh", "wireguard"),
                                                     ("akash", "container", "mtls"), ("openai", "container", "https"),
                                                     ("sim", "container", "mtls")])
def test_channel_per_provider_kind(kind, connection, channel):
    from fleet.kinds import channel_for
    assert channel_for(kind, connection) == channel


def test_ssh_hosts_carry_the_operators_keys_and_a_bad_key_is_one_clear_error():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode() + " op@laptop"
    config = _config(connection="ssh")
    config["ssh_public_keys"] = [f"  {key}\n"]
    spec = _spec(config)
    assert spec.ssh_public_keys == [key]
    plan = build_plan(spec)
    for lease in plan.leases:
        assert worker_launch(spec, lease)["ssh_keys"] == ([key] if lease.connection == "ssh" else [])
    assert any(x.connection == "ssh" for x in plan.leases)
    for bad, why in (("ssh-ed25519 AAAAnot-base64-at-all op@laptop", "not an OpenSSH public key"),
                     ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjE=\n", "never a private key"),
                     ("", "not an OpenSSH public key")):
        config["ssh_public_keys"] = [key, bad]
        with pytest.raises(spec_mod.SpecError, match=rf"^<config>: ssh_public_keys\[1\]: .*{why}"):
            _spec(config)
