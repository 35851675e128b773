"""Images: the gateway, worker and mesh sidecar images, built with BuildKit and pushed, tagged by content.

``pulumi-docker-build`` (the Pulumi provider for buildx/BuildKit) builds ``images/gateway``,
``images/worker`` and ``images/mesh`` (the gateway pods' WireGuard sidecar). The tag is a hash of
everything that goes into the image (the Dockerfile and the files its context copies), so an
unchanged tree means an unchanged tag, no rebuild and no rollout; the fleets use the pushed image's
``ref``, which is pinned by digest (``<repo>:<tag>@sha256:...``). Base images and vLLM are pinned
inside the Dockerfiles.

Pools may still pin their own worker image in the stack file (a canary, a rollback); the
WorkerFleet uses the built worker image only for leases that name none.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import NotRequired, TypedDict

import pulumi
import pulumi_docker_build as docker_build

# What each image's build context copies (relative to the repository root), exactly (tests/test_image_smoke.py
# reads the Dockerfiles' COPY and bind-mount sources): their content is the tag. No stack file: a stack
# change never changes the gateway's tag (the config reaches it as a ConfigMap).
IMAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "gateway": ("images/gateway/Dockerfile", "requirements.lock", "pyproject.toml", "README.md", "fleet", "gateway",
                "engines"),
    "worker": ("images/worker/Dockerfile", "images/worker/entrypoint.py"),
    "mesh": ("images/mesh/Dockerfile", "images/mesh/mesh-sidecar"),
}
_SKIP = {"__pycache__", ".pytest_cache"}


def content_tag(root: Path, paths: Sequence[str]) -> str:
    """sha256 over the sorted (path, bytes) of every file under ``paths``: the same tree, the same tag."""
    h = hashlib.sha256()
    for rel in paths:
        base = root / rel
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file()
                                                      and not _SKIP.intersection(p.parts) and p.suffix != ".pyc")
        for f in files:
            h.update(str(f.relative_to(root)).encode() + b"\0")
            h.update(f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


class ImagesArgs(TypedDict):
    repository: pulumi.Input[str]
    """Registry and path prefix, e.g. ``registry.example/infermesh`` (images go to ``<prefix>/<name>``)."""
    context: str
    """The repository root (the build context)."""
    push: NotRequired[bool]
    """Push to the registry (default True); False builds only (a preview on a laptop)."""
    platforms: NotRequired[Sequence[docker_build.Platform]]
    """Target platforms (default linux/amd64: the GPU hosts)."""


class Images(pulumi.ComponentResource):
    gateway_ref: pulumi.Output[str]
    worker_ref: pulumi.Output[str]
    mesh_ref: pulumi.Output[str]

    def __init__(self, name: str, args: ImagesArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("infermesh:fleet:Images", name, None, opts)
        root = Path(args["context"])
        refs: dict[str, pulumi.Output[str]] = {}
        self.images: dict[str, docker_build.Image] = {}
        for image, inputs in IMAGE_INPUTS.items():
            dockerfile = root / "images" / image / "Dockerfile"
            if not dockerfile.is_file():
                raise ValueError(f"Images: {dockerfile} is missing")
            tag = pulumi.Output.concat(args["repository"], f"/{image}:", content_tag(root, inputs))
            self.images[image] = docker_build.Image(
                f"{name}-{image}",
                docker_build.ImageArgs(
                    tags=[tag],
                    context=docker_build.BuildContextArgs(location=str(root)),
                    dockerfile=docker_build.DockerfileArgs(location=str(dockerfile)),
                    platforms=list(args.get("platforms", [docker_build.Platform.LINUX_AMD64])),
                    push=args.get("push", True),
                    # A preview never builds (the worker's vLLM base is ~9 GB): `up` builds when the
                    # content tag changed, from and into a registry cache beside the image, so an image
                    # is built once per tag (the worker: once per vLLM pin) and the next stack's `up`
                    # of the same tag finds every layer cached (docs/ci.md#images).
                    build_on_preview=False,
                    cache_from=[docker_build.CacheFromArgs(registry=docker_build.CacheFromRegistryArgs(
                        ref=pulumi.Output.concat(args["repository"], f"/{image}:buildcache")))],
                    cache_to=[docker_build.CacheToArgs(registry=docker_build.CacheToRegistryArgs(
                        ref=pulumi.Output.concat(args["repository"], f"/{image}:buildcache"),
                        mode=docker_build.CacheMode.MAX, image_manifest=True, oci_media_types=True))],
                ),
                opts=pulumi.ResourceOptions(parent=self),
            )
            refs[image] = self.images[image].ref
        self.gateway_ref = refs["gateway"]
        self.worker_ref = refs["worker"]
        self.mesh_ref = refs["mesh"]
        self.register_outputs({"gateway_ref": self.gateway_ref, "worker_ref": self.worker_ref,
                               "mesh_ref": self.mesh_ref})
