"""The runs page's filters, kept in the URL: one form turns a query string into the filters of
``traces.selectors.run_list``. The page, its export and its live consumer all parse the same way, so
a live row appears exactly when the page's own query would list it."""
from __future__ import annotations

from datetime import timedelta

from django import forms
from django.http import QueryDict
from django.utils import timezone

from apps.projects.models import SLUG_RE
from apps.traces import selectors
from apps.traces.models import Run

SINCE = {"1h": timedelta(hours=1), "24h": timedelta(hours=24), "7d": timedelta(days=7), "30d": timedelta(days=30)}
TRISTATE = [("", "any"), ("true", "yes"), ("false", "no")]
MAX_META = 5


def _tristate(value: str) -> bool | None:
    return {"true": True, "false": False}.get(value)


class RunFilterForm(forms.Form):
    project = forms.CharField(required=False, max_length=63)
    status = forms.MultipleChoiceField(required=False, choices=Run.Status.choices)
    agent = forms.CharField(required=False, max_length=200)
    agent_version = forms.CharField(required=False, max_length=100, label="Version")
    end_user = forms.CharField(required=False, max_length=256, label="End user")
    session_id = forms.CharField(required=False, max_length=256, label="Session")
    model = forms.CharField(required=False, max_length=200)
    provider = forms.CharField(required=False, max_length=100)
    error_code = forms.CharField(required=False, max_length=100, label="Error code")
    since = forms.ChoiceField(required=False, choices=[("", "any time"), *((k, k) for k in SINCE)])
    started_after = forms.DateTimeField(required=False, label="From", widget=forms.DateTimeInput(
        attrs={"placeholder": "2026-11-30 09:00"}))
    started_before = forms.DateTimeField(required=False, label="To", widget=forms.DateTimeInput(
        attrs={"placeholder": "2026-11-30 18:00"}))
    has_error = forms.ChoiceField(required=False, choices=TRISTATE, label="Has error")
    has_loop = forms.ChoiceField(required=False, choices=TRISTATE, label="Has loop")
    q = forms.CharField(required=False, max_length=200, label="Text in input")
    meta = forms.CharField(required=False, max_length=600, label="Metadata key=value",
                           help_text="One or more key=value pairs, separated by commas.")

    def clean_project(self):
        slug = self.cleaned_data["project"]
        if slug and not SLUG_RE.fullmatch(slug):
            raise forms.ValidationError("Not a project slug.")
        return slug

    def clean_meta(self):
        pairs = []
        for part in filter(None, (p.strip() for p in self.cleaned_data["meta"].split(","))):
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise forms.ValidationError(f"{part!r}: write key=value.")
            pairs.append((key.strip(), value.strip()))
        if len(pairs) > MAX_META:
            raise forms.ValidationError(f"At most {MAX_META} pairs.")
        return pairs

    def run_list_filters(self) -> dict:
        """The validated form as ``run_list`` filters (call after ``is_valid()``)."""
        d = self.cleaned_data
        filters = {key: d[key] for key in ("project", "status", "agent", "agent_version", "end_user", "session_id",
                                           "model", "provider", "q", "started_after", "started_before") if d.get(key)}
        if d.get("since") and not d.get("started_after"):
            filters["started_after"] = timezone.now() - SINCE[d["since"]]
        for key in ("has_error", "has_loop"):
            if _tristate(d.get(key) or "") is not None:
                filters[key] = _tristate(d[key])
        if d.get("meta"):
            filters["metadata"] = d["meta"]
        return filters


def parse(query: QueryDict | dict) -> RunFilterForm:
    return RunFilterForm(query)


def apply(principal, form: RunFilterForm):
    """The runs matching a valid form, newest first, for ``principal`` (the one authorization path)."""
    qs = selectors.run_list(principal=principal, filters=form.run_list_filters())
    if form.cleaned_data.get("error_code"):
        qs = qs.filter(error_code=form.cleaned_data["error_code"])
    return qs.order_by("-started_at", "-id")
