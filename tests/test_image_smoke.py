"""The gateway image runs: installed as images/gateway/Dockerfile installs it, started with its CMD
and its config mounted as the Deployment mounts it, /health answers. And the images' content tags
hash exactly what their Dockerfiles copy.

No Docker here: the smoke test follows the Dockerfile's steps on this machine. A fresh venv outside
the checkout; the build context files the Dockerfile COPYs (read from the Dockerfile itself) in a
/src-like folder; ``pip install --no-deps .`` (non-editable, into site-packages, as the image does);
the ENTRYPOINT and CMD from the Dockerfile run from an /app-like working directory with no stack
file anywhere near, the ConfigMap's ``gateway.json`` and the channel's TLS Secret at the paths the
Deployment mounts (re-rooted under a temp dir). The dependencies come from the project's venv (the
lockfile's pins, already installed) through a .pth file instead of a second download of the lockfile.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import pytest

from fleet import spec as spec_mod
from fleet.channel import LocalCerts
from fleet.components.gateway import CONFIG_DIR, CONFIG_KEY, TLS_DIR
from fleet.components.images import IMAGE_INPUTS, content_tag
from fleet.plan import build_plan
from fleet.routing import gateway_config

ROOT = Path(__file__).resolve().parent.parent


def dockerfile_inputs(image: str) -> set[str]:
    """What the Dockerfile takes from the build context: COPY sources (not --from stages) and bind mounts."""
    text = (ROOT / "images" / image / "Dockerfile").read_text().replace("\\\n", " ")
    found = {f"images/{image}/Dockerfile"}
    for line in text.splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            found |= {w.rstrip("/") for w in words[1:-1] if not w.startswith("--")}
        found |= set(re.findall(r"--mount=type=bind,source=([^,\s]+)", line))
    return found


@pytest.mark.parametrize("image", sorted(IMAGE_INPUTS))
def test_content_tag_hashes_exactly_what_the_image_copies(image):
    assert set(IMAGE_INPUTS[image]) == dockerfile_inputs(image)
    assert not any(p.startswith("stacks") for p in IMAGE_INPUTS[image])     # a stack change never rebuilds


def test_a_stack_change_leaves_the_gateway_tag_alone(tmp_path):
    for rel in IMAGE_INPUTS["gateway"]:
        src = ROOT / rel
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, tmp_path / rel, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, tmp_path / rel)
    shutil.copytree(ROOT / "stacks", tmp_path / "stacks")
    before = content_tag(tmp_path, IMAGE_INPUTS["gateway"])
    prod = tmp_path / "stacks" / "Pulumi.prod.yaml"
    prod.write_text(prod.read_text().replace("name: vast\n", "name: vast\n      drained: true\n", 1))
    assert content_tag(tmp_path, IMAGE_INPUTS["gateway"]) == before
    (tmp_path / "gateway" / "app.py").write_text((tmp_path / "gateway" / "app.py").read_text() + "\n# changed\n")
    assert content_tag(tmp_path, IMAGE_INPUTS["gateway"]) != before


def _instructions(text: str, name: str) -> list[str]:
    for line in text.replace("\\\n", " ").splitlines():
        if line.startswith(name + " "):
            return json.loads(line[len(name) + 1:])
    raise AssertionError(f"no {name} in the Dockerfile")


def _admin(port: int) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/admin/endpoints",
                                 headers={"authorization": "Bearer smoke-admin-token"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_gateway_image_starts_from_its_configmap_and_answers_health(tmp_path):
    text = (ROOT / "images" / "gateway" / "Dockerfile").read_text()
    # 1. the build stage: the context files it COPYs into /src, then `pip install --no-deps .`
    src = tmp_path / "src"
    src.mkdir()
    for rel in sorted(dockerfile_inputs("gateway") - {"images/gateway/Dockerfile", "requirements.lock"}):
        if (ROOT / rel).is_dir():
            shutil.copytree(ROOT / rel, src / rel, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(ROOT / rel, src / rel)
    venv = tmp_path / "opt" / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], check=True, capture_output=True, text=True).stdout.strip())
    (site / "_lockfile_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps",
                          "--disable-pip-version-check", "."], cwd=src, capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-2000:]
    shutil.rmtree(src)                       # the final stage has the venv, not the sources
    # 2. what the Deployment mounts: the ConfigMap's gateway.json and the channel's TLS Secret
    def mount(path: str) -> Path:
        return tmp_path / "mnt" / path.lstrip("/")

    spec = spec_mod.load("staging")
    certs = LocalCerts(tmp_path / "pki", "staging")
    certs.client()
    mount(TLS_DIR).mkdir(parents=True)
    for name in ("ca.crt", "gateway.crt", "gateway.key"):
        shutil.copy(certs.dir / name, mount(TLS_DIR) / name)
    config = gateway_config(spec, {**build_plan(spec).routing, "tls_dir": str(mount(TLS_DIR))})
    mount(CONFIG_DIR).mkdir(parents=True)
    (mount(CONFIG_DIR) / CONFIG_KEY).write_text(json.dumps(config))
    # 3. ENTRYPOINT + CMD, with the mounted paths under the temp dir, from an /app with no stack file
    port = _free_port()
    argv = [str(venv / "bin" / "python") if a == "python" else a
            for a in _instructions(text, "ENTRYPOINT") + _instructions(text, "CMD")]
    argv = [str(mount(a)) if a.startswith(("/etc/infermesh", "/var/lib/infermesh")) else a for a in argv]
    argv[argv.index("--host") + 1], argv[argv.index("--port") + 1] = "127.0.0.1", str(port)
    assert "--stack" not in argv and "--stacks-dir" not in argv
    app = tmp_path / "app"
    app.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONPATH", "VIRTUAL_ENV"))}
    env["INFERMESH_ADMIN_TOKEN"] = "smoke-admin-token"
    log = open(tmp_path / "gateway.log", "wb")
    proc = subprocess.Popen(argv, cwd=app, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline, last = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "gateway.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    last = r.status
                    break
            except OSError:
                time.sleep(0.3)
        assert last == 200, (tmp_path / "gateway.log").read_text()[-3000:]
        # it serves the installed code, not the checkout's
        where = subprocess.run([str(venv / "bin" / "python"), "-c", "import gateway; print(gateway.__file__)"],
                               cwd=app, capture_output=True, text=True, check=True).stdout
        assert str(ROOT) not in where and "site-packages" in where
        req = urllib.request.Request(f"http://127.0.0.1:{port}/admin/endpoints",
                                     headers={"authorization": "Bearer smoke-admin-token"})
        with urllib.request.urlopen(req, timeout=5) as r:
            pools = json.loads(r.read())["pools"]
        assert {e["channel"] for p in pools for e in p["endpoints"]} == {"mtls"}      # staging: marketplaces
        # a changed ConfigMap (a drained pool, a tier's limit) is applied live, by the same process
        version = _admin(port)["version"]
        config["spec"]["tiers"][0]["rpm"] = config["spec"]["tiers"][0]["rpm"] + 1
        config["models"][0]["pools"][0]["role"] = "drained"
        (mount(CONFIG_DIR) / CONFIG_KEY).write_text(json.dumps(config))
        deadline = time.monotonic() + 10
        while _admin(port)["version"] == version and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _admin(port)["pools"][0]["role"] == "drained" and proc.poll() is None
        assert b"gateway config applied" in (tmp_path / "gateway.log").read_bytes()
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
