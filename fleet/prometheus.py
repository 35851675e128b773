"""Reading Prometheus text format (a worker's /metrics), once for everyone: the gateway's load
read of each worker (gateway/router.py), the local stack's drain (fleet/local_apply.py) and the
worker role's drain (playbooks/filter_plugins/infermesh.py).

A sample counts when its line names the metric exactly: ``vllm:num_requests_running{...} 3`` is
``vllm:num_requests_running``, ``vllm:num_requests_running_total 99`` is not. Label values may
hold spaces and a timestamp may follow the value. Comments and values that do not parse are
skipped.
"""

from __future__ import annotations

from collections.abc import Iterable


def sample(line: str) -> tuple[str, float | None]:
    """A sample line's metric name and value (None when it does not parse)."""
    brace = line.find("{")
    if brace >= 0:
        name, rest = line[:brace], line[line.rfind("}") + 1:]
    else:
        name, _, rest = line.partition(" ")
    try:
        return name, float(rest.split()[0])
    except (IndexError, ValueError):
        return name, None


def collect(text: str | None, metrics: Iterable[str]) -> dict[str, list[float]]:
    """The values of each named metric's samples over all label sets, in one pass over the text."""
    out: dict[str, list[float]] = {m: [] for m in metrics}
    firsts = tuple({m[:1] for m in out if m})
    for line in (text or "").splitlines():
        if not line.startswith(firsts):
            continue                               # comments, and every other metric, cheaply
        name, value = sample(line)
        if value is not None and name in out:
            out[name].append(value)
    return out


def samples(text: str | None, metric: str) -> list[float]:
    """The values of a metric's samples, over all label sets."""
    return collect(text, (metric,))[metric]


def metric_sum(text: str | None, metric: str) -> float:
    """Sum of a metric's samples over all label sets (0 if absent)."""
    return sum(samples(text, metric), 0.0)
