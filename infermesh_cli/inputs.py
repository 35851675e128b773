"""The CLI's input parsers and output cells (docs/cli-inputs.md): argparse types for tenant names,
key ids, hours and bounded numbers, `parse_since` for --since/--until, and the table/CSV cell
escapes. Commands import these; nothing here imports a command.
"""

from __future__ import annotations

import argparse
import math
import re
import time
from datetime import datetime, timezone
from typing import overload

from gateway.keys import TENANT_PATTERN     # the key store refuses other names too
from infermesh_cli.errors import UserError


# ---- inputs (docs/cli-inputs.md) ----------------------------------------------------------------

KEY_ID_PATTERN = r"key_[0-9a-f]{12}"
MAX_DEBUG_LOG_HOURS = 720                 # 30 days: an opt-in to prompt logs is a debugging window
MAX_SINCE_DAYS = 3660                     # durations reach back ten years at most
_DURATION = re.compile(r"([0-9]{1,9})(\.[0-9]{1,6})?([mhd])", re.ASCII)
_HOURS = re.compile(r"[0-9]{1,9}(\.[0-9]{1,6})?", re.ASCII)
_UNITS = {"m": 60, "h": 3600, "d": 86400}


def shown(text: str, limit: int = 60) -> str:
    """A value quoted for an error message: control characters, escapes and invalid UTF-8 escaped
    (repr), cut to `limit` characters."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def tenant_name(text: str) -> str:
    """argparse type: a tenant name (TENANT_PATTERN: ASCII letters, digits, '.', '_', '-'; 1 to 64)."""
    if not re.fullmatch(TENANT_PATTERN, text, re.ASCII):
        raise argparse.ArgumentTypeError(
            f"{shown(text)} is not a tenant name (1 to 64 of A-Z a-z 0-9 . _ -, starting with a letter or digit)")
    return text


def key_id(text: str) -> str:
    """argparse type: a key id as `keys list` shows it (key_ and 12 hex digits)."""
    if not re.fullmatch(KEY_ID_PATTERN, text, re.ASCII):
        raise argparse.ArgumentTypeError(f"{shown(text)} is not a key id (key_ and 12 hex digits, as `keys list` "
                                         f"shows)")
    return text


def hours(text: str) -> float:
    """argparse type: a number of hours, 0 to MAX_DEBUG_LOG_HOURS (ASCII digits, optional fraction)."""
    if not _HOURS.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{shown(text)} is not a number of hours (digits 0-9, e.g. 24 or 1.5)")
    value = float(text)
    if not (math.isfinite(value) and 0 <= value <= MAX_DEBUG_LOG_HOURS):
        raise argparse.ArgumentTypeError(f"{shown(text)}: at most {MAX_DEBUG_LOG_HOURS} hours")
    return value


def bounded(kind: type, low: float, high: float):
    """argparse type: an int or float within [low, high] (ASCII digits, finite)."""
    pattern = re.compile(r"[0-9]{1,12}" if kind is int else r"[0-9]{1,12}(\.[0-9]{1,6})?", re.ASCII)

    def parse(text: str):
        if not pattern.fullmatch(text):
            raise argparse.ArgumentTypeError(f"{shown(text)} is not a{'n integer' if kind is int else ' number'} "
                                             f"(digits 0-9)")
        value = kind(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{shown(text)}: give {low:g} to {high:g}")
        return value

    parse.__name__ = kind.__name__
    return parse


@overload
def parse_since(text: str, now: float | None = None, flag: str = "--since") -> float: ...
@overload
def parse_since(text: None, now: float | None = None, flag: str = "--since") -> None: ...
@overload
def parse_since(text: str | None, now: float | None = None, flag: str = "--since") -> float | None: ...


def parse_since(text: str | None, now: float | None = None, flag: str = "--since") -> float | None:
    """A point in time (epoch seconds) from an ISO date/time (UTC unless it says) or a duration back
    from now: digits 0-9, an optional fraction and m, h or d (30m, 24h, 7d, 1.5d), ten years at most."""
    if text is None:
        return None
    now = now or time.time()
    m = _DURATION.fullmatch(text)
    if m:
        seconds = float(m.group(1) + (m.group(2) or "")) * _UNITS[m.group(3)]
        if seconds > MAX_SINCE_DAYS * 86400:
            raise UserError(f"{flag} {shown(text)}: at most {MAX_SINCE_DAYS}d")
        return now - seconds
    hint = "give an ISO date/time (2026-11-01T00:00) or a duration (30m, 24h, 7d)"
    if not text.isascii() or not text[:1].isdigit():
        raise UserError(f"{flag} {shown(text)}: {hint}")
    try:
        dt = datetime.fromisoformat(text)
        return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()
    except (ValueError, OverflowError):
        raise UserError(f"{flag} {shown(text)}: {hint}") from None


def cell(value: object) -> str:
    """A table cell: control characters, bidi overrides and invalid UTF-8 escaped (as in repr), so a
    client-chosen model name cannot move the cursor, recolour the terminal or hide text."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: object) -> object:
    """A CSV cell a spreadsheet will not run (OWASP CSV injection): a text starting with = + - @ tab
    or CR gets a leading single quote. Numbers are left as numbers."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def one_line(text: str) -> str:
    """An error message as one printable line (file names and values in it may hold anything)."""
    return cell(" ".join(str(text).splitlines()) or "error")
