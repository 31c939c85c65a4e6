"""Charts drawn on the server as SVG: no JavaScript library, no build step, readable on a closed
network. Every function returns safe markup; every text that came from data is escaped here."""
from __future__ import annotations

from collections import defaultdict
from html import escape  # the stdlib's: Django's is wrapped for lazy text, a cost per call in these loops

from django.utils.safestring import SafeString, mark_safe


def _fmt(x: float) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".")


def sparkbars(values: list[float], bad: list[float] | None = None, *, label: str, width: int = 300,
              height: int = 64) -> SafeString:
    """Bars of ``values`` (one per bucket), the ``bad`` part of each drawn over it in the error colour."""
    n = max(len(values), 1)
    top = max(values, default=0) or 1
    step = width / n
    parts = [f'<svg class="spark" viewBox="0 0 {width} {height}" preserveAspectRatio="none" role="img" '
             f'aria-label="{escape(label)}"><title>{escape(label)}</title>']
    for i, v in enumerate(values):
        if not v:
            continue
        h = max(v / top * (height - 2), 1)
        parts.append(f'<rect class="bar" x="{_fmt(i * step + 0.5)}" y="{_fmt(height - h)}" '
                     f'width="{_fmt(max(step - 1, 0.5))}" height="{_fmt(h)}"/>')
        if bad and bad[i]:
            hb = max(bad[i] / top * (height - 2), 1)
            parts.append(f'<rect class="bar bad" x="{_fmt(i * step + 0.5)}" y="{_fmt(height - hb)}" '
                         f'width="{_fmt(max(step - 1, 0.5))}" height="{_fmt(hb)}"/>')
    parts.append("</svg>")
    return mark_safe("".join(parts))  # noqa: S308 - built from numbers and escaped text only


# --- a run's timeline: one row per span, bars to scale ----------------------------------------------------

ROW_H = 18
LABEL_W = 240
BARS_W = 760


def timeline(spans: list[dict], *, run_start, run_end, now) -> SafeString:
    """A waterfall of ``spans`` (tree order, as ``traces.selectors.run_outline`` gives them: times in
    epoch seconds): bars to scale from the run's start, open spans drawn to ``run_end`` (or now) dashed,
    errors in red, time to first token marked on model calls, and each retry or fallback linked by a
    curve to what it recovered."""
    t0 = min([run_start.timestamp(), *(s["start_time"] for s in spans)])
    t1 = max([(run_end or now).timestamp(), *(s["end_time"] for s in spans if s["end_time"] is not None)])
    total = max((t1 - t0) * 1000, 1.0)
    scale = BARS_W / total
    height = ROW_H * len(spans) + 24
    row_of = {s["span_id"]: i for i, s in enumerate(spans)}
    out = [f'<svg class="timeline" viewBox="0 0 {LABEL_W + BARS_W + 60} {height}" role="img" '
           f'aria-label="Timeline of {len(spans)} spans over {_fmt(total)} ms">']
    for frac in (0, .25, .5, .75, 1):  # the axis: four quarters of the run
        x = LABEL_W + frac * BARS_W
        out.append(f'<line class="axis" x1="{_fmt(x)}" y1="14" x2="{_fmt(x)}" y2="{height}"/>'
                   f'<text x="{_fmt(x + 2)}" y="11">{_fmt(frac * total)} ms</text>')
    for i, s in enumerate(spans):
        y = 20 + i * ROW_H
        start, end = s["start_time"], s["end_time"]
        x = LABEL_W + (start - t0) * 1000 * scale
        w = max(((end if end is not None else t1) - start) * 1000 * scale, 1.5)
        classes = ["bar", s["kind"].replace(".", "-")]
        if s["status"] == "error":
            classes.append("error")
        if end is None:
            classes.append("open")
        name = s["name"] if len(s["name"]) <= 34 else s["name"][:33] + "…"
        indent = min(s.get("depth", 0), 12) * 8
        dur = f'{_fmt(s["duration_ms"])} ms' if s["duration_ms"] is not None else "running"
        out.append(f'<g class="row" data-span="{escape(s["span_id"])}"><title>{escape(s["name"])} · {s["kind"]} · '
                   f'{escape(s["status"])} · {dur}</title>'
                   f'<text x="{4 + indent}" y="{y + 12}">{escape(name)}</text>'
                   f'<rect class="{" ".join(classes)}" x="{_fmt(x)}" y="{y + 3}" width="{_fmt(w)}" height="{ROW_H - 6}" rx="2"/>')
        if s.get("time_to_first_token_ms") is not None:
            tx = x + s["time_to_first_token_ms"] * scale
            out.append(f'<line class="ttft" x1="{_fmt(tx)}" y1="{y + 1}" x2="{_fmt(tx)}" y2="{y + ROW_H - 1}">'
                       f'<title>time to first token {_fmt(s["time_to_first_token_ms"])} ms</title></line>')
        out.append("</g>")
        recovers = s.get("recovers")
        if recovers and recovers["span_id"] in row_of:
            yr = 20 + row_of[recovers["span_id"]] * ROW_H + ROW_H / 2
            out.append(f'<path class="link" d="M {_fmt(x)} {_fmt(y + ROW_H / 2)} C {_fmt(x - 24)} {_fmt(y + ROW_H / 2)}, '
                       f'{_fmt(x - 24)} {_fmt(yr)}, {_fmt(x)} {_fmt(yr)}"><title>{recovers["via"]} of '
                       f'{escape(recovers["span_id"])}</title></path>')
    out.append("</svg>")
    return mark_safe("".join(out))  # noqa: S308 - numbers and escaped text only


# --- a loop's topology: iterations as nodes, moves as edges ---------------------------------------------

NODE_W, NODE_H, GAP_X, GAP_Y = 170, 58, 70, 18


def loop_graph(loop: dict, *, key: str) -> SafeString:
    """The loop as a left-to-right graph: a start node, iterations in layers by their parent (a move's
    ``parent_index`` → its ``child_indices``), each edge labelled with its move's kind and linking to
    its rationale (``#move-<key>-<round>``); the winner drawn heavier and named, failures in red."""
    nodes = {n["index"]: n for n in loop["nodes"]}
    parent_of: dict[int, int | None] = {}
    for e in loop["edges"]:
        for c in e["child_indices"]:
            parent_of.setdefault(c, e["parent_index"])
    layer: dict[int, int] = {}

    def depth(i: int) -> int:
        seen, d, cur = set(), 1, parent_of.get(i)
        while cur is not None and cur in nodes and cur not in seen:
            seen.add(cur)
            d += 1
            cur = parent_of.get(cur)
        return d

    for i in nodes:
        layer[i] = depth(i)
    columns: dict[int, list[int]] = defaultdict(list)
    for i in sorted(nodes):
        columns[layer[i]].append(i)
    pos = {None: (10, 10)}
    for col, idxs in columns.items():
        for row, i in enumerate(idxs):
            pos[i] = (10 + col * (NODE_W + GAP_X), 10 + row * (NODE_H + GAP_Y))
    width = 20 + (max(columns, default=0) + 1) * (NODE_W + GAP_X)
    height = 20 + max((len(v) for v in columns.values()), default=1) * (NODE_H + GAP_Y)
    out = [f'<svg class="graph" width="{width}" height="{height}" role="img" aria-label="Loop topology">'
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" markerHeight="6" '
           'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#7f8c8d"/></marker></defs>',
           '<g class="node start"><rect x="10" y="10" width="60" height="28" rx="14"/>'
           '<text x="24" y="29">start</text></g>']
    for e in loop["edges"]:
        src = pos.get(e["parent_index"] if e["parent_index"] in nodes else None)
        sx, sy = (src[0] + (NODE_W if src != pos[None] else 60), src[1] + (NODE_H / 2 if src != pos[None] else 14))
        targets = [c for c in e["child_indices"] if c in pos] or []
        label = escape(e["kind"]) + (" (inferred)" if e["inferred"] else "")
        href = f"#move-{escape(key)}-{e['round']}"
        for c in targets:
            tx, ty = pos[c][0], pos[c][1] + NODE_H / 2
            out.append(f'<g class="edge"><path d="M {_fmt(sx)} {_fmt(sy)} C {_fmt(sx + 30)} {_fmt(sy)}, '
                       f'{_fmt(tx - 30)} {_fmt(ty)}, {_fmt(tx)} {_fmt(ty)}"/></g>')
        lx, ly = (sx + (pos[targets[0]][0] if targets else sx + 60)) / 2, sy - 4
        out.append(f'<g class="edge"><a href="{href}" data-move="{e["round"]}"><text x="{_fmt(lx - 20)}" y="{_fmt(ly)}">'
                   f'{label}</text></a></g>')
    for i, n in nodes.items():
        x, y = pos[i]
        classes = ["node"] + (["winner"] if n["winner"] else []) + (
            ["failed"] if n["error"] or n["valid"] is False or n["status"] == "error" else [])
        verdict = {True: "valid ✓", False: "invalid ✕", None: ""}[n["valid"]]
        figures = " · ".join(filter(None, [
            f"score {_fmt(n['score'])}" if n["score"] is not None else "",
            f"${n['cost_usd']:.4f}" if n["cost_usd"] is not None else "",
            f"{_fmt(n['duration_ms'])} ms" if n["duration_ms"] is not None else ""]))
        out.append(f'<g class="{" ".join(classes)}" data-node="{i}" data-span="{escape(n["span_id"])}">'
                   f'<rect x="{x}" y="{y}" width="{NODE_W}" height="{NODE_H}" rx="6"/>'
                   f'<text x="{x + 8}" y="{y + 17}" font-weight="600">#{i}{" ★ winner" if n["winner"] else ""}</text>'
                   f'<text x="{x + 8}" y="{y + 33}">{escape(verdict or n["status"])}</text>'
                   f'<text x="{x + 8}" y="{y + 49}">{escape(figures)}</text>'
                   f'<title>{escape(n["name"])}{": " + escape(n["error"]) if n["error"] else ""}</title></g>')
    out.append("</svg>")
    return mark_safe("".join(out))  # noqa: S308 - numbers and escaped text only


# --- spend per day: one bar per day, each a link to the runs behind it ------------------------------------

DAY_W, DAY_H, DAY_AXIS, DAY_TOP = 1000, 170, 20, 18


def _day_labels(days: list, step: float) -> dict[int, str]:
    """Which days the axis names: each first of a month ("Dec 1") and the first day unless a first of
    a month is close by; on ranges short enough, days between as numbers where they fit."""
    months = {i: f"{d:%b} {d.day}" for i, d in enumerate(days) if d.day == 1}
    if days and not any(i * step < 48 for i in months):
        months[0] = f"{days[0]:%b} {days[0].day}"
    labels = dict(months)
    if step < 8:  # a long range: the months are enough
        return labels
    every = max(1, -(-28 // int(step)))  # a number every ~28 units at least
    for i in range(len(days)):
        if i not in months and i % every == 0 and all(abs(i - j) * step >= 40 for j in months):
            labels[i] = str(days[i].day)
    return labels


def _axis_text(x: float, text: str) -> str:
    """An axis label centred under ``x``, kept inside the chart at its ends (~6.5 units a character)."""
    half = len(text) * 3.3
    anchor, x = ("start", 1.0) if x - half < 0 else ("end", DAY_W - 1.0) if x + half > DAY_W else ("middle", x)
    return f'<text class="day" x="{_fmt(x)}" y="{DAY_H - 5}" text-anchor="{anchor}">{text}</text>'


def day_bars(days: list[dict], *, label: str, money=str) -> SafeString:
    """Bars of ``days`` (in order: ``day`` a date, ``value`` a number, ``href`` the runs behind it,
    ``title`` its tooltip, ``spike`` true to mark it). Each day is a link to its ``href`` over the full
    height of its column (a small day is as easy to hit as a big one); a spike day is drawn in the
    warning colour with a mark above. The top line is labelled with the highest day (``money`` formats
    it); the axis names the months and the days between where they fit."""
    n = max(len(days), 1)
    peak = max((float(d["value"]) for d in days), default=0.0)
    top = peak or 1.0
    step = DAY_W / n
    plot = DAY_H - DAY_AXIS - DAY_TOP
    base = DAY_TOP + plot
    out = [f'<svg class="daybars" viewBox="0 0 {DAY_W} {DAY_H}" role="img" aria-label="{escape(label)}">'
           f'<title>{escape(label)}</title>',
           f'<line class="axis" x1="0" y1="{DAY_TOP}" x2="{DAY_W}" y2="{DAY_TOP}"/>'
           f'<line class="axis base" x1="0" y1="{base}" x2="{DAY_W}" y2="{base}"/>']
    if peak:
        out.append(f'<text class="peak" x="{DAY_W - 2}" y="{DAY_TOP - 5}" text-anchor="end">{escape(money(peak))}'
                   f'</text>')
    for i, d in enumerate(days):
        x = i * step
        v = float(d["value"])
        h = max(v / top * plot, 1.5) if v else 0
        out.append(f'<a href="{escape(d["href"])}" data-day="{d["day"].isoformat()}"><title>{escape(d["title"])}</title>'
                   f'<rect class="hit" x="{_fmt(x)}" y="{DAY_TOP}" width="{_fmt(step)}" height="{plot}"/>')
        if h:
            out.append(f'<rect class="{"bar spike" if d.get("spike") else "bar"}" x="{_fmt(x + step * .12)}" '
                       f'y="{_fmt(base - h)}" width="{_fmt(max(step * .76, .5))}" height="{_fmt(h)}"/>')
        if d.get("spike"):
            out.append(f'<text class="spike-mark" x="{_fmt(x + step / 2)}" y="{_fmt(max(base - h - 3, DAY_TOP + 9))}" '
                       f'text-anchor="middle">▲</text>')
        out.append("</a>")
    for i, text in sorted(_day_labels([d["day"] for d in days], step).items()):
        out.append(_axis_text(i * step + step / 2, text))
    out.append("</svg>")
    return mark_safe("".join(out))  # noqa: S308 - numbers and escaped text only
