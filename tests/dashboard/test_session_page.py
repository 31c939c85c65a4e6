"""A session's page, read through Django's test client: its turns as a timeline with tokens and cache
hits, its tool calls page by page, and a 404 for anyone who may not see it."""
from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.utils import timezone

from apps.dashboard.views import sessions as session_view
from apps.traces import records
from tests.traces.helpers import accept, drain

pytestmark = pytest.mark.django_db

T0 = timezone.now() - timedelta(hours=1)


def _t(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat()


def _turn(project, key, run_id, *, session="chat/42", start, seconds, usage=None, tools=0, status="completed"):
    """One run of the session: a model call (with ``usage``, if any) and ``tools`` tool calls; finished
    unless ``seconds`` is None."""
    recs = [records.run_start_record({"run_id": run_id, "agent": "support", "session_id": session,
                                      "started_at": _t(start)}, received_at=_t(start))]
    recs.append(records.span_record(run_id, {"span_id": "m", "kind": "llm", "start_time": _t(start),
                                             **({"usage": usage} if usage else {})}, received_at=_t(start)))
    recs += [records.span_record(run_id, {"span_id": f"t{i}", "kind": "tool", "start_time": _t(start + i),
                                          "end_time": _t(start + i + 0.5), "status": "ok",
                                          "tool": {"name": f"{run_id}-tool-{i}"}}, received_at=_t(start))
             for i in range(tools)]
    if seconds is not None:
        recs.append(records.run_finish_record(run_id, {"status": status, "ended_at": _t(start + seconds)},
                                              received_at=_t(start + seconds)))
    accept(project, key, recs)


@pytest.fixture
def seeded(project, other_project, make_key):
    """Three turns of chat/42 in acme (the last still running), and globex's own run of that session id."""
    key = make_key(project)[0]
    _turn(project, key, "turn-1", start=0, seconds=10, usage={"input_tokens": 1000, "output_tokens": 100}, tools=2)
    _turn(project, key, "turn-2", start=20, seconds=5,
          usage={"input_tokens": 1200, "output_tokens": 50, "cache_read_tokens": 900}, tools=1)
    _turn(project, key, "turn-3", start=30, seconds=None)
    _turn(other_project, make_key(other_project)[0], "globex-secret", start=0, seconds=1, usage={"input_tokens": 1})
    drain()
    return key


def test_an_auditor_sees_the_turns_with_bars_tokens_and_cache_hits(client, bob, seeded):
    client.force_login(bob)
    response = client.get("/sessions/acme/chat/42/")
    assert response.status_code == 200
    page = response.content.decode()
    assert "globex-secret" not in page
    for n in (1, 2, 3):
        assert f'href="/runs/acme/turn-{n}/"' in page
    assert '<span class="status status-running">running</span>' in page
    # Bars to scale: the session spans 30 s; turn 2 starts at 20 s and lasts 5 s.
    assert re.findall(r'<rect class="bar[^"]*" x="([\d.]+)" y="1" width="([\d.]+)"', page) == [
        ("0.0", "333.3"), ("666.7", "166.7"), ("998.0", "2.0")]  # turn 3, still running: a mark at its start
    [turns] = re.findall(r'<table class="list turns".*?<tbody>(.*?)</tbody>', page, re.S)
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row, re.S) for row in re.findall(r"<tr>(.*?)</tr>", turns, re.S)]
    assert [c[6] for c in cells] == ["2", "1", "0"]  # tool calls
    assert [c[9] for c in cells] == ["0 %", "75 %", "—"]  # cache hit rate (turn 3 has no prompt)
    assert [c[10] for c in cells] == ["1\u202f000 / 100", "2\u202f200 / 150", "2\u202f200 / 150"]
    assert [c[11] for c in cells] == ["0 %", "41 %", "41 %"]  # 900 of 2,200 prompt tokens
    # The session's tool calls, oldest first, each linked to its run.
    assert page.index("turn-1-tool-0") < page.index("turn-1-tool-1") < page.index("turn-2-tool-0")


def test_tool_calls_page_by_cursor(client, bob, seeded, monkeypatch):
    monkeypatch.setattr(session_view, "TOOL_CALLS_PAGE", 2)
    client.force_login(bob)
    first = client.get("/sessions/acme/chat/42/").content.decode()
    assert "turn-1-tool-1" in first and "turn-2-tool-0" not in first
    [after] = re.findall(r'href="\?after=([^"]+)" rel="next"', first)
    second = client.get(f"/sessions/acme/chat/42/?after={after}").content.decode()
    assert "turn-2-tool-0" in second and "turn-1-tool-0" not in second and 'rel="next"' not in second
    assert client.get("/sessions/acme/chat/42/?after=not-a-cursor").status_code == 404


def test_a_session_the_person_may_not_see_is_404(client, bob, charlie, seeded):
    assert client.get("/sessions/acme/chat/42/")["Location"].startswith("/login/")
    client.force_login(charlie)
    assert client.get("/sessions/acme/chat/42/").status_code == 404
    client.force_login(bob)
    assert client.get("/sessions/globex/chat/42/").status_code == 404
    assert client.get("/sessions/acme/no-such-session/").status_code == 404
    assert client.get("/sessions/acme/chat%0042/").status_code == 404


def test_the_session_page_asks_a_fixed_number_of_queries(client, bob, project, seeded,
                                                         django_assert_max_num_queries):
    for i in range(20):
        _turn(project, seeded, f"more-{i}", start=40 + i, seconds=1, usage={"input_tokens": 5}, tools=3)
    drain()
    client.force_login(bob)
    # Session, user, access, visible projects; the turns, their tool call counts, their costs, a page
    # of tool calls.
    with django_assert_max_num_queries(8):
        page = client.get("/sessions/acme/chat/42/")
    assert page.status_code == 200 and page.content.decode().count('href="/runs/acme/more-') == 20 + 47
