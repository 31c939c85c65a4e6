"""Fill a project with realistic agent traffic through the real REST ingest path.

Every run, span and finish is an HTTP request to ``/api/v1/...`` with an ``ingest`` key, exactly as
an agent sends it: over a socket to a running server with ``--url``, otherwise through Django's
request handler in this process (the same middleware, authentication, views and durable inbox,
without a socket). Then the inbox is projected (by this process, as a worker would, unless
``--url`` is given, in which case the server's workers do it and the command waits for them).

The traffic: three agents (one delegating to a sub-agent), several end users and sessions over the
last two days, model calls with cache and reasoning tokens, streaming figures, tool calls, a retry
after a failed tool call, a fallback to another model after a rate limit, a failed run naming its
failing span, and a long-running run left open with a span still running.
"""
from __future__ import annotations

import json
import random
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.test import Client

from apps.projects import services as project_services
from apps.projects.models import Project
from apps.traces import services
from apps.traces.models import IngestBatch

USERS = ["user-1017", "user-2290", "user-3384", "user-4121", "user-5005"]
QUESTIONS = ["Where is my order A-{n}?", "Can I return the blue jacket from order A-{n}?",
             "Why was I charged twice for A-{n}?", "Change the delivery address of A-{n}.",
             "Is A-{n} eligible for express shipping?"]


class Sender:
    """POST/PATCH JSON to the API, over HTTP or in process; raises on anything but 202."""

    def __init__(self, key: str, url: str | None):
        self.key, self.url = key, url.rstrip("/") if url else None
        self.client = None if url else Client(HTTP_HOST=_local_host())
        self.requests = 0

    def __call__(self, method: str, path: str, body) -> dict:
        data = json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}
        self.requests += 1
        if self.url:
            req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    status, text = resp.status, resp.read()
            except urllib.error.HTTPError as err:
                status, text = err.code, err.read()
        else:
            resp = self.client.generic(method, path, data=data, content_type="application/json",
                                       HTTP_AUTHORIZATION=headers["Authorization"])
            status, text = resp.status_code, resp.content
        if status != 202:
            raise CommandError(f"{method} {path} answered {status}: {text[:500]!r}")
        return json.loads(text)


def _local_host() -> str:
    """A Host header this deployment accepts (in-process requests still pass ALLOWED_HOSTS)."""
    for host in settings.ALLOWED_HOSTS:
        if host != "*" and "*" not in host:
            return host.lstrip(".")
    return "localhost"


def iso(t: datetime) -> str:
    return t.isoformat()


class Traffic:
    def __init__(self, send: Sender, rng: random.Random, now: datetime):
        self.send, self.rng, self.now = send, rng, now
        self.runs = 0
        self.tag = now.strftime("%d%H%M%S")  # each invocation adds new runs

    def _llm(self, span_id, parent, t, *, provider, model, response_model=None, status="ok", error_code="",
             message="", cache_read=0, cache_write=0, reasoning=0, retry_of=None, fallback_of=None, question=""):
        dur = self.rng.uniform(0.6, 4.0)
        inp, out = self.rng.randint(400, 3000), self.rng.randint(40, 600)
        span = {"span_id": span_id, "parent_span_id": parent, "kind": "llm", "name": f"chat {model}",
                "provider": provider, "model": model, "endpoint": f"https://api.{provider}.example/v1/chat",
                "start_time": iso(t), "end_time": iso(t + timedelta(seconds=dur)), "status": status,
                "attributes": {"gen_ai.request.temperature": 0.2, "gen_ai.request.max_tokens": 1024}}
        if status == "error":
            span.update(error_code=error_code, status_message=message)
            span["end_time"] = iso(t + timedelta(seconds=0.3))
            return span, t + timedelta(seconds=0.3)
        span.update(response_model=response_model or model, time_to_first_token_ms=round(self.rng.uniform(180, 900), 1),
                    stream={"chunks": out // 4 + 1, "output_tokens_per_second": round(out / dur, 1)},
                    usage={"input_tokens": inp, "output_tokens": out, "cache_read_tokens": cache_read,
                           "cache_write_tokens": cache_write, "reasoning_tokens": reasoning},
                    input_messages=[{"role": "system", "content": "You are a careful support agent."},
                                    {"role": "user", "content": question}],
                    output_messages=[{"role": "assistant", "content": "Let me check that for you."}])
        if retry_of:
            span["retry_of"] = retry_of
        if fallback_of:
            span["fallback_of"] = fallback_of
        return span, t + timedelta(seconds=dur)

    def _tool(self, span_id, parent, t, name, arguments, result=None, *, error=None, retry_of=None):
        dur = self.rng.uniform(0.05, 1.5)
        span = {"span_id": span_id, "parent_span_id": parent, "kind": "tool", "name": name, "start_time": iso(t),
                "end_time": iso(t + timedelta(seconds=dur)), "status": "error" if error else "ok",
                "tool": {"name": name, "call_id": f"call_{span_id}", "arguments": arguments}}
        if error:
            span.update(error_code=error[0], status_message=error[1])
            span["tool"]["error"] = error[1]
        else:
            span["tool"]["result"] = result
        if retry_of:
            span["retry_of"] = retry_of
        return span, t + timedelta(seconds=dur)

    def support_run(self, *, start: datetime, user: str, session: str, variant: str) -> str:
        self.runs += 1
        run_id = f"support-{self.tag}-{self.runs:03d}"
        order = self.rng.randint(1000, 9999)
        question = self.rng.choice(QUESTIONS).format(n=order)
        self.send("POST", "/api/v1/runs", {
            "run_id": run_id, "agent": {"name": "support-bot", "version": "1.4.2"}, "input": {"message": question},
            "end_user": user, "session_id": session, "started_at": iso(start),
            "metadata": {"channel": self.rng.choice(["web", "email", "app"]), "locale": "en-GB"}})
        t = start + timedelta(milliseconds=50)
        spans = [{"span_id": f"{run_id}-plan", "parent_span_id": f"{run_id}-root", "kind": "step",
                  "component": "router", "action": "classify_intent", "details": {"intent": "order_status"},
                  "start_time": iso(t), "end_time": iso(t + timedelta(milliseconds=30)), "status": "ok"}]
        t += timedelta(milliseconds=40)
        span, t = self._llm(f"{run_id}-llm1", f"{run_id}-root", t, provider="anthropic", model="claude-sonnet-4",
                            cache_read=self.rng.choice([0, 1800, 2400]), cache_write=self.rng.choice([0, 1200]),
                            question=question)
        spans.append(span)
        if variant == "tool_retry":
            span, t = self._tool(f"{run_id}-tool1", f"{run_id}-root", t, "lookup_order", {"order": f"A-{order}"},
                                 error=("tool_timeout", "orders-service did not answer in 2 s"))
            spans.append(span)
            span, t = self._tool(f"{run_id}-tool2", f"{run_id}-root", t, "lookup_order", {"order": f"A-{order}"},
                                 {"status": "shipped", "carrier": "DPD"}, retry_of=f"{run_id}-tool1")
            spans.append(span)
        else:
            span, t = self._tool(f"{run_id}-tool1", f"{run_id}-root", t, "lookup_order", {"order": f"A-{order}"},
                                 {"status": self.rng.choice(["shipped", "processing", "delivered"])})
            spans.append(span)
        if variant == "fallback":
            span, t = self._llm(f"{run_id}-llm2", f"{run_id}-root", t, provider="openai", model="gpt-4o",
                                status="error", error_code="rate_limited", message="429 Too Many Requests")
            spans.append(span)
            span, t = self._llm(f"{run_id}-llm3", f"{run_id}-root", t, provider="anthropic", model="claude-haiku-4",
                                fallback_of=f"{run_id}-llm2", question=question)
            spans.append(span)
        else:
            span, t = self._llm(f"{run_id}-llm2", f"{run_id}-root", t, provider="openai", model="gpt-4o",
                                response_model="gpt-4o-2024-11-20", question=question)
            spans.append(span)
        root = {"span_id": f"{run_id}-root", "kind": "agent", "name": "support-bot", "start_time": iso(start),
                "end_time": iso(t + timedelta(milliseconds=20)), "status": "ok"}
        self.send("POST", f"/api/v1/runs/{run_id}/spans", [root, *spans])
        self.send("POST", f"/api/v1/runs/{run_id}/finish", {
            "status": "completed", "output": {"reply": "Your order has shipped with DPD."},
            "ended_at": iso(t + timedelta(milliseconds=30))})
        return run_id

    def research_run(self, *, start: datetime, user: str, session: str, fail: bool = False) -> str:
        """A reasoning model plans, a sub-agent searches; when ``fail``, the search tool keeps failing."""
        self.runs += 1
        run_id, child_id = f"research-{self.tag}-{self.runs:03d}", f"research-{self.tag}-{self.runs:03d}-search"
        topic = self.rng.choice(["EU battery regulation", "GPU spot prices", "solid-state cooling"])
        self.send("POST", "/api/v1/runs", {
            "run_id": run_id, "agent": {"name": "research-agent", "version": "0.9.0"},
            "input": {"task": f"Write a one-page brief on {topic}."}, "end_user": user, "session_id": session,
            "started_at": iso(start)})
        t = start + timedelta(milliseconds=20)
        plan, t = self._llm(f"{run_id}-plan", f"{run_id}-root", t, provider="openai", model="o3",
                            reasoning=self.rng.randint(2000, 9000), question=topic)
        self.send("POST", f"/api/v1/runs/{run_id}/spans", plan)
        # The sub-agent's own run, linked by parent_run_id.
        self.send("POST", "/api/v1/runs", {"run_id": child_id, "agent": {"name": "web-searcher", "version": "0.3.1"},
                                           "input": {"query": topic}, "end_user": user, "session_id": session,
                                           "parent_run_id": run_id, "started_at": iso(t)})
        c_spans, ct = [], t
        for i in range(3):
            err = ("upstream_503", "search API answered 503") if fail else None
            span, ct = self._tool(f"{child_id}-s{i}", "", ct, "web_search", {"q": topic, "page": i},
                                  [{"title": f"{topic} result {i}", "url": f"https://example.org/{i}"}],
                                  error=err, retry_of=f"{child_id}-s{i - 1}" if fail and i else None)
            c_spans.append(span)
        self.send("POST", f"/api/v1/runs/{child_id}/spans", c_spans)
        if fail:
            self.send("POST", f"/api/v1/runs/{child_id}/finish", {
                "status": "failed", "error_code": "search_unavailable",
                "error_details": {"tool": "web_search", "attempts": 3, "last_http_status": 503}, "ended_at": iso(ct)})
            self.send("POST", f"/api/v1/runs/{run_id}/spans", {
                "span_id": f"{run_id}-root", "kind": "agent", "name": "research-agent", "start_time": iso(start),
                "end_time": iso(ct), "status": "error", "error_code": "subagent_failed",
                "status_message": "web-searcher failed after 3 attempts"})
            self.send("POST", f"/api/v1/runs/{run_id}/finish", {
                "status": "failed", "error_code": "subagent_failed",
                "error_details": {"subagent_run_id": child_id, "reason": "search_unavailable"}, "ended_at": iso(ct)})
            return run_id
        self.send("POST", f"/api/v1/runs/{child_id}/finish", {"status": "completed", "output": {"results": 3},
                                                               "ended_at": iso(ct)})
        write, t = self._llm(f"{run_id}-write", f"{run_id}-root", ct, provider="anthropic", model="claude-opus-4",
                             cache_write=3000, question=topic)
        root = {"span_id": f"{run_id}-root", "kind": "agent", "name": "research-agent", "start_time": iso(start),
                "end_time": iso(t), "status": "ok"}
        self.send("POST", f"/api/v1/runs/{run_id}/spans", [root, write])
        self.send("POST", f"/api/v1/runs/{run_id}/finish", {"status": "completed", "output": {"brief": f"{topic}: ..."},
                                                             "ended_at": iso(t)})
        return run_id

    def open_run(self, *, start: datetime, user: str) -> str:
        """A long-running run left open: a batch job still inside a model call."""
        self.runs += 1
        run_id = f"coder-{self.tag}-{self.runs:03d}"
        self.send("POST", "/api/v1/runs", {"run_id": run_id, "agent": {"name": "coder", "version": "2.1.0"},
                                           "input": {"task": "Migrate the billing service to Python 3.12"},
                                           "end_user": user, "session_id": "batch-nightly", "started_at": iso(start)})
        done = []
        t = start
        for i in range(4):
            span, t = self._llm(f"{run_id}-edit{i}", f"{run_id}-root", t, provider="openai", model="gpt-4.1",
                                cache_read=5000 + 1000 * i, question="apply the next diff")
            done.append(span)
            tspan, t = self._tool(f"{run_id}-test{i}", f"{run_id}-root", t, "run_tests", {"suite": "billing"},
                                  {"passed": 120 + i, "failed": 4 - i})
            done.append(tspan)
        root = {"span_id": f"{run_id}-root", "kind": "agent", "name": "coder", "start_time": iso(start)}
        running = {"span_id": f"{run_id}-edit4", "parent_span_id": f"{run_id}-root", "kind": "llm",
                   "name": "chat gpt-4.1", "provider": "openai", "model": "gpt-4.1", "start_time": iso(t)}
        self.send("POST", f"/api/v1/runs/{run_id}/spans", [root, *done, running])
        return run_id


class Command(BaseCommand):
    help = "Fill a project with realistic agent traffic through the REST API (see the module docstring)."

    def add_arguments(self, parser):
        parser.add_argument("--project", default="demo")
        parser.add_argument("--runs", type=int, default=24, help="support runs (research and coder runs come too)")
        parser.add_argument("--url", help="send to a running server (e.g. http://127.0.0.1:8000) over HTTP")
        parser.add_argument("--key", help="an ingest key of the project (else one is minted, audited)")
        parser.add_argument("--seed", type=int, default=7)

    def handle(self, *args, project: str, runs: int, url: str | None, key: str | None, seed: int, **options):
        minted = None
        if key is None:
            with transaction.atomic():
                proj = Project.objects.filter(slug=project).first() or project_services.project_create(
                    slug=project, name=project.replace("-", " ").title(), actor=None)
                minted, key = project_services.api_key_create(project=proj, name="demo traffic",
                                                              scopes=["ingest"], actor=None)
        try:
            self._send(key, url, project, runs, seed)
        finally:
            if minted is not None:  # a key minted for the demo does not outlive it (both audited)
                project_services.api_key_revoke(key=minted, actor=None)

    def _send(self, key: str, url: str | None, project: str, runs: int, seed: int) -> None:
        send = Sender(key, url)
        rng = random.Random(seed)
        now = datetime.now(UTC).replace(microsecond=0)
        traffic = Traffic(send, rng, now)
        variants = ["plain", "plain", "tool_retry", "fallback"]
        for i in range(runs):
            start = now - timedelta(hours=48) + timedelta(hours=47 * i / max(runs, 1), minutes=rng.randint(0, 30))
            user = USERS[i % len(USERS)]
            traffic.support_run(start=start, user=user, session=f"sess-{user}-{i // 3}", variant=variants[i % 4])
        for i in range(3):
            traffic.research_run(start=now - timedelta(hours=20 - 6 * i), user=USERS[i], session=f"research-{i}",
                                 fail=(i == 1))
        open_run = traffic.open_run(start=now - timedelta(minutes=40), user="scheduler")
        self.stdout.write(f"sent {send.requests} requests ({traffic.runs} runs + sub-agents) to project {project!r}")
        if url:
            self._wait_for_server(project)
        else:
            while services.inbox_step():
                pass
        dead = IngestBatch.objects.filter(status=IngestBatch.Status.DEAD, project__slug=project).count()
        if dead:
            raise CommandError(f"{dead} batches were dead-lettered; see the inbox admin")
        self.stdout.write(self.style.SUCCESS(f"projected; the open run is {open_run}. "
                                             "Browse /admin/traces/run/ or GET /api/v1/runs."))

    def _wait_for_server(self, project: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while IngestBatch.objects.filter(project__slug=project, status__in=["pending", "processing"]).exists():
            if time.monotonic() > deadline:
                raise CommandError("the server's workers did not project the demo within 120 s")
            time.sleep(0.5)
