"""Whether each shared backend answers: a gauge per backend and one log line per transition.

``infermesh_shared_state_up{backend="redis"|"postgres"}`` is 1 while every component using
that backend (limits; ledger shipping, key refresh) last succeeded, 0 otherwise.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Gauge

log = logging.getLogger("infermesh.state")


class Health:
    def __init__(self) -> None:
        self._ok: dict[tuple[str, str], bool] = {}
        self.gauge: Gauge | None = None
        self.down_events: dict[str, int] = {}

    def bind(self, registry: CollectorRegistry) -> None:
        self.gauge = Gauge("infermesh_shared_state_up", "1 while the shared state backend answers",
                           ("backend",), registry=registry)
        for backend in {b for b, _ in self._ok}:
            self.gauge.labels(backend).set(1 if self.up(backend) else 0)

    def register(self, backend: str, component: str) -> None:
        self._ok.setdefault((backend, component), True)
        if self.gauge is not None:
            self.gauge.labels(backend).set(1 if self.up(backend) else 0)

    def up(self, backend: str) -> bool:
        return all(ok for (b, _), ok in self._ok.items() if b == backend)

    def report(self, backend: str, component: str, ok: bool, error: BaseException | None = None) -> None:
        key = (backend, component)
        if self._ok.get(key) == ok:
            return
        self._ok[key] = ok
        if ok:
            log.warning("%s is back for %s", backend, component)
        else:
            self.down_events[backend] = self.down_events.get(backend, 0) + 1
            log.error("%s unreachable for %s (%s); %s", backend, component,
                      type(error).__name__ if error else "error", _fallback(backend, component))
        if self.gauge is not None:
            self.gauge.labels(backend).set(1 if self.up(backend) else 0)


def _fallback(backend: str, component: str) -> str:
    if backend == "redis":
        return "using per-process limits (tiers that fail closed are refused) until it answers"
    if component == "ledger":
        return "usage records stay in the local spool and are shipped in order when it answers"
    return ("keys as last loaded (in memory, else from the disk cache) stay in force until it answers; "
            "a replica with none is not ready")
