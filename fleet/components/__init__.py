"""Pulumi components: one per module, each with a TypedDict of args and registered outputs.

GpuLease (a dynamic provider per marketplace), WireGuardMesh (keys as secrets, per-node
configs), Images (docker-build, content-addressed tags), GatewayFleet and WorkerFleet.
``__main__.py`` composes them from the plan; no component reads ``pulumi.Config``.
"""

from fleet.components.gateway import GatewayFleet, GatewayFleetArgs
from fleet.components.images import Images, ImagesArgs
from fleet.components.lease import GpuLease, GpuLeaseArgs
from fleet.components.mesh import WireGuardMesh, WireGuardMeshArgs
from fleet.components.workers import WorkerFleet, WorkerFleetArgs, worker_launch

__all__ = ["GatewayFleet", "GatewayFleetArgs", "GpuLease", "GpuLeaseArgs", "Images", "ImagesArgs",
           "WireGuardMesh", "WireGuardMeshArgs", "WorkerFleet", "WorkerFleetArgs", "worker_launch"]
