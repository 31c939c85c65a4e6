"""What one span cost: reported by its producer, computed from its tokens at a price, or unpriced.

Prices come from the ``genai-prices`` package (offline, bundled: never a hand-written table here) or
from the project's own ``PriceOverride`` rows. A span's token counts follow the GenAI conventions:
``input_tokens`` is the whole prompt, cache reads and writes included, and ``output_tokens`` includes
reasoning; counts that cannot be that (input below its cache tokens, output below its reasoning) are
the other convention (Anthropic's input, Gemini's thoughts) and are added up first.

The price of a model per token (flat, or tiered by the prompt's size: most) is read from the package
once per model and applied here in integer nano-USD (tested equal to the package's own figures for any
usage); a dated or otherwise special price goes through the package's ``calc_price`` (~0.2 ms a call).
"""
from __future__ import annotations

import fnmatch
import importlib.metadata
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal
from functools import lru_cache
from typing import NamedTuple
from zoneinfo import ZoneInfo

from genai_prices import Usage, data_snapshot
from genai_prices.types import TieredPrices

from apps.traces.models import NANOS_PER_USD
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
# Prices of what a span never reports, so counted as none (searches, and the audio, image, video and
# 1-hour-cache shares of the tokens; our counts are all text): they add nothing to a call's price.
# (Held to the package's figures by tests/budgets/test_pricing.py for the models that have them.)
_IGNORED_KEYS = frozenset({"web_searches_kcount", "storage_searches_kcount"})


def _ignored(key: str) -> bool:
    """A price of a share of the tokens a span never reports (its audio, image or video tokens, or 1-hour
    cache writes). Text and reasoning prices apply to what we send: those take the package's path."""
    return key in _IGNORED_KEYS or (key.endswith("_mtok") and "reasoning" not in key and "text" not in key
                                    and any(w in key for w in ("audio", "image", "video", "_1h_")))
_MTOK = Decimal(10**6)


class Tokens(NamedTuple):
    """A call's token counts in the package's convention (input includes cache, output reasoning).
    (A named tuple: one is made per priced call, in the projection.)"""

    input: int
    output: int
    cache_read: int
    cache_write: int
    reasoning: int

    @classmethod
    def of(cls, usage: dict) -> Tokens:
        get = usage.get
        inp, out, read, write, reasoning = (get("input_tokens") or 0, get("output_tokens") or 0,
                                            get("cache_read_tokens") or 0, get("cache_write_tokens") or 0,
                                            get("reasoning_tokens") or 0)
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


Rate = tuple[int, tuple[tuple[int, int], ...]]  # nano-USD per token, and (tier start, rate) above it


def _rate(value) -> Rate | None:
    """A per-million-token price as nano-USD per token (whole, or None), with its tiers if any."""
    def whole(price: Decimal) -> int | None:
        rate = price * NANOS_PER_USD / _MTOK
        return int(rate) if rate == rate.to_integral_value() else None

    if isinstance(value, Decimal):
        base = whole(value)
        return None if base is None else (base, ())
    if isinstance(value, TieredPrices):
        base, tiers = whole(value.base), [(t.start, whole(t.price)) for t in value.tiers]
        if base is None or any(r is None for _, r in tiers):
            return None
        return base, tuple(tiers)  # type: ignore[return-value]
    return None


def _at(rate: Rate, input_tokens: int) -> int:
    """The rate in force for a call of ``input_tokens`` prompt tokens: past a tier's start, that tier's
    rate applies to all the tokens (the package's "cliff" tiers)."""
    base, tiers = rate
    for start, tier_rate in reversed(tiers):
        if input_tokens > start:
            return tier_rate
    return base


@lru_cache(maxsize=4096)
def _flat_rates(model: str, provider_id: str | None) -> tuple[Rate, Rate, Rate, Rate] | None:
    """Nano-USD per token (input, output, cache read, cache write), each possibly tiered by the prompt's
    size, when the model's price has no date conditions and whole nano-USD per token; else None (the
    package computes it)."""
    found = _model(model, provider_id)
    if found is None:
        return None
    prices = found[1].prices
    if isinstance(prices, list):
        return None  # dated prices: the package picks the one in force
    # (Price variants, such as service tiers, apply only to a request that names one; ours never do.)
    keys = {k for k, v in vars(prices).items() if v is not None and not k.startswith("_")}
    if not all(k in _FLAT_KEYS or _ignored(k) for k in keys):
        return None
    rates = []
    for key in ("input_mtok", "output_mtok", "cache_read_mtok", "cache_write_mtok"):
        value = getattr(prices, key, None)
        if value is None and key.startswith("cache"):
            value = prices.input_mtok
        rate = _rate(value)
        if rate is None:
            return None
        rates.append(rate)
    return tuple(rates)  # type: ignore[return-value]


@lru_cache(maxsize=4096)
def _lookup(model: str, provider: str) -> tuple | None:
    """(provider, model info, price reference, per-token rates or None) for a model as a span names it
    and its provider as sent; None when the package knows neither. Once per name pair."""
    provider_id = PROVIDER_ALIASES.get(provider.lower(), provider.lower()) if provider else None
    found = _model(model, provider_id)
    if found is None:
        return None
    prov, info = found
    rates = _flat_rates(model, provider_id)
    if rates is not None:  # (the four rates themselves when none is tiered: most models)
        rates = (None if any(tiers for _, tiers in rates) else tuple(base for base, _ in rates)), rates
    return prov, info, f"{PRICES_VERSION} {prov.id}/{info.id}", rates


def package_price(tokens: Tokens, model: str, provider: str, when: datetime | str) -> tuple[int, str] | None:
    """(nano-USD, price reference) from genai-prices, or None for a model or provider it does not know.
    ``when`` (a datetime or the record's time string) matters only to dated prices."""
    found = _lookup(model, provider)
    if found is None:
        return None
    prov, info, ref, rates = found
    if rates is not None:
        flat, rates = rates
        r_in, r_out, r_read, r_write = flat or [_at(r, tokens.input) for r in rates]
        uncached = tokens.input - tokens.cache_read - tokens.cache_write
        return (uncached * r_in + tokens.cache_read * r_read + tokens.cache_write * r_write
                + tokens.output * r_out), ref
    calc = info.calc_price(tokens.as_usage(), prov,
                           genai_request_timestamp=parse_time(when) if isinstance(when, str) else when)
    return to_nanos(calc.total_price), ref


def override_price(tokens: Tokens, o: PriceOverride) -> int:
    read = o.cache_read_per_mtok if o.cache_read_per_mtok is not None else o.input_per_mtok
    write = o.cache_write_per_mtok if o.cache_write_per_mtok is not None else o.input_per_mtok
    reasoning = o.reasoning_per_mtok if o.reasoning_per_mtok is not None else o.output_per_mtok
    uncached = tokens.input - tokens.cache_read - tokens.cache_write
    usd = (uncached * o.input_per_mtok + tokens.cache_read * read + tokens.cache_write * write
           + (tokens.output - tokens.reasoning) * o.output_per_mtok + tokens.reasoning * reasoning) / _MTOK
    return to_nanos(usd)


def _highest(rate: Rate) -> int:
    base, tiers = rate
    return max([base, *(r for _, r in tiers)])


def package_estimate(model: str, provider: str, input_tokens: int, max_output_tokens: int,
                     when: datetime) -> tuple[int, str] | None:
    """An upper bound of what a call can cost at genai-prices' price: every prompt token at the dearer
    of the input and cache-write prices, every output token at the output price, each at its highest
    tier. None for a model the package does not know."""
    found = _lookup(model, provider)
    if found is None:
        return None
    prov, info, ref, rates = found
    if rates is not None:
        r_in, r_out, _, r_write = (_highest(r) for r in rates[1])
        return input_tokens * max(r_in, r_write) + max_output_tokens * r_out, ref
    worst = 0
    for tokens in (Tokens(input_tokens, max_output_tokens, 0, 0, 0),
                   Tokens(input_tokens, max_output_tokens, 0, input_tokens, 0),
                   Tokens(input_tokens, max_output_tokens, 0, 0, max_output_tokens)):
        worst = max(worst, to_nanos(info.calc_price(tokens.as_usage(), prov, genai_request_timestamp=when).total_price))
    return worst, ref


def override_estimate(o: PriceOverride, input_tokens: int, max_output_tokens: int) -> int:
    """The same upper bound at a project's own price."""
    in_rate = max(o.input_per_mtok, o.cache_write_per_mtok if o.cache_write_per_mtok is not None else 0)
    out_rate = max(o.output_per_mtok, o.reasoning_per_mtok if o.reasoning_per_mtok is not None else 0)
    return to_nanos((input_tokens * in_rate + max_output_tokens * out_rate) / _MTOK)


def is_model_call(eff: dict) -> bool:
    """A span that is priced: a model call (or an iteration that reported its cost)."""
    return eff.get("kind") not in AGGREGATE_KINDS and bool(
        eff.get("usage") or eff.get("model") or eff.get("response_model") or eff.get("cost_usd") is not None)


def priced_model(eff: dict) -> str:
    """The model a call is named by in costs: what answered (the response model), else what was asked for."""
    return eff.get("response_model") or eff.get("model") or ""


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

    def estimate(self, model: str, provider: str, input_tokens: int, max_output_tokens: int,
                 when: datetime) -> tuple[int, str] | None:
        """(nano-USD, price reference): the most a call of this model can cost, or None (unpriced)."""
        override = self.override_for(model, provider, when.astimezone(self.tz).date()) if self.overrides() else None
        if override is not None:
            return override_estimate(override, input_tokens, max_output_tokens), f"override #{override.pk}"
        return package_estimate(model, provider, input_tokens, max_output_tokens, when)

    def price(self, eff: dict) -> Priced | None:
        """The span's cost, or None when it is no model call (nothing to price) or an open one that
        has told neither usage nor cost yet."""
        # (Runs once per changed span inside the projection: is_model_call and model_names inlined.)
        get = eff.get
        usage, response_model, requested, cost = get("usage"), get("response_model"), get("model"), get("cost_usd")
        if get("kind") in AGGREGATE_KINDS or not (usage or response_model or requested or cost is not None):
            return None
        reported = to_nanos(Decimal(cost)) if cost is not None else None
        names = ((response_model, requested) if response_model and requested and response_model != requested
                 else (response_model or requested,) if response_model or requested else ())
        provider = get("provider") or ""
        model = names[0] if names else ""
        computed = ref = None
        source = CostSource.UNPRICED
        if usage and names:
            tokens = Tokens.of(usage)
            override = None
            if self.overrides():
                day = parse_time(eff["start_time"]).astimezone(self.tz).date()
                override = next((o for o in (self.override_for(n, provider, day) for n in names) if o), None)
            if override is not None:
                computed, ref, source = override_price(tokens, override), f"override #{override.pk}", CostSource.OVERRIDE
            else:
                for name in names:
                    found = package_price(tokens, name, provider, eff["start_time"])
                    if found is not None:
                        (computed, ref), source = found, CostSource.COMPUTED
                        break
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
