// The run page: fold and unfold the span tree, select a span (tree row, timeline bar or a link
// carrying data-select-span) to load its panel, open a loop move's rationale from the graph. The
// selection survives the live re-reads of the page body (live.js), and the open panel is re-read
// with them, so a running tool call shows its result when it arrives.
(function () {
  "use strict";
  var selected = new URLSearchParams(location.search).get("span");
  var panel = document.getElementById("span-panel");

  window.liveRefreshQuery = function () {
    return selected ? "&span=" + encodeURIComponent(selected) : "";
  };

  function loadPanel(spanId) {
    if (!panel || !spanId) return;
    var url = panel.dataset.spanUrl.replace("SPAN", encodeURIComponent(spanId));
    fetch(url, {credentials: "same-origin"})
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (html) { panel.innerHTML = html; })
      .catch(function () { panel.innerHTML = '<p class="error">This span could not be loaded.</p>'; });
  }

  function markSelected() {
    document.querySelectorAll(".tree li.selected").forEach(function (li) {
      li.classList.remove("selected"); li.removeAttribute("aria-selected");
    });
    if (!selected) return;
    var li = document.querySelector('.tree li[data-span="' + CSS.escape(selected) + '"]');
    if (li) {
      li.classList.add("selected"); li.setAttribute("aria-selected", "true");
      // Unfold its ancestors so the selection is visible.
      var depth = +li.dataset.depth, prev = li.previousElementSibling;
      while (prev && depth > 0) {
        if (+prev.dataset.depth < depth) {
          depth = +prev.dataset.depth;
          if (prev.getAttribute("aria-expanded") === "false") toggle(prev);
        }
        prev = prev.previousElementSibling;
      }
      li.hidden = false;
    }
  }

  function select(spanId) {
    selected = spanId;
    var url = new URL(location.href);
    url.searchParams.set("span", spanId);
    history.replaceState(null, "", url);
    markSelected();
    loadPanel(spanId);
  }

  function toggle(li) {
    var open = li.getAttribute("aria-expanded") !== "true";
    li.setAttribute("aria-expanded", open ? "true" : "false");
    var button = li.querySelector(".toggle");
    if (button) button.textContent = open ? "▾" : "▸";
    var depth = +li.dataset.depth, next = li.nextElementSibling, hiddenBelow = null;
    while (next && +next.dataset.depth > depth) {
      var d = +next.dataset.depth;
      if (!open) next.hidden = true;
      else {
        if (hiddenBelow !== null && d <= hiddenBelow) hiddenBelow = null;
        next.hidden = hiddenBelow !== null;
        if (hiddenBelow === null && next.getAttribute("aria-expanded") === "false") hiddenBelow = d;
      }
      next = next.nextElementSibling;
    }
  }

  document.addEventListener("click", function (event) {
    var t = event.target;
    var button = t.closest(".tree .toggle");
    if (button && button.tagName === "BUTTON") { toggle(button.closest("li")); return; }
    var li = t.closest(".tree li[data-span]");
    if (li) { select(li.dataset.span); return; }
    var bar = t.closest("svg.timeline g.row[data-span]");
    if (bar) { select(bar.dataset.span); return; }
    var link = t.closest("[data-select-span]");
    if (link) { event.preventDefault(); select(link.dataset.selectSpan); return; }
    var move = t.closest("a[data-move]");
    if (move) {
      event.preventDefault();
      var details = document.getElementById(move.getAttribute("href").slice(1));
      if (details) { details.open = true; details.scrollIntoView({block: "nearest"}); }
    }
  });

  document.addEventListener("live:refreshed", function () {
    markSelected();
    if (selected) loadPanel(selected);
  });

  document.addEventListener("DOMContentLoaded", function () {
    markSelected();
    if (selected) loadPanel(selected);
  });
})();
