"""Settings-like rows edited in the admin (``EditedByProjectAdmins``): a project admin adds, changes and
deletes them through the app's audited services; an auditor of the project only looks."""
from __future__ import annotations

import pytest
from django import forms

from apps.audit.models import AuditEvent

pytestmark = pytest.mark.django_db

# (admin URL, the values a new row is added with, a change, the audit actions' prefix)
CASES = [
    ("budgets/priceoverride", {"model_pattern": "house-*", "effective_from": "2026-01-01", "input_per_mtok": "1",
                               "output_per_mtok": "2"}, {"note": "contract"}, "budgets.price_override"),
    ("budgets/budget", {"name": "daily", "cap_usd": "5", "thresholds": "[80, 100]"}, {"cap_usd": "7"}, "budgets.budget"),
    ("approvals/approvalrule", {"name": "refunds", "action_pattern": "payments.*"}, {"quorum": "2"},
     "approvals.rule"),
    ("gateway/upstream", {"name": "local", "base_url": "http://127.0.0.1:9/v1", "model_names": '["gpt-4o"]'},
     {"priority": "5"}, "gateway.upstream"),
    ("evals/evalconfig", {"name": "quality", "evaluators": '[{"name": "run_succeeded"}]'}, {"sample_rate": "0.5"},
     "evals.config"),
    ("evals/evaljob", {"name": "nightly", "evaluators": '[{"name": "run_succeeded"}]', "statuses": "[]",
                       "schedule": "0 3 * * *"}, {"window_hours": "48"}, "evals.job"),
]


def _form_data(client, url: str, values: dict) -> dict:
    """The admin form's own initial values (as a browser would post them), with ``values`` over them."""
    form = client.get(url).context["adminform"].form
    data = {}
    for name, field in form.fields.items():
        value = form[name].value()
        if isinstance(field, forms.BooleanField):
            if value:
                data[name] = "on"
        elif value is not None:
            data[name] = value  # as the widget renders it (BoundField.value prepares it: JSON as text)
    data.update(values)
    return {k: v for k, v in data.items() if v is not None}


@pytest.fixture
def staff(project, alice, bob, client):
    for user in (alice, bob):
        user.is_staff = True
        user.save()

    def login(user):
        client.force_login(user)
        return client

    return login


@pytest.mark.parametrize(("path", "values", "change", "action"), CASES, ids=[c[0] for c in CASES])
def test_a_project_admin_edits_through_the_audited_service_and_an_auditor_only_looks(
        project, alice, bob, staff, path, values, change, action):
    model_url = f"/admin/{path}/"
    client = staff(bob)
    assert client.get(model_url).status_code == 200
    assert client.get(f"{model_url}add/").status_code == 403
    client = staff(alice)
    resp = client.post(f"{model_url}add/", _form_data(client, f"{model_url}add/",
                                                       {"project": project.pk, **values}))
    assert resp.status_code == 302, resp.context["adminform"].form.errors if resp.context else resp
    created = AuditEvent.objects.filter(action__startswith=action, action__endswith="created")
    assert created.count() == 1 and created.get().actor_repr == "alice"
    pk = created.get().object_id
    resp = client.post(f"{model_url}{pk}/change/", _form_data(client, f"{model_url}{pk}/change/", change))
    assert resp.status_code == 302, resp.context["adminform"].form.errors if resp.context else resp
    assert AuditEvent.objects.filter(action__startswith=action, action__endswith="updated").count() == 1
    assert staff(bob).post(f"{model_url}{pk}/delete/", {"post": "yes"}).status_code == 403
    assert staff(alice).post(f"{model_url}{pk}/delete/", {"post": "yes"}).status_code == 302
    assert AuditEvent.objects.filter(action__startswith=action, action__endswith="deleted").count() == 1
