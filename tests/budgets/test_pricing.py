"""Pricing against genai-prices' own figures: cached, cache-write and reasoning tokens each at their
price, both token conventions, a tiered price, an unknown model, a reported cost, an override."""
from __future__ import annotations

import random
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest
from genai_prices import Usage, calc_price, data_snapshot
from hypothesis import given, settings
from hypothesis import strategies as st

from apps.budgets import pricing
from apps.budgets.models import CostSource, PriceOverride
from apps.budgets.pricing import PRICES_VERSION, Pricer, Tokens
from apps.traces.models import NANOS_PER_USD

WHEN = "2026-11-20T12:00:00+00:00"
UTC_TZ = UTC


def _call(model: str, provider: str, **usage) -> dict:
    return {"span_id": "s1", "kind": "llm", "name": "chat", "start_time": WHEN, "end_time": WHEN,
            "model": model, "provider": provider, "usage": usage}


def _pricer(margin: str = "0.05") -> Pricer:
    p = Pricer(project_id=0, tz=UTC_TZ, margin=Decimal(margin))
    p._overrides = []  # no database: overrides are tested below with real rows
    return p


def _theirs(model: str, provider: str, **usage) -> int:
    total = calc_price(Usage(**usage), model, provider_id=provider,
                       genai_request_timestamp=datetime.fromisoformat(WHEN)).total_price
    return int(total * NANOS_PER_USD)


# Three real models of three providers, each with cache reads, cache writes and reasoning tokens,
# in the GenAI conventions' counting (input includes the cached tokens; output includes reasoning).
CASES = [
    ("gpt-4o", "openai", "openai", {"input_tokens": 12_000, "cache_read_tokens": 8_000, "output_tokens": 900}),
    ("o3", "openai", "openai", {"input_tokens": 5_000, "cache_read_tokens": 1_000, "output_tokens": 4_000,
                                "reasoning_tokens": 3_000}),
    ("claude-sonnet-4-20250514", "anthropic", "anthropic",
     {"input_tokens": 30_000, "cache_read_tokens": 20_000, "cache_write_tokens": 6_000, "output_tokens": 1_200}),
    ("gemini-2.5-flash", "gcp.gemini", "google",
     {"input_tokens": 40_000, "cache_read_tokens": 10_000, "output_tokens": 3_000, "reasoning_tokens": 2_500}),
]


@pytest.mark.parametrize(("model", "provider", "their_provider", "usage"), CASES, ids=[c[0] for c in CASES])
def test_a_call_costs_what_genai_prices_says(model, provider, their_provider, usage):
    priced = _pricer().price(_call(model, provider, **usage))
    expected = _theirs(model, their_provider, input_tokens=usage["input_tokens"],
                       output_tokens=usage["output_tokens"], cache_read_tokens=usage.get("cache_read_tokens", 0),
                       cache_write_tokens=usage.get("cache_write_tokens", 0),
                       output_reasoning_tokens=usage.get("reasoning_tokens", 0))
    assert priced.source == CostSource.COMPUTED
    assert priced.cost_nanos == expected > 0
    assert priced.price_ref.startswith(PRICES_VERSION + " " + their_provider + "/")


def test_gpt_4o_in_figures():
    """12,000 prompt tokens of which 8,000 cached, 900 out: 4,000 x $2.50 + 8,000 x $1.25 + 900 x $10 per
    million = $0.029 (the cache read is half price; priced as input it would be $0.039)."""
    priced = _pricer().price(_call("gpt-4o", "openai", input_tokens=12_000, cache_read_tokens=8_000,
                                   output_tokens=900))
    assert priced.cost_nanos == 29_000_000


def test_cache_writes_cost_more_than_input_and_reads_less():
    base = dict(output_tokens=0)
    price = _pricer().price
    plain = price(_call("claude-sonnet-4-20250514", "anthropic", input_tokens=10_000, **base)).cost_nanos
    written = price(_call("claude-sonnet-4-20250514", "anthropic", input_tokens=10_000, cache_write_tokens=10_000,
                          **base)).cost_nanos
    read = price(_call("claude-sonnet-4-20250514", "anthropic", input_tokens=10_000, cache_read_tokens=10_000,
                       **base)).cost_nanos
    assert (read, plain, written) == (3_000_000, 30_000_000, 37_500_000)


def test_anthropic_counting_without_the_cached_tokens_prices_the_same():
    """Anthropic's input_tokens exclude cache reads and writes; a count below them is read that way."""
    price = _pricer().price
    inclusive = price(_call("claude-sonnet-4-20250514", "anthropic", input_tokens=1_000, cache_read_tokens=5_000,
                            cache_write_tokens=2_000, output_tokens=100))
    exclusive = price(_call("claude-sonnet-4-20250514", "anthropic", input_tokens=8_000, cache_read_tokens=5_000,
                            cache_write_tokens=2_000, output_tokens=100))
    assert inclusive.cost_nanos == exclusive.cost_nanos


def test_reasoning_counted_apart_from_output_is_added_to_it():
    price = _pricer().price
    apart = price(_call("o3", "openai", input_tokens=100, output_tokens=50, reasoning_tokens=400))
    within = price(_call("o3", "openai", input_tokens=100, output_tokens=450, reasoning_tokens=400))
    assert apart.cost_nanos == within.cost_nanos == _theirs("o3", "openai", input_tokens=100, output_tokens=450)


def test_a_tiered_price_is_the_package_s():
    """Gemini 2.5 Pro costs more per token above 200,000 prompt tokens."""
    small = _pricer().price(_call("gemini-2.5-pro", "google", input_tokens=100_000, output_tokens=1_000))
    large = _pricer().price(_call("gemini-2.5-pro", "google", input_tokens=300_000, output_tokens=1_000))
    assert small.cost_nanos == _theirs("gemini-2.5-pro", "google", input_tokens=100_000, output_tokens=1_000)
    assert large.cost_nanos == _theirs("gemini-2.5-pro", "google", input_tokens=300_000, output_tokens=1_000)
    assert large.cost_nanos > 3 * small.cost_nanos  # the higher tier, not the base price x 3


def test_an_unknown_model_is_unpriced_never_zero():
    priced = _pricer().price(_call("acme-llm-7b", "openai", input_tokens=1_000, output_tokens=10))
    assert priced.source == CostSource.UNPRICED and priced.cost_nanos is None
    assert "acme-llm-7b" in priced.price_ref


def test_an_unknown_provider_is_unpriced():
    priced = _pricer().price(_call("gpt-4o", "some-proxy", input_tokens=1_000, output_tokens=10))
    assert priced.source == CostSource.UNPRICED and priced.cost_nanos is None


def test_a_closed_call_without_usage_is_unpriced_and_an_open_one_waits():
    call = _call("gpt-4o", "openai")
    call.pop("usage")
    assert _pricer().price(call).source == CostSource.UNPRICED
    call.pop("end_time")
    assert _pricer().price(call) is None


def test_a_reported_cost_wins_and_a_disagreement_is_flagged_not_averaged():
    tokens = dict(input_tokens=12_000, cache_read_tokens=8_000, output_tokens=900)  # $0.029 computed
    close = _pricer().price({**_call("gpt-4o", "openai", **tokens), "cost_usd": "0.029500000"})
    far = _pricer().price({**_call("gpt-4o", "openai", **tokens), "cost_usd": "0.058000000"})
    assert (close.source, close.cost_nanos, close.computed_nanos, close.disagreement) == (
        CostSource.REPORTED, 29_500_000, 29_000_000, False)
    assert (far.source, far.cost_nanos, far.computed_nanos, far.disagreement) == (
        CostSource.REPORTED, 58_000_000, 29_000_000, True)
    only = _pricer().price({"span_id": "x", "kind": "llm", "name": "x", "start_time": WHEN, "cost_usd": "0.5"})
    assert (only.source, only.cost_nanos, only.disagreement) == (CostSource.REPORTED, 500_000_000, False)


def test_aggregate_spans_are_never_priced():
    agent = {**_call("gpt-4o", "openai", input_tokens=10), "kind": "agent"}
    assert _pricer().price(agent) is None


@pytest.mark.django_db
def test_an_override_applies_from_its_date_and_the_most_specific_wins(project):
    PriceOverride.objects.create(project=project, model_pattern="gpt-4o*", effective_from=date(2026, 11, 21),
                                 input_per_mtok=Decimal("1"), output_per_mtok=Decimal("2"))
    exact = PriceOverride.objects.create(project=project, provider="openai", model_pattern="gpt-4o",
                                         effective_from=date(2026, 11, 21), input_per_mtok=Decimal("0.5"),
                                         output_per_mtok=Decimal("1"), cache_read_per_mtok=Decimal("0.1"))
    p = Pricer(project.pk, UTC_TZ, Decimal("0.05"))
    before = p.price(_call("gpt-4o", "openai", input_tokens=1_000_000, output_tokens=1_000_000))
    assert before.source == CostSource.COMPUTED  # 2026-11-20: no override yet
    later = {**_call("gpt-4o", "openai", input_tokens=1_000_000, cache_read_tokens=500_000,
                     output_tokens=1_000_000), "start_time": "2026-11-22T00:00:00+00:00"}
    priced = p.price(later)
    assert (priced.source, priced.price_ref) == (CostSource.OVERRIDE, f"override #{exact.pk}")
    assert priced.cost_nanos == (500_000 * 500 + 500_000 * 100 + 1_000_000 * 1000)  # nano-USD per token x tokens
    mini = p.price({**later, "model": "gpt-4o-mini"})
    assert mini.source == CostSource.OVERRIDE and mini.cost_nanos == 1_000_000 * 1000 + 1_000_000 * 2000


def _flat_models(limit: int = 300) -> list[tuple[str, str]]:
    out = []
    for provider in data_snapshot.get_snapshot().providers:
        for model in provider.models:
            if pricing._flat_rates(model.id, provider.id) is not None:
                out.append((model.id, provider.id))
    random.Random(7).shuffle(out)
    return out[:limit]


def _as_the_package(model: str, provider: str, tokens: Tokens) -> None:
    """Our price of ``tokens`` equals genai-prices' own calc_price, to the nano-USD."""
    ours = pricing.package_price(tokens, model, provider, datetime.fromisoformat(WHEN))
    found = pricing._model(model, provider)
    theirs = found[1].calc_price(tokens.as_usage(), found[0], genai_request_timestamp=datetime.fromisoformat(WHEN))
    assert ours[0] == int(theirs.total_price * NANOS_PER_USD)


FLAT = _flat_models()
# Models whose price also names units a span never reports (1-hour cache writes, audio, images).
EXTRA_UNITS = [(m, p) for m, p in _flat_models(limit=10_000)
               if any(k.endswith("_mtok") and k not in ("input_mtok", "output_mtok", "cache_read_mtok", "cache_write_mtok")
                      and v is not None for k, v in vars(pricing._model(m, p)[1].prices).items())]
TIERED = [(m, p) for m, p in _flat_models(limit=10_000) if any(r[1] for r in pricing._flat_rates(m, p))]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(FLAT), st.integers(0, 2_000_000), st.integers(0, 500_000), st.integers(0, 100_000),
       st.integers(0, 100_000), st.integers(0, 200_000))
def test_the_flat_price_path_equals_the_package_for_any_usage(model_provider, uncached, out, read, write, reasoning):
    """Per-token prices (flat or tiered) are applied here in integers; for any usage they equal the package's calc_price."""
    model, provider = model_provider
    tokens = Tokens(input=uncached + read + write, output=out + reasoning, cache_read=read, cache_write=write,
                    reasoning=reasoning)
    _as_the_package(model, provider, tokens)


def test_a_response_model_the_database_does_not_know_falls_back_to_the_requested_one():
    call = {**_call("gpt-4o", "openai", input_tokens=12_000, cache_read_tokens=8_000, output_tokens=900),
            "response_model": "gpt-4o-2031-01-01"}
    assert _pricer().price(call).cost_nanos == 29_000_000
    snapshot = {**call, "response_model": "gpt-4o-mini"}  # a known response model wins over the request
    assert _pricer().price(snapshot).cost_nanos < 29_000_000


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(TIERED), st.integers(0, 1_500_000), st.integers(0, 100_000), st.integers(0, 300_000))
def test_tiered_prices_switch_tier_at_the_package_s_threshold(model_provider, uncached, out, read):
    """A prompt past a tier's start pays that tier's rate on all its tokens, as the package computes it."""
    model, provider = model_provider
    tokens = Tokens(input=uncached + read, output=out, cache_read=read, cache_write=0, reasoning=0)
    _as_the_package(model, provider, tokens)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(EXTRA_UNITS), st.integers(0, 500_000), st.integers(0, 50_000), st.integers(0, 50_000),
       st.integers(0, 50_000), st.integers(0, 50_000))
def test_prices_of_units_a_span_never_reports_add_nothing(model_provider, uncached, out, read, write, reasoning):
    model, provider = model_provider
    tokens = Tokens(input=uncached + read + write, output=out + reasoning, cache_read=read, cache_write=write,
                    reasoning=reasoning)
    _as_the_package(model, provider, tokens)
