"""What one span cost: reported by its producer, computed from its tokens at a price, or unpriced.

Prices come from the ``genai-prices`` package (offline, bundled: never a hand-written table here) or
from the project's own ``PriceOverride`` rows. A span's token counts follow the GenAI conventions:
``input_tokens`` is the whole prompt, cache reads and writes included, and ``output_tokens`` includes
reasoning; counts that cannot be that (input below its cache tokens, output below its reasoning) are
the other convention (Anthropic's input, Gemini's thoughts) and are added up first.

The price of a model that is flat per token (most) is read from the package once per model and
applied here in integer nano-USD (tested equal to the package's own figures); a tiered, dated or
otherwise special price goes through the package's ``calc_price``.
"""
from __future__ import annotations

import fnmatch
import importlib.metadata
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal
from functools import lru_cache
from zoneinfo import ZoneInfo

from genai_prices import Usage, data_snapshot

from apps.traces.models import NANOS_PER_USD, TOKEN_FIELDS
from apps.traces.records import parse_time

from .models import CostSource, PriceOverride

PRICES_VERSION = f"genai-prices {importlib.metadata.version('genai-prices')}"

# Span kinds whose tokens and costs are their children's totals (an agent's, a chain's): never priced.
AGGREGATE_KINDS = frozenset({"agent", "chain", "loop", "loop.move"})
# A loop iteration's reported cost (the loop convention's node cost) counts when no model call
# under it is priced itself; otherwise it is kept and shown but not counted (``rollups``).
LOOP_ITERATION = "loop.iteration"

# The GenAI conventions' provider names (gen_ai.provider.name / gen_ai.system) and common spellings,
# as genai-prices' provider ids.
PROVIDER_ALIASES = {
    "openai": "openai", "azure.ai.openai": "azure", "azure_openai": "azure", "az.ai.openai": "azure",
    "azure.ai.inference": "azure", "anthropic": "anthropic", "aws.bedrock": "aws", "bedrock": "aws",
    "gcp.gemini": "google", "gcp.vertex_ai": "google", "gcp.gen_ai": "google", "gemini": "google",
    "vertex_ai": "google", "google": "google", "mistral_ai": "mistral", "mistralai": "mistral",
    "mistral": "mistral", "groq": "groq", "deepseek": "deepseek", "x_ai": "x-ai", "xai": "x-ai",
    "x-ai": "x-ai", "cohere": "cohere", "perplexity": "perplexity", "together": "together",
    "together_ai": "together", "fireworks": "fireworks", "fireworks_ai": "fireworks", "openrouter": "openrouter",
    "cerebras": "cerebras", "moonshotai": "moonshotai", "moonshot": "moonshotai",
}
_FLAT_KEYS = frozenset({"input_mtok", "output_mtok", "cache_read_mtok", "cache_write_mtok"})
# Prices that do not depend on the tokens we price (searches are counted apart, and never sent).
_IGNORED_KEYS = frozenset({"web_searches_kcount", "storage_searches_kcount"})
_MTOK = Decimal(10**6)


@dataclass(frozen=True)
class Tokens:
    """A call's token counts in the package's convention (input includes cache, output reasoning)."""

    input: int
    output: int
    cache_read: int
    cache_write: int
    reasoning: int

    @classmethod
    def of(cls, usage: dict) -> Tokens:
        inp, out, read, write, reasoning = (int(usage.get(k) or 0) for k in TOKEN_FIELDS)
        if inp < read + write:
            inp += read + write
        if out < reasoning:
            out += reasoning
        return cls(inp, out, read, write, reasoning)

    def as_usage(self) -> Usage:
        return Usage(input_tokens=self.input, output_tokens=self.output, cache_read_tokens=self.cache_read,
                     cache_write_tokens=self.cache_write, output_reasoning_tokens=self.reasoning)


@dataclass(frozen=True)
class Priced:
    source: str
    cost_nanos: int | None
    computed_nanos: int | None = None
    reported_nanos: int | None = None
    price_ref: str = ""
    disagreement: bool = False


def to_nanos(amount: Decimal) -> int:
    return int((amount * NANOS_PER_USD).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


@lru_cache(maxsize=4096)
def _model(model: str, provider_id: str | None):
    """(provider, model info) from the package, or None when it does not know them."""
    try:
        return data_snapshot.get_snapshot().find_provider_model(model, None, provider_id, None)
    except LookupError:
        return None


@lru_cache(maxsize=4096)
def _flat_rates(model: str, provider_id: str | None) -> tuple[int, int, int, int] | None:
    """Nano-USD per token (input, output, cache read, cache write) when the model's price is flat, has
    no date conditions and whole nano-USD per token; else None (the package computes it)."""
    found = _model(model, provider_id)
    if found is None:
        return None
    prices = found[1].prices
    if isinstance(prices, list):
        return None
    keys = {k for k, v in vars(prices).items() if v is not None and not k.startswith("_")}
    if not keys <= _FLAT_KEYS | _IGNORED_KEYS or not all(isinstance(getattr(prices, k), Decimal)
                                                         for k in keys & _FLAT_KEYS):
        return None
    per_token = []
    for key in ("input_mtok", "output_mtok", "cache_read_mtok", "cache_write_mtok"):
        value = getattr(prices, key, None)
        if value is None:
            value = prices.input_mtok if key.startswith("cache") else None
        if value is None:
            return None
        rate = value * NANOS_PER_USD / _MTOK
        if rate != rate.to_integral_value():
            return None
        per_token.append(int(rate))
    return tuple(per_token)  # type: ignore[return-value]


def package_price(tokens: Tokens, model: str, provider: str, when: datetime) -> tuple[int, str] | None:
    """(nano-USD, price reference) from genai-prices, or None for a model or provider it does not know."""
    provider_id = PROVIDER_ALIASES.get(provider.lower(), provider.lower()) if provider else None
    found = _model(model, provider_id)
    if found is None:
        return None
    prov, info = found
    ref = f"{PRICES_VERSION} {prov.id}/{info.id}"
    rates = _flat_rates(model, provider_id)
    if rates is not None:
        r_in, r_out, r_read, r_write = rates
        uncached = tokens.input - tokens.cache_read - tokens.cache_write
        return (uncached * r_in + tokens.cache_read * r_read + tokens.cache_write * r_write
                + tokens.output * r_out), ref
    calc = info.calc_price(tokens.as_usage(), prov, genai_request_timestamp=when)
    return to_nanos(calc.total_price), ref


def override_price(tokens: Tokens, o: PriceOverride) -> int:
    read = o.cache_read_per_mtok if o.cache_read_per_mtok is not None else o.input_per_mtok
    write = o.cache_write_per_mtok if o.cache_write_per_mtok is not None else o.input_per_mtok
    reasoning = o.reasoning_per_mtok if o.reasoning_per_mtok is not None else o.output_per_mtok
    uncached = tokens.input - tokens.cache_read - tokens.cache_write
    usd = (uncached * o.input_per_mtok + tokens.cache_read * read + tokens.cache_write * write
           + (tokens.output - tokens.reasoning) * o.output_per_mtok + tokens.reasoning * reasoning) / _MTOK
    return to_nanos(usd)


def is_model_call(eff: dict) -> bool:
    """A span that is priced: a model call (or an iteration that reported its cost)."""
    return eff.get("kind") not in AGGREGATE_KINDS and bool(
        eff.get("usage") or eff.get("model") or eff.get("response_model") or eff.get("cost_usd") is not None)


def priced_model(eff: dict) -> str:
    """The model a call is named by in costs: what answered (the response model), else what was asked for."""
    return eff.get("response_model") or eff.get("model") or ""


def model_names(eff: dict) -> list[str]:
    """The names to look a call's price up by, in order: the response model (what answered, often a
    dated snapshot), then the requested model (when the database does not know the snapshot)."""
    return list(dict.fromkeys(n for n in (eff.get("response_model"), eff.get("model")) if n))


class Pricer:
    """Prices the spans of one project (its overrides read once, on first need)."""

    def __init__(self, project_id: int, tz: ZoneInfo, margin: Decimal) -> None:
        self.project_id = project_id
        self.tz = tz
        self.margin = margin
        self._overrides: list[PriceOverride] | None = None

    def overrides(self) -> list[PriceOverride]:
        if self._overrides is None:
            self._overrides = list(PriceOverride.objects.filter(project_id=self.project_id)
                                   .order_by("-effective_from", "-id"))
        return self._overrides

    def override_for(self, model: str, provider: str, day) -> PriceOverride | None:
        """The latest override in force that day; among those of one date, a named provider first,
        then the longest pattern (the most specific)."""
        best = None
        for o in self.overrides():
            if o.effective_from > day:
                continue
            if o.provider and o.provider.lower() != provider.lower():
                continue
            if not fnmatch.fnmatchcase(model.lower(), o.model_pattern.lower()):
                continue
            rank = (o.effective_from, bool(o.provider), len(o.model_pattern))
            if best is None or rank > best[0]:
                best = (rank, o)
        return best[1] if best else None

    def price(self, eff: dict) -> Priced | None:
        """The span's cost, or None when it is no model call (nothing to price) or an open one that
        has told neither usage nor cost yet."""
        if not is_model_call(eff):
            return None
        reported = to_nanos(Decimal(eff["cost_usd"])) if eff.get("cost_usd") is not None else None
        usage = eff.get("usage") or {}
        names, provider = model_names(eff), eff.get("provider") or ""
        model = names[0] if names else ""
        computed = ref = None
        source = CostSource.UNPRICED
        if usage and names:
            tokens = Tokens.of(usage)
            when = parse_time(eff["start_time"])
            day = when.astimezone(self.tz).date()
            override = next((o for o in (self.override_for(n, provider, day) for n in names) if o), None)
            if override is not None:
                computed, ref, source = override_price(tokens, override), f"override #{override.pk}", CostSource.OVERRIDE
            else:
                found = next((f for f in (package_price(tokens, n, provider, when) for n in names) if f), None)
                if found is not None:
                    (computed, ref), source = found, CostSource.COMPUTED
        if reported is not None:
            disagree = computed is not None and abs(reported - computed) > self.margin * max(reported, computed)
            return Priced(CostSource.REPORTED, reported, computed, reported, ref or "", disagree)
        if computed is not None:
            return Priced(source, computed, computed, None, ref)
        if not usage and not eff.get("end_time"):
            return None  # still open: its usage may come with its end
        why = ("no usage reported" if not usage else "no model named" if not model
               else f"{PRICES_VERSION} does not know {provider or '?'}/{model}")
        return Priced(CostSource.UNPRICED, None, None, None, why)
