"""The costs page: spend per day as a chart, and by agent, end user, model and provider over a range of
project days, each row and each day linked to the runs behind it; the spikes of the range, and the
calls no price was found for (with a link to add a price override in the admin)."""
from __future__ import annotations

from collections import defaultdict
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from django.conf import settings
from django.urls import reverse
from django.utils.functional import cached_property

from apps.budgets import selectors as budgets
from apps.projects.models import Project

from .. import svg
from ..forms import CostRangeForm
from ..templatetags.dashboard import usd
from .base import Page

TABLE_ROWS = 25  # each table shows the most expensive rows; the count says how many there were
SPIKES = 50


def _stamp(moment: datetime, tz: ZoneInfo) -> str:
    """A time as the runs list's From/To read it: plain in the site's time zone, else with its offset."""
    if str(tz) == settings.TIME_ZONE:
        return moment.strftime("%Y-%m-%d %H:%M")
    return moment.isoformat()


def _bounds(first: date, last: date, tz: ZoneInfo, *, hour: int | None = None) -> dict[str, str]:
    """``started_after``/``started_before`` for the runs started from ``first`` to ``last`` (days in
    ``tz``, both included), or for one ``hour`` of ``first``."""
    start = datetime.combine(first, time(hour or 0), tzinfo=tz)
    out = {"started_after": _stamp(start, tz)}
    try:
        end = start + timedelta(hours=1) if hour is not None else datetime.combine(last + timedelta(days=1),
                                                                                   time(0), tzinfo=tz)
        out["started_before"] = _stamp(end, tz)
    except OverflowError:
        pass  # the last day of the calendar: no end
    return out


def _runs_url(query: dict) -> str:
    return reverse("dashboard:runs") + "?" + urlencode({k: v for k, v in query.items() if v not in (None, "")})


class CostsPage(Page):
    """``?project=`` narrows to one project, ``?since=``/``?until=`` pick the project days (default the
    last 30). A fixed number of queries past the layout's: the projects' time zones, spend by day, by
    agent, by end user, by model and provider (the provider table is summed from it), the spikes and
    the unpriced calls, the budgets in their period, the reservations held now and the thresholds
    crossed in the range (``budgets.selectors``)."""

    template_name = "dashboard/costs.html"
    nav = "costs"

    @cached_property
    def zones(self) -> dict[str, ZoneInfo]:
        """The time zone of each project shown (its days are the rollups')."""
        rows = Project.objects.visible_to(self.access, project_slug=self.project_param()).values_list(
            "slug", "time_zone")
        return {slug: ZoneInfo(tz or "UTC") for slug, tz in rows}

    def get_context_data(self, **kwargs):
        project = self.project_param()
        site_tz = ZoneInfo(settings.TIME_ZONE)
        zones = self.zones
        # "Today" is the latest of the projects' todays, so that no project's today falls outside.
        today = max((budgets.today_in(str(tz)) for tz in zones.values()), default=budgets.today_in(settings.TIME_ZONE))
        form = CostRangeForm(self.request.GET, today=today)
        since, until = form.range()
        scope = {"principal": self.access, "project_slug": project, "since": since, "until": until}
        # Links drill down in the project's own time zone (its days); across projects, the site's.
        chart_tz = zones[project] if project in zones else (next(iter(zones.values())) if len(zones) == 1 else site_tz)
        only = project or (next(iter(zones)) if len(zones) == 1 else None)

        def link(project_slug: str | None, first: date, last: date, **dims) -> str:
            tz = zones.get(project_slug, chart_tz) if project_slug else chart_tz
            return _runs_url({"project": project_slug or only, **dims, **_bounds(first, last, tz)})

        by_day = budgets.costs(**scope, group_by=("day",))
        spikes = [s for s in budgets.spikes(principal=self.access, project_slug=project, since=since, limit=SPIKES)
                  if s.day <= until]
        spike_days = defaultdict(list)
        for s in spikes:
            spike_days[s.day].append(s)
        day_rows = {r["day"]: r for r in by_day["rows"]}
        days = []
        for i in range((until - since).days + 1):
            day = since + timedelta(days=i)
            row = day_rows.get(day) or {"cost_usd": Decimal(0), "calls": 0, "unpriced_calls": 0}
            title = f"{day.isoformat()}: {usd(row['cost_usd'])} · {row['calls']} calls"
            if row["unpriced_calls"]:
                title += f" · {row['unpriced_calls']} unpriced"
            if spike_days.get(day):
                title += " · spike: " + ", ".join(_spike_who(s) for s in spike_days[day])
            days.append({"day": day, "value": row["cost_usd"], "title": title, "spike": bool(spike_days.get(day)),
                         "href": link(None, day, day)})
        chart = svg.day_bars(days, label=f"Spend per day, {since} to {until}", money=lambda v: usd(Decimal(str(v))))

        def table(group_by: tuple[str, ...], dims) -> dict:
            """A table grouped by project and ``group_by``; ``dims(row)``: the runs list filters of the
            row, or None where there is none (calls of no agent: the list cannot ask for "none")."""
            result = budgets.costs(**scope, group_by=("project", *group_by))
            return _table(result["rows"], lambda r: None if dims(r) is None else link(r["project"], since, until,
                                                                                     **dims(r)), total)

        total = by_day["total"]["cost_usd"]
        by_model = budgets.costs(**scope, group_by=("project", "model", "provider"))["rows"]
        by_provider: dict[tuple, dict] = {}
        for r in by_model:
            acc = by_provider.setdefault((r["project"], r["provider"]), {
                "project": r["project"], "provider": r["provider"], "cost_usd": Decimal(0), "calls": 0,
                "unpriced_calls": 0, "input_tokens": 0, "output_tokens": 0})
            for m in ("cost_usd", "calls", "unpriced_calls", "input_tokens", "output_tokens"):
                acc[m] += r[m]
        providers = sorted(by_provider.values(), key=lambda r: (-r["cost_usd"], r["project"], r["provider"]))

        project_ids = {p["slug"]: p["id"] for p in self.visible_projects}
        unpriced = budgets.unpriced(principal=self.access, project_slug=project, since=since)
        for u in unpriced:
            u["runs_url"] = _runs_url({"project": u["project"], "model": u["model"],
                                       **_bounds(since, until, zones.get(u["project"], site_tz))})
            u["override_url"] = reverse("admin:budgets_priceoverride_add") + "?" + urlencode(
                {"project": project_ids.get(u["project"], ""), "provider": u["provider"], "model_pattern": u["model"],
                 "effective_from": since.isoformat()})
        for s in spikes:
            dims = {"agent": s.value} if s.scope == "agent" else {"end_user": s.value} if s.scope == "end_user" else {}
            s.runs_url = _runs_url({"project": s.project.slug, **dims, **_bounds(
                s.day, s.day, zones.get(s.project.slug, site_tz), hour=s.hour if s.period == "hour" else None)})
            s.who = _spike_who(s)

        return {
            **super().get_context_data(**kwargs), "form": form, "since": since, "until": until, "today": today,
            "since_iso": since.isoformat(), "until_iso": until.isoformat(),
            "project": project, "total": by_day["total"], "chart": chart, "day_count": len(days),
            "daily_avg": by_day["total"]["cost_usd"] / len(days),
            "all_runs_url": link(None, since, until),
            "presets": [{"label": f"{n} days", "since": (today - timedelta(days=n - 1)).isoformat(),
                         "until": today.isoformat(), "active": since == today - timedelta(days=n - 1) and until == today}
                        for n in (7, 30, 90)],
            "agents": table(("agent",), lambda r: {"agent": r["agent"]} if r["agent"] else None),
            "end_users": table(("end_user",), lambda r: {"end_user": r["end_user"]} if r["end_user"] else None),
            "models": _table(by_model, lambda r: link(r["project"], since, until, model=r["model"],
                                                      provider=r["provider"]) if r["model"] else None, total),
            "providers": _table(providers, lambda r: link(r["project"], since, until, provider=r["provider"])
                                if r["provider"] else None, total),
            "spikes": spikes, "unpriced": unpriced,
            "budget_board": budgets.budget_board(principal=self.access, project_slug=project),
            "held": budgets.reservations_held(principal=self.access, project_slug=project),
            "budget_alerts": budgets.budget_alerts(principal=self.access, project_slug=project, since=datetime.combine(
                since, time(0), tzinfo=chart_tz)),
            "by_project": not project and len(self.visible_projects) != 1,
        }


def _table(rows: list[dict], href, total: Decimal) -> dict:
    """The first ``TABLE_ROWS`` rows (the most expensive), each with ``href`` to its runs (None: the
    row has no value to filter on, such as calls of no agent) and its share of the range's spend, and
    how many rows there were."""
    shown = [{**r, "href": href(r), "share": r["cost_usd"] / total if total else None} for r in rows[:TABLE_ROWS]]
    return {"rows": shown, "count": len(rows), "more": max(len(rows) - TABLE_ROWS, 0)}


def _spike_who(s) -> str:
    return {"project": "the project", "agent": f"agent {s.value}", "end_user": f"end user {s.value}"}.get(
        s.scope, s.scope)
