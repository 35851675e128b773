"""Run one of playbooks/*.yml through ansible-runner, once, the same way everywhere.

``run_playbook`` gathers the runner's arguments (a private data dir per stack, the generated
inventory, an environment built from an allowlist, quiet output) and turns ``runner.status``,
``runner.rc`` and ``runner.stats`` into a :class:`PlaybookResult`: per-host counts plus the
failed tasks' messages (already censored by Ansible where a task is ``no_log``).
Never shell out to ``ansible-playbook``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PLAYBOOKS_DIR = Path(__file__).resolve().parent.parent / "playbooks"
PLAYBOOKS = ("bootstrap", "drain", "rotate-keys")

# Environment passed through to Ansible besides ANSIBLE_*: what ssh and the shell need.
_PASS_ENV = ("HOME", "USER", "LANG", "LC_ALL", "TERM", "SSH_AUTH_SOCK", "TMPDIR")


@dataclass
class HostStats:
    ok: int = 0
    changed: int = 0
    failed: int = 0
    unreachable: int = 0
    skipped: int = 0
    rescued: int = 0
    ignored: int = 0


@dataclass
class Failure:
    host: str
    task: str
    message: str


@dataclass
class PlaybookResult:
    playbook: str
    status: str                                  # runner status: successful | failed | timeout | canceled
    rc: int
    hosts: dict[str, HostStats] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    artifact_dir: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "successful" and self.rc == 0

    @property
    def changed(self) -> int:
        return sum(h.changed for h in self.hosts.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "playbook": self.playbook, "status": self.status, "rc": self.rc, "ok": self.ok,
            "hosts": {h: vars(s) for h, s in sorted(self.hosts.items())},
            "failures": [vars(f) for f in self.failures],
            "artifact_dir": self.artifact_dir,
        }


def runner_env(private_data_dir: Path) -> dict[str, str]:
    """The playbook's environment: an allowlist, ANSIBLE_* overrides, and our settings on top.

    Host keys are always checked (ansible-runner turns checking off unless told otherwise).
    """
    env = {k: v for k, v in os.environ.items() if k.startswith("ANSIBLE_") or k in _PASS_ENV}
    venv_bin = str(Path(sys.executable).parent)
    env.update({
        "PATH": os.pathsep.join([venv_bin, os.environ.get("PATH", "/usr/bin:/bin")]),
        "ANSIBLE_CONFIG": str(PLAYBOOKS_DIR / "ansible.cfg"),
        "ANSIBLE_HOST_KEY_CHECKING": "True",
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(private_data_dir / "cp"),
        "ANSIBLE_LOCAL_TEMP": str(private_data_dir / "tmp"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
    })
    return env


def _forget_runner_env(private_data_dir: Path) -> None:
    """ansible-runner saves the extravars and envvars it was given under env/ and reads them back
    on the next run: a drain's drain_nodes or a rotation's key file would leak into later runs."""
    for name in ("extravars", "envvars"):
        (private_data_dir / "env" / name).unlink(missing_ok=True)


def run_playbook(
    playbook: str,
    *,
    inventory: Path,
    private_data_dir: Path,
    limit: str | None = None,
    extravars: dict[str, Any] | None = None,
    timeout: int | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> PlaybookResult:
    """Run playbooks/<playbook>.yml and return what happened, per host.

    Args:
        playbook: one of PLAYBOOKS.
        inventory: the generated inventory file.
        private_data_dir: ansible-runner's directory (artifacts, control sockets); kept 0700.
        limit: an Ansible host pattern, e.g. "gateway-0,pool-1".
        extravars: non-secret variables only (they appear on the command line).
        timeout: seconds before the run is stopped.
        on_event: called with every runner event (for progress output or logs).

    Returns:
        A PlaybookResult; ``.ok`` is false when any host failed or was unreachable.
    """
    import ansible_runner  # lazy: importing ansible is slow and only bootstrap needs it

    if playbook not in PLAYBOOKS:
        raise ValueError(f"unknown playbook {playbook!r}; known: {', '.join(PLAYBOOKS)}")
    private_data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(private_data_dir, 0o700)
    for sub in ("cp", "tmp"):
        (private_data_dir / sub).mkdir(exist_ok=True, mode=0o700)
    _forget_runner_env(private_data_dir)
    failures: list[Failure] = []

    def handle(event: dict[str, Any]) -> bool:
        kind = event.get("event", "")
        if kind in ("runner_on_failed", "runner_on_unreachable", "runner_item_on_failed"):
            data = event.get("event_data", {})
            res = data.get("res") or {}
            if kind == "runner_on_failed" and data.get("ignore_errors"):
                return True
            message = res.get("msg") or res.get("stderr") or res.get("reason") or ""
            if not message and res.get("censored"):
                message = res["censored"]
            failures.append(Failure(data.get("host", "?"), data.get("task", "?"), str(message).strip()[:2000]))
        if on_event is not None:
            on_event(event)
        return True

    runner = ansible_runner.run(
        private_data_dir=str(private_data_dir),
        project_dir=str(PLAYBOOKS_DIR),
        playbook=f"{playbook}.yml",
        inventory=str(inventory),
        limit=limit,
        extravars=extravars or None,
        envvars=runner_env(private_data_dir),
        quiet=True,
        timeout=timeout,
        event_handler=handle,
        rotate_artifacts=5,
    )
    _forget_runner_env(private_data_dir)
    stats = runner.stats or {}
    hosts: dict[str, HostStats] = {}
    fields = {"ok": "ok", "changed": "changed", "failures": "failed", "dark": "unreachable",
              "skipped": "skipped", "rescued": "rescued", "ignored": "ignored"}
    for key, attr in fields.items():
        for host, count in (stats.get(key) or {}).items():
            setattr(hosts.setdefault(host, HostStats()), attr, int(count))
    return PlaybookResult(playbook=playbook, status=str(runner.status), rc=int(runner.rc or 0),
                          hosts=hosts, failures=failures, artifact_dir=str(runner.config.artifact_dir))
