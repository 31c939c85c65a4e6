"""Approvals through the API, in process: rules and check, requests (idempotent), decisions (roles,
quorum, never the requester's own), consume once for exactly what was approved, expiry, cancel; each
decision audited and each step on the run's trace."""
from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.db import IntegrityError, transaction
from django.utils import timezone

from apps.approvals import grants, services
from apps.approvals.models import Approval, Decision
from apps.approvals.tasks import sweep
from apps.audit.models import AuditEvent
from apps.projects import services as project_services
from apps.projects.models import Role
from apps.traces.models import Span
from tests.approvals.conftest import ARGS
from tests.traces.helpers import drain

pytestmark = pytest.mark.django_db


def _rule(client, **fields):
    resp = client.post("/api/v1/projects/acme/approval-rules", {"name": "rule", **fields}, format="json")
    assert resp.status_code == 201, resp.content
    return resp.json()


def _approve(client, approval_id: str, reason: str = "ok", outcome: str = "approve"):
    return client.post(f"/api/v1/approvals/{approval_id}/{outcome}", {"reason": reason}, format="json")


def _consume(agent, approval_id: str, arguments=None, action: str = "payments.refund"):
    return agent.post(f"/api/v1/approvals/{approval_id}/consume",
                      {"action": action, "arguments": ARGS if arguments is None else arguments}, format="json")


# --- policy ---------------------------------------------------------------------------------------


def test_check_says_which_rule_holds_an_action_and_creates_nothing(client_for, alice, agent):
    admin = client_for(alice)
    _rule(admin, name="refunds", action_pattern="payments.*", position=10)
    _rule(admin, name="costly", min_cost_usd="5", position=20)
    _rule(admin, name="risky", risk_labels=["high"], agent_pattern="billing-*", position=30)
    _rule(admin, name="off", action_pattern="*", enabled=False, position=1)

    def check(**body):
        resp = agent.post("/api/v1/approvals/check", body, format="json")
        assert resp.status_code == 200, resp.content
        return resp.json()["rule"]["name"] if resp.json()["required"] else None

    assert check(action="payments.refund") == "refunds"
    assert check(action="run", tool="payments.charge") == "refunds"  # the tool's name matches too
    assert check(action="send_email", estimated_cost_usd="5.01") == "costly"
    assert check(action="send_email", estimated_cost_usd="4.99") is None
    assert check(action="send_email", risk="high", agent="billing-bot", estimated_cost_usd="0") == "risky"
    assert check(action="send_email", risk="high", agent="support-bot", estimated_cost_usd="0") is None
    assert check(action="send_email") == "costly"  # no estimate against a cost rule: it holds (fails closed)
    assert not Approval.objects.exists()


def test_rules_are_edited_by_project_admins_only_and_audited(client_for, alice, bob, dave, agent):
    created = _rule(client_for(alice), name="refunds", action_pattern="payments.*", quorum=2)
    assert AuditEvent.objects.filter(action="approvals.rule_created").count() == 1
    for person in (bob, dave):
        assert client_for(person).patch(f"/api/v1/projects/acme/approval-rules/{created['id']}", {"quorum": 1},
                                        format="json").status_code == 403
    assert agent.post("/api/v1/projects/acme/approval-rules", {"name": "x"}, format="json").status_code == 403
    resp = client_for(alice).patch(f"/api/v1/projects/acme/approval-rules/{created['id']}", {"quorum": 3},
                                   format="json")
    assert resp.status_code == 200 and resp.json()["quorum"] == 3
    event = AuditEvent.objects.get(action="approvals.rule_updated")
    assert event.before == {"quorum": 2} and event.after == {"quorum": 3}
    bad = client_for(alice).post("/api/v1/projects/acme/approval-rules", {"name": "x", "quorum": 0}, format="json")
    assert bad.status_code == 400 and bad.json()["error_code"] == "invalid_request"
    far = client_for(alice).post("/api/v1/projects/acme/approval-rules",
                                 {"name": "x", "webhook_url": "https://elsewhere.example/hook"}, format="json")
    assert far.status_code == 400 and far.json()["details"]["field"] == "webhook_url"
    assert client_for(alice).delete(f"/api/v1/projects/acme/approval-rules/{created['id']}").status_code == 204
    assert AuditEvent.objects.filter(action="approvals.rule_deleted").count() == 1


# --- the agent's side -----------------------------------------------------------------------------


def test_a_request_stores_the_servers_hash_and_redacted_arguments(ask, project):
    got = ask(run_id="run-1")
    approval = Approval.objects.get(public_id=got["id"])
    assert got["state"] == "pending" and got["quorum"] == 1 and got["approver_role"] == "approver"
    assert approval.action_hash == services.action_hash("payments.refund", ARGS) == got["action_hash"]
    # The hash is over the canonical JSON: key order and spacing change nothing.
    assert services.action_hash("payments.refund", dict(reversed(list(ARGS.items())))) == approval.action_hash
    assert services.action_hash("payments.refund", {**ARGS, "amount": 121}) != approval.action_hash
    assert "customer@example.com" not in str(approval.arguments)  # redacted for the people who read it
    assert approval.key_owner == "alice"


def test_asking_again_with_the_same_idempotency_key_answers_the_same_approval(agent, ask):
    first = ask(idempotency_key="resume-1")
    again = agent.post("/api/v1/approvals", {"action": "payments.refund", "arguments": ARGS,
                                             "summary": "Refund order 1234"}, format="json",
                       HTTP_IDEMPOTENCY_KEY="resume-1")
    assert again.status_code == 200 and again.json()["id"] == first["id"]
    other = agent.post("/api/v1/approvals", {"action": "payments.refund", "arguments": {**ARGS, "amount": 9999}},
                       format="json", HTTP_IDEMPOTENCY_KEY="resume-1")
    assert other.status_code == 409 and other.json()["error_code"] == "idempotency_conflict"
    assert Approval.objects.count() == 1


def _deep(n: int):
    value: list = [1]
    for _ in range(n):
        value = [value]
    return value


def test_bad_requests_get_a_clear_error_and_store_nothing(agent, project):
    for body in ({"arguments": {}}, {"action": "", "arguments": {}}, {"action": "x"},
                 {"action": "x", "arguments": {}, "callback_url": "https://not-allowed.example/"},
                 {"action": "x", "arguments": {"deep": _deep(200)}}):
        resp = agent.post("/api/v1/approvals", body, format="json")
        assert resp.status_code == 400 and resp.json()["error_code"] == "invalid_request", (body, resp.content)
    assert agent.get("/api/v1/approvals/apr_0?wait=31").status_code == 400
    assert not Approval.objects.exists()


# --- decisions ------------------------------------------------------------------------------------


def test_who_may_decide(ask, client_for, bob, dave, charlie, agent, alice):
    got = ask(end_user="Dave@Example.com")
    assert _approve(client_for(bob), got["id"]).json()["error_code"] == "permission_denied"  # an auditor
    assert _approve(client_for(charlie), got["id"]).status_code == 404  # an outsider
    refused = agent.post(f"/api/v1/approvals/{got['id']}/approve", {}, format="json")
    assert refused.status_code == 403 and refused.json()["error_code"] == "person_only"
    own = _approve(client_for(dave), got["id"])  # the end user the run is for (by email, any case)
    assert own.status_code == 403 and own.json()["error_code"] == "self_approval"
    owner = _approve(client_for(alice), got["id"])  # the admin who minted the requesting key
    assert owner.status_code == 403 and owner.json()["error_code"] == "self_approval"
    assert not Decision.objects.exists() and Approval.objects.get().state == "pending"


def test_the_database_refuses_a_decision_by_the_requester_itself(ask, dave):
    approval = Approval.objects.get(public_id=ask(end_user="dave")["id"])
    for row in ({"requester_end_user": "dave"}, {"requester_end_user": "dave@example.com"},
                {"requester_owner": "dave"}):
        with pytest.raises(IntegrityError), transaction.atomic():
            Decision.objects.create(project=approval.project, approval=approval, decider=dave, decider_username="dave",
                                    decider_email="dave@example.com", role="approver", outcome="approve",
                                    action_hash=approval.action_hash, created_at=timezone.now(),
                                    **{"requester_end_user": "", "requester_owner": "", **row})


def test_an_approver_approves_audited_and_traced_and_the_agent_consumes_once(ask, client_for, dave, agent,
                                                                             project):
    got = ask(run_id="run-approve", span_id="tool-span-1")
    resp = _approve(client_for(dave), got["id"], reason="customer verified")
    assert resp.status_code == 200, resp.content
    body = resp.json()
    assert body["state"] == "approved" and body["decisions"] == [
        {"decider": "dave", "role": "approver", "outcome": "approve", "reason": "customer verified",
         "at": body["decisions"][0]["at"]}]
    event = AuditEvent.objects.get(action="approvals.approved")
    assert event.actor_repr == "dave" and event.after["action_hash"] == got["action_hash"]
    assert event.after["reason"] == "customer verified" and event.after["role"] == "approver"

    again = _approve(client_for(dave), got["id"])
    assert again.status_code == 409 and again.json()["error_code"] in ("already_decided", "approval_closed")

    changed = _consume(agent, got["id"], {**ARGS, "amount": 12000})
    assert changed.status_code == 409 and changed.json()["error_code"] == "action_mismatch"
    assert Approval.objects.get(public_id=got["id"]).state == "approved"  # a refused consume changes nothing
    taken = _consume(agent, got["id"])
    assert taken.status_code == 200, taken.content
    claims = grants.verify(taken.json()["grant"], secret=project.webhook_secret, action_hash=got["action_hash"])
    assert claims["approval"] == got["id"] and claims["project"] == "acme"
    assert grants.verify(taken.json()["grant"], secret="another secret") is None
    assert grants.verify(taken.json()["grant"], secret=project.webhook_secret, action_hash="0" * 64) is None
    assert grants.verify(taken.json()["grant"], secret=project.webhook_secret, now=claims["exp"]) is None
    second = _consume(agent, got["id"])
    assert second.status_code == 409 and second.json()["error_code"] == "approval_closed"
    assert second.json()["details"]["state"] == "consumed"

    drain()
    spans = {s.name: s for s in Span.objects.filter(run__run_id="run-approve")}
    assert set(spans) == {"approval.request", "approval.decision", "approval.consume"}, set(spans)
    assert all(s.parent_span_id == "tool-span-1" and s.kind == "guardrail" for s in spans.values())
    assert spans["approval.decision"].attributes["controlplane.approval.decider"] == "dave"


def test_a_quorum_of_two_needs_two_different_approvers(client_for, alice, ask, dave, erin):
    _rule(client_for(alice), name="two", action_pattern="payments.*", quorum=2)
    got = ask()
    first = _approve(client_for(dave), got["id"])
    assert first.json()["state"] == "pending" and first.json()["approvals"] == 1
    twice = _approve(client_for(dave), got["id"])
    assert twice.status_code == 409 and twice.json()["error_code"] == "already_decided"
    second = _approve(client_for(erin), got["id"])
    assert second.json()["state"] == "approved" and second.json()["approvals"] == 2
    assert AuditEvent.objects.filter(action="approvals.approval_counted").count() == 1
    assert AuditEvent.objects.filter(action="approvals.approved").count() == 1


def test_a_rejection_ends_it_and_it_can_never_be_consumed(ask, client_for, dave, erin, agent):
    got = ask()
    assert _approve(client_for(dave), got["id"], "no", outcome="reject").json()["state"] == "rejected"
    late = _approve(client_for(erin), got["id"])
    assert late.status_code == 409 and late.json()["error_code"] == "approval_closed"
    assert _consume(agent, got["id"]).json()["error_code"] == "approval_closed"
    assert Decision.objects.count() == 1


def test_an_admin_only_rule_refuses_approvers_and_a_named_approver_may_decide(client_for, alice, ask, dave, bob,
                                                                            erin):
    _rule(client_for(alice), name="admins", action_pattern="payments.*", approver_role="admin",
          named_approvers=["bob"])
    got = ask()
    assert _approve(client_for(dave), got["id"]).json()["error_code"] == "permission_denied"
    resp = _approve(client_for(bob), got["id"])  # an auditor, named on the rule
    assert resp.status_code == 200 and resp.json()["decisions"][0]["role"] == "named approver"
    other = ask(action="payments.charge")
    assert _approve(client_for(erin), other["id"]).json()["error_code"] == "permission_denied"


def test_a_role_is_checked_at_the_moment_of_the_decision(ask, client_for, dave, alice, project):
    got = ask()
    project_services.role_revoke(project=project, user=dave, role=Role.APPROVER, actor=alice)
    assert _approve(client_for(dave), got["id"]).status_code in (403, 404)
    assert Approval.objects.get().state == "pending"


# --- time: nothing runs by timing out ---------------------------------------------------------------


def test_an_expired_approval_can_never_be_consumed_or_approved(client_for, alice, ask, dave, agent):
    _rule(client_for(alice), name="soon", action_pattern="payments.*", deadline_seconds=60)
    pending, approved = ask(), ask(action="payments.charge")
    assert _approve(client_for(dave), approved["id"]).json()["state"] == "approved"
    Approval.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    late = _approve(client_for(dave), pending["id"])
    assert late.status_code == 409 and late.json()["error_code"] == "approval_expired"
    gone = _consume(agent, approved["id"], action="payments.charge")
    assert gone.status_code == 409 and gone.json()["error_code"] == "approval_expired"
    assert set(Approval.objects.values_list("state", flat=True)) == {"expired"}


def test_the_sweep_expires_past_deadlines_and_leaves_pending_what_has_none(client_for, alice, ask, agent):
    _rule(client_for(alice), name="soon", action_pattern="payments.*", deadline_seconds=60)
    due, forever = ask(), ask(action="send_email")
    Approval.objects.filter(public_id=due["id"]).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert sweep()["expired"] == 1
    assert agent.get(f"/api/v1/approvals/{due['id']}").json()["state"] == "expired"
    assert agent.get(f"/api/v1/approvals/{forever['id']}").json()["state"] == "pending"
    assert sweep()["expired"] == 0


def test_the_agent_cancels_what_it_no_longer_needs(ask, agent, client_for, dave):
    got = ask()
    resp = agent.post(f"/api/v1/approvals/{got['id']}/cancel", {"reason": "user gave up"}, format="json")
    assert resp.status_code == 200 and resp.json()["state"] == "cancelled"
    assert _approve(client_for(dave), got["id"]).json()["error_code"] == "approval_closed"
    assert _consume(agent, got["id"]).json()["error_code"] == "approval_closed"


def test_a_key_sees_its_projects_approvals_only(ask, make_key, other_project, key_client, client_for, bob):
    got = ask()
    _, raw = make_key(other_project, scopes=["approvals"])
    stranger = key_client(raw)
    assert stranger.get(f"/api/v1/approvals/{got['id']}").status_code == 404
    assert got["id"] not in stranger.get("/api/v1/approvals").content.decode()
    listed = client_for(bob).get("/api/v1/approvals?state=pending").json()
    assert [a["id"] for a in listed["results"]] == [got["id"]]


def test_webhooks_tell_the_rule_and_the_callback_signed(client_for, alice, project, receiver, ask, dave,
                                                        settings):
    from apps.projects.webhooks import verify

    settings.CELERY_TASK_ALWAYS_EAGER = True
    url, got = receiver
    project.webhook_allowlist = [url]
    project.save()
    _rule(client_for(alice), name="hooked", action_pattern="payments.*", webhook_url=f"{url}/rule")
    with_callback = ask(callback_url=f"{url}/agent")
    # Eager tasks run on commit: the test's transaction never commits, so run them as the commit would.
    from apps.approvals.tasks import notify

    notify(Approval.objects.get(public_id=with_callback["id"]).pk, "approval.requested")
    paths = sorted(p for p, _, _ in got)
    assert paths == ["/agent", "/rule"]
    for _, headers, body in got:
        assert verify(project.webhook_secret, body, headers["X-Controlplane-Signature"])
        assert headers["X-Controlplane-Event"] == "approval.requested"


def test_an_overdue_request_is_sent_again_once(client_for, alice, project, receiver, ask, settings, mailoutbox):
    from apps.approvals.tasks import notify

    url, got = receiver
    project.webhook_allowlist = [url]
    project.save()
    _rule(client_for(alice), name="slow", action_pattern="payments.*", overdue_seconds=60,
          webhook_url=f"{url}/rule", notify_emails=["approvers@example.com"])
    waiting, decided = ask(), ask()
    for approval in Approval.objects.all():  # as the request's commit would: told once
        notify(approval.pk, "approval.requested")
    Approval.objects.update(overdue_at=timezone.now() - timedelta(seconds=1))
    Approval.objects.filter(public_id=decided["id"]).update(state="rejected")
    got.clear()
    mailoutbox.clear()
    settings.CELERY_TASK_ALWAYS_EAGER = True
    assert sweep()["overdue"] == 1
    assert sweep()["overdue"] == 0  # once
    assert [json.loads(body)["type"] for _, _, body in got] == ["approval.overdue"]
    assert json.loads(got[0][2])["approval"]["id"] == waiting["id"]
    assert len(mailoutbox) == 1 and "still waiting" in mailoutbox[0].subject
