"""Anchors: the chain's tip kept outside the table, so deleting the newest rows no longer goes unnoticed."""
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from datetime import datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from apps.audit.anchors import audit_anchor_last, audit_anchor_tip
from apps.audit.models import AuditEvent
from apps.audit.selectors import audit_chain_verify
from apps.audit.services import Actor, audit_record
from apps.audit.tasks import anchor_tip

pytestmark = pytest.mark.django_db


def _record(n: int = 1) -> None:
    for i in range(n):
        audit_record(actor=Actor.system("test"), action="test.event", object_type="test", object_id=i,
                     object_repr=f"thing {i}")


def _tip() -> AuditEvent:
    return AuditEvent.objects.order_by("-seq").first()


def _delete_newest(n: int) -> None:
    """Delete the newest rows as the database owner can today: with the append-only triggers off."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SET LOCAL session_replication_role = replica")  # until the test's rollback
        else:
            cursor.execute("DROP TRIGGER audit_no_delete")
    newest = list(AuditEvent.objects.order_by("-seq").values_list("pk", flat=True)[:n])
    assert AuditEvent.objects.filter(pk__in=newest).delete()[0] == n


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _verify(*args) -> str:
    out = StringIO()
    call_command("audit_verify", *args, stdout=out)
    return out.getvalue()


def test_the_task_appends_the_tip_as_one_json_line_and_logs_it(anchor_file, caplog):
    _record(3)
    tip = _tip()
    with caplog.at_level(logging.INFO, logger="apps.audit.anchors"):
        assert anchor_tip() == {"status": "anchored", "seq": tip.seq, "hash": tip.hash}
    [line] = _lines(anchor_file)
    assert line["seq"] == tip.seq and line["hash"] == tip.hash
    assert datetime.fromisoformat(line["created_at"]) == tip.created_at
    assert datetime.fromisoformat(line["anchored_at"]) >= tip.created_at
    assert f"seq={tip.seq} hash={tip.hash}" in caplog.text

    _record(1)
    anchor_tip()
    assert [a["seq"] for a in _lines(anchor_file)] == [tip.seq, tip.seq + 1]
    assert audit_anchor_last().seq == tip.seq + 1


def test_nothing_is_anchored_before_the_first_row(anchor_file):
    assert not AuditEvent.objects.exists()
    assert anchor_tip() == {"status": "empty"}
    assert not anchor_file.exists()


def test_beat_runs_the_registered_anchor_task_every_audit_anchor_seconds():
    from controlplane.celery import app

    app.loader.import_default_modules()
    entry = settings.CELERY_BEAT_SCHEDULE["audit-anchor-tip"]
    assert entry["task"] == "audit.anchor_tip" and entry["task"] in app.tasks
    assert entry["schedule"] == settings.AUDIT_ANCHOR_SECONDS == 300


class _Receiver(BaseHTTPRequestHandler):
    status = 204
    received: list

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.headers["Content-Type"], json.loads(body)))
        self.send_response(self.status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook():
    """A local receiver; yields (url, received, set_status)."""
    handler = type("Handler", (_Receiver,), {"received": []})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def set_status(code: int) -> None:
        handler.status = code

    yield f"http://127.0.0.1:{server.server_port}/anchors", handler.received, set_status
    server.shutdown()
    server.server_close()


def test_the_webhook_receives_the_anchor_as_json(anchor_file, webhook, settings):
    url, received, _ = webhook
    settings.AUDIT_ANCHOR_WEBHOOK_URL = url
    _record(2)
    anchor_tip()
    [(content_type, payload)] = received
    assert content_type == "application/json"
    assert payload == {"type": "audit.anchor", **_lines(anchor_file)[0]}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("failure", ["connection refused", "HTTP 500"])
def test_a_failing_webhook_is_logged_and_the_file_anchor_still_written(anchor_file, webhook, settings, caplog,
                                                                       failure):
    url, received, set_status = webhook
    if failure == "HTTP 500":
        set_status(500)
    else:
        url = f"http://127.0.0.1:{_closed_port()}/anchors"
    settings.AUDIT_ANCHOR_WEBHOOK_URL = url
    _record(1)
    assert anchor_tip()["status"] == "anchored"
    assert _lines(anchor_file)[0]["seq"] == _tip().seq
    assert f"webhook {url} failed" in caplog.text


def test_audit_verify_without_an_anchor_file_checks_the_chain_and_says_so(anchor_file):
    _record(2)
    out = _verify()
    assert "audit chain OK: 2 rows" in out and f"no anchor found at {anchor_file}" in out


def test_audit_verify_reports_rows_deleted_from_the_end(anchor_file):
    _record(5)
    anchored = _tip()
    audit_anchor_tip()
    _delete_newest(2)
    assert list(audit_chain_verify()) == []  # what is left is a valid chain: only the anchor can tell
    with pytest.raises(CommandError) as exc:
        _verify()
    assert exc.value.returncode == 1  # what `manage.py audit_verify` exits with
    assert (f"rows missing at the end: anchored seq {anchored.seq} hash {anchored.hash}, "
            f"table ends at seq {anchored.seq - 2}") in str(exc.value)


def test_a_chain_that_grew_past_the_anchor_verifies(anchor_file):
    _record(3)
    audit_anchor_tip()
    _record(4)
    out = _verify()
    assert "audit chain OK: 7 rows" in out and "last anchor (seq 3, taken " in out


def test_a_rewritten_end_is_reported_even_when_the_table_is_as_long_again(anchor_file):
    """Delete the newest rows, then append others until the table is as long as when it was anchored."""
    _record(4)
    anchored = _tip()
    audit_anchor_tip()
    _delete_newest(2)
    _record(2)
    assert _tip().seq == anchored.seq and list(audit_chain_verify()) == []
    with pytest.raises(CommandError, match=f"row #{anchored.seq} does not match its anchor: anchored hash "
                                           f"{anchored.hash}, table has {_tip().hash}"):
        _verify()


def test_the_task_refuses_to_anchor_a_shortened_chain(anchor_file, caplog):
    """Else the next tick would anchor the shortened chain and audit_verify would pass again."""
    _record(4)
    audit_anchor_tip()
    before = anchor_file.read_text()
    _delete_newest(1)
    result = anchor_tip()
    assert result["status"] == "refused" and "rows missing at the end: anchored seq 4" in result["problem"]
    assert anchor_file.read_text() == before
    assert any(r.levelno == logging.ERROR and "anchored seq 4" in r.getMessage() for r in caplog.records)
    with pytest.raises(CommandError, match="rows missing at the end"):
        _verify()


def test_the_refusal_is_posted_to_the_webhook(anchor_file, webhook, settings):
    url, received, _ = webhook
    _record(3)
    audit_anchor_tip()
    _delete_newest(1)
    settings.AUDIT_ANCHOR_WEBHOOK_URL = url
    anchor_tip()
    [(_, payload)] = received
    assert payload["type"] == "audit.anchor_refused" and payload["anchor"]["seq"] == 3
    assert "table ends at seq 2" in payload["problem"]


def test_the_anchors_option_names_another_file(anchor_file, tmp_path):
    elsewhere = tmp_path / "copied" / "anchors.jsonl"
    _record(3)
    audit_anchor_tip(path=elsewhere)
    _delete_newest(1)
    assert "no anchor found" in _verify()  # the default file was never written
    with pytest.raises(CommandError, match="rows missing at the end: anchored seq 3"):
        _verify("--anchors", str(elsewhere))
    with pytest.raises(CommandError, match="no anchor file at"):
        _verify("--anchors", str(tmp_path / "typo.jsonl"))


def test_a_torn_last_line_falls_back_to_the_anchor_before_it(anchor_file):
    _record(2)
    audit_anchor_tip()
    with open(anchor_file, "a") as fh:
        fh.write('{"seq": 9, "hash": "ab')  # a crash mid-write
    assert audit_anchor_last().seq == 2
    assert "last anchor (seq 2" in _verify()


def test_an_anchor_file_without_any_anchor_fails_verification(anchor_file):
    _record(2)
    anchor_file.write_text("not an anchor\n")
    with pytest.raises(CommandError, match="holds no readable anchor"):
        _verify()


@pytest.mark.django_db(databases=[])
def test_a_webhook_url_that_is_not_http_stops_the_process(tmp_path):
    """urllib would also read file:// URLs; settings refuse anything but http(s)."""
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL"}}
    env.update(DATA_DIR=str(tmp_path), AUDIT_ANCHOR_WEBHOOK_URL="file:///etc/passwd")
    proc = subprocess.run([sys.executable, "manage.py", "check"], cwd=Path(__file__).resolve().parents[2], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "AUDIT_ANCHOR_WEBHOOK_URL: expected an http(s):// URL" in proc.stderr
