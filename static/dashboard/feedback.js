// A person's feedback on the run page: thumbs up or down with an optional comment, sent to the API
// (POST /api/v1/runs/<id>/feedback with the session and the CSRF token), which checks the person's role
// and keeps one feedback per person and run. What the API answers is shown; the scores re-read.
(function () {
  "use strict";
  var box = document.querySelector("[data-feedback-url]");
  if (!box) return;
  var error = box.querySelector("[data-feedback-error]");
  var state = box.querySelector("[data-feedback-state]");
  box.addEventListener("click", function (event) {
    var button = event.target.closest("button[data-feedback]");
    if (!button) return;
    var passed = button.dataset.feedback === "up";
    var buttons = box.querySelectorAll("button[data-feedback]");
    buttons.forEach(function (b) { b.disabled = true; });
    error.textContent = "";
    fetch(box.dataset.feedbackUrl, {
      method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/json",
                "X-CSRFToken": box.querySelector("input[name=csrfmiddlewaretoken]").value},
      body: JSON.stringify({passed: passed, comment: box.querySelector("input[name=comment]").value})
    }).then(function (r) {
      return r.json().then(function (body) { return {ok: r.ok, body: body}; });
    }).then(function (answer) {
      buttons.forEach(function (b) { b.disabled = false; });
      if (!answer.ok) { error.textContent = answer.body.message || "Refused."; return; }
      buttons.forEach(function (b) {
        b.setAttribute("aria-pressed", String((b.dataset.feedback === "up") === answer.body.passed));
      });
      state.textContent = "saved: " + (answer.body.passed ? "👍" : "👎") + "; you may change it";
      var live = document.getElementById("run-live");
      if (live) live.dispatchEvent(new CustomEvent("live:refresh"));
    }).catch(function () {
      buttons.forEach(function (b) { b.disabled = false; });
      error.textContent = "The server could not be reached; try again.";
    });
  });
})();
