"""The CI/CD pipelines (.github/): valid against GitHub's schemas, zizmor clean, and shaped as designed.

The job graph is read from the files themselves: which job needs which secret and which approval,
that no preview path builds an image, that the reusable test workflow cannot cancel its caller, and
that a prod `up` runs only after the preview it was approved on. `python -m fleet.ci` (credentials,
stamp, verify) runs as the jobs run it. The Pulumi program is run under mocks to show what the
workflows rely on: no image build on preview, the registry from the stack file, one admin token for
every gateway pod.

The schema check uses check-jsonschema's vendored copy of GitHub's schemas (no network). actionlint
is not used: its PyPI wrapper downloads the binary at build time, which these machines cannot do.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fleet import canary as rules
from fleet import ci

REPO = Path(__file__).resolve().parent.parent
GITHUB = REPO / ".github"
WORKFLOWS = GITHUB / "workflows"
ACTION = GITHUB / "actions" / "stack-access" / "action.yml"
FILES = sorted(WORKFLOWS.glob("*.yml"))
DOC = (REPO / "docs" / "ci.md").read_text()
LOCAL_ACTION = "$/.github/actions/stack-access"


def load(name: str) -> dict:
    return yaml.safe_load((WORKFLOWS / name).read_text())


def steps(wf: dict) -> list[dict]:
    return [s for job in wf["jobs"].values() for s in job.get("steps", [])]


def runs(wf: dict) -> str:
    return "\n".join(s.get("run", "") for s in steps(wf))


def refs(obj, kind: str) -> set[str]:
    """Names referenced as ``${{ <kind>.NAME }}`` anywhere in obj."""
    return set(re.findall(rf"\b{kind}\.([A-Z_][A-Z0-9_]*)", json.dumps(obj)))


def job_secrets(job: dict) -> set[str]:
    return refs({k: v for k, v in job.items() if k != "if"}, "secrets") - {"GITHUB_TOKEN"}


def access(job: dict) -> dict | None:
    """The job's stack-access step (purpose, stack and the credentials it hands over), if any."""
    return next((s for s in job.get("steps", []) if s.get("uses") == LOCAL_ACTION), None)


def pulumi_steps(job: dict) -> list[dict]:
    return [s for s in job.get("steps", []) if s.get("uses", "").startswith("pulumi/actions@")]


# ---- files, schema, zizmor, pins ------------------------------------------------------------------------

def test_the_four_pipelines_and_the_access_action_exist():
    assert [f.name for f in FILES] == ["canary.yml", "deploy.yml", "preview.yml", "test.yml"]
    assert ACTION.is_file()


def test_workflows_and_action_validate_against_githubs_schemas():
    pytest.importorskip("check_jsonschema")
    for schema, files in (("vendor.github-workflows", FILES), ("vendor.github-actions", [ACTION])):
        r = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", schema, *map(str, files)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(shutil.which("actionlint") is None, reason="actionlint is not installed")
def test_actionlint():
    r = subprocess.run(["actionlint", *map(str, FILES)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def zizmor() -> list[str]:
    exe = Path(sys.executable).parent / "zizmor"
    if not exe.exists():
        pytest.skip("zizmor is not installed (pip install -e .[test])")
    return [str(exe)]


def test_zizmor_finds_nothing_even_pedantic_and_nothing_is_suppressed():
    # --offline: no GitHub API (these machines have none); pedantic: every audit and every confidence
    r = subprocess.run([*zizmor(), "--offline", "--persona", "pedantic", "--format", "json", str(GITHUB)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads(r.stdout) == []
    # a suppression needs a written reason: there is none, and no zizmor config that could hide one
    for f in [*FILES, ACTION]:
        for line in f.read_text().splitlines():
            if "zizmor: ignore" in line:
                assert re.search(r"zizmor: ignore\[[a-z-]+\]\s*\S.{10,}", line), (f.name, line)
    assert not list(REPO.glob("zizmor.y*ml")) and not list(GITHUB.glob("zizmor.y*ml"))


def test_zizmor_would_catch_a_regression(tmp_path):
    """The audit is live: an unpinned action and a secret expanded in a script both fail it."""
    wf = tmp_path / ".github" / "workflows"
    wf.mkdir(parents=True)
    (wf / "bad.yml").write_text(
        "name: bad\non: push\npermissions: {}\njobs:\n  x:\n    name: x\n    runs-on: ubuntu-24.04\n"
        "    steps:\n      - uses: actions/checkout@v4\n      - run: echo ${{ github.event.head_commit.message }}\n")
    r = subprocess.run([*zizmor(), "--offline", "--format", "json", str(tmp_path)], capture_output=True, text=True)
    found = {f["ident"] for f in json.loads(r.stdout)}
    assert r.returncode != 0 and {"unpinned-uses", "template-injection"} <= found, found


def test_every_action_is_pinned_by_commit_sha_with_its_version_beside_it():
    pinned = 0
    for f in [*FILES, ACTION]:
        for line in f.read_text().splitlines():
            m = re.search(r"uses:\s*(\S+)", line)
            if not m or m.group(1).startswith("$/"):
                continue
            ref = m.group(1)
            assert re.fullmatch(r"[\w.-]+/[\w.-]+(/[\w./-]+)?@[0-9a-f]{40}", ref), (f.name, line)
            assert re.search(r"#\s*v\d+\.\d+\.\d+\s*$", line), (f.name, line)       # the tag, for updates
            pinned += 1
    assert pinned >= 20


def test_no_secret_or_untrusted_input_is_expanded_inside_a_script():
    """Secrets reach steps only through `env:`/`with:` (GitHub masks them); inputs and event fields
    go through env vars too, never `${{ }}` inside `run:` (script injection)."""
    action = yaml.safe_load(ACTION.read_text())
    for name, all_steps in [(f.name, steps(yaml.safe_load(f.read_text()))) for f in FILES] + \
                           [("action.yml", action["runs"]["steps"])]:
        for s in all_steps:
            script = s.get("run", "")
            assert "${{" not in script, (name, s.get("name"), script)
            assert not re.search(r"echo[^\n]*\$(PULUMI_ACCESS_TOKEN|TOKEN|GH_TOKEN|KUBE_CONFIG|REGISTRY_PASSWORD)",
                                 script)
            assert "set -x" not in script


# ---- the job graph: secrets, approvals, images -------------------------------------------------------------

def test_which_job_needs_which_secret_and_which_approval():
    deploy = load("deploy.yml")["jobs"]
    preview = load("preview.yml")["jobs"]
    canary = load("canary.yml")["jobs"]
    pulumi = {"PULUMI_ACCESS_TOKEN", "PULUMI_CONFIG_PASSPHRASE"}
    cluster = {"KUBE_CONFIG"}
    registry = {"REGISTRY_PASSWORD"}
    bot = {"CANARY_BOT_TOKEN"}
    expected = {
        ("deploy", "test"): (set(), None),
        ("deploy", "staging"): (pulumi | cluster | registry, "staging"),
        ("deploy", "prod-preview"): (pulumi | cluster, "production-preview"),
        ("deploy", "production"): (pulumi | cluster | registry, "production"),
        ("preview", "plan"): (set(), None),
        ("preview", "pulumi-preview"): (pulumi | cluster, "pull-request-preview"),
        ("canary", "start"): (bot, "${{ inputs.stack == 'prod' && 'production-canary' || 'staging' }}"),
        ("canary", "evaluate"): (pulumi | cluster | bot | {"PROMETHEUS_TOKEN"}, "${{ inputs.environment }}"),
    }
    graph = {("deploy", k): v for k, v in deploy.items()} | {("preview", k): v for k, v in preview.items()} \
        | {("canary", k): v for k, v in canary.items()}
    for key, (secrets, env) in expected.items():
        job = graph[key]
        assert job_secrets(job) == secrets, (key, job_secrets(job))
        assert job.get("environment") == env, key
    # the registry's secret reaches only the jobs that push (up), and only those may write packages
    for key, job in graph.items():
        step = access(job)
        pushes = step is not None and step["with"]["purpose"] == "up"
        assert ("REGISTRY_PASSWORD" in job_secrets(job)) == pushes, key
        assert (job.get("permissions", {}).get("packages") == "write") == pushes, key
    # only the prod up job is behind the `production` environment (required reviewers), and it
    # runs only after the prod preview, whose credentials cannot change prod
    behind = [k for k, j in graph.items() if j.get("environment") == "production"]
    assert behind == [("deploy", "production")]
    assert deploy["production"]["needs"] == "prod-preview" and deploy["prod-preview"]["needs"] == "staging"
    assert access(deploy["prod-preview"])["with"]["purpose"] == "preview"
    # reusable calls pass secrets by name, never `secrets: inherit`
    for key, job in graph.items():
        assert job.get("secrets") != "inherit", key


def test_every_secret_and_variable_is_documented_with_who_needs_it_and_how():
    used_secrets = set().union(*(refs(yaml.safe_load(f.read_text()), "secrets") for f in FILES))
    used_vars = set().union(*(refs(yaml.safe_load(f.read_text()), "vars") for f in FILES))
    assert used_vars == set(ci.VARIABLES) and used_secrets - {"GITHUB_TOKEN"} == set(ci.SECRETS)
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([A-Z_]+)` \| ([a-z ()]+) \|", DOC, re.M)}
    for name in used_secrets | used_vars:
        assert name in rows, f"{name} is not in docs/ci.md's table"
        kind = rows[name]
        assert ("variable" in kind) == (name in ci.VARIABLES) or name == "GITHUB_TOKEN", (name, kind)
    # every section a one-line error points to exists (GitHub's anchors: lower case, spaces -> dashes)
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^## (.+)$", DOC, re.M)}
    named = {c.anchor for c in ci.CREDENTIALS} | set(re.findall(r"docs/ci\.md#([a-z-]+)", "\n".join(
        p.read_text() for p in [*FILES, ACTION, REPO / "fleet" / "ci.py",
                                REPO / "infermesh_cli" / "commands" / "canary.py",
                                REPO / "__main__.py", REPO / "scripts" / "canary-commit.sh"])))
    assert named and named <= anchors, named - anchors


def test_no_preview_path_builds_or_pushes_an_image():
    action = yaml.safe_load(ACTION.read_text())
    builders = ("docker/setup-buildx-action@", "docker/login-action@", "docker/build-push-action@")
    # in the access action, buildx and the registry login run for `up` only
    for s in action["runs"]["steps"]:
        if s.get("uses", "").startswith(builders):
            assert s["if"] == "inputs.purpose == 'up'", s
    for f in FILES:
        for name, job in yaml.safe_load(f.read_text())["jobs"].items():
            commands = {s["with"]["command"] for s in pulumi_steps(job) if "command" in s.get("with", {})}
            if "preview" in commands:
                assert commands == {"preview"}, (f.name, name)
                assert access(job)["with"]["purpose"] == "preview", (f.name, name)
                assert not any(s.get("uses", "").startswith(builders) for s in job["steps"])
                assert not re.search(r"docker (build|push)|buildx", runs({"jobs": {name: job}}))


def test_the_program_never_builds_on_preview_and_pushes_to_the_stacks_registry(monkeypatch):
    from tests.test_pulumi_program import run_program

    run = run_program("prod", monkeypatch)
    from fleet.components.images import IMAGE_INPUTS

    images = run.mocks.of_type("docker-build:index:Image")
    assert len(images) == len(IMAGE_INPUTS) == 3            # the gateway, the worker, the gateways' mesh sidecar
    for image in images:
        name = image.name.rsplit("-", 1)[1]
        assert image.inputs["buildOnPreview"] is False
        [tag] = image.inputs["tags"]
        assert tag.startswith(f"{run.spec.delivery.registry}/{name}:")
        cache = f"{run.spec.delivery.registry}/{name}:buildcache"
        assert image.inputs["cacheFrom"] == [{"registry": {"ref": cache}}]
        [to] = image.inputs["cacheTo"]
        assert {k: to["registry"][k] for k in ("ref", "mode", "imageManifest")} == {
            "ref": cache, "mode": "max", "imageManifest": True}        # a plain manifest: ECR, GHCR alike


def test_the_worker_image_is_built_once_per_vllm_pin(tmp_path):
    """The worker's tag is a hash of images/worker alone, whose Dockerfile pins vLLM by version and
    digest: any other change leaves the tag, so `up` has nothing to build; a new pin is a new tag."""
    import shutil as _shutil

    from fleet.components.images import IMAGE_INPUTS, content_tag

    assert IMAGE_INPUTS["worker"] == ("images/worker/Dockerfile", "images/worker/entrypoint.py")   # what it copies
    dockerfile = (REPO / "images" / "worker" / "Dockerfile").read_text()
    assert re.search(r"^FROM vllm/vllm-openai:v[\d.]+@sha256:[0-9a-f]{64}$", dockerfile, re.M)
    root = tmp_path / "repo"
    _shutil.copytree(REPO / "images", root / "images")
    (root / "fleet").mkdir()
    before = content_tag(root, IMAGE_INPUTS["worker"])
    (root / "fleet" / "new.py").write_text("x = 1\n")                 # a change elsewhere
    assert content_tag(root, IMAGE_INPUTS["worker"]) == before
    path = root / "images" / "worker" / "Dockerfile"
    path.write_text(re.sub(r"vllm-openai:v[\d.]+@sha256:[0-9a-f]{64}", "vllm-openai:v9.9.9@sha256:" + "0" * 64,
                           path.read_text()))
    assert content_tag(root, IMAGE_INPUTS["worker"]) != before


def test_no_marketplace_key_is_a_github_secret():
    """Marketplace keys are Pulumi secrets in the stack file, decrypted inside `pulumi up`."""
    used = set().union(*(refs(yaml.safe_load(f.read_text()), "secrets") for f in [*FILES, ACTION]))
    assert not {s for s in used if re.search(r"VAST|RUNPOD|AKASH|GONKA|API_KEY", s)}
    for stack in ("prod", "staging"):
        doc = yaml.safe_load((REPO / "stacks" / f"Pulumi.{stack}.yaml").read_text())["config"]
        for p in doc["infermesh:providers"]:
            if p.get("credentials"):
                assert set(doc[f"infermesh:{p['credentials']}"]) == {"secure"}, (stack, p["name"])


def test_every_gateway_pod_gets_the_stacks_admin_token(monkeypatch, tmp_path):
    from tests.test_pulumi_program import is_secret, run_program, unwrap

    run = run_program("prod", monkeypatch)
    [secret] = [r for r in run.mocks.of_type("kubernetes:core/v1:Secret") if r.name.endswith("-admin")]
    assert is_secret(secret.inputs["stringData"])              # a Pulumi secret all the way to the cluster
    assert unwrap(secret.inputs["stringData"]) == {"INFERMESH_ADMIN_TOKEN": "test-secret-gateway-admin-token"}
    sts = run.mocks.one("kubernetes:apps/v1:StatefulSet")
    [container] = sts.inputs["spec"]["template"]["spec"]["containers"]
    assert {"name": "INFERMESH_ADMIN_TOKEN", "valueFrom": {"secretKeyRef": {
        "name": secret.inputs["metadata"]["name"], "key": "INFERMESH_ADMIN_TOKEN"}}} in container["env"]
    # a cluster stack without the secret is refused in one line naming the setting and the doc section
    doc = yaml.safe_load((REPO / "stacks" / "Pulumi.prod.yaml").read_text())
    del doc["config"]["infermesh:delivery"]["admin_token"]
    (tmp_path / "Pulumi.noadmin.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(Exception) as e:
        run_program("noadmin", monkeypatch, stacks_dir=tmp_path)
    assert "delivery.admin_token" in str(e.value) and "docs/ci.md#admin-token" in str(e.value)


# ---- concurrency: the reusable test workflow cannot cancel its caller ---------------------------------------

def expand(expr, ctx: dict[str, str]):
    """The two expression shapes the concurrency blocks use: `${{ github.x }}` and `${{ a == 'b' }}`."""
    if not isinstance(expr, str):
        return expr

    def one(m: re.Match) -> str:
        inner = m.group(1).strip()
        eq = re.fullmatch(r"([\w.]+)\s*==\s*'([^']*)'", inner)
        if eq:
            return "true" if ctx[eq.group(1)] == eq.group(2) else "false"
        return ctx[inner]

    out = re.sub(r"\$\{\{(.*?)\}\}", one, expr)
    return {"true": True, "false": False}.get(out, out)


def test_the_reusable_test_workflow_cannot_cancel_its_caller():
    test, deploy = load("test.yml"), load("deploy.yml")
    assert "workflow_call" in test[True] and deploy["jobs"]["test"]["uses"] == "$/.github/workflows/test.yml"
    # no workflow-level group: it would also apply when deploy.yml calls test.yml (GitHub evaluates
    # a called workflow's concurrency in the caller's context)
    assert "concurrency" not in test
    group = test["jobs"]["test"]["concurrency"]
    on_push = {"github.workflow": "test", "github.ref": "refs/heads/main"}
    in_deploy = {"github.workflow": "deploy", "github.ref": "refs/heads/main"}
    # a push to main starts test.yml and deploy.yml (which calls test.yml) at once:
    assert expand(group["group"], on_push) != expand(group["group"], in_deploy)
    assert expand(group["group"], in_deploy) != deploy["concurrency"]["group"]
    assert expand(group["cancel-in-progress"], in_deploy) is False           # never cancels inside a deploy
    assert expand(group["cancel-in-progress"], on_push) is True              # a newer push still replaces
    assert deploy["concurrency"] == {"group": "deploy", "cancel-in-progress": False}
    # a called canary has no workflow-level group either (it runs inside deploy's)
    assert "concurrency" not in load("canary.yml")


# ---- the prod diff is approved, then applied exactly or refused -----------------------------------------------

def test_prod_is_applied_exactly_as_previewed():
    jobs = load("deploy.yml")["jobs"]
    [preview] = pulumi_steps(jobs["prod-preview"])
    assert preview["with"]["command"] == "preview" and preview["with"]["stack-name"] == "prod"
    assert preview["with"]["comment-on-summary"] is True and preview["with"]["plan"] == "prod.plan.json"
    upload = next(s for s in jobs["prod-preview"]["steps"] if s.get("uses", "").startswith("actions/upload-artifact@"))
    download = next(s for s in jobs["production"]["steps"]
                    if s.get("uses", "").startswith("actions/download-artifact@"))
    assert upload["with"]["name"] == download["with"]["name"]
    script = runs({"jobs": {"p": jobs["prod-preview"]}})
    assert "pulumi stack export --stack prod" in script and "fleet.ci stamp --stack prod" in script
    names = [s.get("name", s.get("uses", "")) for s in jobs["production"]["steps"]]
    verify = names.index("refuse a stale preview")
    [up] = pulumi_steps(jobs["production"])
    assert names.index(up["name"]) > verify > names.index(download["uses"])
    assert "fleet.ci verify --stack prod" in jobs["production"]["steps"][verify]["run"]
    assert up["with"]["command"] == "up" and up["with"]["plan"] == f"{download['with']['path']}/prod.plan.json"


def state(resources: list[dict]) -> bytes:
    return json.dumps({"version": 3, "deployment": {"manifest": {"time": "t"}, "resources": resources}}).encode()


def ci_main(*argv: str) -> tuple[int, str, str]:
    r = subprocess.run([sys.executable, "-m", "fleet.ci", *argv], capture_output=True, text=True, cwd=REPO,
                       env={"PATH": os.environ["PATH"]})
    return r.returncode, r.stdout, r.stderr


def test_a_stale_preview_is_refused_in_one_line(tmp_path):
    stacks = tmp_path / "stacks"
    stacks.mkdir()
    (stacks / "Pulumi.prod.yaml").write_bytes((REPO / "stacks" / "Pulumi.prod.yaml").read_bytes())
    before = tmp_path / "before.json"
    before.write_bytes(state([{"urn": "a", "inputs": {"x": 1}}]))
    rc, out, err = ci_main("stamp", "--stack", "prod", "--commit", "c0ffee", "--state", str(before),
                           "--stacks-dir", str(stacks))
    assert rc == 0, err
    stamp = tmp_path / "stamp.json"
    stamp.write_text(out)
    # the same state, reformatted: as previewed
    same = tmp_path / "same.json"
    same.write_text(json.dumps(json.loads(before.read_bytes()), indent=4))
    args = ["verify", "--stack", "prod", "--stamp", str(stamp), "--stacks-dir", str(stacks)]
    rc, out, err = ci_main(*args, "--commit", "c0ffee", "--state", str(same))
    assert rc == 0 and "as previewed" in out, err
    # someone updated the stack in between (a canary rollback, a manual up)
    moved = tmp_path / "moved.json"
    moved.write_bytes(state([{"urn": "a", "inputs": {"x": 2}}]))
    rc, out, err = ci_main(*args, "--commit", "c0ffee", "--state", str(moved))
    assert rc == 2 and err.count("\n") == 1 and "the stack's state changed since its preview" in err
    assert "nothing applied" in err and "docs/ci.md#production-approval" in err and "Traceback" not in err
    # another commit, or the stack file edited
    rc, _, err = ci_main(*args, "--commit", "beef", "--state", str(same))
    assert rc == 2 and "the commit changed" in err
    (stacks / "Pulumi.prod.yaml").write_text((stacks / "Pulumi.prod.yaml").read_text() + "\n# edited\n")
    rc, _, err = ci_main(*args, "--commit", "c0ffee", "--state", str(same))
    assert rc == 2 and "the stack file changed" in err
    rc, _, err = ci_main(*args, "--commit", "c0ffee", "--state", str(tmp_path / "missing.json"))
    assert rc == 2 and err.count("\n") == 1 and "cannot read" in err


# ---- credentials: one line per missing one, naming it and the doc section -----------------------------------

def test_a_missing_secret_is_one_line_naming_it_and_the_doc_section():
    rc, out, err = ci_main("credentials", "--stack", "prod", "--for", "up")
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 2 and "Traceback" not in err
    assert "secret PULUMI_ACCESS_TOKEN" in lines[0] and lines[0].endswith("see docs/ci.md#pulumi-backend")
    assert "secret KUBE_CONFIG" in lines[1] and lines[1].endswith("see docs/ci.md#cluster-access")

    def check(purpose: str, **env: str) -> tuple[int, str]:
        r = subprocess.run([sys.executable, "-m", "fleet.ci", "credentials", "--stack", "prod", "--for", purpose],
                           capture_output=True, text=True, cwd=REPO, env={"PATH": os.environ["PATH"], **env})
        return r.returncode, r.stderr

    assert check("up", PULUMI_ACCESS_TOKEN="t", KUBE_CONFIG="k")[0] == 0        # ghcr.io: GITHUB_TOKEN
    assert check("preview", PULUMI_BACKEND_URL="s3://b", PULUMI_CONFIG_PASSPHRASE="p", AWS_ROLE_ARN="arn",
                 AWS_REGION="eu-west-1", EKS_CLUSTER="c")[0] == 0
    rc, err = check("up", PULUMI_BACKEND_URL="s3://b", KUBE_CONFIG="k")          # the passphrase is missing
    assert rc == 2 and "PULUMI_CONFIG_PASSPHRASE" in err and err.count("\n") == 1
    rc, err = check("canary", PULUMI_ACCESS_TOKEN="t", KUBE_CONFIG="k")
    assert rc == 2 and err.strip().endswith("see docs/ci.md#canary-bot") and "secret CANARY_BOT_TOKEN" in err


def test_a_registry_other_than_ghcr_needs_its_login(tmp_path):
    stacks = tmp_path / "stacks"
    stacks.mkdir()
    text = (REPO / "stacks" / "Pulumi.staging.yaml").read_text()
    (stacks / "Pulumi.staging.yaml").write_text(text.replace("ghcr.io/infermesh-example", "registry.acme.example:5000"))
    base = ["credentials", "--stack", "staging", "--stacks-dir", str(stacks), "--for", "up"]
    env = {"PATH": os.environ["PATH"], "PULUMI_ACCESS_TOKEN": "t", "KUBE_CONFIG": "k"}
    r = subprocess.run([sys.executable, "-m", "fleet.ci", *base], capture_output=True, text=True, cwd=REPO, env=env)
    assert r.returncode == 2 and "REGISTRY_PASSWORD" in r.stderr and "registry.acme.example:5000" in r.stderr
    assert r.stderr.strip().endswith("see docs/ci.md#registry")
    r = subprocess.run([sys.executable, "-m", "fleet.ci", *base], capture_output=True, text=True, cwd=REPO,
                       env={**env, "REGISTRY_USERNAME": "robot", "REGISTRY_PASSWORD": "pw"})
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "fleet.ci", "outputs", "--stack", "staging", "--stacks-dir", str(stacks)],
                       capture_output=True, text=True, cwd=REPO)
    assert "registry_host=registry.acme.example:5000\n" in r.stdout and "canary_commits=direct\n" in r.stdout


# ---- the canary lives in main and rolls back on any end but a promote ------------------------------------------

def test_the_canary_is_evaluated_after_the_deploy_that_applied_it():
    jobs = load("deploy.yml")["jobs"]
    for job, after in (("staging-canary", "staging"), ("prod-canary", "production")):
        assert jobs[job]["uses"] == "$/.github/workflows/canary.yml" and jobs[job]["needs"] == after
        assert jobs[job]["if"] == f"needs.{after}.outputs.canary == 'true'"
        assert jobs[after]["outputs"]["canary"] == "${{ steps.access.outputs.canary }}"
    assert jobs["prod-canary"]["with"]["environment"] == "production-canary"
    # no job runs `pulumi up` from anything but the checked-out commit of main (no canary branch)
    assert "git switch -c" not in runs(load("canary.yml"))


def test_any_end_of_the_canary_job_but_a_promote_rolls_it_back():
    jobs = load("canary.yml")["jobs"]
    evaluate, rollback = jobs["evaluate"], jobs["rollback"]
    script = next(s["run"] for s in evaluate["steps"] if s.get("id") == "evaluate")
    assert "infermesh canary evaluate" in script and "--follow" in script and "--apply" not in script
    assert 'test "$rc" -eq 0' in script                       # only a promote (exit 0) lets the job succeed
    assert rules.EXIT == {"promote": 0, "wait": 3, "rollback": 4}
    promote = next(s for s in evaluate["steps"] if s.get("id") == "promote")
    assert promote["run"].rstrip().endswith('echo "promoted=true" >> "$GITHUB_OUTPUT"')  # set only when done
    assert evaluate["outputs"]["promoted"] == "${{ steps.promote.outputs.promoted }}"
    # the rollback job runs whatever became of evaluate (failure, timeout, cancel: always()) unless promoted
    assert rollback["needs"] == "evaluate"
    cond = " ".join(rollback["if"].split())
    assert cond.startswith("always() &&") and "needs.evaluate.outputs.promoted != 'true'" in cond
    assert evaluate["timeout-minutes"] * 60 > 60 * 60                        # beyond the evaluation's own limit
    names = [s.get("name", "") for s in rollback["steps"]]
    [up] = pulumi_steps(rollback)
    assert names.index("remove the canary block from the deployed stack file") < names.index(up["name"])
    assert up["with"]["command"] == "up" and up["if"] == "inputs.action == 'evaluate'"
    assert "scripts/canary-commit.sh direct" in rollback["steps"][-1]["run"]   # on main, by the bot
    # start and promote follow the stack's canary_commits
    assert 'scripts/canary-commit.sh "$commits"' in promote["run"]
    assert 'scripts/canary-commit.sh "$commits"' in runs({"jobs": {"s": jobs["start"]}})
    # the stacks say how: staging lets the bot commit, prod goes through pull requests
    assert "canary_commits=direct" in ci_main("outputs", "--stack", "staging")[1]
    assert "canary_commits=pull-request" in ci_main("outputs", "--stack", "prod")[1]
