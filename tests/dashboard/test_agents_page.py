"""The agents page, read through Django's test client: each agent version's figures over a window,
the version change marked, each version linked to its runs, and nothing of other projects."""
from __future__ import annotations

import re
from datetime import datetime, timedelta

import pytest
from django.db import connection
from django.utils import timezone

from apps.traces import records
from tests.traces.helpers import accept, drain

pytestmark = pytest.mark.django_db


def _ago(**delta) -> str:
    return (timezone.now() - timedelta(**delta)).isoformat()


def _run(project, key, run_id, *, agent, version, started, seconds=2, status="completed", error_code=None):
    start = records.run_start_record({"run_id": run_id, "agent": {"name": agent, "version": version},
                                      "started_at": started}, received_at=started)
    ended = (datetime.fromisoformat(started) + timedelta(seconds=seconds)).isoformat()
    finish = records.run_finish_record(run_id, {"status": status, "ended_at": ended,
                                                **({"error_code": error_code} if error_code else {})},
                                       received_at=ended)
    accept(project, key, [start, finish])


@pytest.fixture
def seeded(project, other_project, make_key):
    """support 1.0 three and two days ago, then 2.0 from yesterday; triage a month ago; globex's own agent."""
    key = make_key(project)[0]
    _run(project, key, "a", agent="support", version="1.0", started=_ago(days=3))
    _run(project, key, "b", agent="support", version="1.0", started=_ago(days=2), status="failed",
         error_code="tool_timeout")
    for i in range(3):
        _run(project, key, f"c{i}", agent="support", version="2.0", started=_ago(hours=20 - i), seconds=4 + i)
    _run(project, key, "t", agent="triage", version="0.1", started=_ago(days=20))
    _run(other_project, make_key(other_project)[0], "g", agent="globex-secret-bot", version="9",
         started=_ago(hours=1))
    drain()


def test_an_auditor_sees_each_version_with_the_change_marked(client, bob, seeded):
    client.force_login(bob)
    page = client.get("/agents/").content.decode()
    assert "globex-secret-bot" not in page and "triage" not in page  # another project's; outside 7 days
    [group] = re.findall(r'<tbody class="agent">(.*?)</tbody>', page, re.S)
    # One group for the agent: 2.0 above 1.0, and a boundary between them.
    assert re.findall(r"<tr( class=\"version-change\")?>", group) == ["", ' class="version-change"']
    assert page.index(">2.0</a>") < page.index(">1.0</a>")
    assert page.count("new version since") == 1
    assert "tool_timeout" in page and "50 %" in page and "100 %" in page  # 1.0 then 2.0 success rates
    assert 'href="/runs/?project=acme&amp;agent=support&amp;agent_version=2.0"' in page


def test_the_window_is_chosen_in_the_url(client, bob, seeded):
    client.force_login(bob)
    day = client.get("/agents/?window=24h").content.decode()
    assert ">2.0</a>" in day and ">1.0</a>" not in day and "new version since" not in day
    month = client.get("/agents/?window=30d").content.decode()
    assert "triage" in month and 'aria-current="true" class="active">30d' in month
    # A window it does not know is the default one, not an error.
    assert 'class="active">7d' in client.get("/agents/?window=forever").content.decode()


def test_an_outsider_sees_no_agent_and_anonymous_people_sign_in(client, charlie, seeded):
    assert client.get("/agents/")["Location"].startswith("/login/")
    client.force_login(charlie)
    page = client.get("/agents/")
    assert page.status_code == 200 and b"support" not in page.content and b"No run started" in page.content


def test_the_agents_page_asks_a_fixed_number_of_queries(client, bob, project, make_key, seeded,
                                                        django_assert_max_num_queries):
    key = make_key(project)[0]
    for i in range(20):
        _run(project, key, f"more-{i}", agent=f"agent-{i % 10}", version=str(i // 10), started=_ago(hours=i + 1))
    drain()
    client.force_login(bob)
    # Session, user, access, visible projects; then the grouped totals, the error codes (and on SQLite
    # the durations), the spend per version, the feedback and eval verdicts: never a query per agent.
    with django_assert_max_num_queries(8 if connection.vendor == "postgresql" else 9):
        page = client.get("/agents/")
    assert page.status_code == 200 and page.content.decode().count('class="version-change"') == 11
