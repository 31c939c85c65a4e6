"""The tamper-evident audit log.

Rows are append-only (database triggers refuse UPDATE and DELETE, and TRUNCATE on PostgreSQL) and
hash-chained: each row stores SHA-256 over its own content and the previous row's hash, so an edit
or a deletion anywhere breaks the chain that ``manage.py audit_verify`` walks. Rows keep ids and
repr strings, never foreign keys, so they survive the deletion of what they describe, and this app
imports nothing above it.
"""
from __future__ import annotations

import hashlib
import json

from django.db import models

GENESIS_HASH = "0" * 64


class AuditEventQuerySet(models.QuerySet):
    def visible_to_projects(self, project_ids):
        return self.filter(project_id__in=project_ids)


class AuditEvent(models.Model):
    class ActorType(models.TextChoices):
        USER = "user", "Person"
        API_KEY = "api_key", "API key"
        SYSTEM = "system", "System"

    seq = models.BigIntegerField(unique=True, help_text="Position in the hash chain, from 1, without gaps.")
    created_at = models.DateTimeField(db_index=True)
    project_id = models.BigIntegerField(null=True, blank=True, db_index=True)
    project_slug = models.CharField(max_length=64, blank=True)
    actor_type = models.CharField(max_length=16, choices=ActorType.choices)
    actor_id = models.CharField(max_length=64, blank=True)
    actor_repr = models.CharField(max_length=200)
    actor_role = models.CharField(max_length=100, blank=True, help_text="The actor's role(s) at that moment.")
    action = models.CharField(max_length=64, db_index=True)
    object_type = models.CharField(max_length=64)
    object_id = models.CharField(max_length=64)
    object_repr = models.CharField(max_length=200)
    before = models.JSONField(null=True, blank=True)
    after = models.JSONField(null=True, blank=True)
    request_id = models.CharField(max_length=128, blank=True)
    prev_hash = models.CharField(max_length=64)
    hash = models.CharField(max_length=64, unique=True)

    objects = AuditEventQuerySet.as_manager()

    class Meta:
        ordering = ["-seq"]
        indexes = [
            models.Index(fields=["project_id", "-created_at"], name="audit_project_time"),
            models.Index(fields=["object_type", "object_id"], name="audit_object"),
        ]

    def __str__(self) -> str:
        return f"#{self.seq} {self.action} {self.object_repr} by {self.actor_repr}"

    def content(self) -> dict:
        """The fields the hash covers, in a form that survives a database round trip."""
        return {
            "seq": self.seq,
            "created_at": self.created_at.isoformat(timespec="microseconds"),
            "project_id": self.project_id,
            "project_slug": self.project_slug,
            "actor_type": self.actor_type,
            "actor_id": self.actor_id,
            "actor_repr": self.actor_repr,
            "actor_role": self.actor_role,
            "action": self.action,
            "object_type": self.object_type,
            "object_id": self.object_id,
            "object_repr": self.object_repr,
            "before": self.before,
            "after": self.after,
            "request_id": self.request_id,
            "prev_hash": self.prev_hash,
        }

    def compute_hash(self) -> str:
        canonical = json.dumps(self.content(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
