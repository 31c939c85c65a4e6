"""The redaction rules, one type at a time, and how a JSON value is walked (pure: no database)."""
from __future__ import annotations

import pytest

from apps.common.redaction import PatternError, Redactor, detect, redact_text, validate_extra_patterns

JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
       "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U")


@pytest.mark.parametrize(("text", "expected"), [
    ("write to Jane.Doe+billing@mail.example.co.uk today", "write to [EMAIL] today"),
    ("<ops@example.com>", "<[EMAIL]>"),
    ("card 4111 1111 1111 1111 exp 12/29", "card [CARD] exp 12/29"),
    ("amex 3782-822463-10005", "amex [CARD]"),
    ("pan=5555555555554444;", "pan=[CARD];"),
    ("key sk-proj-Abc123def456ghi789jkl012mno", "key [API_KEY]"),
    ("sk-ant-api03-abcdefghijklmnopqrstuvwxyz0123", "[API_KEY]"),
    ("aws AKIAIOSFODNN7EXAMPLE region", "aws [API_KEY] region"),
    ("token ghp_0123456789abcdefghijABCDEFGHIJ012345", "token [API_KEY]"),
    ("google AIzaSyA-1234567890abcdefghijklmnopqrstu", "google [API_KEY]"),
    ("Authorization: Bearer 8f14e45fceea167a5a36dedd4bea2543", "Authorization: Bearer [TOKEN]"),
    (f"id_token={JWT}", "id_token=[JWT]"),
    ("call +1 415 555 2671 now", "call [PHONE] now"),
    ("(415) 555-2671", "[PHONE]"),
    ("tel 020 7946 0958", "tel [PHONE]"),
    ("+44 20 7946 0958", "[PHONE]"),
    ("0049 30 901820", "[PHONE]"),
    ("from 203.0.113.7:443", "from [IP]:443"),
    ("peer 2001:db8::8a2e:370:7334 closed", "peer [IP] closed"),
])
def test_each_type_is_replaced(text, expected):
    assert redact_text(text) == expected


@pytest.mark.parametrize("text", [
    "version 1.2.3 and 10.0.19041.1",
    "at 2026-11-26T12:35:15.123Z",
    "uuid 550e8400-e29b-41d4-a716-446655440000",
    "sha 3f786850e387550fdab836ed7e6dc881de23001b",
    "epoch 1732623315123",
    "order 4111111111111112 (not a card: fails Luhn)",
    "std::vector<int> and a::b",
    "pages 120-135, zip 94105-1234",
    "model gpt-4o-2024-08-06 or claude-3-5-sonnet-20241022",
    "risk-assessment task-id 42",
    "the Bearer of bad news",
    "ssh deploy@buildhost",
    "localhost:8080 and 12:35:15",
])
def test_hard_negatives_are_left_alone(text):
    assert redact_text(text) == text


def test_luhn_decides_card_numbers():
    assert detect("4012 8888 8888 1881") == {"CARD"}
    assert detect("4012 8888 8888 1882") == set()


def test_extra_patterns_and_disabled_builtins():
    redactor = Redactor([{"name": "EMPLOYEE_ID", "pattern": r"EMP-\d{6}"}], builtin=False)
    assert redactor.text("EMP-123456 wrote to bob@example.com") == "[EMPLOYEE_ID] wrote to bob@example.com"
    assert Redactor(builtin=False).active is False


@pytest.mark.parametrize(("patterns", "fragment"), [
    ("EMP", "must be a list"),
    ([{"name": "lower", "pattern": "x"}], "upper-case"),
    ([{"name": "X", "pattern": "("}], "not a valid regular expression"),
    ([{"name": "X", "pattern": "a*"}], "empty string"),
    ([{"name": "X", "pattern": "a", "flags": "i"}], "'name' and 'pattern' only"),
])
def test_bad_extra_patterns_are_refused(patterns, fragment):
    with pytest.raises(PatternError, match=fragment):
        validate_extra_patterns(patterns)


def test_json_values_redact_every_string_and_keep_keys_and_exempt_attributes():
    """The generic walk: which values of a record are free text is the record module's
    (``apps.traces.records.redact``, tested in tests/traces/test_record_contract.py)."""
    redactor = Redactor(exempt_attributes=["http.client_ip", "debug.*"])
    value = {"bob@example.com": ["call +1 415 555 2671", 3, None, {"ip": "203.0.113.8"}], "ok": True}
    assert redactor.value(value) == {"bob@example.com": ["call [PHONE]", 3, None, {"ip": "[IP]"}], "ok": True}
    attributes = {"http.client_ip": "203.0.113.7", "net.peer.ip": "203.0.113.8", "debug.raw": "x@y.com"}
    assert redactor.value(attributes, exemptable=True) == {
        "http.client_ip": "203.0.113.7", "net.peer.ip": "[IP]", "debug.raw": "x@y.com"}
    assert redactor.value(attributes)["http.client_ip"] == "[IP]"  # exempt only in a map of attributes
