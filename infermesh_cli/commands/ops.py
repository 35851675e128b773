"""`infermesh ops drain|logs|diag --stack S --host NODE`: day-to-day operations over SSH (Fabric).

Hosts are chosen from the plan and the generated inventory, never typed as addresses: a node
name (repeatable), or all gateways / all workers. Host keys are checked against the hosts
file's known_hosts (unknown keys are refused). Every command reports per host; a host that
fails does not hide the others (Fabric's GroupResult).

- diag: GPUs (nvidia-smi), WireGuard handshakes per peer (by node name) and traffic, and the
  worker's health and load as the engine reports them.
- logs: the worker's log (the supervise loop's file, or journald under systemd); --follow.
- drain: the gateways stop routing to the node (its endpoint leaves their routing file; they
  reload it), its in-flight requests finish, then its engine stops. The drain playbook does
  the same through Ansible (`infermesh bootstrap --playbook drain --limit NODE`).
"""

from __future__ import annotations

import argparse
import io
import json
import shlex
import sys
import time
from typing import Any

from fleet import mesh_keys
from infermesh_cli.errors import UserError
from infermesh_cli.inputs import bounded
from infermesh_cli.commands.bootstrap import add_stack_args, drain_through_the_stack
from fleet.inventory import GATEWAYS, WORKERS, Fleet, host_vars, load_fleet, nodes_of
from fleet.routing import routing_without

HANDSHAKE_STALE_S = 180      # WireGuard rekeys every 2 minutes on a live path
DEFAULTS = {                 # the roles' defaults, where the inventory does not override them
    "worker_log_dir": "/var/log/infermesh",
    "worker_run_dir": "/run/infermesh",
    "worker_service_name": "infermesh-worker",
    "worker_port": 8000,
    "routing_file": "/etc/infermesh/routing.json",
    "gateway_url": "http://127.0.0.1:8080",
    "gateway_admin_token_file": "/var/lib/infermesh/gateway/admin.token",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ops", help="operate nodes over SSH: drain, logs, diag",
                       description=__doc__.splitlines()[0])
    osub = p.add_subparsers(dest="action", required=True)
    for name, help_ in (("diag", "GPU, mesh handshakes and worker health, per host"),
                        ("logs", "show (or follow) a worker's log"),
                        ("drain", "take a worker out of rotation without dropping requests, then stop it")):
        q = osub.add_parser(name, help=help_)
        add_stack_args(q)
        q.add_argument("--host", action="append", default=[], metavar="NODE",
                       help="a node from the plan (repeatable)")
        if name == "diag":
            q.add_argument("--all", action="store_true", help="every node (the default without --host)")
            q.add_argument("--json", action="store_true")
        if name == "logs":
            q.add_argument("--lines", type=bounded(int, 1, 100_000), default=50)
            q.add_argument("--follow", action="store_true")
        if name == "drain":
            q.add_argument("--timeout", type=bounded(float, 1, 3600), default=120,
                           help="seconds to wait for in-flight requests (1 to 3600)")
        q.set_defaults(func=run)


# ---- connections -------------------------------------------------------------------------------

def connection(fleet: Fleet, node: str):
    """A Fabric connection to a node, host key checked against the hosts file's known_hosts."""
    import paramiko
    from fabric import Connection

    hv = host_vars(fleet.inventory, node)
    kwargs: dict[str, Any] = {}
    key = hv.get("ansible_ssh_private_key_file")
    if key:
        kwargs["key_filename"] = [key]
    c = Connection(host=hv["ansible_host"], user=hv.get("ansible_user", "root"), port=int(hv.get("ansible_port", 22)),
                   connect_kwargs=kwargs, connect_timeout=10)
    c.client.set_missing_host_key_policy(paramiko.RejectPolicy())
    if fleet.hosts.ssh_known_hosts:
        c.client.load_host_keys(fleet.hosts.ssh_known_hosts)
    else:
        c.client.load_system_host_keys()
    return c


def var(hv: dict[str, Any], name: str) -> Any:
    return hv.get(name, DEFAULTS.get(name))


# ---- commands ----------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    if not args.stack and not args.stack_file:
        raise UserError("name a stack: --stack S (or --stack-file FILE)")
    fleet = load_fleet(args.stack, stack_file=args.stack_file, stacks_dir=args.stacks_dir,
                       state_dir=args.state_dir, hosts_file=args.inventory_hosts, ensure_keys=False)
    known = nodes_of(fleet.inventory)
    for h in args.host:
        if h not in known:
            raise UserError(f"--host {h}: no such node; nodes: {', '.join(known)}")
    if args.action == "diag":
        return diag(fleet, args.host or known, as_json=args.json)
    if len(args.host) != 1:
        raise UserError(f"ops {args.action} takes one --host NODE")
    node = args.host[0]
    if args.action == "logs":
        return logs(fleet, node, lines=args.lines, follow=args.follow)
    if node not in nodes_of(fleet.inventory, WORKERS):
        raise UserError(f"--host {node}: only workers are drained; "
                        f"workers: {', '.join(nodes_of(fleet.inventory, WORKERS))}")
    if fleet.hosts.kubernetes_gateways:
        raise drain_through_the_stack("ops drain", fleet.spec.stack)
    return drain(fleet, node, timeout=args.timeout)


def _diag_script(hv: dict[str, Any]) -> str:
    """One shell script per host: its sections are parsed by diag_report()."""
    iface = shlex.quote(hv["mesh_interface"])
    lines = [
        "echo '== gpu'",
        "nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu,driver_version "
        "--format=csv,noheader 2>/dev/null || echo none",
        "echo '== handshakes'", f"wg show {iface} latest-handshakes 2>&1",
        "echo '== transfer'", f"wg show {iface} transfer 2>&1",
        "echo '== now'", "date +%s",
    ]
    if hv.get("mesh_role") == "worker":
        url = f"http://{hv['mesh_address']}:{var(hv, 'worker_port')}"
        probe = (
            "import urllib.request,sys\n"
            "def get(p):\n"
            "    try:\n"
            f"        r=urllib.request.urlopen('{url}'+p,timeout=5); return r.status, r.read().decode()\n"
            "    except Exception as e: return 0, type(e).__name__\n"
            "s,_=get('/health'); print('health', s)\n"
            "s,t=get('/metrics')\n"
            "for l in t.splitlines():\n"
            "    if l.startswith(('vllm:num_requests_running','vllm:num_requests_waiting')): print(l)\n"
        )
        lines += ["echo '== worker'", f"python3 -c {shlex.quote(probe)}"]
    return "\n".join(lines)


def diag_report(node: str, hv: dict[str, Any], output: str, names_by_key: dict[str, str]) -> dict[str, Any]:
    sections: dict[str, list[str]] = {}
    current = None
    for line in output.splitlines():
        if line.startswith("== "):
            current = line[3:].strip()
            sections[current] = []
        elif current is not None and line.strip():
            sections[current].append(line.strip())
    now = int((sections.get("now") or ["0"])[0])
    peers = {}
    for line in sections.get("handshakes", []):
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            ts = int(parts[1])
            peers[names_by_key.get(parts[0], parts[0][:8] + "…")] = {"handshake_age_s": now - ts if ts else None}
    for line in sections.get("transfer", []):
        parts = line.split()
        if len(parts) == 3:
            name = names_by_key.get(parts[0], parts[0][:8] + "…")
            peers.setdefault(name, {}).update({"rx_bytes": int(parts[1]), "tx_bytes": int(parts[2])})
    gpus = [g for g in sections.get("gpu", []) if g != "none"]
    report: dict[str, Any] = {"node": node, "role": hv.get("mesh_role"), "gpus": gpus, "peers": peers}
    problems = []
    for peer in hv.get("mesh_peers", []):
        age = peers.get(peer["name"], {}).get("handshake_age_s")
        if age is None or age > HANDSHAKE_STALE_S:
            problems.append(f"no recent handshake with {peer['name']}")
    if hv.get("mesh_role") == "worker":
        worker = sections.get("worker", [])
        status = next((ln.split()[1] for ln in worker if ln.startswith("health ")), "0")
        report["worker"] = {"health": int(status) if status.isdigit() else 0,
                            "load": [ln for ln in worker if ln.startswith("vllm:")]}
        if report["worker"]["health"] != 200:
            problems.append(f"worker /health answered {status}")
    report["problems"] = problems
    return report


def diag(fleet: Fleet, nodes: list[str], *, as_json: bool = False) -> int:
    keys = mesh_keys.read(fleet.keys_file)
    names_by_key = {pair["public_key"]: name for name, pair in keys.items()}
    reports, failed = [], False
    conns = {n: connection(fleet, n) for n in nodes}
    results = {}
    # Each host gets its own script, so run them side by side rather than as one group command.
    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(max_workers=min(16, len(conns))) as pool:
        futures = {n: pool.submit(c.run, _diag_script(host_vars(fleet.inventory, n)), hide=True, warn=True,
                                  in_stream=False) for n, c in conns.items()}
        for n, f in futures.items():
            try:
                results[n] = f.result()
            except Exception as e:  # unreachable host: report it, keep the others
                results[n] = e
    for n in nodes:
        hv = host_vars(fleet.inventory, n)
        r = results[n]
        rep: dict[str, Any]
        if isinstance(r, Exception):
            rep = {"node": n, "role": hv.get("mesh_role"), "problems": [f"unreachable: {type(r).__name__}: {r}"]}
        else:
            rep = diag_report(n, hv, r.stdout, names_by_key)
        failed = failed or bool(rep["problems"])
        reports.append(rep)
    for c in conns.values():
        c.close()
    if as_json:
        print(json.dumps(reports, indent=1))
    else:
        for rep in reports:
            print(f"{rep['node']} ({rep['role']}): {'OK' if not rep['problems'] else 'PROBLEMS'}")
            for g in rep.get("gpus", []):
                print(f"  gpu  {g}")
            if "gpus" in rep and not rep["gpus"]:
                print("  gpu  none")
            for peer, p in sorted(rep.get("peers", {}).items()):
                age = p.get("handshake_age_s")
                print(f"  mesh {peer}: handshake {'never' if age is None else f'{age}s ago'}, "
                      f"rx {p.get('rx_bytes', 0)} B, tx {p.get('tx_bytes', 0)} B")
            if "worker" in rep:
                print(f"  worker /health {rep['worker']['health']}; " + "; ".join(rep["worker"]["load"]))
            for prob in rep["problems"]:
                print(f"  problem: {prob}")
    return 1 if failed else 0


def logs(fleet: Fleet, node: str, *, lines: int, follow: bool) -> int:
    hv = host_vars(fleet.inventory, node)
    service = var(hv, "worker_service_name")
    path = f"{var(hv, 'worker_log_dir')}/{service}.log"
    flag = "-F" if follow else ""
    cmd = (f"if [ -f {shlex.quote(path)} ]; then tail -n {int(lines)} {flag} {shlex.quote(path)}; "
           f"else journalctl -u {shlex.quote(service)} -n {int(lines)} {'-f' if follow else ''} --no-pager; fi")
    with connection(fleet, node) as c:
        r = c.run(cmd, warn=True, pty=follow, in_stream=False)
    return 0 if r.ok else 1


def _gateway_lists(c, hv: dict[str, Any], endpoint_id: str) -> bool | None:
    """Whether the gateway on this host still routes to endpoint_id (None: cannot tell)."""
    token_file = shlex.quote(var(hv, "gateway_admin_token_file"))
    url = var(hv, "gateway_url") + "/admin/endpoints"
    probe = ("import json,sys,urllib.request\n"
             f"t=open({token_file!r}).read().strip()\n"
             f"r=urllib.request.urlopen(urllib.request.Request({url!r},headers={{'Authorization':'Bearer '+t}}),"
             "timeout=5)\n"
             "print(json.dumps([e['id'] for p in json.load(r)['pools'] for e in p['endpoints']]))\n")
    r = c.run(f"python3 -c {shlex.quote(probe)}", hide=True, warn=True, in_stream=False)
    if not r.ok:
        return None
    return endpoint_id in json.loads(r.stdout)


def drain(fleet: Fleet, node: str, *, timeout: float) -> int:
    hv = host_vars(fleet.inventory, node)
    endpoint_id = hv["worker_endpoint_id"]
    routing = routing_without(fleet.plan.routing, [endpoint_id])
    body = json.dumps(routing, indent=4, sort_keys=True).encode()
    gateways = nodes_of(fleet.inventory, GATEWAYS)
    failed = []
    for g in gateways:
        ghv = host_vars(fleet.inventory, g)
        path = var(ghv, "routing_file")
        with connection(fleet, g) as c:
            # Write beside, then rename: the gateway never reads a half-written file.
            c.put(io.BytesIO(body), remote=f"{path}.infermesh-tmp")
            r = c.run(f"mv {shlex.quote(path + '.infermesh-tmp')} {shlex.quote(path)}", hide=True, warn=True,
                      in_stream=False)
            if not r.ok:
                failed.append(f"{g}: routing file not written: {r.stderr.strip()}")
                continue
            deadline = time.monotonic() + 30
            while _gateway_lists(c, ghv, endpoint_id) and time.monotonic() < deadline:
                time.sleep(0.5)
            print(f"{g}: no longer routes to {endpoint_id}")
    if failed:
        print("\n".join(failed), file=sys.stderr)
        return 1
    url = f"http://{hv['mesh_address']}:{var(hv, 'worker_port')}/metrics"
    idle = ("import sys,time,urllib.request\n"
            f"end=time.time()+{float(timeout)}\n"
            "while time.time()<end:\n"
            "    try: t=urllib.request.urlopen(" + repr(url) + ",timeout=5).read().decode()\n"
            "    except Exception: sys.exit(0)\n"
            "    n=sum(float(l.rsplit(' ',1)[1]) for l in t.splitlines()\n"
            "          if l.startswith(('vllm:num_requests_running','vllm:num_requests_waiting')))\n"
            "    if n==0: sys.exit(0)\n"
            "    time.sleep(0.5)\n"
            "sys.exit(1)\n")
    service = var(hv, "worker_service_name")
    pidfile = f"{var(hv, 'worker_run_dir')}/{service}.pid"
    stop = (f"if [ -f {shlex.quote(pidfile)} ]; then start-stop-daemon --stop --oknodo --retry TERM/60/KILL/5 "
            f"--remove-pidfile --pidfile {shlex.quote(pidfile)}; else systemctl stop {shlex.quote(service)}; fi")
    with connection(fleet, node) as c:
        r = c.run(f"python3 -c {shlex.quote(idle)}", hide=True, warn=True, in_stream=False)
        if not r.ok:
            print(f"{node}: still busy after {timeout:g}s; stopping anyway (SIGTERM lets it finish)", file=sys.stderr)
        r = c.run(stop, hide=True, warn=True, in_stream=False)
    if not r.ok:
        print(f"{node}: stop failed: {r.stderr.strip()}", file=sys.stderr)
        return 1
    print(f"{node}: drained and stopped ({endpoint_id}); `infermesh bootstrap --limit {node}` brings it back")
    return 0
