"""gateway/redact.py: what the opted-in debug logs never keep."""

from __future__ import annotations

import json

import pytest

from gateway.redact import luhn, redact, summary


@pytest.mark.parametrize("text,kind", [
    ("my key is sk-proj-AbCdEf0123456789ghIJklmn please", "secret"),
    ("sk-AbCdEf0123456789ghIJklmnOPqr", "secret"),
    ("im-0123456789ab.Zx9_yW8-vU7tS6rQ5pO4", "secret"),
    ("aws AKIAIOSFODNN7EXAMPLE here", "secret"),
    ("ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789", "secret"),
    ("xoxb-1234567890-abcdefghij", "secret"),
    ("AIzaSyA-1234567890abcdefghijklmnopqrstu", "secret"),
    ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U", "secret"),
    ("Authorization: Bearer abcdefghijklmnop1234", "secret"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEow\nIBAAK\n-----END RSA PRIVATE KEY-----", "secret"),
    ("4111 1111 1111 1111", "card"),
    ("4111-1111-1111-1111", "card"),
    ("5500005555555559", "card"),
    ("378282246310005", "card"),                       # Amex, 15 digits
    ("write to jane.doe+billing@example.co.uk today", "email"),
    ("call +44 20 7946 0958", "phone"),
    ("call +1-555-123-4567", "phone"),
    ("call (555) 123-4567", "phone"),
    ("call 555-123-4567", "phone"),
    ("call 555.123.4567", "phone"),
    ("call 020 7946 0958", "phone"),
])
def test_each_kind_is_redacted(text, kind):
    out, counts = redact(text)
    assert f"[redacted:{kind}]" in out and counts[kind] == 1 and sum(counts.values()) == 1, (out, counts)


def test_only_the_match_goes():
    out, _ = redact("call +1-555-123-4567 or mail a@b.io, card 4111 1111 1111 1111, key sk-AbCdEf0123456789ghIJ.")
    assert out == "call [redacted:phone] or mail [redacted:email], card [redacted:card], key [redacted:secret]."


@pytest.mark.parametrize("text", [
    "password=hunter2x", "PASSWORD: correct-horse", "api_key=abc123xyz", "api-key: 0123abcd", "token=deadbeef",
    "client_secret = s3cr3tvalue",
])
def test_assigned_secrets_keep_their_name(text):
    out, counts = redact(text)
    name = text.split("=")[0].split(":")[0]
    assert out.startswith(name) and out.endswith("[redacted:secret]") and counts == {"secret": 1}


@pytest.mark.parametrize("text", [
    "4111 1111 1111 1112",              # fails Luhn: an order number, kept
    "order 1234567890123",              # 13 digits, fails Luhn
    "2026-12-01T11:48:25Z",             # a timestamp
    "version 1.2.3, 42 tokens, 3.14159",
    "the year 2026 and 12,345 requests",
    "IP 10.90.0.1 and port 8080",
    "price 0.50 per 1M tokens",
    "sk-short",                         # too short to be a key
    "a token of 12 characters",
    "user@localhost",                   # no domain suffix
])
def test_ordinary_text_is_kept(text):
    out, counts = redact(text)
    assert out == text and not counts, out


def test_json_stays_json_and_is_redacted_inside():
    messages = [{"role": "user", "content": "I'm jane@example.com, card 4242 4242 4242 4242, +1 (555) 010-9999"},
                {"role": "user", "content": "api_key=\"sk-live0123456789abcdefXYZ\""}]
    text, counts = redact(json.dumps(messages))
    back = json.loads(text)
    assert "jane@" not in text and "4242" not in text and "010-9999" not in text and "sk-live" not in text
    assert back[0]["content"].startswith("I'm [redacted:email], card [redacted:card], ")
    assert counts["email"] == 1 and counts["card"] == 1 and counts["phone"] == 1 and counts["secret"] == 1


def test_luhn():
    assert luhn("4111111111111111") and luhn("79927398713") and not luhn("79927398710")


def test_summary_names_kinds_and_counts():
    _, a = redact("a@b.io and c@d.io")
    _, b = redact("4111 1111 1111 1111")
    assert summary(a, b) == "card=1,email=2"
    assert summary(redact("nothing here")[1]) == ""
