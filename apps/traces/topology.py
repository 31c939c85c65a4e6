"""A run's loop topology: iterations as nodes, moves as edges, ready for a UI to draw.

Pure (no Django): it reads the effective spans ``selectors.run_spans`` produces. A loop is a span of
kind ``loop``; its ``loop.iteration`` and ``loop.move`` spans are the descendants whose nearest
loop ancestor it is. The values come from ``details["loop"]`` (the ``tangle.loop.*`` attributes with
their prefix stripped, or the same keys sent over REST).

Each move is one edge from its parent iteration (``None`` for the loop's start) to the iterations it
produced: ``fanout`` to several, ``refine`` to one, ``stop`` to none. Where a loop has iterations but
no move spans the edges are inferred from the iterations themselves (``parent_index``, then shared
``group_id`` as a fan-out star, else a refine chain in index order) and the loop says ``inferred``.
"""
from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

PREVIEW_CHARS = 500


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return None
    return None


def _int(value: Any) -> int | None:
    n = _num(value)
    return int(n) if n is not None and float(n).is_integer() else None


def _bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    return None


def _indices(value: Any) -> list[int]:
    """Child indices as sent: an array attribute, a JSON array, or "0,1,2"."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError:
                return []
        else:
            value = [part for part in text.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)):
        value = [value]
    out = [_int(v.strip() if isinstance(v, str) else v) for v in value]
    return [i for i in out if i is not None]


def _get(d: dict, *keys: str) -> Any:
    for key in keys:
        if d.get(key) is not None:
            return d[key]
        # A value nested by a REST client ({"verdict": {"score": 1}}) reads the same as "verdict.score".
        head, _, tail = key.partition(".")
        if tail and isinstance(d.get(head), dict) and d[head].get(tail) is not None:
            return d[head][tail]
    return None


def _loop_values(span: dict) -> dict:
    details = span.get("details")
    values = details.get("loop") if isinstance(details, dict) else None
    return values if isinstance(values, dict) else {}


def _preview(value: Any) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text[:PREVIEW_CHARS]


def _llm_tokens(span_id: str, children: dict[str, list[dict]]) -> tuple[int | None, int | None]:
    """Input and output tokens of the model calls under a span (iteratively, no recursion limit)."""
    tin = tout = None
    stack = list(children.get(span_id, []))
    seen: set[str] = set()
    while stack:
        span = stack.pop()
        if span["span_id"] in seen:
            continue
        seen.add(span["span_id"])
        usage = span.get("usage") or {}
        if span["kind"] in ("llm", "embedding") and usage:
            if usage.get("input_tokens") is not None:
                tin = (tin or 0) + usage["input_tokens"]
            if usage.get("output_tokens") is not None:
                tout = (tout or 0) + usage["output_tokens"]
        stack.extend(children.get(span["span_id"], []))
    return tin, tout


def _node(span: dict, order: int, children: dict[str, list[dict]]) -> dict:
    v = _loop_values(span)
    index = _int(_get(v, "index"))
    tin, tout = _int(_get(v, "tokens_in")), _int(_get(v, "tokens_out"))
    if tin is None or tout is None:
        sum_in, sum_out = _llm_tokens(span["span_id"], children)
        tin = tin if tin is not None else sum_in
        tout = tout if tout is not None else sum_out
    error = _get(v, "error")
    if error is None and span.get("status") == "error":
        error = span.get("status_message") or span.get("error_code") or "error"
    duration = _num(_get(v, "duration_ms"))
    return {
        "index": index if index is not None else order,
        "span_id": span["span_id"],
        "name": span["name"],
        "parent_index": _int(_get(v, "parent_index")),
        "group_id": _get(v, "group_id"),
        "placement": _get(v, "placement"),
        "agent_run": _get(v, "agent_run"),
        "valid": _bool(_get(v, "verdict.valid")),
        "score": _num(_get(v, "verdict.score")),
        "cost_usd": _num(_get(v, "cost_usd")),
        "duration_ms": duration if duration is not None else span.get("duration_ms"),
        "tokens_in": tin,
        "tokens_out": tout,
        "error": str(error) if error not in (None, "", False) else None,
        "output_preview": _preview(_get(v, "output_preview")),
        "status": span.get("status", "unset"),
        "start_time": span.get("start_time"),
        "winner": False,
    }


def _edge(span: dict, order: int) -> dict:
    v = _loop_values(span)
    kind = _get(v, "kind")
    round_ = _int(_get(v, "round"))
    return {
        "span_id": span["span_id"],
        "kind": str(kind) if kind is not None else "unknown",
        "round": round_ if round_ is not None else order,
        "rationale": _get(v, "rationale"),
        "parent_index": _int(_get(v, "parent_index")),
        "child_indices": _indices(_get(v, "child_indices")),
        "inferred": False,
    }


def _infer_edges(nodes: list[dict]) -> list[dict]:
    """Edges from the iterations alone: parent_index where given, a shared group_id is a fan-out."""
    parent_of: dict[int, int | None] = {}
    first_of_group: dict[Any, int] = {}
    previous: int | None = None
    for node in nodes:  # in index order
        idx = node["index"]
        if node["parent_index"] is not None:
            parent = node["parent_index"]
        elif node["group_id"] is not None and node["group_id"] in first_of_group:
            parent = parent_of[first_of_group[node["group_id"]]]
        else:
            parent = previous if previous is not None and previous != idx else None
        if node["group_id"] is not None:
            first_of_group.setdefault(node["group_id"], idx)
        parent_of[idx] = parent
        previous = idx
    groups: dict[int | None, list[int]] = defaultdict(list)
    for idx, parent in parent_of.items():
        groups[parent].append(idx)
    edges = []
    for parent, kids in groups.items():
        if parent is None and len(kids) == 1:
            continue  # the loop's first attempt: a start, not a move
        edges.append({"span_id": None, "kind": "fanout" if len(kids) > 1 else "refine", "round": None,
                      "rationale": None, "parent_index": parent, "child_indices": kids, "inferred": True})
    # Rounds follow the order the children were attempted.
    edges.sort(key=lambda e: min(e["child_indices"]))
    for n, edge in enumerate(edges):
        edge["round"] = n
    return edges


def build(spans: list[dict]) -> dict:
    """``{"loops": [...]}`` for a run's effective spans; no loop spans gives an empty list."""
    by_id = {s["span_id"]: s for s in spans}
    children: dict[str, list[dict]] = defaultdict(list)
    for s in spans:
        if s.get("parent_span_id") in by_id:
            children[s["parent_span_id"]].append(s)

    def owner(span: dict) -> str | None:
        """The nearest ancestor loop span, or None (a loop without a root span); cycle-safe."""
        seen = {span["span_id"]}
        parent = by_id.get(span.get("parent_span_id") or "")
        while parent is not None and parent["span_id"] not in seen:
            if parent["kind"] == "loop":
                return parent["span_id"]
            seen.add(parent["span_id"])
            parent = by_id.get(parent.get("parent_span_id") or "")
        return None

    members: dict[str | None, dict[str, list[dict]]] = defaultdict(lambda: {"iterations": [], "moves": []})
    roots = [s for s in spans if s["kind"] == "loop"]
    for s in roots:
        members[s["span_id"]]  # noqa: B018 - a loop with nothing under it still shows
    for s in spans:
        if s["kind"] == "loop.iteration":
            members[owner(s)]["iterations"].append(s)
        elif s["kind"] == "loop.move":
            members[owner(s)]["moves"].append(s)

    loops = []
    for loop_id, parts in members.items():
        root = by_id.get(loop_id) if loop_id else None
        rv = _loop_values(root) if root else {}
        ordered = sorted(parts["iterations"], key=lambda s: s.get("start_time") or "")
        nodes = [_node(s, n, children) for n, s in enumerate(ordered)]
        nodes.sort(key=lambda n: (n["index"], n["start_time"] or ""))
        moves = sorted(parts["moves"], key=lambda s: s.get("start_time") or "")
        edges = [_edge(s, n) for n, s in enumerate(moves)]
        edges.sort(key=lambda e: e["round"])
        inferred = bool(nodes) and not edges
        if inferred:
            edges = _infer_edges(nodes)
        winner = _int(_get(rv, "winner_index", "winner.iteration_index", "winner.index"))
        for node in nodes:
            node.pop("start_time")
            flag = _bool(_get(_loop_values(by_id[node["span_id"]]), "winner"))
            node["winner"] = node["index"] == winner if winner is not None else bool(flag)
        if winner is None:
            winner = next((n["index"] for n in nodes if n["winner"]), None)
        total_cost = _num(_get(rv, "total_cost_usd"))
        if total_cost is None and any(n["cost_usd"] is not None for n in nodes):
            total_cost = round(sum(n["cost_usd"] or 0 for n in nodes), 10)
        duration = _num(_get(rv, "duration_ms"))
        loops.append({
            "span_id": loop_id,
            "name": root["name"] if root else None,
            "driver": _get(rv, "driver"),
            "winner_index": winner,
            "total_cost_usd": total_cost,
            "duration_ms": duration if duration is not None else (root or {}).get("duration_ms"),
            "declared_iterations": _int(_get(rv, "iterations")),
            "inferred": inferred,
            "nodes": nodes,
            "edges": edges,
        })
    return {"loops": loops}
