"""Reading Prometheus text format (a worker's /metrics), once for everyone: the local stack's drain
(fleet/local_apply.py) and the worker role's drain (playbooks/filter_plugins/infermesh.py).

A sample counts when its line names the metric exactly: ``vllm:num_requests_running{...} 3`` is
``vllm:num_requests_running``, ``vllm:num_requests_running_total 99`` is not. Comments and values
that do not parse are skipped.
"""

from __future__ import annotations


def samples(text: str | None, metric: str) -> list[float]:
    """The values of a metric's samples, over all label sets."""
    out = []
    for line in (text or "").splitlines():
        if not line.startswith(metric):
            continue
        rest = line[len(metric):]
        if rest[:1] not in ("{", " "):
            continue  # a longer metric name that starts the same
        try:
            out.append(float(line.rsplit(" ", 1)[1]))
        except (IndexError, ValueError):
            continue
    return out


def metric_sum(text: str | None, metric: str) -> float:
    """Sum of a metric's samples over all label sets (0 if absent)."""
    return sum(samples(text, metric), 0.0)
