// Approve and reject on the approvals pages. The page decides nothing: the buttons call the API
// (POST /api/v1/approvals/<id>/approve|reject with the session and the CSRF token), which checks the
// person's role at that moment, refuses the requester's own request and audits the decision. What the
// API answers is shown; the live list re-reads itself when the decision is published.
(function () {
  "use strict";
  function csrf() {
    var input = document.querySelector("input[name=csrfmiddlewaretoken]");
    return input ? input.value : "";
  }
  document.addEventListener("click", function (event) {
    var button = event.target.closest("button[data-decide]");
    if (!button) return;
    var box = button.closest("[data-decide-for]");
    var reason = box.querySelector("input[name=reason]");
    var error = box.querySelector("[data-decide-error]");
    box.querySelectorAll("button").forEach(function (b) { b.disabled = true; });
    error.textContent = "";
    fetch(button.dataset.url, {
      method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/json", "X-CSRFToken": csrf()},
      body: JSON.stringify({reason: reason ? reason.value : ""})
    }).then(function (r) {
      return r.json().then(function (body) { return {ok: r.ok, body: body}; });
    }).then(function (answer) {
      if (!answer.ok) {
        error.textContent = answer.body.message || "Refused.";
        box.querySelectorAll("button").forEach(function (b) { b.disabled = false; });
        return;
      }
      box.dataset.decided = answer.body.state;
      box.textContent = answer.body.state === "pending"
        ? "Your approval is counted (" + answer.body.approvals + " of " + answer.body.quorum + ")."
        : "Done: " + answer.body.state + ".";
      var page = document.querySelector("[data-approval][data-state]");
      if (page && !box.closest("tr")) page.dataset.state = answer.body.state;
    }).catch(function () {
      error.textContent = "The server could not be reached; try again.";
      box.querySelectorAll("button").forEach(function (b) { b.disabled = false; });
    });
  });
})();
