"""`infermesh failover drain|restore PROVIDER --stack S`: declarative failover, one line in the stack file.

`drain` marks the provider ``drained: true`` in stacks/Pulumi.<S>.yaml; `restore` removes the mark.
Nothing else is written: the plan (fleet/plan.py) does the rest as a pure function of the file:
the provider's pools become role `drained` (no leases, weight 0, so their traffic moves to the
other pools) and replacement capacity is added where N+1 would break. `pulumi up` then changes
exactly the leases and the routing ConfigMap.

Why a provider-level flag rather than rewriting each pool's role and replicas: the operator's
intent ("this provider is out") is one fact, so it is one line; restore is exact (removing the
line gives back the very same file and plan, with no remembered roles or replica counts to
restore); and the replacement capacity stays a computed, reviewable output of the plan
(`infermesh plan --diff HEAD`) instead of hand-edited numbers that outlive the incident.

The file is edited as text, not re-serialised: comments, order and formatting are kept. The edit
is verified by parsing the result before it replaces the file (atomically: temp file + rename).
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

from fleet import plan as plan_mod
from fleet import policy
from fleet import spec as spec_mod
from infermesh_cli.errors import UserError
from fleet.stackfile import write_atomically

MARK_COMMENT = "# infermesh failover drain; undo with `infermesh failover restore`"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("failover", help="drain a provider (or restore it) by changing the stack file")
    fsub = p.add_subparsers(dest="action", required=True)
    for action, text in (("drain", "mark PROVIDER drained: its traffic and capacity move to the others"),
                         ("restore", "bring a drained PROVIDER back")):
        a = fsub.add_parser(action, help=text)
        a.add_argument("provider", metavar="PROVIDER")
        a.add_argument("--stack", required=True)
        a.add_argument("--stacks-dir", type=Path, default=None, help=argparse.SUPPRESS)
        a.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = spec_mod.stack_path(args.stack, args.stacks_dir)
    before = spec_mod.load(args.stack, args.stacks_dir)
    text = path.read_bytes().decode("utf-8")
    if args.action == "drain":
        new_text = drain_text(text, before, args.provider)
    else:
        new_text = restore_text(text, before, args.provider)
    after = _verify(new_text, args.stack, path, args.provider, args.action == "drain")
    write_atomically(path, new_text)
    old_plan, new_plan = plan_mod.build_plan(before), plan_mod.build_plan(after)
    d = plan_mod.diff(old_plan, new_plan)
    verb = "drained" if args.action == "drain" else "restored"
    print(f"{verb} {args.provider} in {path.name}: leases +{len(d['leases']['added'])} "
          f"-{len(d['leases']['removed'])}, {len(d['routing'])} routing pools changed, "
          f"cost {d['cost']['monthly_delta']:+,.2f}/month")
    for x in d["leases"]["added"]:
        print(f"  + {x['name']} ({x['provider']}, {x['region']})")
    for x in d["leases"]["removed"]:
        print(f"  - {x['name']} ({x['provider']}, {x['region']})")
    for v in policy.check(after, new_plan, rules=["capacity-n-plus-1", "multi-provider", "reserved-fallback"]):
        print(f"warning: {v.line()}")
    print("review with `infermesh plan --stack {0} --diff HEAD`, apply with `pulumi up -s {0}`".format(args.stack))
    return 0


# ---- the text edit ---------------------------------------------------------------------------------

def _provider_items(text: str) -> tuple[list[str], dict[str, tuple[int, int, int]]]:
    """Lines, and each provider's (first line, end line exclusive, field indent) in the providers list."""
    lines = text.splitlines(keepends=True)
    key = next((i for i, ln in enumerate(lines)
                if re.match(rf"^\s*{spec_mod.NAMESPACE}:providers:\s*(#.*)?$", ln)), None)
    if key is None:
        raise UserError(f"no block-style `{spec_mod.NAMESPACE}:providers:` list in the stack file; "
                        "edit it by hand (add `drained: true` to the provider)")
    key_indent = len(lines[key]) - len(lines[key].lstrip())
    items: list[tuple[int, int]] = []        # (start line, dash indent)
    end = len(lines)
    item_indent = None
    for i in range(key + 1, len(lines)):
        ln = lines[i]
        stripped = ln.strip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(ln) - len(ln.lstrip())
        is_dash = ln.lstrip().startswith("- ") or ln.strip() == "-"
        if indent < key_indent or (indent == key_indent and not is_dash):
            end = i
            break
        if is_dash and (item_indent is None or indent == item_indent):
            item_indent = indent
            items.append((i, indent))
    # Trailing blank/comment lines before the next key belong to no item.
    while end > key + 1 and (not lines[end - 1].strip() or lines[end - 1].strip().startswith("#")):
        end -= 1
    out: dict[str, tuple[int, int, int]] = {}
    for n, (start, dash) in enumerate(items):
        stop = items[n + 1][0] if n + 1 < len(items) else end
        while stop > start + 1 and (not lines[stop - 1].strip() or lines[stop - 1].strip().startswith("#")):
            stop -= 1
        first = lines[start].lstrip()[2:]
        field_indent = dash + 2 + (len(first) - len(first.lstrip()))
        name = None
        for j in range(start, stop):
            body = lines[j].lstrip()[2:] if j == start else lines[j]
            m = re.match(r"^\s*name:\s*['\"]?([A-Za-z0-9._/-]+)['\"]?\s*(#.*)?$", body)
            if m and (j == start or len(lines[j]) - len(lines[j].lstrip()) == field_indent):
                name = m.group(1)
                break
        if name is not None:
            out[name] = (start, stop, field_indent)
    return lines, out


def _find(text: str, spec: spec_mod.Spec, provider: str) -> tuple[list[str], tuple[int, int, int]]:
    known = [p.name for p in spec.providers]
    if provider not in known:
        raise UserError(f"unknown provider {provider!r}; declared: {', '.join(known)}")
    lines, items = _provider_items(text)
    if provider not in items:
        raise UserError(f"cannot find provider {provider!r} as a block-style list item in the stack file; "
                        "edit it by hand (add `drained: true`)")
    return lines, items[provider]


def _drained_line(lines: list[str], start: int, stop: int, indent: int) -> int | None:
    for j in range(start, stop):
        body = lines[j].lstrip()[2:] if j == start else lines[j]
        if re.match(r"^\s*drained:", body) and (j == start or len(lines[j]) - len(lines[j].lstrip()) == indent):
            return j
    return None


def drain_text(text: str, spec: spec_mod.Spec, provider: str) -> str:
    """The stack file with ``drained: true`` added to PROVIDER (refuses an unknown or drained provider)."""
    lines, (start, stop, indent) = _find(text, spec, provider)
    if spec.provider(provider).drained:
        raise UserError(f"provider {provider!r} is already drained; `infermesh failover restore {provider}` "
                        "brings it back")
    if all(p.drained or p.name == provider for p in spec.providers if p.kind != "openai"):
        raise UserError(f"refusing to drain {provider!r}: it is the last provider in service")
    j = _drained_line(lines, start, stop, indent)
    nl = "\r\n" if lines[start].endswith("\r\n") else "\n"
    mark = " " * indent + f"drained: true  {MARK_COMMENT}{nl}"
    if j is not None:        # an explicit `drained: false`
        if j == start:
            raise UserError("`drained:` sits on the list item's first line; edit it by hand")
        lines[j] = mark
    else:
        if not lines[stop - 1].endswith(("\n", "\r")):
            lines[stop - 1] += nl
        lines.insert(stop, mark)
    return "".join(lines)


def restore_text(text: str, spec: spec_mod.Spec, provider: str) -> str:
    """The stack file without PROVIDER's ``drained: true`` (refuses an unknown or undrained provider)."""
    lines, (start, stop, indent) = _find(text, spec, provider)
    if not spec.provider(provider).drained:
        raise UserError(f"provider {provider!r} is not drained; nothing to restore")
    j = _drained_line(lines, start, stop, indent)
    if j is None or j == start:
        raise UserError(f"cannot find the `drained: true` line of {provider!r}; edit it by hand")
    del lines[j]
    return "".join(lines)


def _verify(new_text: str, stack: str, path: Path, provider: str, drained: bool) -> spec_mod.Spec:
    """Parse the edited text; it must be the same stack with only the flag changed."""
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, path.name).write_text(new_text)
        try:
            after = spec_mod.load(stack, Path(tmp))
        except spec_mod.SpecError as e:
            raise UserError(f"the edit would break the stack file ({e}); file left untouched") from None
    if after.provider(provider).drained is not drained:
        raise UserError("the edit did not take (unexpected layout); file left untouched")
    return after
