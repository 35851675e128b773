"""Redaction of opted-in debug logs: what looks like a secret, a card number, an email address or a
phone number is replaced before a prompt or completion is written (gateway/app.py keep_debug_log).

Each match becomes ``[redacted:<kind>]``; :func:`redact` also counts what it replaced, and the
debug-log row carries that count (``redacted``: e.g. ``card=1,email=2``), so a reader knows the
text was changed and how. The rules err on the side of redacting: a debug log is for seeing how a
request went, never for reading a customer's data.

Rules, applied in this order (an earlier rule's replacement is never matched by a later one):

- ``secret``: PEM private-key blocks; API keys and tokens by their shape (OpenAI-style ``sk-``,
  infermesh ``im-``, AWS ``AKIA``, GitHub ``ghp_``..., Slack ``xox?-``, Google ``AIza``, JWTs,
  ``Bearer`` tokens); the value of ``password=``, ``secret:``, ``api_key=``, ``token=`` and the like
  (the name stays).
- ``card``: 13 to 19 digits, spaces or dashes between them, passing the Luhn check (so an order
  number that fails it is kept).
- ``email``: ``local@domain.tld``.
- ``phone``: an international number (``+`` and 8 to 15 digits, spaces, dots, dashes, brackets)
  or a national one written in groups like ``(555) 123-4567`` or ``555-123-4567``.

Replacements contain no quote or backslash, so a JSON text stays valid JSON.
"""

from __future__ import annotations

import re
from collections import Counter

_SECRET = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----"
    r"|\b(?:sk|rk|pk)-(?:[A-Za-z0-9]+-)*[A-Za-z0-9_]{16,}"
    r"|\bim-[0-9a-f]{12}\.[A-Za-z0-9_-]{8,}"
    r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"
    r"|\bgh[pousr]_[A-Za-z0-9]{30,}"
    r"|\bgithub_pat_[A-Za-z0-9_]{30,}"
    r"|\bxox[abprs]-[A-Za-z0-9-]{10,}"
    r"|\bAIza[0-9A-Za-z_-]{35}"
    r"|\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"
    r"|(?i:\bbearer\s+)[A-Za-z0-9._~+/=-]{16,}",
    re.DOTALL,
)
# name = value: the name stays, the value goes (up to a quote, a space, a comma or a semicolon)
_ASSIGNED = re.compile(
    r"(?i)\b((?:password|passwd|pwd|passphrase|secret|client_secret|api[_-]?key|access[_-]?key|auth[_-]?token"
    r"|access[_-]?token|token)\s*(?:=|:)\s*)(?!\[redacted)([^\s\"',;\\]{4,})"
)
_CARD = re.compile(r"(?<![\d.-])\d(?:[ -]?\d){12,18}(?![\d.-])")
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_PHONE = re.compile(
    r"(?<![\w+])\+\d(?:[ .()-]{0,2}\d){7,14}(?!\d)"                 # +44 20 7946 0958, +1-555-123-4567
    r"|(?<![\w.-])\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}(?!\d)"              # (555) 123-4567
    r"|(?<![\w.-])\d{3}[ .-]\d{3}[ .-]\d{4}(?![\w-])"                # 555-123-4567, 555.123.4567
    r"|(?<![\w.-])0\d{2,4}[ -]\d{3,4}[ -]?\d{3,4}(?![\w-])"          # 020 7946 0958, 030-1234-5678
)


def luhn(digits: str) -> bool:
    """The Luhn check every payment card number passes."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def redact(text: str) -> tuple[str, Counter]:
    """The text with secrets, card numbers, emails and phone numbers replaced by [redacted:<kind>],
    and how many of each kind were replaced."""
    counts: Counter = Counter()

    def sub(kind: str):
        def repl(m: re.Match) -> str:
            counts[kind] += 1
            return f"[redacted:{kind}]"
        return repl

    def assigned(m: re.Match) -> str:
        counts["secret"] += 1
        return m.group(1) + "[redacted:secret]"

    def card(m: re.Match) -> str:
        digits = re.sub(r"[ -]", "", m.group(0))
        if 13 <= len(digits) <= 19 and luhn(digits):
            counts["card"] += 1
            return "[redacted:card]"
        return m.group(0)

    text = _SECRET.sub(sub("secret"), text)
    text = _ASSIGNED.sub(assigned, text)
    text = _CARD.sub(card, text)
    text = _EMAIL.sub(sub("email"), text)
    text = _PHONE.sub(sub("phone"), text)
    return text, counts


def summary(*counts: Counter) -> str:
    """What was replaced, for the log row: ``card=1,email=2`` (kinds in name order); '' when nothing."""
    total: Counter = Counter()
    for c in counts:
        total.update(c)
    return ",".join(f"{k}={v}" for k, v in sorted(total.items()) if v)
