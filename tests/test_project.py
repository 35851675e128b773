"""The CLI finds its project as pulumi does (fleet/project.py): from the current directory upwards
to the first Pulumi.yaml, its stackConfigDir, and .infermesh/ beside it. Run from a worktree of
this repository and from a copy of the project outside it, the installed `infermesh` reads and
edits that project's stacks and state, never its install location's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fleet import project

REPO = Path(__file__).resolve().parent.parent


INSTALLED = Path(sys.executable).parent / "infermesh"     # the console script of this checkout's install


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """The installed `infermesh` (its code is this checkout's), run in another folder: not
    `python -m`, which would import the code of the folder it runs in."""
    if not INSTALLED.exists():
        pytest.skip(f"no installed infermesh at {INSTALLED}")
    env = {k: v for k, v in os.environ.items() if k not in ("INFERMESH_STATE_DIR", "INFERMESH_PROJECT")}
    return subprocess.run([str(INSTALLED), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _mark(stacks: Path) -> None:
    """Give the local stack a pool the repository's does not have."""
    path = stacks / "Pulumi.local.yaml"
    text = path.read_text()
    marker = ("    - name: marker-pool\n      model: demo-mini\n      provider: sim-west\n      region: local\n"
              "      replicas: 1\n")
    path.write_text(text.replace("  infermesh:tiers:\n", marker + "  infermesh:tiers:\n", 1))


def test_a_copy_of_the_project_outside_the_repository(tmp_path):
    copy = tmp_path / "ops" / "inference"
    copy.mkdir(parents=True)
    shutil.copy(REPO / "Pulumi.yaml", copy / "Pulumi.yaml")
    shutil.copytree(REPO / "stacks", copy / "stacks")
    _mark(copy / "stacks")
    deep = copy / "stacks"                          # found from a subfolder too
    assert project.root(deep) == copy and project.stacks_dir(copy) == copy / "stacks"
    out = run_cli(deep, "plan", "--stack", "local", "--json")
    assert out.returncode == 0, out.stderr
    assert "marker-pool" in out.stdout
    # its state lives beside its Pulumi.yaml
    out = run_cli(deep, "keys", "create", "--stack", "local", "--tenant", "acme", "--tier", "pro")
    assert out.returncode == 0, out.stderr
    assert (copy / ".infermesh" / "local" / "keys.db").is_file()
    # a failover edits the copy's stack file, not the repository's
    before = (REPO / "stacks" / "Pulumi.local.yaml").read_bytes()
    out = run_cli(copy, "failover", "drain", "sim-west", "--stack", "local")
    assert out.returncode == 0, out.stderr
    assert "drained: true" in (copy / "stacks" / "Pulumi.local.yaml").read_text()
    assert (REPO / "stacks" / "Pulumi.local.yaml").read_bytes() == before


def test_a_worktree_of_the_repository(tmp_path):
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    wt = tmp_path / "wt"
    made = subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(wt), "HEAD"],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"git worktree add failed: {made.stderr.strip()[:200]}")
    try:
        _mark(wt / "stacks")
        out = run_cli(wt, "plan", "--stack", "local", "--json")
        assert out.returncode == 0, out.stderr
        assert "marker-pool" in out.stdout                              # the worktree's stack file
        where = run_cli(wt, "plan", "--stack", "nosuchstack")
        assert str(wt / "stacks") in where.stderr                        # looked for it there
        assert "marker-pool" not in (REPO / "stacks" / "Pulumi.local.yaml").read_text()
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(wt)], capture_output=True)


def test_without_a_pulumi_yaml_above_the_install_checkout_is_used(tmp_path, monkeypatch):
    monkeypatch.delenv("INFERMESH_PROJECT", raising=False)
    assert project.root(tmp_path) in (project.INSTALL_ROOT, *[p for p in tmp_path.parents
                                                                if (p / "Pulumi.yaml").is_file()])
    monkeypatch.setenv("INFERMESH_PROJECT", str(tmp_path))
    assert project.root() == tmp_path.resolve()
    (tmp_path / "Pulumi.yaml").write_bytes(b"name: x\nstackConfigDir: [not, a, path]\n")
    assert project.stacks_dir() == tmp_path.resolve()                   # pulumi's default: the project folder
    (tmp_path / "Pulumi.yaml").write_bytes(b"\xff\xfe")
    with pytest.raises(project.ProjectError, match="not a readable Pulumi project file"):
        project.stacks_dir()
