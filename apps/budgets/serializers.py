from decimal import Decimal

from django.core.validators import RegexValidator
from rest_framework import serializers

from .models import Budget, CostSettings, CostSource, PriceOverride, nanos
from .selectors import DIMENSIONS


class GroupByField(serializers.CharField):
    def to_internal_value(self, data):
        names = [n.strip() for n in super().to_internal_value(data).split(",") if n.strip()]
        unknown = [n for n in names if n not in DIMENSIONS]
        if unknown:
            raise serializers.ValidationError(f"{unknown[0]!r} is not one of {', '.join(DIMENSIONS)}.")
        if len(set(names)) != len(names):
            raise serializers.ValidationError("names a dimension twice.")
        return names


class CostQuery(serializers.Serializer):
    project = serializers.RegexField(r"^[a-z0-9][a-z0-9-]{0,62}$", required=False,
                                     help_text="A project slug, for people who see several.")
    group_by = GroupByField(required=False, default=["day"],
                            help_text=f"Comma-separated, in order: {', '.join(DIMENSIONS)} (default: day).")
    since = serializers.DateField(required=False, help_text="First day (the project's), default 30 days ago.")
    until = serializers.DateField(required=False, help_text="Last day, inclusive (default: today).")
    agent = serializers.CharField(required=False, max_length=200)
    version = serializers.CharField(required=False, max_length=100)
    end_user = serializers.CharField(required=False, max_length=256)
    key = serializers.IntegerField(required=False, min_value=1, help_text="An API key's id.")
    model = serializers.CharField(required=False, max_length=200)
    provider = serializers.CharField(required=False, max_length=100)

    def validate(self, attrs):
        if attrs.get("since") and attrs.get("until") and attrs["since"] > attrs["until"]:
            raise serializers.ValidationError({"since": "is after until."})
        if attrs.get("since") and attrs.get("until") and (attrs["until"] - attrs["since"]).days > 3660:
            raise serializers.ValidationError({"since": "at most ten years at a time."})
        return attrs



class KeyRefOut(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    prefix = serializers.CharField()


class MeasuresOut(serializers.Serializer):
    cost_usd = serializers.DecimalField(max_digits=24, decimal_places=9, help_text="Exact (nano-USD).")
    calls = serializers.IntegerField(help_text="Priced calls.")
    unpriced_calls = serializers.IntegerField(help_text="Calls of a model or provider with no price: never 0.")
    input_tokens = serializers.IntegerField()
    output_tokens = serializers.IntegerField()
    cache_read_tokens = serializers.IntegerField()
    cache_write_tokens = serializers.IntegerField()
    reasoning_tokens = serializers.IntegerField()


class CostRowOut(MeasuresOut):
    project = serializers.CharField(required=False)
    day = serializers.DateField(required=False)
    agent = serializers.CharField(required=False)
    version = serializers.CharField(required=False)
    end_user = serializers.CharField(required=False)
    key = KeyRefOut(required=False, allow_null=True)
    model = serializers.CharField(required=False)
    provider = serializers.CharField(required=False)

    def to_representation(self, instance):
        # Only the dimensions grouped by, in their order, then the measures.
        data = super().to_representation(instance)
        return {k: data[k] for k in instance if k in data}


class CostsOut(serializers.Serializer):
    currency = serializers.CharField()
    since = serializers.DateField()
    until = serializers.DateField()
    group_by = serializers.ListField(child=serializers.CharField())
    filters = serializers.DictField()
    rows = CostRowOut(many=True)
    total = MeasuresOut()
    truncated = serializers.BooleanField()


class SpanCostOut(serializers.Serializer):
    span_id = serializers.CharField()
    model = serializers.CharField()
    provider = serializers.CharField()
    source = serializers.ChoiceField(choices=CostSource.choices)
    cost_usd = serializers.DecimalField(max_digits=24, decimal_places=9, allow_null=True)
    computed_usd = serializers.DecimalField(max_digits=24, decimal_places=9, allow_null=True)
    reported_usd = serializers.DecimalField(max_digits=24, decimal_places=9, allow_null=True)
    price_ref = serializers.CharField(help_text="The price entry, or why the call is unpriced.")
    disagreement = serializers.BooleanField()
    day = serializers.DateField()
    hour = serializers.IntegerField()


class ChildCostOut(serializers.Serializer):
    run_id = serializers.CharField()
    cost_usd = serializers.DecimalField(max_digits=24, decimal_places=9, allow_null=True)


class RunCostOut(serializers.Serializer):
    run_id = serializers.CharField()
    cost_usd = serializers.DecimalField(max_digits=24, decimal_places=9, allow_null=True,
                                        help_text="The run's own spans' costs.")
    children_cost_usd = serializers.DecimalField(max_digits=24, decimal_places=9, allow_null=True,
                                                 help_text="Its child runs' costs, beside it (not included).")
    child_runs = ChildCostOut(many=True)
    unpriced_spans = serializers.IntegerField()
    disagreements = serializers.IntegerField()
    spans = SpanCostOut(many=True)


class UnpricedOut(serializers.Serializer):
    project = serializers.CharField()
    model = serializers.CharField()
    provider = serializers.CharField()
    calls = serializers.IntegerField()
    last_day = serializers.DateField()
    reason = serializers.CharField()


class SpikeOut(serializers.Serializer):
    id = serializers.IntegerField()
    project = serializers.CharField(source="project.slug")
    period = serializers.CharField()
    day = serializers.DateField()
    hour = serializers.IntegerField(allow_null=True)
    scope = serializers.CharField()
    value = serializers.CharField()
    spend_usd = serializers.DecimalField(max_digits=24, decimal_places=9)
    baseline_usd = serializers.DecimalField(max_digits=24, decimal_places=9)
    factor = serializers.DecimalField(max_digits=8, decimal_places=2)
    detected_at = serializers.DateTimeField()
    webhook_status = serializers.CharField()
    email_status = serializers.CharField()


class SinceQuery(serializers.Serializer):
    project = serializers.RegexField(r"^[a-z0-9][a-z0-9-]{0,62}$", required=False)
    since = serializers.DateField(required=False)


_PRICE = dict(max_digits=14, decimal_places=3, min_value=0)


class PriceOverrideSerializer(serializers.ModelSerializer):
    input_per_mtok = serializers.DecimalField(**_PRICE)
    output_per_mtok = serializers.DecimalField(**_PRICE)
    cache_read_per_mtok = serializers.DecimalField(**_PRICE, required=False, allow_null=True)
    cache_write_per_mtok = serializers.DecimalField(**_PRICE, required=False, allow_null=True)
    reasoning_per_mtok = serializers.DecimalField(**_PRICE, required=False, allow_null=True)

    class Meta:
        model = PriceOverride
        fields = ["id", "provider", "model_pattern", "effective_from", "input_per_mtok", "output_per_mtok",
                  "cache_read_per_mtok", "cache_write_per_mtok", "reasoning_per_mtok", "note", "created_at",
                  "updated_at"]
        read_only_fields = ["id", "created_at", "updated_at"]
        validators = []  # the unique (project, provider, pattern, date) check is the service's full_clean


class CostSettingsSerializer(serializers.ModelSerializer):
    alert_emails = serializers.ListField(child=serializers.EmailField(), max_length=20, required=False)

    class Meta:
        model = CostSettings
        fields = list(CostSettings.FIELDS)



# --- budgets and reservations ---------------------------------------------------------------------

_MAX_TOKENS = 10**9


class BudgetSerializer(serializers.ModelSerializer):
    cap_usd = serializers.DecimalField(max_digits=18, decimal_places=9, min_value=Decimal(0),
                                       max_value=Decimal(9 * 10**9), help_text="USD per period.")
    thresholds = serializers.ListField(child=serializers.IntegerField(min_value=1, max_value=1000), max_length=10,
                                       required=False, help_text="Percentages of the cap that alert when crossed.")
    current = serializers.SerializerMethodField(help_text="The period in force: spent, held, remaining.")

    class Meta:
        model = Budget
        fields = ["id", "name", "scope", "value", "period", "cap_usd", "time_zone", "hard", "thresholds", "enabled",
                  "created_at", "updated_at", "current"]
        read_only_fields = ["id", "created_at", "updated_at", "current"]

    def get_current(self, obj) -> dict | None:
        return (self.context.get("current") or {}).get(obj.pk)

    def to_representation(self, instance):
        data = super().to_representation(instance)
        data["cap_usd"] = f"{instance.cap_usd:.9f}"
        return data

    def to_internal_value(self, data):
        values = super().to_internal_value(data)
        if "cap_usd" in values:
            values["cap_nanos"] = nanos(values.pop("cap_usd"))
        return values


class SettleUsageIn(serializers.Serializer):
    input_tokens = serializers.IntegerField(min_value=0, max_value=_MAX_TOKENS, required=False, default=0)
    output_tokens = serializers.IntegerField(min_value=0, max_value=_MAX_TOKENS, required=False, default=0)
    cache_read_tokens = serializers.IntegerField(min_value=0, max_value=_MAX_TOKENS, required=False, default=0)
    cache_write_tokens = serializers.IntegerField(min_value=0, max_value=_MAX_TOKENS, required=False, default=0)
    reasoning_tokens = serializers.IntegerField(min_value=0, max_value=_MAX_TOKENS, required=False, default=0)


_NO_NUL = RegexValidator(r"^[^\x00]*$", "must not contain NUL.")


class ReservationIn(serializers.Serializer):
    agent = serializers.CharField(max_length=200, required=False, default="", allow_blank=True, validators=[_NO_NUL])
    end_user = serializers.CharField(max_length=256, required=False, default="", allow_blank=True,
                                     validators=[_NO_NUL])
    model = serializers.CharField(max_length=200, required=False, default="", allow_blank=True, validators=[_NO_NUL])
    provider = serializers.CharField(max_length=100, required=False, default="", allow_blank=True,
                                     validators=[_NO_NUL])
    run_id = serializers.CharField(max_length=128, required=False, default="", allow_blank=True,
                                   validators=[_NO_NUL])
    estimated_cost_usd = serializers.DecimalField(max_digits=18, decimal_places=9, min_value=Decimal(0),
                                                  max_value=Decimal(10**6), required=False,
                                                  help_text="An upper bound of the call's cost; or give the model "
                                                            "and max_output_tokens.")
    input_tokens = serializers.IntegerField(min_value=0, max_value=_MAX_TOKENS, required=False, default=0)
    max_output_tokens = serializers.IntegerField(min_value=0, max_value=_MAX_TOKENS, required=False)
    ttl_seconds = serializers.IntegerField(min_value=1, max_value=24 * 3600, required=False,
                                           help_text="Unsettled after this, it is charged in full (default: the "
                                                     "server's BUDGETS_RESERVATION_TTL_SECONDS).")

    def validate(self, attrs):
        if attrs.get("estimated_cost_usd") is None and not (attrs.get("model") and
                                                            attrs.get("max_output_tokens") is not None):
            raise serializers.ValidationError(
                {"estimated_cost_usd": "Give an estimated cost, or a model with max_output_tokens."})
        return attrs


class SettleIn(serializers.Serializer):
    usage = SettleUsageIn(required=False)
    cost_usd = serializers.DecimalField(max_digits=18, decimal_places=9, min_value=Decimal(0),
                                        max_value=Decimal(10**6), required=False)

    def validate(self, attrs):
        if attrs.get("usage") is None and attrs.get("cost_usd") is None:
            raise serializers.ValidationError({"usage": "Give the call's usage or its cost_usd."})
        return attrs


class ReservationBudgetOut(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    scope = serializers.CharField()
    value = serializers.CharField()
    period = serializers.CharField()
    hard = serializers.BooleanField()
    period_start = serializers.DateField()
    resets_at = serializers.DateTimeField()
    cap_usd = serializers.CharField()
    spent_usd = serializers.CharField()
    held_usd = serializers.CharField()
    remaining_usd = serializers.CharField()


class ReservationOut(serializers.Serializer):
    id = serializers.IntegerField()
    state = serializers.CharField()
    held_usd = serializers.CharField(help_text="What the reservation holds (its estimate).")
    charged_usd = serializers.CharField(allow_null=True)
    agent = serializers.CharField()
    end_user = serializers.CharField()
    model = serializers.CharField()
    provider = serializers.CharField()
    run_id = serializers.CharField()
    created_at = serializers.DateTimeField()
    expires_at = serializers.DateTimeField()
    closed_at = serializers.DateTimeField(allow_null=True)
    budgets = ReservationBudgetOut(many=True, required=False)
