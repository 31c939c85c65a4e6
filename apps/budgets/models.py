"""Costs: a price per span, rolled up per run (``Run.cost_usd``), per day and per hour.

Money is nano-USD in integers (``traces.models.NANOS_PER_USD``): a price per million tokens with up
to three decimals costs a whole number of nano-USD per token, so a span's cost is exact and a sum of
a million spans is too, on PostgreSQL and SQLite alike (SQLite's decimals are floats).

``SpanCost`` is one priced span (a model call, or a span that reported its cost): what it cost, how
that was decided (``source``), and the run's attribution (agent, version, end user, key) it was
rolled up under. The rollups (``CostDay``, ``CostDayUser``, ``CostDayEndUser``, ``CostHour``) are sums of those rows,
kept in step inside the projection's transaction (``rollups.py``) and re-derivable from the spans by
``manage.py costs_rederive``. Days and hours are the project's (``Project.time_zone``).
"""
from __future__ import annotations

from decimal import Decimal

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models
from django.db.models import Q

from apps.projects.models import ProjectOwnedQuerySet
from apps.traces.models import NANOS_PER_USD


def usd(nanos: int | None) -> Decimal | None:
    return None if nanos is None else Decimal(nanos).scaleb(-9)


def usd_text(nanos_: int) -> str:
    """Nano-USD as the API writes money: a decimal string with nine places ("0.000000000")."""
    return f"{Decimal(nanos_).scaleb(-9):.9f}"


def nanos(amount: Decimal) -> int:
    return int((amount * NANOS_PER_USD).to_integral_value())


class CostSource(models.TextChoices):
    REPORTED = "reported", "Reported by the producer"
    COMPUTED = "computed", "Tokens × the price database"
    OVERRIDE = "override", "Tokens × the project's price override"
    UNPRICED = "unpriced", "Unknown model or provider: not priced"


class PriceOverride(models.Model):
    """A project's own price for a provider and model pattern, from a date: contracted rates, a
    self-hosted model, a model the price database does not know. Prices are USD per million tokens;
    cache and reasoning prices left empty take the input and output prices."""

    project = models.ForeignKey("projects.Project", on_delete=models.CASCADE, related_name="price_overrides")
    provider = models.CharField(max_length=100, blank=True, help_text="Empty: any provider.")
    model_pattern = models.CharField(
        max_length=200, help_text="The model name, or a glob (gpt-4o*, *-instruct); matched case-insensitively.")
    effective_from = models.DateField(help_text="Calls from this day on (the project's time zone) use this price.")
    input_per_mtok = models.DecimalField(max_digits=14, decimal_places=6, validators=[MinValueValidator(0)])
    output_per_mtok = models.DecimalField(max_digits=14, decimal_places=6, validators=[MinValueValidator(0)])
    cache_read_per_mtok = models.DecimalField(max_digits=14, decimal_places=6, null=True, blank=True,
                                              validators=[MinValueValidator(0)])
    cache_write_per_mtok = models.DecimalField(max_digits=14, decimal_places=6, null=True, blank=True,
                                               validators=[MinValueValidator(0)])
    reasoning_per_mtok = models.DecimalField(max_digits=14, decimal_places=6, null=True, blank=True,
                                             validators=[MinValueValidator(0)])
    note = models.CharField(max_length=200, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = ProjectOwnedQuerySet.as_manager()

    PRICE_FIELDS = ("input_per_mtok", "output_per_mtok", "cache_read_per_mtok", "cache_write_per_mtok",
                    "reasoning_per_mtok")

    class Meta:
        ordering = ["project", "provider", "model_pattern", "-effective_from"]
        constraints = [
            models.UniqueConstraint(fields=["project", "provider", "model_pattern", "effective_from"],
                                    name="budgets_override_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.provider or '*'}/{self.model_pattern} from {self.effective_from}"

    def clean(self) -> None:
        for field in self.PRICE_FIELDS:
            value = getattr(self, field)
            # Three decimals per million tokens: a whole number of nano-USD per token, so costs stay exact.
            if value is not None and value != value.quantize(Decimal("0.001")):
                raise ValidationError({field: "At most three decimals (USD per million tokens)."})

    def as_dict(self) -> dict:
        return {"provider": self.provider, "model_pattern": self.model_pattern,
                "effective_from": self.effective_from.isoformat(),
                **{f: None if getattr(self, f) is None else str(getattr(self, f)) for f in self.PRICE_FIELDS},
                "note": self.note}


class CostSettings(models.Model):
    """A project's cost rules: when a reported cost disagrees with the tokens, what a spike is, and
    where spikes are sent. Absent: the defaults below."""

    project = models.OneToOneField("projects.Project", on_delete=models.CASCADE, related_name="cost_settings")
    disagreement_margin = models.DecimalField(
        max_digits=6, decimal_places=4, default=Decimal("0.05"), validators=[MinValueValidator(0)],
        help_text="A reported cost differing from the computed one by more than this share is flagged.")
    spike_factor = models.DecimalField(
        max_digits=8, decimal_places=2, default=Decimal("3"), validators=[MinValueValidator(1)],
        help_text="An hour (or day) spending more than this many times its baseline is a spike.")
    spike_baseline_days = models.PositiveSmallIntegerField(
        default=7, validators=[MinValueValidator(1)],
        help_text="The baseline: the median of the same hour (or of the days) over this many days before.")
    spike_min_usd = models.DecimalField(
        max_digits=14, decimal_places=6, default=Decimal("1"), validators=[MinValueValidator(0)],
        help_text="Spend below this (USD, in the hour or day) is never a spike.")
    webhook_url = models.URLField(
        max_length=500, blank=True, help_text="Spikes are POSTed here, HMAC-signed (must be on the project's "
                                              "webhook allowlist).")
    alert_emails = models.JSONField(default=list, blank=True, help_text='Addresses emailed on a spike, e.g. '
                                                                        '["finops@example.com"].')
    unpriced_reservations = models.BooleanField(
        default=False, help_text="Admit a reservation for a model with no price (holding nothing); "
                                 "otherwise it is refused (model_unpriced).")
    updated_at = models.DateTimeField(auto_now=True)

    objects = ProjectOwnedQuerySet.as_manager()

    FIELDS = ("disagreement_margin", "spike_factor", "spike_baseline_days", "spike_min_usd", "webhook_url",
              "alert_emails", "unpriced_reservations")

    class Meta:
        verbose_name_plural = "cost settings"

    def __str__(self) -> str:
        return f"cost settings of {self.project}"

    def as_dict(self) -> dict:
        return {f: str(v) if isinstance(v, Decimal) else v for f in self.FIELDS for v in [getattr(self, f)]}


class SpanCost(models.Model):
    """One priced span. ``cost_nanos`` is what counts (None: unpriced, counted apart, never as 0)."""

    # The run's project, copied for scoping. No index of its own ((project, day, hour) serves it) and no
    # constraint of its own (the run's holds it): every index and check here is paid on each priced span.
    project = models.ForeignKey("projects.Project", on_delete=models.CASCADE, related_name="+", db_index=False,
                                db_constraint=False)
    run = models.ForeignKey("traces.Run", on_delete=models.CASCADE, related_name="span_costs")
    # The span's row id (this row's key: one index fewer to keep on every priced span than an id of
    # its own) and id, not a foreign key: spans are deleted in bulk by the retention sweep (no
    # collector); this row goes with its run (the sweep deletes runs through the ORM).
    span_pk = models.BigIntegerField(primary_key=True)
    span_id = models.CharField(max_length=64)
    day = models.DateField(help_text="The call's day in the project's time zone.")
    hour = models.PositiveSmallIntegerField(help_text="The call's hour (0-23) in the project's time zone.")
    # The attribution it was rolled up under (the run's, at the time; moved when the run's changes).
    agent_name = models.CharField(max_length=200, blank=True)
    agent_version = models.CharField(max_length=100, blank=True)
    end_user = models.CharField(max_length=256, blank=True)
    api_key_id = models.BigIntegerField(default=0, help_text="0: no key.")
    kind = models.CharField(max_length=32, blank=True, help_text="The span's kind.")
    model = models.CharField(max_length=200, blank=True)
    provider = models.CharField(max_length=100, blank=True)
    input_tokens = models.BigIntegerField(default=0)
    output_tokens = models.BigIntegerField(default=0)
    cache_read_tokens = models.BigIntegerField(default=0)
    cache_write_tokens = models.BigIntegerField(default=0)
    reasoning_tokens = models.BigIntegerField(default=0)
    source = models.CharField(max_length=16, choices=CostSource.choices)
    cost_nanos = models.BigIntegerField(null=True, blank=True)
    computed_nanos = models.BigIntegerField(null=True, blank=True, help_text="What the tokens cost at the price.")
    reported_nanos = models.BigIntegerField(null=True, blank=True, help_text="What the producer reported.")
    price_ref = models.CharField(max_length=300, blank=True,
                                 help_text="The price entry: genai-prices <version> <provider>/<model>, or override #id.")
    disagreement = models.BooleanField(
        default=False, help_text="Reported and computed cost differ by more than the project's margin.")
    # The reservation the call was made under (the span's ``controlplane.reservation_id`` attribute; the
    # gateway sets it), 0 if none: its cost reached the budgets' ledgers by the settle, not by the trace.
    reservation_id = models.BigIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    objects = ProjectOwnedQuerySet.as_manager()

    class Meta:
        ordering = ["-day", "-span_pk"]
        indexes = [
            models.Index(fields=["project", "model", "provider"], name="budgets_spancost_unpriced",
                         condition=Q(source="unpriced")),
            models.Index(fields=["project", "-day"], name="budgets_spancost_flagged",
                         condition=Q(disagreement=True)),
            models.Index(fields=["project", "day", "hour"], name="budgets_spancost_time"),
        ]

    def __str__(self) -> str:
        return f"{self.model or 'span'} {self.source} {usd(self.cost_nanos)}"

    @property
    def cost_usd(self) -> Decimal | None:
        return usd(self.cost_nanos)


class _RollupMeasures(models.Model):
    """What every rollup row sums."""

    cost_nanos = models.BigIntegerField(default=0)
    calls = models.BigIntegerField(default=0, help_text="Priced spans (reported, computed or override).")
    unpriced_calls = models.BigIntegerField(default=0)
    input_tokens = models.BigIntegerField(default=0)
    output_tokens = models.BigIntegerField(default=0)
    cache_read_tokens = models.BigIntegerField(default=0)
    cache_write_tokens = models.BigIntegerField(default=0)
    reasoning_tokens = models.BigIntegerField(default=0)

    objects = ProjectOwnedQuerySet.as_manager()

    class Meta:
        abstract = True

    def __str__(self) -> str:
        return f"{self.day} {getattr(self, 'agent_name', '')} {getattr(self, 'model', '')}: ${self.cost_usd}"

    @property
    def cost_usd(self) -> Decimal:
        return usd(self.cost_nanos)


class CostDay(_RollupMeasures):
    """Spend per project day by agent, version, key, model and provider: every read that does not ask
    for end users (their number would make this table as long as the run log)."""

    project = models.ForeignKey("projects.Project", on_delete=models.CASCADE, related_name="+")
    day = models.DateField()
    agent_name = models.CharField(max_length=200, blank=True)
    agent_version = models.CharField(max_length=100, blank=True)
    api_key_id = models.BigIntegerField(default=0)
    model = models.CharField(max_length=200, blank=True)
    provider = models.CharField(max_length=100, blank=True)

    KEY = ("project_id", "day", "agent_name", "agent_version", "api_key_id", "model", "provider")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["project", "day", "agent_name", "agent_version",
                                                       "api_key_id", "model", "provider"],
                                               name="budgets_costday_key")]


class CostDayUser(_RollupMeasures):
    """The same with the end user: reads that group or filter by end user."""

    project = models.ForeignKey("projects.Project", on_delete=models.CASCADE, related_name="+")
    day = models.DateField()
    end_user = models.CharField(max_length=256, blank=True)
    agent_name = models.CharField(max_length=200, blank=True)
    agent_version = models.CharField(max_length=100, blank=True)
    api_key_id = models.BigIntegerField(default=0)
    model = models.CharField(max_length=200, blank=True)
    provider = models.CharField(max_length=100, blank=True)

    KEY = ("project_id", "day", "end_user", "agent_name", "agent_version", "api_key_id", "model", "provider")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["project", "day", "end_user", "agent_name", "agent_version",
                                                       "api_key_id", "model", "provider"],
                                               name="budgets_costdayuser_key")]
        indexes = [models.Index(fields=["project", "end_user", "day"], name="budgets_costdayuser_user")]


class CostDayEndUser(_RollupMeasures):
    """Spend per project day and end user alone: "who spent most" over weeks reads one row per user and
    day here, where ``CostDayUser`` holds one per user, day, agent, version, key and model."""

    project = models.ForeignKey("projects.Project", on_delete=models.CASCADE, related_name="+")
    day = models.DateField()
    end_user = models.CharField(max_length=256, blank=True)

    KEY = ("project_id", "day", "end_user")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["project", "day", "end_user"],
                                               name="budgets_costdayenduser_key")]


class CostHour(models.Model):
    """Spend per project hour for the whole project, each agent and each end user: what spikes are
    measured on (``scope`` "project" has ``value`` "")."""

    class Scope(models.TextChoices):
        PROJECT = "project"
        AGENT = "agent"
        END_USER = "end_user"

    project = models.ForeignKey("projects.Project", on_delete=models.CASCADE, related_name="+")
    day = models.DateField()
    hour = models.PositiveSmallIntegerField()
    scope = models.CharField(max_length=16, choices=Scope.choices)
    value = models.CharField(max_length=256, blank=True)
    cost_nanos = models.BigIntegerField(default=0)
    calls = models.BigIntegerField(default=0)

    objects = ProjectOwnedQuerySet.as_manager()

    KEY = ("project_id", "day", "hour", "scope", "value")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["project", "scope", "value", "day", "hour"],
                                               name="budgets_costhour_key")]

    def __str__(self) -> str:
        return f"{self.day} {self.hour:02d}h {self.scope} {self.value}: ${self.cost_usd}"

    @property
    def cost_usd(self) -> Decimal:
        return usd(self.cost_nanos)


class CostSpike(models.Model):
    """An hour or a day whose spend was far above its baseline, recorded once (not an audit event:
    no person changed anything)."""

    class Period(models.TextChoices):
        HOUR = "hour"
        DAY = "day"

    project = models.ForeignKey("projects.Project", on_delete=models.CASCADE, related_name="+")
    period = models.CharField(max_length=8, choices=Period.choices)
    day = models.DateField()
    hour = models.PositiveSmallIntegerField(null=True, blank=True, help_text="Empty for a day.")
    scope = models.CharField(max_length=16, choices=CostHour.Scope.choices)
    value = models.CharField(max_length=256, blank=True)
    spend_nanos = models.BigIntegerField()
    baseline_nanos = models.BigIntegerField()
    factor = models.DecimalField(max_digits=8, decimal_places=2, help_text="The threshold in force.")
    detected_at = models.DateTimeField(auto_now_add=True)
    webhook_status = models.CharField(max_length=200, blank=True)
    email_status = models.CharField(max_length=200, blank=True)

    objects = ProjectOwnedQuerySet.as_manager()

    class Meta:
        ordering = ["-day", "-hour", "-id"]
        constraints = [
            models.UniqueConstraint(fields=["project", "period", "scope", "value", "day", "hour"],
                                    condition=Q(period="hour"), name="budgets_spike_hour"),
            models.UniqueConstraint(fields=["project", "period", "scope", "value", "day"],
                                    condition=Q(period="day"), name="budgets_spike_day"),
        ]

    def __str__(self) -> str:
        when = f"{self.day} {self.hour:02d}:00" if self.period == self.Period.HOUR else str(self.day)
        who = f"{self.scope} {self.value}" if self.value else "project"
        return f"spike {who} {when}"

    @property
    def spend_usd(self) -> Decimal:
        return usd(self.spend_nanos)

    @property
    def baseline_usd(self) -> Decimal:
        return usd(self.baseline_nanos)


class Budget(models.Model):
    """A cap on spend in a period (a day, or a month) of the budget's time zone, for the whole project
    or one agent, end user, model or API key. A hard budget refuses a reservation that would take its
    period past the cap; a soft one only alerts. What a period has used is its ``BudgetLedger`` row."""

    class Scope(models.TextChoices):
        PROJECT = "project", "The whole project"
        AGENT = "agent", "One agent"
        END_USER = "end_user", "One end user"
        MODEL = "model", "One model"
        API_KEY = "api_key", "One API key"

    class Period(models.TextChoices):
        DAY = "day"
        MONTH = "month"

    project = models.ForeignKey("projects.Project", on_delete=models.CASCADE, related_name="budgets")
    name = models.CharField(max_length=100)
    scope = models.CharField(max_length=16, choices=Scope.choices, default=Scope.PROJECT)
    value = models.CharField(max_length=256, blank=True,
                             help_text="The agent's name, the end user, the model, or the API key's id; empty for "
                                       "the whole project.")
    period = models.CharField(max_length=8, choices=Period.choices, default=Period.DAY)
    cap_nanos = models.BigIntegerField(validators=[MinValueValidator(0)], help_text="nano-USD")
    time_zone = models.CharField(max_length=64, blank=True,
                                 help_text="Where the period's day starts (IANA name); empty: the project's.")
    hard = models.BooleanField(default=True, help_text="Refuse what would go past the cap (else alert only).")
    thresholds = models.JSONField(default=list, blank=True,
                                  help_text="Percentages of the cap whose crossing alerts, e.g. [80, 100].")
    enabled = models.BooleanField(default=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = ProjectOwnedQuerySet.as_manager()

    FIELDS = ("name", "scope", "value", "period", "cap_nanos", "time_zone", "hard", "thresholds", "enabled")

    class Meta:
        ordering = ["project", "name"]
        constraints = [models.UniqueConstraint(fields=["project", "name"], name="budgets_budget_name")]

    def __str__(self) -> str:
        what = f"{self.scope} {self.value}" if self.value else self.scope
        return f"{self.name} ({what}, ${usd(self.cap_nanos)}/{self.period})"

    @property
    def cap_usd(self) -> Decimal:
        return usd(self.cap_nanos)

    def clean(self) -> None:
        from apps.projects.models import validate_time_zone

        errors = {}
        if self.scope == self.Scope.PROJECT and self.value:
            errors["value"] = "A project budget names no value."
        if self.scope != self.Scope.PROJECT and not self.value:
            errors["value"] = f"A budget of one {self.scope.replace('_', ' ')} names it."
        if self.scope == self.Scope.API_KEY and self.value and not self.value.isdigit():
            errors["value"] = "An API key budget names the key's id."
        if self.time_zone:
            try:
                validate_time_zone(self.time_zone)
            except ValidationError as exc:
                errors["time_zone"] = exc.messages[0]
        if (not isinstance(self.thresholds, list) or len(self.thresholds) > 10
                or not all(isinstance(t, int) and not isinstance(t, bool) and 0 < t <= 1000 for t in self.thresholds)):
            errors["thresholds"] = "A list of at most 10 whole percentages (1 to 1000)."
        if errors:
            raise ValidationError(errors)

    def as_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.FIELDS}


class BudgetLedger(models.Model):
    """What one budget's period has used: charged (settled reservations), traced (spend that arrived
    through traces without a reservation) and held (reservations not yet settled). A reservation is
    one conditional upsert of these rows (``reservations.reserve``): used + held never passes a hard
    cap. ``cap_nanos`` and ``hard`` are the budget's at the last write."""

    project = models.ForeignKey("projects.Project", on_delete=models.CASCADE, related_name="+")
    budget = models.ForeignKey(Budget, on_delete=models.CASCADE, related_name="ledger")
    period_start = models.DateField(help_text="The period's first day in the budget's time zone.")
    cap_nanos = models.BigIntegerField()
    hard = models.BooleanField()
    charged_nanos = models.BigIntegerField(default=0)
    traced_nanos = models.BigIntegerField(default=0)
    held_nanos = models.BigIntegerField(default=0)
    reservations = models.BigIntegerField(default=0, help_text="Reservations admitted in the period.")

    objects = ProjectOwnedQuerySet.as_manager()

    class Meta:
        ordering = ["budget", "-period_start"]
        constraints = [models.UniqueConstraint(fields=["budget", "period_start"], name="budgets_ledger_period")]

    def __str__(self) -> str:
        return f"{self.budget_id} from {self.period_start}: ${usd(self.spent_nanos)} + ${usd(self.held_nanos)} held"

    @property
    def spent_nanos(self) -> int:
        return self.charged_nanos + self.traced_nanos


class Reservation(models.Model):
    """Money held for one call before it is made, then settled with what it cost (or released, or
    charged in full when it expires unsettled). Per call: not audited (the run log's, not a change)."""

    class State(models.TextChoices):
        HELD = "held"
        SETTLED = "settled"
        RELEASED = "released"
        EXPIRED = "expired"
        REFUSED = "refused"

    project = models.ForeignKey("projects.Project", on_delete=models.CASCADE, related_name="+")
    api_key_id = models.BigIntegerField(default=0)
    agent_name = models.CharField(max_length=200, blank=True)
    end_user = models.CharField(max_length=256, blank=True)
    model = models.CharField(max_length=200, blank=True)
    provider = models.CharField(max_length=100, blank=True)
    run_id = models.CharField(max_length=128, blank=True)
    state = models.CharField(max_length=16, choices=State.choices)
    estimate_nanos = models.BigIntegerField(help_text="What was held (an upper bound of the call's cost).")
    charged_nanos = models.BigIntegerField(null=True, blank=True)
    ledger_ids = models.JSONField(default=list, help_text="The ledger rows it holds on.")
    usage = models.JSONField(null=True, blank=True)
    refused_by = models.ForeignKey(Budget, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField()
    expires_at = models.DateTimeField()
    closed_at = models.DateTimeField(null=True, blank=True)

    objects = ProjectOwnedQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["expires_at"], name="budgets_reservation_due", condition=Q(state="held")),
            models.Index(fields=["project", "run_id"], name="budgets_reservation_run"),
            models.Index(fields=["project", "-created_at"], name="budgets_reservation_recent"),
        ]

    def __str__(self) -> str:
        return f"reservation {self.pk} {self.state} ${usd(self.estimate_nanos)}"

    @property
    def estimate_usd(self) -> Decimal:
        return usd(self.estimate_nanos)

    @property
    def charged_usd(self) -> Decimal | None:
        return usd(self.charged_nanos)


class BudgetAlert(models.Model):
    """A budget's period crossed one of its thresholds (recorded once per period and threshold)."""

    project = models.ForeignKey("projects.Project", on_delete=models.CASCADE, related_name="+")
    budget = models.ForeignKey(Budget, on_delete=models.CASCADE, related_name="alerts")
    period_start = models.DateField()
    threshold = models.PositiveSmallIntegerField(help_text="Percent of the cap.")
    spent_nanos = models.BigIntegerField()
    cap_nanos = models.BigIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)
    webhook_status = models.CharField(max_length=200, blank=True)
    email_status = models.CharField(max_length=200, blank=True)

    objects = ProjectOwnedQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [models.UniqueConstraint(fields=["budget", "period_start", "threshold"],
                                               name="budgets_alert_once")]

    def __str__(self) -> str:
        return f"{self.budget} at {self.threshold}% from {self.period_start}"

    @property
    def spent_usd(self) -> Decimal:
        return usd(self.spent_nanos)

    @property
    def cap_usd(self) -> Decimal:
        return usd(self.cap_nanos)
