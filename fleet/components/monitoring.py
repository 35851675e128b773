"""Monitoring: the stack's alerting rules as a PrometheusRule, and what lets Prometheus read the gateways.

For a cluster running the Prometheus Operator (kube-prometheus-stack or the like):

- ``PrometheusRule`` ``infermesh-alerts`` (monitoring.coreos.com/v1): the rule groups of
  fleet/alerts.py, rendered from the stack (the same rules as monitoring/alerts/<stack>.rules.yml);
  ``rule_labels`` are added to its labels for the operator's ``ruleSelector`` (kube-prometheus-stack
  selects ``release: <its release name>`` by default);
- ``PodMonitor`` ``infermesh-gateway``: every gateway pod's ``/metrics`` on its ``http`` port, every
  15 s (the alerts sum over replicas, so each pod is scraped, not the Service);
- ``NetworkPolicy`` ``prometheus-scrape``: the gateway namespace denies all ingress but the
  ingress controller and the mesh (GatewayFleet), so Prometheus' namespace is let in to the gateway
  port, nothing else.

The rules sum over every series Prometheus has: where one Prometheus scrapes several stacks (staging
and prod in one cluster), run the operator with ``enforcedNamespaceLabel: namespace`` so that each
PrometheusRule reads only its own namespace's gateways.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NotRequired, TypedDict

import pulumi
import pulumi_kubernetes as k8s

RULE_NAME = "infermesh-alerts"


class MonitoringArgs(TypedDict):
    stack: str
    groups: list[dict[str, Any]]
    """Prometheus rule groups (fleet.alerts.rule_groups of the stack's spec)."""
    namespace: NotRequired[str]
    """The gateway's namespace (default ``infermesh``), created by GatewayFleet."""
    port: NotRequired[int]
    """The gateway's container port (default 8080)."""
    prometheus_namespace: NotRequired[str]
    """Where Prometheus runs (default ``monitoring``): allowed to scrape the gateway port."""
    rule_labels: NotRequired[Mapping[str, str]]
    """Extra labels on the PrometheusRule and PodMonitor, for the operator's selectors."""


class Monitoring(pulumi.ComponentResource):
    rule_name: pulumi.Output[str]

    def __init__(self, name: str, args: MonitoringArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("infermesh:fleet:Monitoring", name, None, opts)
        ns = args.get("namespace", "infermesh")
        labels = {"app.kubernetes.io/name": "infermesh-gateway", "app.kubernetes.io/component": "monitoring",
                  "app.kubernetes.io/part-of": "infermesh", "infermesh/stack": args["stack"],
                  **dict(args.get("rule_labels") or {})}
        child = pulumi.ResourceOptions(parent=self)
        k8s.apiextensions.CustomResource(
            f"{name}-rules", api_version="monitoring.coreos.com/v1", kind="PrometheusRule",
            metadata={"name": RULE_NAME, "namespace": ns, "labels": labels},
            spec={"groups": args["groups"]}, opts=child)
        k8s.apiextensions.CustomResource(
            f"{name}-podmonitor", api_version="monitoring.coreos.com/v1", kind="PodMonitor",
            metadata={"name": "infermesh-gateway", "namespace": ns, "labels": labels},
            spec={"selector": {"matchLabels": {"app.kubernetes.io/name": "infermesh-gateway",
                                               "app.kubernetes.io/component": "gateway"}},
                  # /metrics is the operator's: scraped with the admin token the pods themselves get
                  "podMetricsEndpoints": [{"port": "http", "path": "/metrics", "interval": "15s",
                                           "authorization": {"type": "Bearer", "credentials": {
                                               "name": "infermesh-admin", "key": "INFERMESH_ADMIN_TOKEN"}}}]},
            opts=child)
        k8s.networking.v1.NetworkPolicy(
            f"{name}-scrape", metadata={"name": "prometheus-scrape", "namespace": ns, "labels": labels},
            spec={"podSelector": {"matchLabels": {"app.kubernetes.io/name": "infermesh-gateway",
                                                  "app.kubernetes.io/component": "gateway"}},
                  "policyTypes": ["Ingress"],
                  "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {
                      "kubernetes.io/metadata.name": args.get("prometheus_namespace", "monitoring")}}}],
                      "ports": [{"protocol": "TCP", "port": args.get("port", 8080)}]}]},
            opts=child)
        self.rule_name = pulumi.Output.from_input(RULE_NAME)
        self.register_outputs({"rule_name": self.rule_name})
