"""Projects, the roles people hold in them, and the API keys agents use.

A role is a Django group per (project, role), holding django-guardian object permissions on that
project; membership is group membership. ``access.project_access(principal)`` is the one place
that decides which projects a person or a key may see; every project-owned model's queryset
(``ProjectOwnedQuerySet``) has ``visible_to(principal)`` built on it.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import zoneinfo

from django.conf import settings
from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from django.utils import timezone

from apps.common import redaction

API_KEY_PREFIX = "cp_live_"
API_KEY_LOOKUP_LEN = 12  # characters after the prefix, indexed for lookup


class Role(models.TextChoices):
    AUDITOR = "auditor", "Auditor"  # reads everything in the project, changes nothing
    APPROVER = "approver", "Approver"  # decides approvals
    OPERATOR = "operator", "Operator"  # steers the queue
    ADMIN = "admin", "Admin"  # manages keys, members and settings


# Object permissions each role's group holds on its project (guardian).
ROLE_PERMISSIONS: dict[str, tuple[str, ...]] = {
    Role.AUDITOR: ("view_project",),
    Role.APPROVER: ("view_project", "approve_project", "score_project"),
    Role.OPERATOR: ("view_project", "operate_project", "score_project"),
    Role.ADMIN: ("view_project", "change_project", "manage_project", "approve_project", "operate_project",
                 "score_project"),
}


class Scope(models.TextChoices):
    INGEST = "ingest", "Send traces"
    READ = "read", "Read the project's data"
    BUDGET = "budget", "Ask and reserve budget"
    APPROVALS = "approvals", "Request approvals (never decide them)"
    QUEUE = "queue", "Submit GPU work (never steer the queue)"


class ProjectOwnedQuerySet(models.QuerySet):
    """The queryset of every model whose rows belong to a project (here and in the apps above):
    ``visible_to(principal)`` keeps the rows of the projects ``principal`` may see, as decided by
    ``access.project_access``. ``project_field`` names the row's project (a foreign key, or ``pk``
    on Project itself); use ``ProjectOwnedQuerySet.as_manager()``, or subclass it."""

    project_field = "project"

    def visible_to(self, principal, *, project_slug: str | None = None):
        """Rows of the projects a person (any role), an API key (its own project) or an already
        computed ``ProjectAccess`` may see; nothing otherwise. ``project_slug`` narrows to one project."""
        from .access import project_access  # access is built on these models: imported when first used

        access = project_access(principal)
        if project_slug is not None:
            access = access.in_project(project_slug)
        return access.apply(self, self.project_field)


class ProjectQuerySet(ProjectOwnedQuerySet):
    project_field = "pk"


# A project's slug, the one definition: the model, the projects API and the run log's ?project= use it.
SLUG_PATTERN = r"[a-z0-9][a-z0-9-]{0,62}"
SLUG_RE = re.compile(SLUG_PATTERN)  # used with fullmatch
slug_validator = RegexValidator(rf"^{SLUG_PATTERN}$", "Lower-case letters, digits and dashes.")


def new_webhook_secret() -> str:
    return secrets.token_hex(32)


def validate_time_zone(name: str) -> None:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise ValidationError(f"{name!r} is not an IANA time zone name (e.g. Europe/Paris).") from exc


MAX_WEBHOOK_PREFIXES = 20


def validate_webhook_allowlist(value) -> list[str]:
    """A list of https:// (or http://) URL prefixes naming at least a host."""
    if not isinstance(value, list) or len(value) > MAX_WEBHOOK_PREFIXES:
        raise ValidationError(f"A list of at most {MAX_WEBHOOK_PREFIXES} URL prefixes.")
    out = []
    for item in value:
        if not isinstance(item, str) or len(item) > 500 or not re.fullmatch(r"https?://[^/\s?#]+(/\S*)?", item):
            raise ValidationError(f"{str(item)[:80]!r} is not an http(s) URL prefix naming a host.")
        out.append(item)
    return out


def url_allowed(url: str, allowlist: list[str]) -> bool:
    """A URL is allowed when it starts with a prefix of the list; a prefix naming only a host matches
    that host exactly (https://a.example never allows https://a.example.evil.com)."""
    for prefix in allowlist:
        bare = prefix.rstrip("/") if prefix.count("/") <= 3 else None
        if bare is not None and (url == bare or url.startswith(bare + "/")):
            return True
        if bare is None and url.startswith(prefix):
            return True
    return False


class Project(models.Model):
    slug = models.SlugField(max_length=63, unique=True, validators=[slug_validator])
    name = models.CharField(max_length=200)
    created_at = models.DateTimeField(auto_now_add=True)
    # Redaction (apps/common/redaction.py), applied before anything reaches the run log.
    redaction_enabled = models.BooleanField(
        default=True, help_text="Replace emails, phone and card numbers, API keys, tokens and IP addresses by "
                                "typed placeholders before traces are stored.")
    redaction_patterns = models.JSONField(
        default=list, blank=True,
        help_text='Extra patterns, as [{"name": "EMPLOYEE_ID", "pattern": "EMP-\\d{6}"}]: a match becomes '
                  "[EMPLOYEE_ID]. Applied even when the built-in rules are off.")
    redaction_exempt_attributes = models.JSONField(
        default=list, blank=True,
        help_text='Attribute names whose values are kept as sent, e.g. ["http.client_ip", "app.debug.*"].')
    retention_days = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1), MaxValueValidator(36500)],
        help_text="Delete runs (with their spans and tool calls) this many days after they were last active. "
                  "Empty: the server's default (TRACES_RETENTION_DAYS; 0 there keeps them forever).")
    time_zone = models.CharField(
        max_length=64, default="UTC",
        help_text="IANA time zone (e.g. Europe/Paris) in which this project's days begin and end: cost "
                  "rollups, spend per day and daily budgets.")
    webhook_allowlist = models.JSONField(
        default=list, blank=True,
        help_text='URL prefixes this project may send webhooks to, e.g. ["https://hooks.example.com/"]. '
                  "A webhook to any other URL is refused.")
    webhook_secret = models.CharField(
        max_length=64, default=new_webhook_secret, editable=False,
        help_text="Key of the HMAC-SHA256 signature on this project's webhooks (header X-Controlplane-Signature).")

    objects = ProjectQuerySet.as_manager()

    class Meta:
        ordering = ["slug"]
        permissions = [
            ("manage_project", "Manage keys and members"),
            ("approve_project", "Decide approvals"),
            ("operate_project", "Steer the queue"),
            ("score_project", "Score runs (people's feedback)"),
        ]

    def __str__(self) -> str:
        return self.slug

    def clean(self) -> None:
        errors = {}
        for field, check in (("redaction_patterns", redaction.validate_extra_patterns),
                             ("redaction_exempt_attributes", redaction.validate_exempt_attributes)):
            try:
                setattr(self, field, check(getattr(self, field)))
            except redaction.PatternError as exc:
                errors[field] = str(exc)
        try:
            validate_time_zone(self.time_zone)
        except ValidationError as exc:
            errors["time_zone"] = exc.messages[0]
        try:
            self.webhook_allowlist = validate_webhook_allowlist(self.webhook_allowlist)
        except ValidationError as exc:
            errors["webhook_allowlist"] = exc.messages[0]
        if errors:
            raise ValidationError(errors)

    @property
    def tz(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.time_zone)

    def redactor(self) -> redaction.Redactor:
        return redaction.Redactor(self.redaction_patterns, self.redaction_exempt_attributes,
                                  builtin=self.redaction_enabled)


class ProjectRole(models.Model):
    """The group that carries one role in one project."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="roles")
    role = models.CharField(max_length=16, choices=Role.choices)
    group = models.OneToOneField(Group, on_delete=models.CASCADE, related_name="project_role")

    objects = ProjectOwnedQuerySet.as_manager()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["project", "role"], name="project_role_unique")]

    def __str__(self) -> str:
        return f"{self.project.slug}:{self.role}"


def hash_api_key(raw: str) -> str:
    """Keyed hash (HMAC-SHA256 with API_KEY_PEPPER): a leaked table alone cannot be brute-forced."""
    return hmac.new(settings.API_KEY_PEPPER.encode(), raw.encode(), hashlib.sha256).hexdigest()


class ApiKeyQuerySet(ProjectOwnedQuerySet):
    def active(self):
        now = timezone.now()
        return self.filter(revoked_at__isnull=True).filter(models.Q(expires_at__isnull=True) |
                                                           models.Q(expires_at__gt=now))


class ApiKey(models.Model):
    """An agent's credential for one project. The secret is never stored, only its keyed hash."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100)
    lookup = models.CharField(max_length=API_KEY_LOOKUP_LEN, unique=True, editable=False)
    key_hash = models.CharField(max_length=64, editable=False)
    scopes = models.JSONField(default=list)
    created_at = models.DateTimeField(auto_now_add=True)
    created_by = models.CharField(max_length=200, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    rate_limit_per_minute = models.PositiveIntegerField(
        null=True, blank=True, help_text="Ingest requests per minute (429 beyond); empty: the server default, "
                                         "0: unlimited.")

    objects = ApiKeyQuerySet.as_manager()

    # An API key authenticates as itself, never as a person.
    is_authenticated = True
    is_anonymous = False
    is_superuser = False
    is_staff = False

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.display_prefix})"

    @property
    def display_prefix(self) -> str:
        return f"{API_KEY_PREFIX}{self.lookup}…"

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def is_expired(self) -> bool:
        return self.expires_at is not None and self.expires_at <= timezone.now()

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes
