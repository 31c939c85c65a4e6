"""Scores on the pages: a run's scores on its page and their summary on its row in the runs list; the
feedback box for people whose role may score, not for auditors; regressions on the overview are in
test_regressions.py, the feedback clicked in Chromium in tests/dashboard/test_browser.py."""
from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from apps.evals import services
from apps.traces.models import Run

pytestmark = pytest.mark.django_db


@pytest.fixture
def scored(record, agent_key, dave):
    run = record("r1", output="Done.")
    services.score_submit(key=agent_key[0], run=run, evaluator="ragas.faithfulness", version="1", score=0.9,
                          passed=True, explanation="faithful to the sources")
    services.score_submit(key=agent_key[0], run=run, evaluator="tone", version="2", passed=False, label="rude")
    services.feedback_submit(user=dave, run=run, passed=False, explanation="wrong city")
    return run


def test_the_runs_list_shows_each_runs_scores_in_brief(client, bob, scored):
    client.force_login(bob)
    html = client.get("/runs/").content.decode()
    cell = html[html.index('data-field="scores"'):][:600]
    assert "✓1" in cell and "✗2" in cell
    assert "ragas.faithfulness: pass" in cell and "tone: fail" in cell and "human: fail" in cell


def test_the_run_page_lists_the_scores_and_offers_feedback_only_to_who_may_give_it(client, bob, dave, scored):
    client.force_login(bob)  # an auditor: reads the scores, gives no feedback
    html = client.get("/runs/acme/r1/").content.decode()
    assert 'data-score="ragas.faithfulness@1"' in html and "faithful to the sources" in html
    assert 'data-score="tone@2"' in html and f'data-score="human@user:{dave.pk}"' in html
    assert "data-feedback-url" not in html
    client.force_login(dave)  # an approver: their own feedback is shown, theirs to change
    html = client.get("/runs/acme/r1/").content.decode()
    assert 'data-feedback-url="/api/v1/runs/r1/feedback?project=acme"' in html
    assert 'data-feedback="down" aria-pressed="true"' in html and 'value="wrong city"' in html


def test_the_agents_page_shows_the_feedback_rate_and_the_evaluators_pass_rate(client, bob, record, scored):
    record("r2", output="Also done.")  # the same agent and version, no feedback, no score
    # The helpers date runs on a fixed day; the page shows the last 7 days: bring both runs into them.
    recent = timezone.now() - timedelta(hours=1)
    Run.objects.filter(run_id__in=["r1", "r2"]).update(started_at=recent, ended_at=recent + timedelta(minutes=1))
    client.force_login(bob)
    html = client.get("/agents/").content.decode()
    feedback = html[html.index('data-field="feedback"'):][:200]
    assert "50 %" in feedback and "👍0 👎1" in feedback  # one run of two
    evals_cell = html[html.index('data-field="eval-pass"'):][:200]
    assert "50 %" in evals_cell and "of 2" in evals_cell  # faithfulness passed, tone failed


def test_the_evals_page_shows_regressions_quality_by_version_and_batches(client, bob, charlie, project, alice):
    from apps.evals import jobs
    from tests.evals.test_regressions import scored_runs

    scored_runs(project, n=60, passed=54, version="1", hours_ago=72)
    scored_runs(project, n=60, passed=30, version="2", hours_ago=2)
    job = jobs.job_create(project=project, actor=alice, name="nightly", evaluators=[{"name": "json_valid"}],
                          schedule="0 3 * * *")
    batch = jobs.job_start(job=job, trigger="manual", actor=alice)
    jobs.job_chunk_step(lane_pk=batch.lane_set.first().pk)
    client.force_login(bob)
    html = client.get("/evals/").content.decode()
    assert 'data-regression="version/support-bot/run_succeeded" data-flagged="true"' in html
    assert 'data-regression="window/support-bot/run_succeeded" data-flagged="true"' in html
    row = html[html.index('data-quality="support-bot/run_succeeded"'):][:2500]
    assert '<span class="version-rate" data-version="1">1: 90 %' in row and 'data-version="2">2: 50 %' in row
    assert f'data-job="{job.pk}" data-batch="{batch.pk}" data-state="succeeded"' in html and "0 3 * * *" in html
    fragment = client.get("/evals/?fragment=batches").content.decode()
    assert f'data-batch="{batch.pk}"' in fragment and "<html" not in fragment
    client.force_login(charlie)  # an outsider: nothing of acme's
    html = client.get("/evals/").content.decode()
    assert "data-regression=" not in html and "data-job=" not in html and "data-quality=" not in html
