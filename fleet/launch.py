"""One worker launch, decided here: what every worker runs, whoever starts it.

A pure function of the spec. The Pulumi worker fleet (fleet/components/workers.py) passes
``worker_launch`` to its leases, the Ansible worker role execs ``serving_flags`` behind its own
``--model <weights dir>`` (fleet/inventory.py hands them over as ``worker_engine_args``), and the
local stack (fleet/local.py) runs ``sim_command`` with the same decided flags in the sim's
vocabulary. So a 2-GPU pool runs tensor parallel 2 wherever it is started, an embedding model is
served by vLLM's pooling runner everywhere, and a worker on the mTLS channel requires the
gateway's client certificate everywhere.

Decided flags (vLLM's names): ``--max-num-seqs``, ``--max-model-len``, ``--tensor-parallel-size``,
``--quantization``, ``--enable-prompt-tokens-details`` (usage.prompt_tokens_details.cached_tokens,
metered), ``--runner pooling`` for embedding models, and on the ``mtls`` channel ``--ssl-keyfile``,
``--ssl-certfile``, ``--ssl-ca-certs``, ``--ssl-cert-reqs 2``. The disk: the weights plus 10% and
``DISK_OVERHEAD_GB``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypedDict

from fleet.kinds import channel_for
from fleet.marketplaces.base import countries_for
from fleet.plan import WORKER_PORT, Lease
from fleet.spec import Pool, Spec

DISK_OVERHEAD_GB = 20          # image layers, CUDA caches, logs beyond the weights
CONTAINER_TLS_DIR = "/run/infermesh/tls"   # where images/worker/entrypoint.py writes the channel's files


@dataclass(frozen=True)
class TlsFiles:
    cert: str
    key: str
    ca: str


CONTAINER_TLS = TlsFiles(f"{CONTAINER_TLS_DIR}/worker.crt", f"{CONTAINER_TLS_DIR}/worker.key",
                         f"{CONTAINER_TLS_DIR}/ca.crt")


def tls_flags(tls: TlsFiles | None) -> list[str]:
    """Mutual TLS as vLLM serves it: its certificate and key, the CA clients must chain to, required."""
    if tls is None:
        return []
    return ["--ssl-keyfile", tls.key, "--ssl-certfile", tls.cert, "--ssl-ca-certs", tls.ca, "--ssl-cert-reqs", "2"]


def serving_flags(spec: Spec, pool: Pool, gpu_count: int, tls: TlsFiles | None) -> list[str]:
    """The decided vLLM flags of a pool's worker, apart from where the weights come from and where it binds."""
    model = spec.model(pool.model)
    flags = ["--max-num-seqs", str(pool.max_concurrency),
             "--max-model-len", str(pool.max_model_len or model.context_length),
             "--tensor-parallel-size", str(gpu_count),
             "--enable-prompt-tokens-details"]        # usage.prompt_tokens_details.cached_tokens (metered)
    if model.kind == "embedding":
        flags += ["--runner", "pooling"]              # serves /v1/embeddings instead of generation
    if model.quantization:
        flags += ["--quantization", model.quantization]
    return flags + tls_flags(tls)


def disk_gb(spec: Spec, pool: Pool) -> int:
    return int(spec.model(pool.model).weights_gb * 1.1) + DISK_OVERHEAD_GB


def lease_channel(lease: Lease) -> str:
    return channel_for(lease.provider_kind, lease.connection)


class WorkerLaunch(TypedDict):
    args: Sequence[str]
    """vLLM server flags (the image's ENTRYPOINT is kept)."""
    env: Mapping[str, str]
    """Non-secret environment (the channel's secrets are added by the worker fleet)."""
    disk_gb: int
    """Container disk: weights plus overhead."""
    countries: Sequence[str]
    """Countries the lease's region stands for."""
    channel: str
    """mtls (container leases: the API port is published, TLS required) or wireguard (SSH hosts)."""
    ssh_keys: Sequence[str]
    """SSH hosts: the operator's public keys, registered on the marketplace account where it takes them."""


def worker_launch(spec: Spec, lease: Lease) -> WorkerLaunch:
    """What one lease runs: a pure function of the spec (same spec, same launch)."""
    pool, model = spec.pool(lease.pool), spec.model(lease.model)
    channel = lease_channel(lease)
    # mTLS: bind every interface of the container (the marketplace forwards the port; TLS is the guard);
    # WireGuard: the mesh address only
    host = "0.0.0.0" if channel == "mtls" else lease.mesh_address
    args = ["--model", model.weights, "--revision", model.revision, "--served-model-name", model.id,
            "--host", host, "--port", str(WORKER_PORT),
            *serving_flags(spec, pool, lease.gpu_count, CONTAINER_TLS if channel == "mtls" else None)]
    env = {"INFERMESH_LEASE": lease.name, "INFERMESH_MODEL": model.id, "INFERMESH_MESH_ADDRESS": lease.mesh_address,
           "INFERMESH_CHANNEL": channel}
    if model.sha256:
        env["INFERMESH_WEIGHTS_SHA256"] = model.sha256
    region = next((r for r in spec.regions if r.name == lease.region), None)
    return WorkerLaunch(args=args, env=env, disk_gb=disk_gb(spec, pool),
                        countries=list(countries_for(lease.region, region.location if region else "")),
                        channel=channel, ssh_keys=list(spec.ssh_public_keys) if lease.connection == "ssh" else [])


def sim_command(spec: Spec, pool: Pool, python: str, host: str, port: int, tls: TlsFiles | None) -> list[str]:
    """A local sim worker: the pool's knobs, and the decided flags in the sim's vocabulary (vLLM's
    names where the sim has them; ``--max-concurrency`` for vLLM's ``--max-num-seqs``)."""
    from fleet.spec import SimKnobs

    model = spec.model(pool.model)
    knobs = pool.sim or SimKnobs()
    cmd = [python, "-m", "engines.sim", "--host", host, "--port", str(port),
           "--model", pool.model, "--ttft-ms", str(knobs.ttft_ms), "--itl-ms", str(knobs.itl_ms),
           "--output-tokens", str(knobs.output_tokens), "--error-rate", str(knobs.error_rate),
           "--max-concurrency", str(pool.max_concurrency),
           "--max-model-len", str(pool.max_model_len or model.context_length),
           "--enable-prompt-tokens-details"]
    if model.kind == "embedding":
        cmd += ["--embedding-dim", str(knobs.embedding_dim)]
    if knobs.seed is not None:
        cmd += ["--seed", str(knobs.seed)]
    return cmd + tls_flags(tls)
