"""The pages in a real browser (Debian's Chromium driven by Playwright) over a server started the
way `make run` starts it (embedded: SQLite, in-process worker, in-memory channel layer), seeded
through the real ingest path: the REST API and the OpenTelemetry SDK over OTLP/HTTP.

Screenshots of each page at 1280 and 1920 px go to var/screenshots/ (test artefacts, not committed).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests import http_client as http
from tests.ingest.otel import flush, sdk
from tests.system.test_make_run import _free_port as free_port

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
SHOTS = ROOT / "var" / "screenshots"
LIVE_WITHIN_MS = 2000

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (.ci/run installs it)")

SETUP_PEOPLE = """
from django.contrib.auth import get_user_model
from apps.projects import services
from apps.projects.models import Project, Role
User = get_user_model()
demo = Project.objects.get(slug="demo")
other = services.project_create(slug="other", name="Other", actor=None)
for name, project in (("auditor", demo), ("other-auditor", other)):
    user = User.objects.create_user(name, password="pw-" + name + "-123")
    services.role_grant(project=project, user=user, role=Role.AUDITOR, actor=None)
"""


class Server:
    def __init__(self, tmp: Path):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items()
                    if k not in {"DATABASE_URL", "REDIS_URL", "DEBUG", "SECRET_KEY", "DJANGO_SETTINGS_MODULE"}}
        self.env.update({"DATA_DIR": str(tmp / "var"), "PORT": str(self.port), "ADMIN_PASSWORD": "a-long-pw-123",
                         "OTLP_GRPC_PORT": str(free_port())})
        self.log_path = tmp / "server.log"
        self.keys: dict[str, str] = {}

    def start(self):
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(["make", "run"], cwd=ROOT, env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while http.get(f"{self.base}/healthz")[0] != 200:
            assert self.proc.poll() is None, self.log_path.read_text()
            assert time.monotonic() < deadline, "the server did not start within 300 s"
            time.sleep(0.3)
        for project in ("demo", "other"):
            if project == "other":
                self.manage("shell", "-c", SETUP_PEOPLE)
            self.keys[project] = self.manage("create_api_key", "--project", project, "--scopes", "ingest,read",
                                             *(["--create-project"] if project == "demo" else [])).strip()

    def manage(self, *args) -> str:
        done = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=self.env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def stop(self):
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()

    def rest(self, method, path, body=None, project="demo"):
        status, text, _ = http.request(method, f"{self.base}/api/v1{path}", timeout=20,
                                       headers={"Authorization": f"Bearer {self.keys[project]}",
                                                "Content-Type": "application/json"},
                                       data=json.dumps(body).encode() if body is not None else None)
        assert status == 202, (status, text)
        return json.loads(text)


def ago(seconds: float) -> str:
    return (datetime.now(UTC) - timedelta(seconds=seconds)).isoformat()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("browser"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    chromium = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
    yield chromium
    chromium.close()
    pw.stop()


def sign_in(browser, server, user="auditor", width=1280):
    context = browser.new_context(viewport={"width": width, "height": 900})
    page = context.new_page()
    page.goto(f"{server.base}/runs/")  # signed out: sent to the product's login page
    assert "/login/" in page.url
    page.fill("#id_username", user)
    page.fill("#id_password", f"pw-{user}-123")
    page.click("button[type=submit]")
    page.wait_for_url(f"{server.base}/runs/")
    return page


def shoot(page, name):
    SHOTS.mkdir(parents=True, exist_ok=True)
    for width in (1280, 1920):
        page.set_viewport_size({"width": width, "height": 1000})
        page.screenshot(path=str(SHOTS / f"{name}-{width}.png"), full_page=True)
        # Nothing wider than the window: the layout holds at this width.
        overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0, f"{name} overflows by {overflow}px at {width}px"
    page.set_viewport_size({"width": 1280, "height": 900})


def reload_until(page, url, selector, seconds=10):
    """Open ``url`` again until ``selector`` is on it (what a worker projects shows up a moment later)."""
    deadline = time.monotonic() + seconds
    while True:
        page.goto(url)
        if page.locator(selector).count():
            return
        assert time.monotonic() < deadline, page.locator("main").inner_text()[:2000]
        page.wait_for_timeout(300)


def live_ready(page):
    page.wait_for_selector("[data-live-state][data-state=open]", timeout=10_000)


def test_the_overview_shows_a_new_failed_run_live(server, browser):
    page = sign_in(browser, server)
    page.goto(f"{server.base}/")
    live_ready(page)
    sent = time.monotonic()
    server.rest("POST", "/runs", {"run_id": "ov-fail-1", "agent": "billing-bot", "started_at": ago(3)})
    server.rest("POST", "/runs/ov-fail-1/finish", {"status": "failed", "error_code": "card_declined"})
    page.wait_for_selector("[data-tile=failures] >> text=ov-fail-1", timeout=LIVE_WITHIN_MS + 3000)
    elapsed_ms = (time.monotonic() - sent) * 1000
    assert elapsed_ms < LIVE_WITHIN_MS, f"the failed run appeared after {elapsed_ms:.0f} ms"
    assert page.locator("[data-tile=failures]").inner_text().count("card_declined") == 1
    shoot(page, "overview")


def test_the_runs_list_filters_by_agent_and_status_and_keeps_them_in_the_url(server, browser):
    for run_id, agent, status in (("fl-1", "alpha-bot", "failed"), ("fl-2", "alpha-bot", "completed"),
                                  ("fl-3", "beta-bot", "failed")):
        server.rest("POST", "/runs", {"run_id": run_id, "agent": agent, "started_at": ago(20)})
        server.rest("POST", f"/runs/{run_id}/finish", {"status": status})
    page = sign_in(browser, server)
    page.wait_for_selector("text=fl-3")
    page.fill("#id_agent", "alpha-bot")
    page.select_option("select[name=status]", ["failed"])
    page.click("form.filters button[type=submit]")
    page.wait_for_url("**agent=alpha-bot**")
    assert "status=failed" in page.url
    rows = page.locator("tbody tr[data-key]")
    assert rows.count() == 1 and "fl-1" in rows.first.inner_text()
    live_ready(page)
    # The list stays live under its filters: a new matching run appears, another does not.
    server.rest("POST", "/runs", {"run_id": "fl-4", "agent": "alpha-bot"})
    server.rest("POST", "/runs/fl-4/finish", {"status": "failed"})
    server.rest("POST", "/runs", {"run_id": "fl-5", "agent": "beta-bot"})
    server.rest("POST", "/runs/fl-5/finish", {"status": "failed"})
    page.wait_for_selector("tbody >> text=fl-4", timeout=5000)
    page.wait_for_timeout(1000)
    assert page.locator("tbody >> text=fl-5").count() == 0
    page.reload()
    assert page.locator("#id_agent").input_value() == "alpha-bot"
    shoot(page, "runs-filtered")


def test_the_run_page_shows_timeline_tree_a_tool_call_tokens_and_cache_hit_rate(server, browser):
    server.rest("POST", "/runs", {"run_id": "rp-1", "agent": "support-bot", "end_user": "u-42",
                                  "session_id": "sess-1", "started_at": ago(30)})
    server.rest("POST", "/runs/rp-1/spans", [
        {"span_id": "llm-1", "kind": "llm", "name": "chat gpt-4o", "model": "gpt-4o", "provider": "openai",
         "start_time": ago(29), "end_time": ago(27), "time_to_first_token_ms": 300,
         "usage": {"input_tokens": 2000, "output_tokens": 120, "cache_read_tokens": 1500, "reasoning_tokens": 40},
         "input_messages": [{"role": "system", "content": "You are a careful support agent."},
                            {"role": "user", "content": "Where is my parcel?"}]},
        {"span_id": "tool-1", "parent_span_id": "llm-1", "kind": "tool", "name": "track_parcel",
         "start_time": ago(27), "end_time": ago(26),
         "tool": {"name": "track_parcel", "arguments": {"parcel": "PX-1234"}, "result": {"state": "in transit"}}}])
    server.rest("POST", "/runs/rp-1/finish", {"status": "completed", "output": {"answer": "It is in transit."}})
    page = sign_in(browser, server)
    page.wait_for_selector("text=rp-1")
    page.click("text=rp-1")
    page.wait_for_selector("svg.timeline")
    assert page.locator("svg.timeline g.row").count() == 2
    assert page.locator(".tree li[data-span]").count() == 2
    assert page.locator("[data-field=cache-hit-rate]").inner_text() == "75 %"  # 1,500 of 2,000
    assert "2 000 / 120" in page.locator("[data-field=tokens]").inner_text().replace("\u202f", " ")
    page.click(".tree li[data-span=tool-1]")
    page.wait_for_selector("#span-panel [data-tool=arguments]")
    assert "PX-1234" in page.locator("#span-panel [data-tool=arguments]").inner_text()
    assert "in transit" in page.locator("#span-panel [data-tool=result]").inner_text()
    # The model call's context: the system instructions and the user's message, by role.
    page.click(".tree li[data-span=llm-1]")
    page.wait_for_selector("#span-panel [data-messages]")
    messages = page.locator("#span-panel [data-messages] li")
    assert messages.count() == 2 and "careful support agent" in messages.first.inner_text()
    assert messages.first.locator(".role").inner_text().lower() == "system"
    shoot(page, "run")


def test_a_span_that_opens_and_closes_shows_running_then_done_without_reload(server, browser):
    server.rest("POST", "/runs", {"run_id": "lv-1", "agent": "coder", "started_at": ago(5)})
    page = sign_in(browser, server)
    page.wait_for_selector("text=lv-1")
    page.goto(f"{server.base}/runs/demo/lv-1/")
    live_ready(page)
    page.evaluate("window.__marker = 'no reload'")
    server.rest("POST", "/runs/lv-1/spans", {"span_id": "t-1", "kind": "tool", "name": "run_tests",
                                             "tool": {"name": "run_tests", "arguments": {"path": "tests/"}}})
    row = ".tree li[data-span=t-1]"
    page.wait_for_selector(f"{row} .status-running", timeout=5000)
    page.click(row)
    page.wait_for_selector("#span-panel >> text=no result yet")
    server.rest("PATCH", "/runs/lv-1/spans/t-1", {"end_time": ago(0), "status": "ok",
                                                   "tool": {"result": {"passed": 12}}})
    page.wait_for_selector(f"{row} .status-ok", timeout=5000)
    page.wait_for_selector("#span-panel [data-tool=result] >> text=passed", timeout=5000)
    assert page.evaluate("window.__marker") == "no reload"


P = "tangle.loop."


def test_a_loop_run_shows_its_graph_and_the_rationale_of_a_move(server, browser):
    provider, tracer, exporter = sdk(server.base, server.keys["demo"], service="loop-agent")
    with tracer.start_as_current_span("loop", attributes={P + "driver": "dynamic", P + "winner_index": 1}) as root:
        with tracer.start_as_current_span("loop.move", attributes={
                P + "move.kind": "fanout", P + "move.round": 0, P + "move.rationale": "two plans; try both",
                P + "move.child_indices": [0, 1]}):
            pass
        for index, valid in ((0, False), (1, True)):
            with tracer.start_as_current_span("loop.iteration", attributes={
                    P + "iteration.index": index, P + "iteration.verdict.valid": valid,
                    P + "iteration.verdict.score": 0.9 if valid else 0.1}):
                pass
    trace_id = f"{root.get_span_context().trace_id:032x}"
    flush(provider, exporter)
    page = sign_in(browser, server)
    deadline = time.monotonic() + 10
    while True:
        page.goto(f"{server.base}/runs/demo/{trace_id}/")
        if page.locator("svg.graph").count():
            break
        assert time.monotonic() < deadline, page.content()[:2000]
        page.wait_for_timeout(300)
    assert page.locator("svg.graph g.node[data-node]").count() == 2
    assert "winner" in page.locator("svg.graph g.node.winner").text_content()
    page.click("svg.graph a[data-move]")
    assert page.locator("details.move[open] .rationale").inner_text() == "two plans; try both"
    shoot(page, "run-loop")


def test_a_session_page_shows_its_turns_with_their_cache_hit_rates(server, browser):
    for n, (inp, cached) in enumerate(((1000, 0), (1200, 900))):
        run_id = f"turn-{n}"
        server.rest("POST", "/runs", {"run_id": run_id, "agent": "chat", "session_id": "sess-browser",
                                      "started_at": ago(60 - n * 10)})
        server.rest("POST", f"/runs/{run_id}/spans", {"span_id": "m", "kind": "llm", "model": "claude",
                                                      "usage": {"input_tokens": inp, "output_tokens": 10,
                                                                "cache_read_tokens": cached}})
        server.rest("POST", f"/runs/{run_id}/finish", {"status": "completed"})
    page = sign_in(browser, server)
    deadline = time.monotonic() + 10
    while True:
        page.goto(f"{server.base}/sessions/demo/sess-browser/")
        if page.locator("text=turn-1").count():
            break
        assert time.monotonic() < deadline
        page.wait_for_timeout(300)
    text = page.locator("main").inner_text()
    assert "turn-0" in text and "turn-1" in text and "75 %" in text  # 900 of 1,200
    shoot(page, "session")


def test_an_auditor_of_another_project_sees_none_of_it(server, browser):
    server.rest("POST", "/runs", {"run_id": "secret-1", "agent": "vault"})
    page = sign_in(browser, server, user="other-auditor")
    response = page.goto(f"{server.base}/runs/demo/secret-1/")
    assert response.status == 404
    page.goto(f"{server.base}/runs/")
    live_ready(page)
    # The live channel of demo's run is refused; the list channel carries nothing of demo's runs.
    code = page.evaluate("""() => new Promise(resolve => {
        const ws = new WebSocket(`ws://${location.host}/ws/runs/demo/secret-1/`);
        ws.onclose = e => resolve(e.code);
    })""")
    assert code == 4404
    page.evaluate("""() => { window.__live = [];
        document.addEventListener('live:message', e => window.__live.push(e.detail)); }""")
    server.rest("POST", "/runs", {"run_id": "secret-2", "agent": "vault"})
    server.rest("POST", "/runs/secret-2/finish", {"status": "failed"})
    server.rest("POST", "/runs", {"run_id": "mine-1", "agent": "other-bot"}, project="other")
    page.wait_for_selector("tbody >> text=mine-1", timeout=5000)
    live = page.evaluate("window.__live")
    assert live and not any("secret" in json.dumps(m) for m in live)
    assert page.locator("text=secret-2").count() == 0


def test_the_agents_and_audit_pages_open_for_an_auditor(server, browser):
    page = sign_in(browser, server)
    page.goto(f"{server.base}/agents/")
    assert page.locator("main").inner_text().count("support-bot") >= 1
    shoot(page, "agents")
    page.goto(f"{server.base}/audit/")
    page.click("text=Verify the chain")
    page.wait_for_load_state()
    assert "intact" in page.locator("main").inner_text().lower() or "ok" in page.locator("main").inner_text().lower()
    shoot(page, "audit")


def test_the_costs_page_draws_spend_and_the_run_page_a_run_s_cost(server, browser):
    server.rest("POST", "/runs", {"run_id": "cost-1", "agent": {"name": "pricing-bot", "version": "2.1"},
                                  "end_user": "u-77", "started_at": ago(40)})
    usage = {"input_tokens": 12_000, "cache_read_tokens": 8_000, "output_tokens": 900}  # $0.029 on gpt-4o
    server.rest("POST", "/runs/cost-1/spans", [
        {"span_id": "a", "kind": "llm", "name": "chat gpt-4o", "provider": "openai", "model": "gpt-4o",
         "start_time": ago(39), "end_time": ago(38), "usage": usage},
        {"span_id": "b", "kind": "llm", "name": "chat claude", "provider": "anthropic",
         "model": "claude-sonnet-4-20250514", "start_time": ago(37), "end_time": ago(36),
         "usage": {"input_tokens": 10_000, "cache_write_tokens": 10_000, "output_tokens": 1_000}},  # $0.0525
        {"span_id": "x", "kind": "llm", "name": "chat in-house", "provider": "acme", "model": "acme-7b",
         "start_time": ago(35), "end_time": ago(34), "usage": {"input_tokens": 500, "output_tokens": 20}},
        {"span_id": "rep", "kind": "llm", "name": "chat reported", "provider": "openai", "model": "gpt-4o",
         "start_time": ago(33), "end_time": ago(32), "usage": usage, "cost_usd": "0.05"}])
    server.rest("POST", "/runs/cost-1/finish", {"status": "completed"})
    page = sign_in(browser, server)
    reload_until(page, f"{server.base}/costs/", "[data-costs=agent] >> text=pricing-bot")
    assert page.locator("svg.daybars a[data-day]").count() == 30 and page.locator("svg.daybars rect.bar").count() >= 1
    for table, name in (("agent", "pricing-bot"), ("end_user", "u-77"), ("model", "claude-sonnet-4-20250514"),
                        ("provider", "anthropic")):
        assert page.locator(f"[data-costs={table}] a", has_text=name).count() == 1, table
    unpriced = page.locator('[data-unpriced="acme/acme-7b"]')
    assert "does not know acme/acme-7b" in unpriced.inner_text()
    assert "/admin/budgets/priceoverride/add/" in unpriced.locator("text=Add a price override").get_attribute("href")
    shoot(page, "costs")
    # An agent's row drills down into its runs.
    page.click("[data-costs=agent] a:has-text('pricing-bot')")
    page.wait_for_url("**/runs/?**agent=pricing-bot**")
    assert page.locator("tbody tr[data-key]").count() == 1
    assert page.locator("tbody tr[data-key] [data-field=cost]").inner_text() == "$0.1315"
    # The run's page: its cost in the header, each call's in the tree, how it was priced in the panel.
    page.goto(f"{server.base}/runs/demo/cost-1/")
    head = page.locator("[data-field=cost]").inner_text()
    assert "$0.1315" in head and "1 call unpriced" in head and "1 reported cost disagrees" in head
    assert page.locator(".tree li[data-span=a] .cost").inner_text() == "$0.0290"
    assert page.locator(".tree li[data-span=x] .cost").inner_text() == "unpriced"
    page.click(".tree li[data-span=rep]")
    page.wait_for_selector("#span-panel [data-field=span-cost]")
    panel = page.locator("#span-panel").inner_text()
    assert "reported" in panel and "disagrees" in panel and "the tokens say $0.0290" in panel
    shoot(page, "run-cost")
    # Another project's auditor sees none of it.
    other = sign_in(browser, server, user="other-auditor")
    other.goto(f"{server.base}/costs/")
    assert "pricing-bot" not in other.locator("main").inner_text()


MAKE_BUDGET = """
from apps.budgets import services
from apps.projects.models import Project
services.budget_create(project=Project.objects.get(slug="demo"), actor=None, name="browser-daily",
                       cap_nanos=10**9, thresholds=[50, 90])
"""


def test_a_budget_crossing_a_threshold_shows_live_on_the_overview_and_on_the_costs_page(server, browser):
    server.manage("shell", "-c", MAKE_BUDGET)
    raw = server.manage("create_api_key", "--project", "demo", "--scopes", "budget,ingest").strip()

    def call(path, body):
        status, text, _ = http.request("POST", f"{server.base}/api/v1/budget/reservations{path}", timeout=20,
                                       headers={"Authorization": f"Bearer {raw}", "Content-Type": "application/json"},
                                       data=json.dumps(body).encode())
        assert status in (200, 201, 402), (status, text)
        return status, json.loads(text)

    page = sign_in(browser, server)
    page.goto(f"{server.base}/")
    live_ready(page)
    assert page.locator("[data-tile=budgets] [data-alert]").count() == 0
    _, held = call("", {"estimated_cost_usd": "0.60", "run_id": "budget-run-1", "agent": "spender"})
    sent = time.monotonic()
    call(f"/{held['id']}/settle", {"cost_usd": "0.55"})  # 55 % of $1: crosses 50 %
    page.wait_for_selector("[data-tile=budgets] [data-alert=browser-daily-50]", timeout=LIVE_WITHIN_MS + 3000)
    elapsed_ms = (time.monotonic() - sent) * 1000
    assert elapsed_ms < LIVE_WITHIN_MS, f"the crossed threshold appeared after {elapsed_ms:.0f} ms"
    assert "55 % of $1.00" in page.locator("[data-tile=budgets] [data-budget=browser-daily]").inner_text()
    status, refusal = call("", {"estimated_cost_usd": "0.50", "run_id": "budget-run-1", "agent": "spender"})
    assert status == 402 and refusal["error_code"] == "budget_exceeded"
    shoot(page, "overview-budgets")
    page.goto(f"{server.base}/costs/")
    row = page.locator("[data-costs=budgets] tr[data-budget=browser-daily]")
    assert row.get_attribute("data-level") == "near" and "50 % ✓" in row.inner_text()
    shoot(page, "costs-budgets")
    server.rest("POST", "/runs", {"run_id": "budget-run-1", "agent": "spender", "started_at": ago(5)})
    reload_until(page, f"{server.base}/runs/demo/budget-run-1/", "[data-run=reservations]")
    states = page.locator("[data-run=reservations] tr[data-state]").evaluate_all("rs => rs.map(r => r.dataset.state)")
    assert states == ["settled", "refused"]
    assert "budget “browser-daily”" in page.locator("[data-run=reservations] tr[data-state=refused]").inner_text()
    shoot(page, "run-reservations")


SETUP_APPROVER = """
from django.contrib.auth import get_user_model
from apps.projects import services
from apps.projects.models import Project, Role
user = (get_user_model().objects.filter(username="approver").first()
        or get_user_model().objects.create_user("approver", password="pw-approver-123"))
services.role_grant(project=Project.objects.get(slug="demo"), user=user, role=Role.APPROVER, actor=None)
"""


def test_a_request_appears_in_the_open_inbox_is_approved_and_the_agents_wait_ends(server, browser):
    import threading

    server.manage("shell", "-c", SETUP_APPROVER)
    agent_key = server.manage("create_api_key", "--project", "demo", "--scopes", "approvals,ingest").strip()
    headers = {"Authorization": f"Bearer {agent_key}", "Content-Type": "application/json"}
    page = sign_in(browser, server, user="approver")
    page.goto(f"{server.base}/approvals/")
    live_ready(page)

    sent = time.monotonic()
    status, body, _ = http.request("POST", f"{server.base}/api/v1/approvals", headers=headers, timeout=20, data=json.dumps({
        "action": "payments.refund", "arguments": {"order": 1234, "amount": 120}, "summary": "Refund order 1234",
        "agent": "billing-bot", "end_user": "customer-42"}).encode())
    assert status == 201, body
    approval_id = json.loads(body)["id"]
    row = f"[data-approvals=pending] [data-approval={approval_id}]"
    page.wait_for_selector(row, timeout=LIVE_WITHIN_MS + 3000)  # no reload: pushed by the inbox's channel
    elapsed_ms = (time.monotonic() - sent) * 1000
    assert elapsed_ms < LIVE_WITHIN_MS, f"the request appeared after {elapsed_ms:.0f} ms"

    waited: dict = {}

    def wait():
        waited["status"], raw, _ = http.request("GET", f"{server.base}/api/v1/approvals/{approval_id}?wait=30",
                                                headers=headers, timeout=40)
        waited["body"] = json.loads(raw)

    agent = threading.Thread(target=wait)
    agent.start()
    time.sleep(0.5)
    assert agent.is_alive()  # the agent waits
    shoot(page, "approvals")
    page.fill(f"{row} input[name=reason]", "order checked")
    page.click(f"{row} button[data-decide=approve]")
    page.wait_for_selector(f"[data-decide-for={approval_id}][data-decided=approved]", timeout=10_000)
    agent.join(timeout=15)
    assert waited["status"] == 200 and waited["body"]["state"] == "approved"
    assert waited["body"]["decisions"][0] == {**waited["body"]["decisions"][0], "decider": "approver",
                                              "reason": "order checked"}
    page.wait_for_selector(f"{row}", state="detached", timeout=LIVE_WITHIN_MS + 3000)  # no longer pending
    page.goto(f"{server.base}/approvals/demo/{approval_id}/")
    assert page.locator("[data-field=state]").inner_text().startswith("approved")
    shoot(page, "approval")


def test_an_approver_gives_feedback_from_the_run_page_and_an_auditor_may_not(server, browser):
    server.manage("shell", "-c", SETUP_APPROVER)
    server.rest("POST", "/runs", {"run_id": "fb-1", "agent": "support-bot", "started_at": ago(20)})
    server.rest("POST", "/runs/fb-1/finish", {"status": "completed", "output": "Your parcel is in Lyon."})
    page = sign_in(browser, server, user="approver")
    reload_until(page, f"{server.base}/runs/demo/fb-1/", "[data-run-status=completed]")
    live_ready(page)
    assert page.locator("[data-run=scores]").count() == 0  # no score yet
    page.fill("[data-feedback-url] input[name=comment]", "wrong city")
    page.click("[data-feedback-url] button[data-feedback=down]")
    # The API answered (the button shows it) and the scores were re-read without a reload.
    page.wait_for_selector("button[data-feedback=down][aria-pressed=true]", timeout=10_000)
    row = page.wait_for_selector("[data-run=scores] tr[data-score^='human@user:']", timeout=10_000)
    assert "fail" in row.inner_text() and "wrong city" in row.inner_text() and "approver" in row.inner_text()
    shoot(page, "run-feedback")
    # Changed: one feedback per person, now up.
    page.click("[data-feedback-url] button[data-feedback=up]")
    page.wait_for_selector("button[data-feedback=up][aria-pressed=true]", timeout=10_000)
    page.wait_for_function("document.querySelectorAll(\"[data-run=scores] tr[data-score^='human@']\").length === 1 && "
                           "document.querySelector(\"[data-run=scores] tr[data-score^='human@']\").innerText"
                           ".includes('pass')", timeout=10_000)
    # An auditor reads the score, and has no feedback to give.
    auditor = sign_in(browser, server)
    auditor.goto(f"{server.base}/runs/demo/fb-1/")
    assert auditor.locator("[data-run=scores] tr[data-score^='human@']").count() == 1
    assert auditor.locator("[data-feedback-url]").count() == 0


START_BATCH = """
from apps.evals import jobs
from apps.projects.models import Project
job = jobs.job_create(project=Project.objects.get(slug="demo"), actor=None, name="browser-nightly",
                      evaluators=[{"name": "run_succeeded"}, {"name": "json_valid"}], schedule="0 3 * * *")
print(jobs.job_start(job=job, trigger="schedule").pk)
"""


def test_the_evals_page_shows_a_batch_progress_live_and_scores_reach_the_runs_list(server, browser):
    for n in range(3):
        server.rest("POST", "/runs", {"run_id": f"ev-{n}", "agent": "grader-bot", "started_at": ago(60 + n)})
        server.rest("POST", f"/runs/ev-{n}/finish", {"status": "completed" if n else "failed", "output": '{"ok": 1}'})
    page = sign_in(browser, server)
    reload_until(page, f"{server.base}/runs/?agent=grader-bot", "tr[data-status=failed]")
    page.goto(f"{server.base}/evals/")
    live_ready(page)
    batch = server.manage("shell", "-c", START_BATCH).strip().splitlines()[-1]
    # No reload: the embedded worker walks the batch and each chunk's progress is pushed to the page.
    page.wait_for_selector(f"[data-evals=batches] tr[data-batch='{batch}'][data-state=succeeded]",
                           timeout=LIVE_WITHIN_MS + 10_000)
    assert "0 3 * * *" in page.locator("[data-evals=batches]").inner_text()
    shoot(page, "evals")
    page.goto(f"{server.base}/runs/?agent=grader-bot")
    failed = page.locator("tr[data-status=failed] [data-field=scores]")
    assert "✗1" in failed.inner_text() and "run_succeeded: fail" in failed.get_attribute("title")


SETUP_QUEUE = """
from django.contrib.auth import get_user_model
from apps.projects import services
from apps.projects.models import Project, Role
from apps.scheduler import services as queue
from apps.scheduler.models import Device
demo = Project.objects.get(slug="demo")
user = (get_user_model().objects.filter(username="operator").first()
        or get_user_model().objects.create_user("operator", password="pw-operator-123"))
services.role_grant(project=demo, user=user, role=Role.OPERATOR, actor=None)
if not Device.objects.filter(project=demo).exists():
    gpu = queue.device_create(project=demo, actor=None, name="gpu0", gpu="declared:gpu0", memory_mb=24576)
    queue.backend_create(project=demo, actor=None, name="sd-local", device=gpu, kind="handler", handler="sleep",
                         model_memory={"sdxl": {"load_mb": 0, "request_mb": 4000}})
"""


def test_the_queue_page_follows_tasks_live_and_an_operator_pauses_a_device(server, browser):
    server.manage("shell", "-c", SETUP_QUEUE)
    agent_key = server.manage("create_api_key", "--project", "demo", "--scopes", "queue").strip()
    headers = {"Authorization": f"Bearer {agent_key}", "Content-Type": "application/json"}

    def submit(seconds):
        status, body, _ = http.request("POST", f"{server.base}/api/v1/queue/tasks", headers=headers, timeout=20,
                                       data=json.dumps({"kind": "image", "model": "sdxl",
                                                        "input": {"seconds": seconds}}).encode())
        assert status == 201, body
        return json.loads(body)["id"]

    page = sign_in(browser, server, user="operator")
    page.goto(f"{server.base}/queue/")
    live_ready(page)
    sent = time.monotonic()
    task = submit(2)
    row = f"[data-queue=tasks] tr[data-task={task}]"
    page.wait_for_selector(row, timeout=LIVE_WITHIN_MS + 3000)  # no reload: pushed by the queue's channel
    elapsed_ms = (time.monotonic() - sent) * 1000
    assert elapsed_ms < LIVE_WITHIN_MS, f"the task appeared after {elapsed_ms:.0f} ms"
    page.wait_for_selector(f"{row}[data-state=running]", timeout=10_000)
    shoot(page, "queue")
    page.wait_for_selector(row, state="detached", timeout=15_000)  # it ended: gone from the open tasks
    assert page.locator(f"[data-queue=recent] tr[data-task={task}][data-state=succeeded]").count() == 1

    page.on("dialog", lambda dialog: dialog.accept("swap the card"))  # the confirmation, then the reason
    page.click("[data-queue=devices] tr[data-device=gpu0] button[data-paused=true]")
    page.wait_for_selector("[data-queue=devices] tr[data-device=gpu0][data-paused=true]", timeout=10_000)
    held = submit(0)
    page.wait_for_selector(f"[data-queue=tasks] tr[data-task={held}][data-state=queued]", timeout=10_000)
    time.sleep(2.5)  # two ticks of the dispatcher: nothing starts on a paused device
    assert page.locator(f"[data-queue=tasks] tr[data-task={held}]").get_attribute("data-state") == "queued"
    page.dblclick(f"[data-queue=tasks] tr[data-task={held}] td.mono")
    page.wait_for_selector(f"dialog[open] [data-task-history={held}] tr[data-event=submitted]", timeout=5000)
    shoot(page, "queue-task")
    page.keyboard.press("Escape")
    page.click("[data-queue=devices] tr[data-device=gpu0] button[data-paused=false]")
    page.wait_for_selector(f"[data-queue=tasks] tr[data-task={held}]", state="detached", timeout=15_000)
    status, body, _ = http.request("GET", f"{server.base}/api/v1/queue/tasks/{held}", headers=headers, timeout=20)
    assert json.loads(body)["state"] == "succeeded"
    events = [e["event"] for e in json.loads(body)["history"]]
    assert events[:2] == ["submitted", "admitted"] and events[-1] == "succeeded"
