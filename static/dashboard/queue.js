// The queue page's controls and drill-down. The page decides nothing: each button asks for confirmation
// and a reason, then calls the API with the session and the CSRF token (pause, resume and throttle:
// POST /api/v1/projects/<slug>/queue/controls; a task's cancel, redirect and priority:
// POST /api/v1/queue/tasks/<id>/...), which checks the operator's role and audits the action. The live
// part re-reads itself when the change is published. A double-click on a task's row opens its dispatch
// history (GET /api/v1/queue/tasks/<id>) and a link to its run.
(function () {
  "use strict";
  function csrf() {
    var input = document.querySelector("input[name=csrfmiddlewaretoken]");
    return input ? input.value : "";
  }
  function showError(el, message) {
    var section = el.closest("[data-queue-project]");
    var box = section && section.querySelector("[data-queue-error]");
    if (box) box.textContent = message;
  }
  function post(el, url, body) {
    el.disabled = true;
    return fetch(url, {
      method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/json", "X-CSRFToken": csrf()},
      body: JSON.stringify(body)
    }).then(function (r) {
      return r.json().then(function (answer) {
        if (!r.ok) throw new Error(answer.message || "Refused.");
        showError(el, "");
        var live = document.getElementById("queue-live");
        if (live) live.dispatchEvent(new CustomEvent("live:refresh"));
        return answer;
      });
    }).catch(function (err) {
      showError(el, err.message || "The server could not be reached; try again.");
    }).finally(function () { el.disabled = false; });
  }
  function ask(question) {
    if (!window.confirm(question)) return null;
    var reason = window.prompt("Why? (kept in the audit log)", "");
    return reason === null ? null : reason;
  }

  document.addEventListener("click", function (event) {
    var control = event.target.closest("button[data-control]");
    if (control) {
      var d = control.dataset, body = {}, what;
      if (d.device) { body.device = d.device; what = "device " + d.device; }
      else if (d.backend) { body.backend = d.backend; what = "backend " + d.backend; }
      else { what = "the whole queue of " + d.project; }
      if (d.throttle !== undefined) {
        var ms = window.prompt("At least how many milliseconds between starts on " + what + "? (0: none)", d.throttle);
        if (ms === null) return;
        if (!/^[0-9]+$/.test(ms.trim())) { showError(control, "A whole number of milliseconds."); return; }
        body.throttle_ms = parseInt(ms, 10);
        var why = window.prompt("Why? (kept in the audit log)", "");
        if (why === null) return;
        body.reason = why;
      } else {
        body.paused = d.paused === "true";
        var reason = ask((body.paused ? "Pause " : "Resume ") + what + "?" +
                         (body.paused ? " Nothing new starts there; running tasks finish." : ""));
        if (reason === null) return;
        body.reason = reason;
      }
      post(control, "/api/v1/projects/" + encodeURIComponent(d.project) + "/queue/controls", body);
      return;
    }
    var action = event.target.closest("button[data-task-action]");
    if (action) {
      var id = action.dataset.taskId, url = "/api/v1/queue/tasks/" + encodeURIComponent(id) + "/";
      if (action.dataset.taskAction === "cancel") {
        var force = action.dataset.force === "true";
        var r = ask(force ? "Kill task " + id + " now? Its worker process is terminated (the last resort)."
                          : "Cancel task " + id + "?");
        if (r === null) return;
        post(action, url + "cancel", {reason: r, force: force});
      } else if (action.dataset.taskAction === "priority") {
        var p = window.prompt("New priority for " + id + " (-100 to 100, higher first)", action.dataset.priority);
        if (p === null) return;
        if (!/^-?[0-9]+$/.test(p.trim())) { showError(action, "A whole number from -100 to 100."); return; }
        var pr = window.prompt("Why? (kept in the audit log)", "");
        if (pr === null) return;
        post(action, url + "priority", {priority: parseInt(p, 10), reason: pr});
      }
    }
  });

  document.addEventListener("change", function (event) {
    var select = event.target.closest("select[data-redirect-to]");
    if (!select || !select.value) return;
    var id = select.dataset.redirectTo, backend = select.value;
    var reason = ask("Move task " + id + " to " + backend + "? A running task is stopped and queued there.");
    if (reason === null) { select.value = ""; return; }
    post(select, "/api/v1/queue/tasks/" + encodeURIComponent(id) + "/redirect", {backend: backend, reason: reason});
  });

  function text(tag, value, cls) {
    var el = document.createElement(tag);
    el.textContent = value === null || value === undefined ? "" : String(value);
    if (cls) el.className = cls;
    return el;
  }

  document.addEventListener("dblclick", function (event) {
    var row = event.target.closest("tr[data-task]");
    if (!row || event.target.closest("button, select")) return;
    var dialog = document.querySelector("[data-task-detail]");
    var body = dialog.querySelector("[data-task-detail-body]");
    fetch("/api/v1/queue/tasks/" + encodeURIComponent(row.dataset.task), {credentials: "same-origin"})
      .then(function (r) { return r.json(); })
      .then(function (task) {
        body.textContent = "";
        body.appendChild(text("h2", "Task " + task.id + " · " + task.state));
        var facts = text("p", task.kind + " · " + task.model + " on " + task.backend + " (" + task.device + ") · " +
                         task.memory_mb + " MiB · priority " + task.priority + " · attempts " + task.attempts +
                         " · requested by " + task.requested_by, "muted");
        body.appendChild(facts);
        if (task.run_id) {
          var link = document.createElement("a");
          link.href = "/runs/" + encodeURIComponent(task.project) + "/" + encodeURIComponent(task.run_id) + "/";
          link.textContent = "Its run's trace →";
          link.dataset.taskRun = task.run_id;
          body.appendChild(link);
        }
        if (task.error_code) body.appendChild(text("p", task.error_code + ": " + (task.error_message || ""), "bad"));
        var table = document.createElement("table");
        table.className = "list";
        table.dataset.taskHistory = task.id;
        var head = table.createTHead().insertRow();
        ["When", "Event", "Who", "Where", "Waited", "Ran"].forEach(function (h) { head.appendChild(text("th", h)); });
        var tbody = table.createTBody();
        task.history.forEach(function (e) {
          var tr = tbody.insertRow();
          tr.dataset.event = e.event;
          [e.at.replace("T", " ").slice(0, 23), e.event, e.actor, e.backend + " / " + e.device,
           e.waited_ms === null ? "" : e.waited_ms + " ms", e.ran_ms === null ? "" : e.ran_ms + " ms"]
            .forEach(function (v) { tr.appendChild(text("td", v)); });
        });
        body.appendChild(table);
        dialog.showModal();
      });
  });
})();
