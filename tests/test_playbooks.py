"""The bootstrap path without hosts: inventory generation, mesh keys, the playbooks' filters,
the bootstrap command's errors, and ansible-lint's production profile. (tests/test_mesh.py runs
the playbooks for real.)"""

from __future__ import annotations

import base64
import importlib.util
import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fleet import mesh_keys
from fleet.inventory import (
    InventoryError,
    build_inventory,
    host_vars,
    interface_name,
    load_fleet,
    load_hosts,
    nodes_of,
)
from fleet.plan import build_plan
from fleet.spec import load

REPO = Path(__file__).resolve().parent.parent
STACKS_DIR = REPO / "tests" / "mesh"
FILTERS = REPO / "playbooks" / "filter_plugins" / "infermesh.py"


def _filters():
    spec = importlib.util.spec_from_file_location("infermesh_filters", FILTERS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def plan_and_spec():
    spec = load("meshtest", STACKS_DIR)
    return spec, build_plan(spec)


@pytest.fixture
def hosts_file(tmp_path: Path) -> Path:
    path = tmp_path / "hosts.yaml"
    path.write_text(yaml.safe_dump({
        "ssh_known_hosts": "/k/known_hosts",
        "hosts": {
            "gateway-0": {"ssh_host": "192.0.2.10", "mesh_endpoint": "198.51.100.7"},
            "meshpool-0": {"ssh_host": "192.0.2.11", "ssh_port": 2222, "ssh_user": "ubuntu"},
            "meshpool-1": "192.0.2.12",
        },
    }))
    return path


# ---- inventory ----------------------------------------------------------------------------------

def test_inventory_comes_from_the_plan_and_the_lease_outputs(plan_and_spec, hosts_file, tmp_path) -> None:
    spec, plan = plan_and_spec
    inv = build_inventory(spec, plan, load_hosts(hosts_file), keys_file=tmp_path / "keys.json")
    assert nodes_of(inv, "gateways") == ["gateway-0"]
    assert nodes_of(inv, "workers") == ["meshpool-0", "meshpool-1"]
    gw = host_vars(inv, "gateway-0")
    w0 = host_vars(inv, "meshpool-0")
    addresses = {n.name: n.address for n in plan.mesh}
    assert gw["mesh_address"] == addresses["gateway-0"] and gw["mesh_prefix_len"] == 24
    # Gateways list every worker without an endpoint (workers behind NAT dial out) ...
    assert [(p["name"], p.get("endpoint")) for p in gw["mesh_peers"]] == [("meshpool-0", None), ("meshpool-1", None)]
    # ... and workers dial the gateway's mesh endpoint, with keepalive from the stack.
    assert w0["mesh_peers"] == [{"name": "gateway-0", "address": addresses["gateway-0"],
                                 "endpoint": "198.51.100.7:51820", "keepalive": 5}]
    assert (w0["ansible_host"], w0["ansible_port"], w0["ansible_user"]) == ("192.0.2.11", 2222, "ubuntu")
    assert w0["worker_endpoint_id"] == "meshpool/0" and w0["worker_model"] == "mesh-chat"
    assert w0["worker_sim_args"] == {"ttft_ms": 20.0, "itl_ms": 3.0, "output_tokens": 8}
    assert w0["preflight_gpu_type"] == ""  # a `cpu` pool
    assert gw["preflight_allow_sim"] is True and gw["routing_config"] == plan.routing   # SSH workers only
    assert gw["routing_left_out"] == []
    assert "StrictHostKeyChecking=yes" in gw["ansible_ssh_common_args"]
    # Interface names are unique per node and valid Linux names.
    names = {host_vars(inv, n)["mesh_interface"] for n in nodes_of(inv)}
    assert len(names) == 3 and all(len(n) <= 15 for n in names)


def test_ssh_gateways_get_no_placeholder_for_container_leases(hosts_file, tmp_path) -> None:
    """A container pool (mutual TLS at its marketplace's forwarded port) beside the SSH pool: the
    SSH gateway's routing leaves its endpoints out instead of dialling a mesh address it never has."""
    doc = yaml.safe_load((STACKS_DIR / "Pulumi.meshtest.yaml").read_text())
    pools = doc["config"]["infermesh:pools"]
    pools.append({**pools[0], "name": "boxpool", "connection": "container", "replicas": 2})
    (tmp_path / "Pulumi.mixed.yaml").write_text(yaml.safe_dump(doc))
    spec = load("mixed", tmp_path)
    plan = build_plan(spec)
    full = {e["id"]: e for m in plan.routing["models"] for p in m["pools"] for e in p["endpoints"]}
    assert full["boxpool/0"]["channel"] == "mtls"        # the plan routes it (Pulumi fills in its address)
    inv = build_inventory(spec, plan, load_hosts(hosts_file), keys_file=tmp_path / "keys.json")
    gw = host_vars(inv, "gateway-0")
    routed = {e["id"] for m in gw["routing_config"]["models"] for p in m["pools"] for e in p["endpoints"]}
    assert routed == {"meshpool/0", "meshpool/1"}
    assert gw["routing_left_out"] == ["boxpool/0", "boxpool/1"]
    assert nodes_of(inv, "workers") == ["meshpool-0", "meshpool-1"]     # containers are not Ansible's


def test_interface_names_stay_valid_for_long_node_names() -> None:
    long_a, long_b = "a-very-long-pool-name-0", "a-very-long-pool-name-1"
    assert interface_name("gateway-0") == "wg-gateway-0"
    assert len(interface_name(long_a)) <= 15 and interface_name(long_a) != interface_name(long_b)


def test_inventory_refuses_missing_and_unknown_hosts(plan_and_spec, tmp_path) -> None:
    spec, plan = plan_and_spec
    path = tmp_path / "hosts.yaml"
    path.write_text(yaml.safe_dump({"hosts": {"gateway-0": "192.0.2.10", "meshpool-0": "192.0.2.11"}}))
    with pytest.raises(InventoryError, match="no SSH address for meshpool-1"):
        build_inventory(spec, plan, load_hosts(path), keys_file=tmp_path / "k")
    path.write_text(yaml.safe_dump({"hosts": {"gateway-0": "a", "meshpool-0": "b", "meshpool-1": "c", "stray-9": "d"}}))
    with pytest.raises(InventoryError, match="stray-9"):
        build_inventory(spec, plan, load_hosts(path), keys_file=tmp_path / "k")
    path.write_text(yaml.safe_dump({"hosts": {"gateway-0": {"ssh_host": "a", "port": 22}}}))
    with pytest.raises(InventoryError, match=r"hosts.gateway-0: unknown field"):
        load_hosts(path)


def test_bootstrap_command_names_what_is_missing(tmp_path) -> None:
    r = subprocess.run([sys.executable, "-m", "infermesh_cli", "bootstrap", "--stack", "meshtest", "--stacks-dir",
                        str(STACKS_DIR), "--state-dir", str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2
    assert "no hosts file" in r.stderr and "Traceback" not in r.stderr


def test_load_fleet_keeps_keys_private_and_stable(hosts_file, tmp_path) -> None:
    f1 = load_fleet("meshtest", stacks_dir=STACKS_DIR, state_dir=tmp_path / "s", hosts_file=hosts_file)
    mode = stat.S_IMODE(f1.keys_file.stat().st_mode)
    assert mode == 0o600
    keys = json.loads(f1.keys_file.read_text())
    assert set(keys) == {"gateway-0", "meshpool-0", "meshpool-1"}
    f2 = load_fleet("meshtest", stacks_dir=STACKS_DIR, state_dir=tmp_path / "s", hosts_file=hosts_file)
    assert json.loads(f2.keys_file.read_text()) == keys
    # The inventory names the key file, never a key.
    text = json.dumps(f2.inventory)
    assert all(pair["private_key"] not in text for pair in keys.values())


# ---- mesh keys ----------------------------------------------------------------------------------

def test_mesh_keys_are_wireguard_keys(tmp_path) -> None:
    pair = mesh_keys.generate()
    assert len(base64.b64decode(pair["private_key"])) == 32
    assert mesh_keys.public_key(pair["private_key"]) == pair["public_key"]
    if shutil.which("wg"):
        out = subprocess.run(["wg", "pubkey"], input=pair["private_key"], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == pair["public_key"]


def test_rotation_writes_next_keys_and_promotes_them(tmp_path) -> None:
    path = tmp_path / "mesh-keys.json"
    old = mesh_keys.ensure(path, ["a", "b"])
    nxt = mesh_keys.prepare_rotation(path, ["a", "b"])
    assert mesh_keys.read(path) == old
    new = mesh_keys.read(nxt)
    assert all(new[n]["public_key"] != old[n]["public_key"] for n in ("a", "b"))
    mesh_keys.promote(path)
    assert mesh_keys.read(path) == new and not nxt.exists()


# ---- the playbooks' filters ------------------------------------------------------------------------

def test_nvidia_smi_rows_and_gpu_matching() -> None:
    f = _filters()
    gpus = f.nvidia_gpus(["NVIDIA H100 80GB HBM3, 81559, 550.54.15", "NVIDIA H100 80GB HBM3, 81559, 550.54.15", ""])
    assert gpus == [{"name": "NVIDIA H100 80GB HBM3", "memory_mib": 81559, "driver": "550.54.15"}] * 2
    assert f.gpu_matches("NVIDIA H100 80GB HBM3", "H100")
    assert f.gpu_matches("NVIDIA A100-SXM4-80GB", "A100-80G")
    assert f.gpu_matches("NVIDIA GeForce RTX 4090", "RTX4090")
    assert not f.gpu_matches("NVIDIA L40S", "H100")
    assert not f.gpu_matches("NVIDIA A10", "A100-80G")
    banner = "| NVIDIA-SMI 550.54.15   Driver Version: 550.54.15   CUDA Version: 12.4     |"
    assert f.cuda_version(banner) == "12.4" and f.cuda_version("") == ""


def test_routing_without_drained_endpoints(plan_and_spec) -> None:
    _, plan = plan_and_spec
    out = _filters().routing_without(plan.routing, ["meshpool/1"])
    assert [ep["id"] for ep in out["models"][0]["pools"][0]["endpoints"]] == ["meshpool/0"]
    assert len(plan.routing["models"][0]["pools"][0]["endpoints"]) == 2  # input untouched


def test_prometheus_sum_reads_vllm_gauges() -> None:
    text = ('# HELP vllm:num_requests_running x\nvllm:num_requests_running{model_name="m"} 3\n'
            'vllm:num_requests_running_total 99\nvllm:num_requests_waiting{model_name="m"} 1.0\n')
    f = _filters()
    assert f.prometheus_sum(text, "vllm:num_requests_running") == 3
    assert f.prometheus_sum(text, "vllm:num_requests_waiting") == 1
    assert f.prometheus_sum("", "vllm:num_requests_running") == 0


# ---- lint ---------------------------------------------------------------------------------------

def test_playbooks_pass_ansible_lint_production_profile() -> None:
    lint = Path(sys.executable).parent / "ansible-lint"
    if not lint.exists():
        pytest.skip("ansible-lint is not installed (pip install -e .[test])")
    r = subprocess.run([str(lint), "--offline", "--profile", "production", "--nocolor", "playbooks/"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
