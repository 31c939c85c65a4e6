"""Regressions: for each agent and evaluator, a recent window against the days before it, or an agent's
newest version against the one before; mean score and pass rate with their counts, and whether the drop
is significant.

A comparison is flagged when, with at least ``EVALS_REGRESSION_MIN_RUNS`` scored runs on each side, the
pass rate or the mean score fell by at least ``EVALS_REGRESSION_MIN_DROP`` (absolute: most scores lie in
0..1) and a one-sided test says a drop that large is unlikely by chance (p < ``EVALS_REGRESSION_ALPHA``):
a two-proportion z-test for the pass rate, Welch's test (normal approximation) for the mean. The run's
start time places a score in a window (a batch scoring old runs today scores them where they happened).
Only run-level scores count, evaluator errors never do; people's feedback (``human``) is one evaluator
whoever gave it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Avg, Case, CharField, Count, F, Max, Min, Q, Sum, Value, When
from django.utils import timezone

from .models import HUMAN, EvalScore

# What a comparison sets against what: a window against the days before it, or a version against the one before.
REGRESSION_KINDS = ("window", "version")


@dataclass(frozen=True)
class Side:
    label: str           # "baseline" / "current", or the agent version
    runs: int            # runs scored (a score or a pass/fail)
    scored: int          # with a numeric score
    mean: float | None
    sd: float | None
    judged: int          # with a pass/fail
    passed: int

    @property
    def pass_rate(self) -> float | None:
        return self.passed / self.judged if self.judged else None

    def as_dict(self) -> dict:
        return {"label": self.label, "runs": self.runs, "mean": _round(self.mean), "pass_rate": _round(self.pass_rate),
                "judged": self.judged, "passed": self.passed}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _p_one_sided(z: float) -> float:
    """P(Z >= z) for a standard normal."""
    return 0.5 * math.erfc(z / math.sqrt(2))


def pass_rate_test(base: Side, cur: Side) -> tuple[float, float] | None:
    """(drop, p) of the pass rate, or None where either side has no pass/fail."""
    if not base.judged or not cur.judged:
        return None
    p1, p2 = base.pass_rate, cur.pass_rate
    pooled = (base.passed + cur.passed) / (base.judged + cur.judged)
    se = math.sqrt(pooled * (1 - pooled) * (1 / base.judged + 1 / cur.judged))
    drop = p1 - p2
    if se == 0:
        return drop, (0.0 if drop > 0 else 1.0)
    return drop, _p_one_sided(drop / se)


def mean_test(base: Side, cur: Side) -> tuple[float, float] | None:
    """(drop, p) of the mean score, or None where either side has fewer than two scores."""
    if base.scored < 2 or cur.scored < 2 or base.mean is None or cur.mean is None:
        return None
    se = math.sqrt((base.sd or 0) ** 2 / base.scored + (cur.sd or 0) ** 2 / cur.scored)
    drop = base.mean - cur.mean
    if se == 0:
        return drop, (0.0 if drop > 0 else 1.0)
    return drop, _p_one_sided(drop / se)


def compare(base: Side, cur: Side) -> dict:
    """The comparison of two sides, flagged where a drop is large enough and significant."""
    enough = min(base.runs, cur.runs) >= settings.EVALS_REGRESSION_MIN_RUNS
    out = {"baseline": base.as_dict(), "current": cur.as_dict(), "enough_runs": enough, "flagged": False,
           "reasons": []}
    for metric, test in (("pass_rate", pass_rate_test), ("mean", mean_test)):
        result = test(base, cur)
        out[f"{metric}_drop"], out[f"{metric}_p"] = (None, None) if result is None else (
            _round(result[0]), _round(result[1]))
        if (enough and result is not None and result[0] >= settings.EVALS_REGRESSION_MIN_DROP
                and result[1] < settings.EVALS_REGRESSION_ALPHA):
            out["flagged"] = True
            out["reasons"].append(metric)
    return out


def _scores(scores, *, since: datetime, agent: str | None, evaluator: str | None):
    scores = scores.filter(outcome=EvalScore.Outcome.SCORED, span_id="", run__started_at__gte=since)
    if agent:
        scores = scores.filter(run__agent_name=agent)
    if evaluator:
        scores = scores.filter(evaluator=evaluator)
    # People's feedback is one evaluator, whoever gave it (its version names the person).
    return scores.annotate(ev_version=Case(When(evaluator=HUMAN, then=Value("")), default=F("version"),
                                           output_field=CharField()))


# The spread from the sum of squares (SQLite's STDDEV_SAMP raises on a group of one score).
AGGREGATES = {"runs": Count("run_id", distinct=True), "scored": Count("score"), "mean": Avg("score"),
              "sum_sq": Sum(F("score") * F("score")), "judged": Count("passed"),
              "passed": Count("id", filter=Q(passed=True))}


def _sd(row: dict) -> float | None:
    n, mean, sum_sq = row["scored"], row["mean"], row.get("sum_sq")
    if n < 2 or mean is None or sum_sq is None:
        return None
    return math.sqrt(max((sum_sq - n * mean * mean) / (n - 1), 0.0))


def _side(label: str, row: dict) -> Side:
    return Side(label=label, runs=row["runs"], scored=row["scored"], mean=row["mean"], sd=_sd(row),
                judged=row["judged"], passed=row["passed"])


def by_window(scores, *, now: datetime | None = None, window_hours: int = 24, baseline_days: int = 7,
              agent: str | None = None, evaluator: str | None = None) -> list[dict]:
    """Each agent and evaluator: the last ``window_hours`` against the ``baseline_days`` before them.
    ``scores``: the ``EvalScore`` rows the caller may see (``EvalScore.objects.visible_to(...)``)."""
    now = now or timezone.now()
    current_from = now - timedelta(hours=window_hours)
    since = current_from - timedelta(days=baseline_days)
    rows = (_scores(scores, since=since, agent=agent, evaluator=evaluator)
            .filter(run__started_at__lt=now)
            .annotate(side=Case(When(run__started_at__gte=current_from, then=Value("current")),
                                default=Value("baseline"), output_field=CharField()))
            .values("project__slug", "run__agent_name", "evaluator", "ev_version", "side")
            .annotate(**AGGREGATES).order_by())
    groups: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        groups.setdefault((row["project__slug"], row["run__agent_name"], row["evaluator"], row["ev_version"]),
                          {})[row["side"]] = row
    out = []
    empty = {k: 0 for k in ("runs", "scored", "judged", "passed")} | {"mean": None, "sum_sq": None}
    for (project, agent_name, name, version), sides in groups.items():
        item = compare(_side("baseline", sides.get("baseline", empty)), _side("current", sides.get("current", empty)))
        out.append({"kind": "window", "project": project, "agent": agent_name, "evaluator": name,
                    "evaluator_version": version or None, "baseline_from": since, "current_from": current_from,
                    "baseline_version": None, "current_version": None, **item})
    return _ordered(out)


def by_version(scores, *, now: datetime | None = None, days: int = 30, agent: str | None = None,
               evaluator: str | None = None) -> list[dict]:
    """Each agent and evaluator: its newest version (the one whose runs began last) against the version
    before it, over the last ``days``."""
    now = now or timezone.now()
    rows = (_scores(scores, since=now - timedelta(days=days), agent=agent, evaluator=evaluator)
            .values("project__slug", "run__agent_name", "run__agent_version", "evaluator", "ev_version")
            .annotate(**AGGREGATES, first=Min("run__started_at"), last=Max("run__started_at")).order_by())
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["project__slug"], row["run__agent_name"], row["evaluator"], row["ev_version"]),
                          []).append(row)
    out = []
    for (project, agent_name, name, version), versions in groups.items():
        if len(versions) < 2:
            continue
        versions.sort(key=lambda r: (r["first"], r["last"]))
        before, newest = versions[-2], versions[-1]
        item = compare(_side(before["run__agent_version"], before), _side(newest["run__agent_version"], newest))
        out.append({"kind": "version", "project": project, "agent": agent_name, "evaluator": name,
                    "evaluator_version": version or None, "baseline_from": None, "current_from": None,
                    "baseline_version": before["run__agent_version"], "current_version": newest["run__agent_version"],
                    **item})
    return _ordered(out)


def _ordered(items: list[dict]) -> list[dict]:
    """Flagged first, the largest drop first."""
    def drop(item):
        return max(item.get("pass_rate_drop") or 0, item.get("mean_drop") or 0)
    return sorted(items, key=lambda i: (not i["flagged"], -drop(i), i["agent"], i["evaluator"]))
