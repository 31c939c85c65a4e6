"""Formatting for the product's pages: durations, token counts, rates, money and JSON."""
from __future__ import annotations

import json
from decimal import Decimal, InvalidOperation

from django import template

register = template.Library()


@register.filter
def duration(ms) -> str:
    """Milliseconds as a short human duration: 840 ms, 1.2 s, 3 min 20 s, 2 h 5 min."""
    if ms is None or ms == "":
        return "—"
    ms = float(ms)
    if ms < 1000:
        return f"{ms:.0f} ms"
    s = ms / 1000
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60)} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"


@register.filter
def num(value) -> str:
    """An integer with thin grouping (12 345), or — for none."""
    if value is None or value == "":
        return "—"
    return f"{int(value):,}".replace(",", "\u202f")


@register.filter
def pct(rate) -> str:
    """A 0..1 rate as a percentage, or — when there is none."""
    if rate is None or rate == "":
        return "—"
    return f"{float(rate) * 100:.0f} %"


@register.filter
def usd(amount) -> str:
    """US dollars as people read a bill: $1,234.56 from a dollar up, four decimals below ($0.0290),
    four significant digits under a cent ($0.001235, $0.000012), — for none (unpriced, not zero)."""
    if amount is None or amount == "":
        return "—"
    try:
        value = Decimal(str(amount))
    except InvalidOperation:
        return "—"
    sign, value = ("-", -value) if value < 0 else ("", value)
    if value >= 1:
        text = f"{value:,.2f}"
    elif value == 0:
        text = "0.00"
    elif value >= Decimal("0.01"):
        text = f"{value:.4f}"
    else:
        digits = max(4 - value.adjusted() - 1, 4)  # four significant digits after the leading zeros
        text = f"{value:.{digits}f}".rstrip("0")
    return f"{sign}${text}"


@register.filter
def prettyjson(value) -> str:
    """JSON, indented, for a <pre> (escaped by the template as usual)."""
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False, default=str)


@register.filter
def getitem(mapping, key):
    """``mapping[key]`` in a template (a key held in a variable), or "" when absent."""
    try:
        return mapping[key]
    except (KeyError, IndexError, TypeError):
        return ""


@register.simple_tag(takes_context=True)
def query_with(context, **changes) -> str:
    """The current query string with ``changes`` applied (None removes a key), for links that keep filters."""
    query = context["request"].GET.copy()
    for key, value in changes.items():
        if value is None:
            query.pop(key, None)
        else:
            query[key] = value
    return query.urlencode()
