"""Regressions: an agent's newest version, or the last day, against a baseline; flagged where the pass
rate or the mean score fell enough, significantly, with enough runs on each side."""
from __future__ import annotations

import itertools
from datetime import timedelta

import pytest
from django.utils import timezone

from apps.evals import regressions
from apps.evals.models import EvalScore
from apps.traces.models import Run

pytestmark = pytest.mark.django_db
_ids = itertools.count()


def mine(project):
    return EvalScore.objects.filter(project=project)


def scored_runs(project, *, n: int, passed: int, agent="support-bot", version="1", hours_ago: float = 1,
                evaluator="run_succeeded", scores=None, ev_version="1", user=None):
    """``n`` runs of ``agent`` at ``version`` started ``hours_ago``, each with one run-level score:
    ``passed`` of them passing (or the numbers in ``scores``)."""
    at = timezone.now() - timedelta(hours=hours_ago)
    runs = Run.objects.bulk_create([
        Run(project=project, run_id=f"r-{next(_ids)}", trace_id="0" * 32, agent_name=agent, agent_version=version,
            status="completed", started_at=at - timedelta(seconds=i), ended_at=at) for i in range(n)])
    EvalScore.objects.bulk_create([
        EvalScore(project=project, run=run, evaluator=evaluator, version=ev_version, source="job", user=user,
                  score=scores[i] if scores else float(i < passed), passed=None if scores else i < passed)
        for i, run in enumerate(runs)])
    return runs


def test_a_version_with_a_worse_pass_rate_is_flagged_as_a_regression(project):
    scored_runs(project, n=60, passed=54, version="1", hours_ago=72)   # 90 %
    scored_runs(project, n=60, passed=30, version="2", hours_ago=2)    # 50 %
    [item] = regressions.by_version(mine(project))
    assert (item["baseline_version"], item["current_version"], item["flagged"]) == ("1", "2", True)
    assert "pass_rate" in item["reasons"] and item["pass_rate_drop"] == 0.4 and item["pass_rate_p"] < 0.001
    assert (item["baseline"]["pass_rate"], item["current"]["pass_rate"]) == (0.9, 0.5)
    assert (item["baseline"]["runs"], item["current"]["runs"]) == (60, 60)
    # The same drop seen as the last day against the week before it.
    [window] = regressions.by_window(mine(project))
    assert window["flagged"] and window["current"]["runs"] == 60 and window["baseline"]["runs"] == 60


def test_the_same_rate_a_small_drop_or_too_few_runs_is_not_flagged(project, other_project, settings):
    settings.EVALS_REGRESSION_MIN_RUNS = 20
    scored_runs(project, n=60, passed=54, agent="steady", version="1", hours_ago=72)
    scored_runs(project, n=60, passed=54, agent="steady", version="2", hours_ago=2)
    scored_runs(project, n=100, passed=90, agent="slight", version="1", hours_ago=72)
    scored_runs(project, n=100, passed=88, agent="slight", version="2", hours_ago=2)   # 2 points: too small
    scored_runs(project, n=5, passed=5, agent="rare", version="1", hours_ago=72)
    scored_runs(project, n=5, passed=0, agent="rare", version="2", hours_ago=2)       # a drop, 5 runs a side
    items = {i["agent"]: i for i in regressions.by_version(mine(project))}
    assert not any(i["flagged"] for i in items.values())
    assert items["steady"]["pass_rate_drop"] == 0 and items["slight"]["pass_rate_drop"] == 0.02
    assert items["rare"]["enough_runs"] is False and items["rare"]["pass_rate_drop"] == 1.0
    assert regressions.by_version(mine(other_project)) == []


def test_a_drop_of_the_mean_score_is_flagged(project):
    scored_runs(project, n=40, passed=0, evaluator="llm_judge", version="1", hours_ago=72,
                scores=[0.8 + (i % 5) / 100 for i in range(40)])
    scored_runs(project, n=40, passed=0, evaluator="llm_judge", version="2", hours_ago=2,
                scores=[0.6 + (i % 5) / 100 for i in range(40)])
    [item] = regressions.by_version(mine(project))
    assert item["flagged"] and item["reasons"] == ["mean"] and item["mean_drop"] == pytest.approx(0.2)
    assert item["pass_rate_drop"] is None


def test_peoples_feedback_is_one_evaluator_whoever_gave_it(project, alice, bob):
    scored_runs(project, n=15, passed=14, evaluator="human", ev_version=f"user:{alice.pk}", user=alice,
                version="1", hours_ago=72)
    scored_runs(project, n=15, passed=14, evaluator="human", ev_version=f"user:{bob.pk}", user=bob,
                version="1", hours_ago=72)
    scored_runs(project, n=30, passed=10, evaluator="human", ev_version=f"user:{alice.pk}", user=alice,
                version="2", hours_ago=2)
    [item] = regressions.by_version(mine(project))
    assert (item["evaluator"], item["evaluator_version"], item["baseline"]["runs"]) == ("human", None, 30)
    assert item["flagged"]


def test_regressions_over_http(project, other_project, bob, client_for, make_key, key_client):
    scored_runs(project, n=60, passed=54, version="1", hours_ago=72)
    scored_runs(project, n=60, passed=30, version="2", hours_ago=2)
    scored_runs(other_project, n=60, passed=0, agent="theirs", version="2", hours_ago=2)
    resp = client_for(bob).get("/api/v1/projects/acme/eval-regressions?by=version&flagged=true")
    assert resp.status_code == 200, resp.json()
    [item] = resp.json()
    assert (item["agent"], item["baseline_version"], item["current_version"], item["flagged"]) == (
        "support-bot", "1", "2", True)
    assert item["current"]["pass_rate"] == 0.5 and item["baseline"]["pass_rate"] == 0.9
    window = key_client(make_key(project, scopes=("read",))[1]).get("/api/v1/projects/acme/eval-regressions")
    assert [i["agent"] for i in window.json()] == ["support-bot"]
    bad = client_for(bob).get("/api/v1/projects/acme/eval-regressions?by=month")
    assert bad.status_code == 400 and bad.json()["details"]["field"] == "by"


def test_the_overview_shows_a_flagged_regression_to_whoever_sees_the_project(project, bob, charlie, client):
    scored_runs(project, n=60, passed=54, version="1", hours_ago=72)
    scored_runs(project, n=60, passed=30, version="2", hours_ago=2)
    client.force_login(bob)
    html = client.get("/").content.decode()
    assert 'data-regression="support-bot/run_succeeded"' in html and "pass 90 % → 50 %" in html
    client.force_login(charlie)  # sees no project: no regression of acme's
    assert "data-regression=" not in client.get("/").content.decode()


def test_a_side_of_one_score_compares_without_error(project):
    scored_runs(project, n=1, passed=1, version="1", hours_ago=72, scores=[0.9])
    scored_runs(project, n=1, passed=0, version="2", hours_ago=2, scores=[0.1])
    [item] = regressions.by_version(mine(project))
    assert item["enough_runs"] is False and item["flagged"] is False and item["mean_p"] is None
    assert item["baseline"]["mean"] == 0.9 and item["current"]["mean"] == 0.1
    [window] = regressions.by_window(mine(project))
    assert window["flagged"] is False
