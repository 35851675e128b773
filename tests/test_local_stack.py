"""`infermesh up`: the local stack as a user runs it, stopped by SIGTERM with nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from openai import OpenAI

from tests.conftest import REPO, free_port, free_port_range, kill_tree


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def test_up_serves_prints_a_key_and_stops_everything(tmp_path):
    env = {**os.environ, "INFERMESH_STATE_DIR": str(tmp_path / "state")}
    port, base = free_port(), free_port_range(8)
    proc = subprocess.Popen([sys.executable, "-m", "infermesh_cli", "up", "--stack", "local", "--port", str(port),
                             "--port-base", str(base)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        info, seen = None, []
        deadline = time.monotonic() + 60
        while info is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "infermesh up exited early:\n" + "".join(seen)
            seen.append(line)
            if line.startswith("{"):
                info = json.loads(line)
        text = "".join(seen)
        assert info["base_url"] == f"http://127.0.0.1:{port}/v1"
        assert info["key"] in text and "curl" in text and "OpenAI(base_url=" in text and "simulator" in text
        client = OpenAI(base_url=info["base_url"], api_key=info["key"], max_retries=0)
        r = client.chat.completions.create(model=info["model"], messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].message.content
        children = _children(proc.pid)
        assert len(children) == 7          # 6 sim workers + the gateway of stacks/Pulumi.local.yaml
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not [c for c in children if _alive(c)]
        assert (tmp_path / "state" / "ledger.db").exists() and (tmp_path / "state" / "keys.db").exists()
    finally:
        kill_tree(proc)          # with the workers and the gateway it started, whatever failed above


def test_up_refuses_a_stack_that_leases_gpus(tmp_path):
    # staging leases remote GPUs; `up` says so in one line instead of starting anything
    remote = "staging"
    env = {**os.environ, "INFERMESH_STATE_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "infermesh_cli", "up", "--stack", remote], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "pulumi up" in r.stderr


def test_a_gateway_whose_port_is_taken_says_so_in_one_line(local_stack):
    """The gateway binds its own listening sockets (gateway/listener.py): a port in use is one
    clear line and exit status 2, not a traceback."""
    port = local_stack.spec.gateway.port                 # the running stack's gateway holds it
    r = subprocess.run([sys.executable, "-m", "gateway", "--stack", "test", "--stacks-dir",
                        str(local_stack.stacks_dir), "--routing", str(local_stack.state / "routing.json"),
                        "--state-dir", str(local_stack.state), "--port", str(port)],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"gateway: cannot listen on 127.0.0.1:{port}: Address already in use", r.stderr
