"""The run list's filters by agent version, loop and metadata, and what each listed run says of its key,
its loop and its cache: written the way agents write, read the way the pages and the API read."""
from __future__ import annotations

import importlib
import json

import pytest
from django.apps import apps

from apps.traces.models import Run

from .helpers import at, drain

pytestmark = pytest.mark.django_db


@pytest.fixture
def agent(project, make_key, key_client):
    """A client holding the project's ingest+read key, named "billing-bot"."""
    return key_client(make_key(project, name="billing-bot")[1])


def post(client, url, body):
    r = client.post(url, data=json.dumps(body), content_type="application/json")
    assert r.status_code == 202, r.json()
    return r


def listed(client, query: str) -> list[str]:
    r = client.get(f"/api/v1/runs?{query}")
    assert r.status_code == 200, r.json()
    return [run["id"] for run in r.json()["results"]]


def write_runs(client):
    """Five runs (newest last): two versions of one agent, metadata of several shapes, two loops."""
    runs = [
        ("v1-web", "1.0", {"channel": "web", "tier": "gold"}, "step", at(10)),
        ("v1-api", "1.0", {"channel": "api", "tier": "gold", "url": "https://x.test/a"}, "loop", at(20)),
        ("v2-web", "2.0", {"channel": "web", "tier": "free", "1": "digits"}, "loop.iteration", at(30)),
        ("v2-num", "2.0", {"channel": 7, "tier": {"name": "gold"}}, "llm", at(40)),
        ("v2-move", "2.0", {}, "loop.move", at(50)),
    ]
    for run_id, version, metadata, kind, started in runs:
        post(client, "/api/v1/runs", {"run_id": run_id, "agent": {"name": "billing", "version": version},
                                      "metadata": metadata, "started_at": started})
        post(client, f"/api/v1/runs/{run_id}/spans", {"span_id": "s1", "kind": kind, "name": kind,
                                                      "start_time": started})
    drain()


@pytest.mark.parametrize(("query", "expected"), [
    ("agent_version=2.0", ["v2-move", "v2-num", "v2-web"]),
    ("agent=billing&agent_version=1.0", ["v1-api", "v1-web"]),
    ("agent=other&agent_version=1.0", []),
    ("has_loop=true", ["v2-move", "v2-web", "v1-api"]),
    ("has_loop=false", ["v2-num", "v1-web"]),
    ("has_loop=true&agent_version=1.0", ["v1-api"]),
    ("metadata=channel:web", ["v2-web", "v1-web"]),
    ("metadata=channel:web&metadata=tier:gold", ["v1-web"]),
    ("metadata=tier:gold", ["v1-api", "v1-web"]),  # {"name": "gold"} is not the string "gold"
    ("metadata=channel:7", []),  # the number 7 is not the string "7"
    ("metadata=url:https://x.test/a", ["v1-api"]),  # the key ends at the first colon; the value keeps the rest
    ("metadata=1:digits", ["v2-web"]),  # a key of digits is a key, not an array index
    ("metadata=channel:", []),
    ("metadata=missing:web", []),
])
def test_runs_are_filtered_by_version_loop_and_metadata(agent, query, expected):
    write_runs(agent)
    assert listed(agent, query) == expected


@pytest.mark.parametrize("query", ["metadata=channel", "metadata=:web", "metadata=channel:web&metadata=nocolon",
                                   "metadata=" + "k:" + "v" * 600,
                                   "&".join(f"metadata=k{i}:v" for i in range(11)),
                                   "has_loop=perhaps"])
def test_a_malformed_filter_is_a_400_naming_its_field(agent, query):
    r = agent.get(f"/api/v1/runs?{query}")
    field = query.split("=")[0].lstrip("&")
    assert r.status_code == 400 and r.json()["error_code"] == "invalid_request", r.json()
    assert r.json()["details"]["field"] == field


def test_a_listed_run_names_its_key_says_whether_it_loops_and_its_cache_hit_rate(agent):
    post(agent, "/api/v1/runs", {"run_id": "r1", "started_at": at(0)})
    post(agent, "/api/v1/runs/r1/spans", [
        {"span_id": "L", "kind": "loop", "name": "search", "start_time": at(1)},
        {"span_id": "m", "kind": "llm", "start_time": at(2),
         "usage": {"input_tokens": 1000, "cache_read_tokens": 250, "output_tokens": 10}}])
    drain()
    [run] = agent.get("/api/v1/runs").json()["results"]
    assert run["api_key"]["name"] == "billing-bot" and run["api_key"]["prefix"].startswith("cp_live_")
    assert run["has_loop"] is True and run["cache_hit_rate"] == 0.25
    detail = agent.get("/api/v1/runs/r1").json()
    assert (detail["api_key"], detail["has_loop"], detail["cache_hit_rate"]) == (
        run["api_key"], True, 0.25)


def test_a_run_without_a_key_or_a_prompt_says_null(agent):
    post(agent, "/api/v1/runs", {"run_id": "r1", "started_at": at(0)})
    drain()
    Run.objects.update(api_key=None)  # the key was deleted since (SET_NULL)
    [run] = agent.get("/api/v1/runs").json()["results"]
    assert (run["api_key"], run["has_loop"], run["cache_hit_rate"]) == (None, False, None)


def test_a_span_updated_into_a_loop_kind_marks_its_run(agent):
    post(agent, "/api/v1/runs/r1/spans", {"span_id": "s1", "kind": "step", "name": "try", "start_time": at(1)})
    drain()
    assert not Run.objects.get().has_loop
    r = agent.patch("/api/v1/runs/r1/spans/s1", data=json.dumps({"kind": "loop.iteration"}),
                    content_type="application/json")
    assert r.status_code == 202
    drain()
    assert Run.objects.get().has_loop


def test_the_migration_backfills_has_loop_from_spans_and_their_updates(agent):
    for run_id, kind in (("plain", "llm"), ("looped", "loop.move"), ("updated", "step")):
        post(agent, f"/api/v1/runs/{run_id}/spans", {"span_id": "s1", "kind": kind, "name": kind,
                                                     "start_time": at(1)})
    drain()
    agent.patch("/api/v1/runs/updated/spans/s1", data=json.dumps({"kind": "loop"}), content_type="application/json")
    drain()
    Run.objects.update(has_loop=False)  # as the rows stood before the column existed

    importlib.import_module("apps.traces.migrations.0008_run_has_loop").backfill(apps, None)

    assert dict(Run.objects.values_list("run_id", "has_loop")) == {"plain": False, "looped": True, "updated": True}


def test_the_filtered_list_asks_a_fixed_number_of_queries(agent, project, make_key, key_client,
                                                          django_assert_num_queries):
    # Runs started by several keys: naming each run's key joins it in, never a query per row.
    for i in range(12):
        writer = key_client(make_key(project, name=f"writer-{i % 4}")[1])
        post(writer, "/api/v1/runs", {"run_id": f"r{i}", "agent": {"name": "billing", "version": "2.0"},
                                      "metadata": {"channel": "web"}, "started_at": at(i)})
    drain()
    with django_assert_num_queries(3):  # the key, its last-used touch, the page of runs
        r = agent.get("/api/v1/runs?agent_version=2.0&metadata=channel:web&has_loop=false&limit=50")
    assert len(r.json()["results"]) == 12
    assert {run["api_key"]["name"] for run in r.json()["results"]} == {f"writer-{i}" for i in range(4)}
