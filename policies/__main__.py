"""infermesh's Pulumi CrossGuard policy pack: the same rules as `infermesh check`.

Stack validations run every rule of fleet/policy.py over the stack's spec and plan (one
policy per rule id, so each can be configured or downgraded on its own) and check that the
routing ConfigMap the program registered is the plan's routing. Resource validations judge
what the program registers: no public worker Service, Ingress with TLS, GPU leases pinned by
digest and under their price cap.

The spec comes from the stack's config as Pulumi hands it to the pack (``infermesh:*`` keys),
else from stacks/Pulumi.<PULUMI_STACK>.yaml. Constructing ``PolicyPack`` starts the analyzer's
gRPC server and blocks, so it happens only when Pulumi runs this file (``run_name="__main__"``);
importing the module (tests) only builds the policy objects.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pulumi_policy import (  # noqa: E402
    EnforcementLevel,
    PolicyPack,
    ReportViolation,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationArgs,
    StackValidationPolicy,
)

from fleet import plan as plan_mod  # noqa: E402
from fleet import policy as rules  # noqa: E402
from fleet import spec as spec_mod  # noqa: E402

PACK_NAME = "infermesh"


def _config_env() -> dict[str, str]:
    try:
        import pulumi.runtime

        return dict(pulumi.runtime.get_config_env())
    except Exception:  # noqa: BLE001 - no engine config: fall back to the stack file
        return {}


def spec_from_config(config: Mapping[str, str], stack: str) -> spec_mod.Spec | None:
    """The spec from Pulumi's config env (``infermesh:<key>`` -> JSON or plain string), or None."""
    prefix = f"{spec_mod.NAMESPACE}:"
    fields = spec_mod._FIELDS
    data: dict[str, Any] = {}
    for key, raw in config.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name in fields:
            try:
                data[name] = json.loads(raw) if isinstance(raw, str) else raw
            except json.JSONDecodeError:
                data[name] = raw
        else:
            data[name] = str(raw)     # a secret (or another plain setting) handed in as text
    if not data:
        return None
    return spec_mod.parse(data, stack, source=f"stack {stack} config")


def load_spec() -> spec_mod.Spec:
    stack = os.environ.get("PULUMI_STACK", "")
    spec = spec_from_config(_config_env(), stack or "unknown")
    if spec is not None:
        return spec
    if not stack:
        raise spec_mod.SpecError("no infermesh config and no PULUMI_STACK: cannot find the stack spec")
    return spec_mod.load(stack)


_cache: dict[str, Any] = {}


def _spec_and_plan() -> tuple[spec_mod.Spec, plan_mod.Plan]:
    if "plan" not in _cache:
        spec = load_spec()
        _cache["spec"], _cache["plan"] = spec, plan_mod.build_plan(spec)
    return _cache["spec"], _cache["plan"]


def stack_rule(rule: rules.Rule):
    def validate(args: StackValidationArgs, report_violation: ReportViolation) -> None:
        try:
            spec, plan = _spec_and_plan()
        except spec_mod.SpecError as e:
            report_violation(f"the stack spec is invalid: {e}")
            return
        for v in rule.check(spec, plan):
            report_violation(v.line())
    return validate


def routing_matches_plan(args: StackValidationArgs, report_violation: ReportViolation) -> None:
    """Any ConfigMap carrying a routing config (JSON with `stack` and `models`) must equal the plan's."""
    try:
        _, plan = _spec_and_plan()
    except spec_mod.SpecError as e:
        report_violation(f"the stack spec is invalid: {e}")
        return
    for r in args.resources:
        if not r.resource_type.startswith("kubernetes:core/v1:ConfigMap"):
            continue
        for key, value in ((r.props.get("data") or {}).items()):
            try:
                doc = json.loads(value) if isinstance(value, str) else None
            except json.JSONDecodeError:
                continue
            if isinstance(doc, dict) and "models" in doc and "stack" in doc and doc != plan.routing:
                report_violation(f"routing-matches-plan configmap/{r.name}: data[{key}] differs from the plan's "
                                 "routing (fix: deploy from the current stack file; never edit the ConfigMap)", r.urn)


def resource_rules(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    for v in rules.check_resource(args.resource_type, args.props, args.name):
        report_violation(v.line())


POLICIES = [
    *[StackValidationPolicy(name=r.id, description=r.description, validate=stack_rule(r),
                            enforcement_level=EnforcementLevel.MANDATORY) for r in rules.RULES],
    StackValidationPolicy(name="routing-matches-plan", description="The routing ConfigMap is the plan's routing",
                          validate=routing_matches_plan, enforcement_level=EnforcementLevel.MANDATORY),
    ResourceValidationPolicy(name="resources", description="Worker Services stay private, Ingress has TLS, "
                             "GPU leases are pinned by digest and under their price cap",
                             validate=resource_rules, enforcement_level=EnforcementLevel.MANDATORY),
]


if __name__ == "__main__":
    PolicyPack(name=PACK_NAME, policies=POLICIES, enforcement_level=EnforcementLevel.MANDATORY)
