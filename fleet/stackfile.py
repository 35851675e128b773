"""Surgical edits of a stack file (stacks/Pulumi.<stack>.yaml) that keep everything else as written.

The file is edited as text, never re-serialised: comments, key order, quoting and flow-style
lists stay as the operator wrote them, so the commit that a CLI command makes shows exactly
one intended change. Each edit is checked by parsing the result and comparing it with the spec
the caller expects (``verify``); only then does ``write_atomically`` replace the file (temp file
in the same folder, fsync, rename).

What it can edit, block-style YAML as Pulumi writes it:
- a top-level ``infermesh:<key>:`` entry of the ``config:`` mapping: add one (``add_key``),
  remove one (``remove_key``);
- a field of a named item of a block-style list (``infermesh:pools:`` items with ``name:``):
  set it (``set_item_field``), replacing the field's line and any continuation lines under it.
A layout it does not understand (flow-style lists, a field on the item's dash line) raises
``StackEditError``, whose message says to edit by hand.

The same approach as `infermesh failover` (infermesh_cli/commands/failover.py), in a reusable form.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml

from fleet import spec as spec_mod

NS = spec_mod.NAMESPACE


class StackEditError(Exception):
    pass


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _blank(line: str) -> bool:
    s = line.strip()
    return not s or s.startswith("#")


def _nl(lines: list[str]) -> str:
    return "\r\n" if lines and lines[0].endswith("\r\n") else "\n"


def scalar(value: Any) -> str:
    """A value as inline YAML (flow style for mappings and lists)."""
    def tidy(v: Any) -> Any:
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, dict):
            return {k: tidy(x) for k, x in v.items()}
        if isinstance(v, list):
            return [tidy(x) for x in v]
        return v

    value = tidy(value)
    if isinstance(value, (dict, list)):
        text = yaml.safe_dump([value], default_flow_style=True, width=10_000, sort_keys=False).strip()
        return text[1:-1]
    text = yaml.safe_dump({"v": value}, default_flow_style=False, width=10_000).strip()
    return text[3:]


def _config_line(lines: list[str]) -> int:
    for i, ln in enumerate(lines):
        if re.match(r"^config:\s*(#.*)?$", ln.rstrip("\r\n")):
            return i
    raise StackEditError("no top-level `config:` mapping in the stack file")


def key_span(lines: list[str], key: str) -> tuple[int, int] | None:
    """Lines [start, end) of the ``infermesh:<key>:`` entry (its value included, trailing blank
    and comment lines excluded), or None."""
    cfg = _config_line(lines)
    pat = re.compile(rf"^(\s+){re.escape(NS)}:{re.escape(key)}:(\s|$)")
    for i in range(cfg + 1, len(lines)):
        m = pat.match(lines[i])
        if not m:
            continue
        indent = len(m.group(1))
        end = len(lines)
        for j in range(i + 1, len(lines)):
            if _blank(lines[j]):
                continue
            is_dash = lines[j].lstrip().startswith("-")
            if _indent(lines[j]) < indent or (_indent(lines[j]) == indent and not is_dash):
                end = j
                break
        while end > i + 1 and _blank(lines[end - 1]):
            end -= 1
        return i, end
    return None


def _config_end(lines: list[str]) -> tuple[int, int]:
    """(line after the config mapping's last content line, the mapping's key indent)."""
    cfg = _config_line(lines)
    indent = None
    end = len(lines)
    for j in range(cfg + 1, len(lines)):
        if _blank(lines[j]):
            continue
        if _indent(lines[j]) == 0:
            end = j
            break
        if indent is None:
            indent = _indent(lines[j])
    if indent is None:
        raise StackEditError("the `config:` mapping is empty")
    while end > cfg + 1 and _blank(lines[end - 1]):
        end -= 1
    return end, indent


def list_items(lines: list[str], key: str) -> dict[str, tuple[int, int, int]]:
    """Each named item of the block-style list ``infermesh:<key>:``: name -> (first line,
    end line exclusive, indent of the item's fields)."""
    span = key_span(lines, key)
    if span is None:
        raise StackEditError(f"no `{NS}:{key}:` in the stack file")
    start_key, end = span
    head = lines[start_key].split(":", 2)[2] if lines[start_key].count(":") >= 2 else ""
    if head.strip() and not head.strip().startswith("#"):
        raise StackEditError(f"`{NS}:{key}` is not a block-style list; edit it by hand")
    items: list[tuple[int, int]] = []
    item_indent = None
    for i in range(start_key + 1, end):
        ln = lines[i]
        if _blank(ln):
            continue
        is_dash = ln.lstrip().startswith("- ") or ln.strip() == "-"
        if is_dash and (item_indent is None or _indent(ln) == item_indent):
            item_indent = _indent(ln)
            items.append((i, item_indent))
    out: dict[str, tuple[int, int, int]] = {}
    for n, (start, dash) in enumerate(items):
        stop = items[n + 1][0] if n + 1 < len(items) else end
        while stop > start + 1 and _blank(lines[stop - 1]):
            stop -= 1
        first = lines[start].lstrip()[2:]
        field_indent = dash + 2 + (len(first) - len(first.lstrip()))
        for j in range(start, stop):
            body = lines[j].lstrip()[2:] if j == start else lines[j]
            m = re.match(r"^\s*name:\s*['\"]?([A-Za-z0-9._/-]+)['\"]?\s*(#.*)?$", body.rstrip("\r\n"))
            if m and (j == start or _indent(lines[j]) == field_indent):
                out[m.group(1)] = (start, stop, field_indent)
                break
    return out


def _field_span(lines: list[str], start: int, stop: int, indent: int, field: str) -> tuple[int, int] | None:
    for j in range(start, stop):
        body = lines[j].lstrip()[2:] if j == start else lines[j]
        if re.match(rf"^\s*{re.escape(field)}:(\s|$)", body) and (j == start or _indent(lines[j]) == indent):
            if j == start:
                raise StackEditError(f"`{field}:` sits on the list item's first line; edit it by hand")
            end = j + 1
            while end < stop and (_blank(lines[end]) or _indent(lines[end]) > indent):
                end += 1
            while end > j + 1 and _blank(lines[end - 1]):
                end -= 1
            return j, end
    return None


def set_item_field(text: str, key: str, name: str, field: str, value: Any, comment: str = "") -> str:
    """Set ``field: value`` on the item named `name` of list `key` (replace or append)."""
    lines = text.splitlines(keepends=True)
    items = list_items(lines, key)
    if name not in items:
        raise StackEditError(f"cannot find `{name}` as a block-style item of `{NS}:{key}`; edit it by hand")
    start, stop, indent = items[name]
    nl = _nl(lines)
    line = " " * indent + f"{field}: {scalar(value)}" + (f"  {comment}" if comment else "") + nl
    span = _field_span(lines, start, stop, indent, field)
    if span is not None:
        lines[span[0]:span[1]] = [line]
    else:
        if not lines[stop - 1].endswith(("\n", "\r")):
            lines[stop - 1] += nl
        lines.insert(stop, line)
    return "".join(lines)


def remove_key(text: str, key: str) -> str:
    """The file without the ``infermesh:<key>:`` entry (and a comment line right above it that
    an `add_key` wrote)."""
    lines = text.splitlines(keepends=True)
    span = key_span(lines, key)
    if span is None:
        raise StackEditError(f"no `{NS}:{key}:` in the stack file")
    start, end = span
    if start > 0 and lines[start - 1].strip().startswith("# infermesh:"):
        start -= 1
    del lines[start:end]
    return "".join(lines)


def add_key(text: str, key: str, value: dict[str, Any], comment: str = "") -> str:
    """Append ``infermesh:<key>:`` with `value` (a mapping, one field a line) to the config mapping."""
    lines = text.splitlines(keepends=True)
    if key_span(lines, key) is not None:
        raise StackEditError(f"`{NS}:{key}` is already in the stack file")
    end, indent = _config_end(lines)
    nl = _nl(lines)
    if end > 0 and not lines[end - 1].endswith(("\n", "\r")):
        lines[end - 1] += nl
    block = []
    if comment:
        block.append(" " * indent + f"# infermesh: {comment}{nl}")
    block.append(" " * indent + f"{NS}:{key}:{nl}")
    for k, v in value.items():
        block.append(" " * (indent + 2) + f"{k}: {scalar(v)}{nl}")
    lines[end:end] = block
    return "".join(lines)


def parse_text(text: str, stack: str, path: Path) -> spec_mod.Spec:
    """The spec a stack file's text would give (SpecError if it would not)."""
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, path.name).write_text(text)
        return spec_mod.load(stack, Path(tmp))


def verify(new_text: str, stack: str, path: Path, expected: spec_mod.Spec) -> spec_mod.Spec:
    """Parse the edited text; it must give exactly `expected`, else the file is left untouched."""
    try:
        after = parse_text(new_text, stack, path)
    except spec_mod.SpecError as e:
        raise StackEditError(f"the edit would break the stack file ({e}); file left untouched") from None
    if after != expected:
        raise StackEditError("the edit did not give the intended stack (unexpected layout); file left untouched; "
                             "edit it by hand")
    return after


def write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        except OSError:
            pass
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
