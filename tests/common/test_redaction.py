"""The redaction rules, one type at a time, and how a record is walked (pure: no database)."""
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


def test_records_redact_free_text_and_keep_structure():
    redactor = Redactor(exempt_attributes=["http.client_ip", "debug.*"])
    span = redactor.record({"op": "span", "run_id": "r1", "span": {
        "span_id": "s1", "kind": "tool", "name": "email bob@example.com", "model": "gpt-4o",
        "start_time": "2026-01-01T00:00:00+00:00", "status": "ok",
        "tool": {"name": "send_mail", "call_id": "call_1", "arguments": {"to": "bob@example.com", "cc": ["a@b.io"]},
                 "result": "sent with key sk-abcdefghijklmnopqrstuvwxyz"},
        "input_messages": [{"role": "user", "content": "my card is 4111111111111111"}],
        "attributes": {"http.client_ip": "203.0.113.7", "net.peer.ip": "203.0.113.8", "debug.raw": "x@y.com",
                       "count": 3},
        "events": [{"name": "log", "attributes": {"body": "call +1 415 555 2671"}}],
    }})["span"]
    assert span["name"] == "email [EMAIL]"
    assert span["tool"] == {"name": "send_mail", "call_id": "call_1",
                            "arguments": {"to": "[EMAIL]", "cc": ["[EMAIL]"]}, "result": "sent with key [API_KEY]"}
    assert span["input_messages"][0]["content"] == "my card is [CARD]"
    assert span["attributes"] == {"http.client_ip": "203.0.113.7", "net.peer.ip": "[IP]", "debug.raw": "x@y.com",
                                  "count": 3}
    assert span["events"][0]["attributes"]["body"] == "call [PHONE]"
    assert span["model"] == "gpt-4o" and span["span_id"] == "s1"

    start = redactor.record({"op": "run.start", "run_id": "r1", "end_user": "u@example.com",
                             "input": {"q": "reach me at u@example.com"}, "metadata": {"ip": "10.1.2.3"}})
    assert start["end_user"] == "u@example.com"  # the attribution the sender chose
    assert start["input"] == {"q": "reach me at [EMAIL]"} and start["metadata"] == {"ip": "[IP]"}
    finish = redactor.record({"op": "run.finish", "run_id": "r1", "output": "done, AKIAIOSFODNN7EXAMPLE",
                              "error_details": {"peer": "2001:db8::1:0:0:1"}})
    assert finish["output"] == "done, [API_KEY]" and finish["error_details"] == {"peer": "[IP]"}
