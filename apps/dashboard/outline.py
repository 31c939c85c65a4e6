"""HTML drawn in Python where a template loop would be the page's cost: a run's span tree can hold
thousands of rows (a 5,000-span run renders in a fraction of the template engine's time this way)."""
from __future__ import annotations

from html import escape  # the stdlib's: Django's is wrapped for lazy text, a cost per call in these loops

from django.utils.safestring import SafeString, mark_safe

from apps.budgets.models import usd as nanos_to_usd

from .templatetags.dashboard import usd

# Above this many spans the tree opens collapsed below its first level (the rows are all there; a
# click unfolds them), so a huge run is readable at once.
COLLAPSE_ABOVE = 300


def display_status(span: dict) -> str:
    """A span's status as a person reads it: one never given a status is running until it ends, done after."""
    if span["status"] != "unset":
        return span["status"]
    return "done" if span.get("end_time") else "running"


def _duration(ms: float | None) -> str:
    if ms is None:
        return "running"
    return f"{ms:.0f} ms" if ms < 1000 else f"{ms / 1000:.1f} s"


def span_cost(cost) -> str:
    """A priced span's cost in the tree (a ``budgets.models.SpanCost``, or None: nothing to price): the
    amount, and how it was decided in its tooltip; "unpriced" (never $0) when no price was found, and a
    mark when the producer's reported cost disagrees with its tokens."""
    if cost is None:
        return ""
    if cost.cost_nanos is None:
        return f'<span class="cost unpriced" title="unpriced: {escape(cost.price_ref)}">unpriced</span>'
    title = f"{cost.source}" + (f" · {cost.price_ref}" if cost.price_ref else "")
    if cost.disagreement:
        title += (f" · reported {usd(nanos_to_usd(cost.reported_nanos))}, the tokens say "
                  f"{usd(nanos_to_usd(cost.computed_nanos))}")
    mark = '<span class="disagrees" aria-label="disagrees">≠</span>' if cost.disagreement else ""
    return (f'<span class="cost source-{escape(cost.source)}" title="{escape(title)}">{mark}'
            f'{usd(cost.cost_usd)}</span>')


def span_tree(spans: list[dict], *, selected: str | None = None, costs: dict | None = None) -> SafeString:
    """The span tree as a flat list of rows (tree order, ``depth`` as indentation): a node's row has a
    toggle that hides or shows its descendants (static/dashboard/run.js); each row selects its span.
    ``costs``: the run's priced spans by span id (``budgets.selectors.span_costs_of_run``), each shown
    on its row."""
    costs = costs or {}
    collapse = len(spans) > COLLAPSE_ABOVE
    hidden_below: int | None = None  # rows deeper than this are inside a collapsed node
    out = ['<ul class="tree" role="tree" data-tree>']
    for s in spans:
        depth = s.get("depth", 0)
        if hidden_below is not None and depth <= hidden_below:
            hidden_below = None
        has_children = bool(s.get("children"))
        collapsed = collapse and has_children and depth >= 1
        label = s["tool"]["name"] if s.get("tool") and s["tool"].get("name") else s["name"]
        status = display_status(s)
        attrs = [f'data-span="{escape(s["span_id"])}"', f'data-depth="{depth}"', 'role="treeitem"',
                 f'style="padding-left:{min(depth, 40) * 14 + 4}px"']
        if hidden_below is not None:
            attrs.append("hidden")
        if s["span_id"] == selected:
            attrs.append('class="selected" aria-selected="true"')
        if has_children:
            attrs.append(f'aria-expanded="{"false" if collapsed else "true"}"')
        toggle = (f'<button type="button" class="toggle" aria-label="Fold or unfold">{"▸" if collapsed else "▾"}</button>'
                  if has_children else '<span class="toggle"></span>')
        model = f' <span class="muted">{escape(s["model"])}</span>' if s.get("model") else ""
        error = f' <span class="mono error">{escape(s["error_code"])}</span>' if s.get("error_code") else ""
        out.append(f'<li {" ".join(attrs)}>{toggle}<span class="status status-{escape(status)}">{escape(status)}</span>'
                   f'<span class="kind">{escape(s["kind"])}</span><span class="name">{escape(label)}</span>{model}{error}'
                   f'{span_cost(costs.get(s["span_id"]))}<span class="dur">{_duration(s.get("duration_ms"))}</span></li>')
        if collapsed and hidden_below is None:
            hidden_below = depth
    out.append("</ul>")
    return mark_safe("".join(out))  # noqa: S308 - escaped text only
