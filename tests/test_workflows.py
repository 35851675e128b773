"""The CI pipelines (.github/workflows/): valid against GitHub's workflow schema, and shaped as designed.

The schema check uses check-jsonschema's vendored copy of GitHub's workflow schema (no network).
actionlint is not used: its PyPI wrapper downloads the binary at build time, which these machines
cannot do.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fleet import canary as rules

WORKFLOWS = Path(__file__).resolve().parent.parent / ".github" / "workflows"
FILES = sorted(WORKFLOWS.glob("*.yml"))


def load(name: str) -> dict:
    return yaml.safe_load((WORKFLOWS / name).read_text())


def steps(wf: dict) -> list[dict]:
    return [s for job in wf["jobs"].values() for s in job.get("steps", [])]


def runs(wf: dict) -> str:
    return "\n".join(s.get("run", "") for s in steps(wf))


def test_the_four_pipelines_exist():
    assert [f.name for f in FILES] == ["canary.yml", "deploy.yml", "preview.yml", "test.yml"]


def test_workflows_validate_against_githubs_schema():
    pytest.importorskip("check_jsonschema")
    r = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows",
                        *map(str, FILES)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(shutil.which("actionlint") is None, reason="actionlint is not installed")
def test_actionlint():
    r = subprocess.run(["actionlint", *map(str, FILES)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_no_secret_or_untrusted_input_is_expanded_inside_a_script():
    """Secrets reach steps only through `env:`/`with:` (GitHub masks them); inputs and event fields
    go through env vars too, never `${{ }}` inside `run:` (script injection)."""
    for f in FILES:
        for s in steps(yaml.safe_load(f.read_text())):
            script = s.get("run", "")
            assert "${{" not in script, (f.name, s.get("name"), script)
            assert not re.search(r"echo[^\n]*\$(PULUMI_ACCESS_TOKEN|INFERMESH_ADMIN_TOKEN|GH_TOKEN)", script)
            assert "set -x" not in script


def test_triggers():
    on = load("test.yml")[True]          # YAML 1.1 reads the key `on` as True
    assert "push" in on and "pull_request" in on
    assert "make test" in runs(load("test.yml"))
    preview = load("preview.yml")
    assert set(preview[True]["pull_request"]["paths"]) >= {"stacks/**", "__main__.py", "fleet/**"}
    pulumi = [s for s in steps(preview) if s.get("uses", "").startswith("pulumi/actions@")]
    assert pulumi and pulumi[0]["with"]["command"] == "preview" and pulumi[0]["with"]["policyPacks"] == "policies"
    assert pulumi[0]["with"]["comment-on-pr"] is True
    assert "infermesh plan --stack \"$stack\" --diff \"origin/$BASE_REF\"" in runs(preview)


def test_deploy_goes_to_staging_then_production_behind_an_approval():
    wf = load("deploy.yml")
    assert wf[True]["push"]["branches"] == ["main"]
    jobs = wf["jobs"]
    assert jobs["staging"]["needs"] == "test" and jobs["production"]["needs"] == "staging"
    assert jobs["production"]["environment"] == "production"
    for job, stack in (("staging", "staging"), ("production", "prod")):
        up = [s for s in jobs[job]["steps"] if s.get("uses", "").startswith("pulumi/actions@")]
        assert up[0]["with"]["command"] == "up" and up[0]["with"]["stack-name"] == stack
        assert up[0]["env"]["PULUMI_ACCESS_TOKEN"] == "${{ secrets.PULUMI_ACCESS_TOKEN }}"


def test_canary_pipeline_calls_infermesh_at_each_step_and_reads_its_exit_codes():
    wf = load("canary.yml")
    assert set(wf[True]["workflow_dispatch"]["inputs"]) >= {"pool", "image"}
    script = runs(wf)
    for cmd in ("infermesh canary start", "infermesh canary evaluate", "infermesh canary rollback",
                "git commit", "gh pr create"):
        assert cmd in script
    # the exit codes the script dispatches on are the ones fleet/canary.py returns
    assert rules.EXIT == {"promote": 0, "wait": 3, "rollback": 4}
    assert re.search(r"0\) decision=promote", script) and re.search(r"4\) decision=rollback", script)
    assert re.search(r"3\) decision=rollback", script)            # no decision in time: roll back
