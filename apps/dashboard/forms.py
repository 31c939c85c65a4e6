"""The pages' filter forms: each turns a query string into a selector's filters, with a clear error
for a value it cannot use (never a 500, never a silently ignored filter)."""
from __future__ import annotations

import datetime as dt
import re

from django import forms
from django.utils import timezone

from apps.audit.selectors import AuditFilters
from apps.projects.access import ProjectAccess
from apps.projects.models import SLUG_RE

# Actions and object types are dotted identifiers (``api_key.created``, ``projects.apikey``); an action
# ending with "*" is a prefix (``api_key.*``).
_AUDIT_ACTION = re.compile(r"[\w.:-]+\*?", re.ASCII)
_AUDIT_OBJECT_TYPE = re.compile(r"[\w.]+", re.ASCII)


class AuditFilterForm(forms.Form):
    """The audit log page's filters (and its export's). ``project`` must name a project the caller
    sees: an unknown slug and another project's read the same, so the error tells nothing."""

    project = forms.CharField(required=False, max_length=63)
    action = forms.CharField(required=False, max_length=64,
                             help_text="Exact (api_key.created), or a prefix ending with * (api_key.*).")
    actor = forms.CharField(required=False, max_length=200, help_text="Part of a username or a key's name.")
    object_type = forms.CharField(required=False, max_length=64, label="Object type",
                                  help_text="app.model, for example projects.apikey.")
    date_from = forms.DateField(required=False, label="From", widget=forms.DateInput(attrs={"type": "date"}))
    date_to = forms.DateField(required=False, label="To", widget=forms.DateInput(attrs={"type": "date"}))

    def __init__(self, data, *, access: ProjectAccess):
        super().__init__(data)
        self.access = access

    def clean_project(self) -> ProjectAccess | None:
        """The caller's access narrowed to the project (None: every project they see)."""
        slug = self.cleaned_data["project"]
        if not slug:
            return None
        narrowed = self.access.in_project(slug) if SLUG_RE.fullmatch(slug) else None
        if narrowed is None or not narrowed.roles:
            raise forms.ValidationError("No project of yours has this slug.")
        return narrowed

    def clean_action(self) -> str:
        action = self.cleaned_data["action"]
        if action and not _AUDIT_ACTION.fullmatch(action):
            raise forms.ValidationError("An action is letters, digits, “_” and “.”; end it with * for a prefix.")
        return action

    def clean_object_type(self) -> str:
        object_type = self.cleaned_data["object_type"]
        if object_type and not _AUDIT_OBJECT_TYPE.fullmatch(object_type):
            raise forms.ValidationError("An object type is app.model: letters, digits, “_” and “.”.")
        return object_type

    def clean(self):
        data = super().clean()
        start, end = data.get("date_from"), data.get("date_to")
        if start and end and start > end:
            raise forms.ValidationError("“From” is after “To”.")
        try:
            # A day in the site's time zone, as UTC (what the query sends): converting here finds the
            # dates at the ends of the calendar that have no UTC instant, as a form error.
            data["since"] = _day_start(start) if start else None
            data["until"] = _day_start(end + dt.timedelta(days=1)) if end and end < dt.date.max else None
        except OverflowError:
            raise forms.ValidationError("That date is out of range.") from None
        return data

    def scope(self) -> ProjectAccess:
        """What the rows are read through: the caller's access, narrowed to ``project`` when given."""
        return self.cleaned_data.get("project") or self.access

    def audit_filters(self) -> AuditFilters:
        """The valid form as ``audit_events`` filters (call after ``is_valid()``)."""
        d = self.cleaned_data
        return AuditFilters(action=d["action"], actor=d["actor"], object_type=d["object_type"],
                            since=d["since"], until=d["until"])


def _day_start(day: dt.date) -> dt.datetime:
    return timezone.make_aware(dt.datetime.combine(day, dt.time.min)).astimezone(dt.UTC)


COST_MAX_DAYS = 366
COST_DEFAULT_DAYS = 30


class CostRangeForm(forms.Form):
    """The costs page's range: project days ``since``..``until``, both included (default: the last 30
    days up to ``today``, the latest "today" of the projects shown), at most ``COST_MAX_DAYS``."""

    since = forms.DateField(required=False, label="From", widget=forms.DateInput(attrs={"type": "date"}))
    until = forms.DateField(required=False, label="To", widget=forms.DateInput(attrs={"type": "date"}))

    def __init__(self, data, *, today: dt.date):
        super().__init__(data)
        self.today = today

    def clean(self):
        data = super().clean()
        if self.errors:
            return data
        span = dt.timedelta(days=COST_DEFAULT_DAYS - 1)
        try:
            # From a day alone: its 30 days, but not past today.
            until = data.get("until") or (max(min(data["since"] + span, self.today), data["since"])
                                          if data.get("since") else self.today)
            since = data.get("since") or until - span
        except OverflowError:
            raise forms.ValidationError("That date is out of range.") from None
        if since > until:
            raise forms.ValidationError("“From” is after “To”.")
        if (until - since).days + 1 > COST_MAX_DAYS:
            raise forms.ValidationError(f"At most {COST_MAX_DAYS} days at a time.")
        data["since"], data["until"] = since, until
        return data

    def range(self) -> tuple[dt.date, dt.date]:
        """The valid range, or the default one when the form is not valid (its errors are shown)."""
        if self.is_valid():
            return self.cleaned_data["since"], self.cleaned_data["until"]
        return self.today - dt.timedelta(days=COST_DEFAULT_DAYS - 1), self.today
