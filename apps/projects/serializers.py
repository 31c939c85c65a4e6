from rest_framework import serializers

from apps.common import redaction

from .models import MAX_WEBHOOK_PREFIXES, SLUG_PATTERN, ApiKey, Project, Role, Scope


class RedactionPatternSerializer(serializers.Serializer):
    name = serializers.RegexField(rf"^{redaction.NAME_RE.pattern}$", help_text="The placeholder's name: [NAME].")
    pattern = serializers.CharField(max_length=redaction.MAX_PATTERN_LEN, help_text="A Python regular expression.")


class ProjectSerializer(serializers.ModelSerializer):
    redaction_patterns = RedactionPatternSerializer(many=True, read_only=True)
    redaction_exempt_attributes = serializers.ListField(child=serializers.CharField(), read_only=True)

    class Meta:
        model = Project
        fields = ["slug", "name", "created_at", "redaction_enabled", "redaction_patterns",
                  "redaction_exempt_attributes", "retention_days", "time_zone", "webhook_allowlist"]


class ProjectUpdateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=Project._meta.get_field("name").max_length, required=False)
    redaction_enabled = serializers.BooleanField(required=False)
    redaction_patterns = RedactionPatternSerializer(many=True, required=False)
    redaction_exempt_attributes = serializers.ListField(
        child=serializers.CharField(max_length=redaction.MAX_EXEMPT_ATTRIBUTE_LEN), required=False,
        max_length=redaction.MAX_EXEMPT_ATTRIBUTES)
    retention_days = serializers.IntegerField(
        min_value=1, max_value=36500, allow_null=True, required=False,
        help_text="Days to keep runs after their last activity; null: the server's default.")
    time_zone = serializers.CharField(max_length=64, required=False,
                                      help_text="IANA name; the project's days (cost rollups, daily budgets).")
    webhook_allowlist = serializers.ListField(
        child=serializers.CharField(max_length=500), required=False, max_length=MAX_WEBHOOK_PREFIXES,
        help_text="URL prefixes webhooks may be sent to.")


class ProjectCreateSerializer(serializers.Serializer):
    slug = serializers.RegexField(rf"^{SLUG_PATTERN}$")
    name = serializers.CharField(max_length=Project._meta.get_field("name").max_length, required=False,
                                 allow_blank=True)


class ApiKeySerializer(serializers.ModelSerializer):
    prefix = serializers.CharField(source="display_prefix", read_only=True)
    revoked = serializers.BooleanField(source="is_revoked", read_only=True)

    class Meta:
        model = ApiKey
        fields = ["id", "name", "prefix", "scopes", "created_at", "created_by", "expires_at", "revoked",
                  "revoked_at", "last_used_at"]


class ApiKeyCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=ApiKey._meta.get_field("name").max_length)
    scopes = serializers.ListField(child=serializers.ChoiceField(choices=Scope.choices), allow_empty=False)
    expires_at = serializers.DateTimeField(required=False, allow_null=True)


class ApiKeyCreatedSerializer(ApiKeySerializer):
    key = serializers.CharField(read_only=True, help_text="The secret. Shown once; store it now.")

    class Meta(ApiKeySerializer.Meta):
        fields = ApiKeySerializer.Meta.fields + ["key"]


class MemberSerializer(serializers.Serializer):
    username = serializers.CharField()
    roles = serializers.ListField(child=serializers.ChoiceField(choices=Role.choices))


class RoleGrantSerializer(serializers.Serializer):
    username = serializers.CharField()
    role = serializers.ChoiceField(choices=Role.choices)


class MeProjectSerializer(serializers.Serializer):
    slug = serializers.CharField()
    name = serializers.CharField()
    roles = serializers.ListField(child=serializers.CharField())


class MeSerializer(serializers.Serializer):
    type = serializers.ChoiceField(choices=["api_key", "user"])
    # for a key
    project = serializers.CharField(required=False)
    scopes = serializers.ListField(child=serializers.CharField(), required=False)
    key_prefix = serializers.CharField(required=False)
    # for a person
    username = serializers.CharField(required=False)
    is_superuser = serializers.BooleanField(required=False)
    projects = MeProjectSerializer(many=True, required=False)
