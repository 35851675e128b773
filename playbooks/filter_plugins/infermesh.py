"""Jinja filters the infermesh playbooks use: small pure functions, unit-tested in tests/test_playbooks.py.

Parsing (nvidia-smi's CSV, Prometheus text) and reshaping (the routing config) are easier to
get right, and to test, in Python than in nested Jinja. The routing config's reshaping and the
Prometheus reader are fleet's own (fleet/routing.py, fleet/prometheus.py; the controller runs
Ansible from infermesh's environment): the CLI and the local stack use the same functions.
"""

from __future__ import annotations

import re
from typing import Any

from fleet.prometheus import metric_sum as prometheus_sum
from fleet.routing import routing_without

_ALNUM = re.compile(r"[^a-z0-9]")


def nvidia_gpus(lines: list[str]) -> list[dict[str, Any]]:
    """Rows of `nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader,nounits`."""
    gpus = []
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3 or not parts[0]:
            continue
        try:
            memory_mib = int(float(parts[1]))
        except ValueError:
            continue
        gpus.append({"name": parts[0], "memory_mib": memory_mib, "driver": parts[2]})
    return gpus


def cuda_version(nvidia_smi_output: str) -> str:
    """The CUDA version the driver supports, from the banner of plain `nvidia-smi` ("" if absent)."""
    m = re.search(r"CUDA Version:\s*([0-9]+(?:\.[0-9]+)*)", nvidia_smi_output or "")
    return m.group(1) if m else ""


def gpu_matches(name: str, gpu_type: str) -> bool:
    """Whether a GPU's reported name is the pool's GPU type.

    "NVIDIA H100 80GB HBM3" is an H100; "NVIDIA A100-SXM4-80GB" is an A100-80G (the memory
    suffix is checked against VRAM separately); "NVIDIA GeForce RTX 4090" is an RTX4090.
    """
    family = _ALNUM.sub("", gpu_type.lower().split("-")[0])
    return bool(family) and family in _ALNUM.sub("", name.lower())


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "infermesh_routing_without": routing_without,
            "infermesh_nvidia_gpus": nvidia_gpus,
            "infermesh_cuda_version": cuda_version,
            "infermesh_gpu_matches": gpu_matches,
            "infermesh_prometheus_sum": prometheus_sum,
        }
