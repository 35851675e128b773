"""Every Kubernetes object the Pulumi program renders, validated against the OpenAPI schemas of a
current Kubernetes release (kubernetes-validate, pinned in requirements.lock), strictly: an unknown
field is an error, as the API server's strict field validation makes it.

The objects are those the program registers under ``pulumi.runtime.set_mocks`` (tests/test_pulumi_program.py),
as the provider would send them (secrets unwrapped, numbers as JSON numbers). Custom resources
(Gateway API, prometheus-operator) have no schema in Kubernetes' own OpenAPI: they are listed
by kind here, so a new built-in object can never slip past unvalidated.
"""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from tests.test_pulumi_program import run_program, unwrap

K8S_VERSION = "1.37.0"           # kubernetes-validate 1.37.0 ships schemas up to this release
CUSTOM = {("gateway.networking.k8s.io/v1", "Gateway"), ("gateway.networking.k8s.io/v1", "HTTPRoute"),
          ("monitoring.coreos.com/v1", "PodMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}


def _json(value: Any) -> Any:
    """As JSON reaches the API server: integral floats (gRPC's numbers) are integers."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_json(v) for v in value]
    return value


def manifests(run) -> list[dict]:
    out = []
    for r in run.mocks.resources:
        if not r.typ.startswith("kubernetes:"):
            continue
        _, group_version, kind = r.typ.split(":")
        group, version = group_version.rsplit("/", 1)
        api_version = version if group == "core" else f"{group}/{version}"
        body = {k: v for k, v in unwrap(r.inputs).items() if k not in ("apiVersion", "kind")}
        out.append(_json({"apiVersion": api_version, "kind": kind, **body}))
    return out


def validate_all(objects: list[dict], label: str) -> tuple[list[str], set[tuple[str, str]]]:
    """Validate every built-in object strictly (one clear failure naming it); returns the kinds
    checked and the custom resources seen (which have no schema here)."""
    checked, custom = [], set()
    for obj in objects:
        key = (obj["apiVersion"], obj["kind"])
        if key in CUSTOM:
            custom.add(key)
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{label}: {obj['kind']} {obj['metadata'].get('name')}: {e.message} at "
                        f"{'.'.join(str(p) for p in e.path)}")
        checked.append(obj["kind"])
    return checked, custom


def test_the_schemas_are_of_a_current_release():
    assert kubernetes_validate.latest_version() == K8S_VERSION


@pytest.mark.parametrize("stack", ["local-ha", "staging", "prod"])
def test_every_rendered_object_is_valid_for_a_current_kubernetes(stack, monkeypatch):
    run = run_program(stack, monkeypatch)
    objects = manifests(run)
    if stack == "local-ha":
        # a local stack runs on one machine (`infermesh up`): the program renders no Kubernetes object
        assert objects == []
        return
    assert len(objects) >= 12
    checked, custom = validate_all(objects, stack)
    assert {"StatefulSet", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy", "Secret",
            "ConfigMap", "Namespace"} <= set(checked)
    assert custom == CUSTOM


def test_an_invalid_object_is_refused():
    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
           "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {"spec": {"containers": [
               {"name": "c", "image": "i", "lifecycle": {"preStop": {"sleep": {"seconds": "ten"}}}}]}}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
