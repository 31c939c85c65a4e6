"""The navigation of the product's pages. A later app adds its page by appending an entry here (and a
URL in ``urls.py``); the layout draws them in this order."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NavEntry:
    key: str  # a page's ``nav`` attribute names the entry it highlights
    label: str
    url_name: str


NAV: list[NavEntry] = [
    NavEntry("overview", "Overview", "dashboard:overview"),
    NavEntry("runs", "Runs", "dashboard:runs"),
    NavEntry("agents", "Agents", "dashboard:agents"),
    NavEntry("costs", "Costs", "dashboard:costs"),
    NavEntry("evals", "Evals", "dashboard:evals"),
    NavEntry("approvals", "Approvals", "dashboard:approvals"),
    NavEntry("queue", "GPU queue", "dashboard:queue"),
    NavEntry("audit", "Audit log", "dashboard:audit"),
]
