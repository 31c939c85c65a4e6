"""Writes for projects, roles and API keys. Each one audits in its own transaction."""
from __future__ import annotations

import secrets
import string
from datetime import datetime

from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone
from guardian.shortcuts import assign_perm
from rest_framework.exceptions import AuthenticationFailed

from apps.audit.models import AuditEvent
from apps.audit.services import Actor, audit_record
from apps.common.errors import ErrorCode

from . import signals
from .models import (
    API_KEY_LOOKUP_LEN,
    API_KEY_PREFIX,
    ROLE_PERMISSIONS,
    ApiKey,
    Project,
    ProjectRole,
    Role,
    Scope,
    hash_api_key,
    new_webhook_secret,
)

_ALPHABET = string.ascii_letters + string.digits
_SECRET_LEN = 40  # ~238 bits from a 62-letter alphabet
LAST_USED_RESOLUTION_S = 60  # write last_used_at at most once a minute per key


def user_roles(user, project: Project) -> list[str]:
    if not getattr(user, "is_authenticated", False) or isinstance(user, ApiKey):
        return []
    return sorted(
        ProjectRole.objects.filter(project=project, group__user=user).values_list("role", flat=True)
    )


def actor_for(principal, project: Project | None = None) -> Actor:
    """The audit Actor for a person, an API key or the system (None), with the role held now."""
    if principal is None:
        return Actor.system()
    if isinstance(principal, ApiKey):
        return Actor(
            type=AuditEvent.ActorType.API_KEY,
            id=str(principal.pk),
            repr=f"key {principal.name} ({principal.display_prefix})",
            role="api_key:" + ",".join(sorted(principal.scopes)),
        )
    roles = user_roles(principal, project) if project is not None else []
    if principal.is_superuser:
        roles = roles + ["superuser"]
    return Actor(type=AuditEvent.ActorType.USER, id=str(principal.pk), repr=principal.get_username(),
                 role=",".join(roles))


def audit_change(principal, project: Project, action: str, obj, *, before=None, after=None) -> None:
    """Audit a person's or key's change to one of a project's rows (in the caller's transaction): the
    one shape every app's audited services use."""
    audit_record(
        actor=actor_for(principal, project),
        action=action,
        object_type=obj._meta.label_lower,
        object_id=obj.pk,
        object_repr=str(obj),
        project_id=project.pk,
        project_slug=project.slug,
        before=before,
        after=after,
    )


_audit = audit_change


def update_audited(obj, changes: dict, fields, clean, actor, action: str):
    """Apply ``changes`` (of ``fields`` only) to a locked row of a project (``obj.project``), validate
    (``clean``), save and audit what differs; the row as it is now."""
    before = obj.as_dict()
    for field, value in changes.items():
        if field not in fields:
            raise ValidationError({field: f"is not a field of a {obj._meta.verbose_name}."})
        setattr(obj, field, value)
    clean()
    after = obj.as_dict()
    if after != before:
        obj.save()
        changed = [k for k in after if after[k] != before[k]]
        audit_change(actor, obj.project, action, obj, before={k: before[k] for k in changed},
                     after={k: after[k] for k in changed})
    return obj


@transaction.atomic
def project_create(*, slug: str, name: str = "", actor=None) -> Project:
    """Create a project with one group per role; a person who creates it becomes its admin."""
    project = Project(slug=slug, name=name or slug)
    project.full_clean()
    project.save()
    for role in Role:
        group = Group.objects.create(name=f"project:{project.slug}:{role.value}")
        ProjectRole.objects.create(project=project, role=role, group=group)
        for perm in ROLE_PERMISSIONS[role]:
            assign_perm(f"projects.{perm}", group, project)
    _audit(actor, project, "project.created", project, after={"slug": project.slug, "name": project.name})
    if actor is not None and not isinstance(actor, ApiKey):
        role_grant(project=project, user=actor, role=Role.ADMIN, actor=actor)
    return project


PROJECT_SETTINGS = ("name", "redaction_enabled", "redaction_patterns", "redaction_exempt_attributes",
                    "retention_days", "time_zone", "webhook_allowlist")


@transaction.atomic
def project_update(*, project: Project, actor, **changes) -> Project:
    """Change a project's settings (name, redaction, retention, time zone, webhook allowlist). Validated by ``Project.clean``; audited with
    the fields that changed, before and after. Returns the project (unchanged: nothing audited)."""
    unknown = set(changes) - set(PROJECT_SETTINGS)
    if unknown:
        raise ValidationError({sorted(unknown)[0]: "is not a project setting."})
    project = Project.objects.select_for_update().get(pk=project.pk)
    before = {f: getattr(project, f) for f in PROJECT_SETTINGS}
    for field, value in changes.items():
        setattr(project, field, value)
    project.full_clean()
    after = {f: getattr(project, f) for f in PROJECT_SETTINGS}
    changed = [f for f in PROJECT_SETTINGS if before[f] != after[f]]
    if changed:
        project.save(update_fields=changed)
        _audit(actor, project, "project.updated", project, before={f: before[f] for f in changed},
               after={f: after[f] for f in changed})
        signals.project_updated.send(sender=Project, project=project, changed=changed)
    return project


@transaction.atomic
def webhook_secret_rotate(*, project: Project, actor) -> str:
    """A new signing secret for the project's webhooks (returned once; the audit row never holds it)."""
    secret = new_webhook_secret()
    Project.objects.filter(pk=project.pk).update(webhook_secret=secret)
    _audit(actor, project, "project.webhook_secret_rotated", project)
    return secret


@transaction.atomic
def role_grant(*, project: Project, user, role: str, actor) -> bool:
    """Give ``user`` a role in ``project``. Returns False (and audits nothing) if already held."""
    project_role = ProjectRole.objects.select_related("group").get(project=project, role=Role(role))
    if project_role.group.user_set.filter(pk=user.pk).exists():
        return False
    # Audit first so the actor's role is recorded as it was before the change.
    _audit(actor, project, "role.granted", project_role, after={"user": user.get_username(), "role": role})
    project_role.group.user_set.add(user)
    return True


@transaction.atomic
def role_revoke(*, project: Project, user, role: str, actor) -> bool:
    project_role = ProjectRole.objects.select_related("group").get(project=project, role=Role(role))
    if not project_role.group.user_set.filter(pk=user.pk).exists():
        return False
    _audit(actor, project, "role.revoked", project_role, before={"user": user.get_username(), "role": role})
    project_role.group.user_set.remove(user)
    return True


def _validate_scopes(scopes) -> list[str]:
    valid = set(Scope.values)
    cleaned = sorted({s.strip() for s in scopes if s and s.strip()})
    unknown = [s for s in cleaned if s not in valid]
    if unknown or not cleaned:
        raise ValidationError(
            {"scopes": f"unknown scope(s): {', '.join(unknown)}" if unknown
             else f"at least one scope is required ({', '.join(sorted(valid))})"}
        )
    return cleaned


@transaction.atomic
def api_key_create(*, project: Project, name: str, scopes, actor, expires_at: datetime | None = None
                   ) -> tuple[ApiKey, str]:
    """Mint a key. Returns the row and the raw secret, which is shown once and never stored."""
    cleaned = _validate_scopes(scopes)
    if expires_at is not None and expires_at <= timezone.now():
        raise ValidationError({"expires_at": "must be in the future"})
    while True:
        body = "".join(secrets.choice(_ALPHABET) for _ in range(_SECRET_LEN))
        lookup = body[:API_KEY_LOOKUP_LEN]
        if not ApiKey.objects.filter(lookup=lookup).exists():
            break
    raw = API_KEY_PREFIX + body
    key = ApiKey.objects.create(
        project=project, name=name, lookup=lookup, key_hash=hash_api_key(raw), scopes=cleaned,
        expires_at=expires_at, created_by=actor_for(actor, project).repr,
    )
    _audit(actor, project, "api_key.created", key,
           after={"name": name, "scopes": cleaned, "prefix": key.display_prefix, "expires_at": expires_at})
    return key, raw


@transaction.atomic
def api_key_revoke(*, key: ApiKey, actor) -> ApiKey:
    """Revoke a key (idempotent: revoking a revoked key changes and audits nothing)."""
    key = ApiKey.objects.select_for_update().select_related("project").get(pk=key.pk)
    if key.revoked_at is not None:
        return key
    key.revoked_at = timezone.now()
    key.save(update_fields=["revoked_at"])
    _audit(actor, key.project, "api_key.revoked", key, before={"revoked_at": None},
           after={"revoked_at": key.revoked_at})
    return key


def api_key_authenticate(raw: str) -> ApiKey:
    """Resolve a presented secret to its key, or raise AuthenticationFailed with a stable code."""
    raw = raw.strip()
    if not raw.startswith(API_KEY_PREFIX) or len(raw) != len(API_KEY_PREFIX) + _SECRET_LEN:
        raise AuthenticationFailed("Invalid API key.", code=ErrorCode.INVALID_API_KEY)
    lookup = raw[len(API_KEY_PREFIX):len(API_KEY_PREFIX) + API_KEY_LOOKUP_LEN]
    key = ApiKey.objects.select_related("project").filter(lookup=lookup).first()
    # Compare even when no row matched, so timing does not tell whether a prefix exists.
    expected = key.key_hash if key else "0" * 64
    if not secrets.compare_digest(expected, hash_api_key(raw)) or key is None:
        raise AuthenticationFailed("Invalid API key.", code=ErrorCode.INVALID_API_KEY)
    if key.is_revoked:
        raise AuthenticationFailed("This API key has been revoked.", code=ErrorCode.API_KEY_REVOKED)
    if key.is_expired:
        raise AuthenticationFailed("This API key has expired.", code=ErrorCode.API_KEY_EXPIRED)
    now = timezone.now()
    if key.last_used_at is None or (now - key.last_used_at).total_seconds() >= LAST_USED_RESOLUTION_S:
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
        key.last_used_at = now
    return key
