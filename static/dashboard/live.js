// Live pages, without a framework. An element with data-live-ws="/ws/..." holds a WebSocket open
// (reconnecting with backoff) and applies what the server sends:
//   {"type": "row", "key": k, "html": "<tr ...>"}  a row of a live list: replaced in place, or added on top
//   {"type": "remove", "key": k}                   a row that no longer matches the page's filters
//   {"type": "changed"}                            something moved: re-read data-live-refresh (debounced;
//                                                  with data-live-parts, each data-live-part is swapped)
// The database stays the truth: each time the socket opens, the first time included, the page re-reads
// its data-live-refresh fragment, so a change made between rendering the page and subscribing, or
// while disconnected, only delays the page (a run projected just after the list was rendered was
// otherwise missing until the next change).
(function () {
  "use strict";
  var REFRESH_DEBOUNCE_MS = 150;

  function setState(state) {
    document.querySelectorAll("[data-live-state]").forEach(function (el) {
      el.dataset.state = state;
      el.textContent = state === "open" ? "live" : state === "closed" ? "reconnecting" : "connecting";
    });
  }

  function refresher(el) {
    var timer = null, inflight = false, again = false;
    function run() {
      if (inflight) { again = true; return; }
      inflight = true;
      var url = el.dataset.liveRefresh;
      var extra = typeof window.liveRefreshQuery === "function" ? window.liveRefreshQuery(el) : "";
      fetch(url + extra, {credentials: "same-origin", headers: {"X-Requested-With": "live"}})
        .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
        .then(function (html) {
          keepingOpen(el, function () {
            if (el.hasAttribute("data-live-parts")) swapParts(el, html);
            else el.innerHTML = html;
          });
          el.dispatchEvent(new CustomEvent("live:refreshed", {bubbles: true}));
        })
        .catch(function () {})
        .finally(function () {
          inflight = false;
          if (again) { again = false; run(); }
        });
    }
    return function () {
      if (timer) return;
      timer = setTimeout(function () { timer = null; run(); }, REFRESH_DEBOUNCE_MS);
    };
  }

  // What a person opened stays open when the part holding it is re-read (a <details> with an id): the
  // re-read that follows the socket's opening would otherwise close a panel opened a moment before.
  function keepingOpen(el, swap) {
    var open = Array.prototype.map.call(el.querySelectorAll("details[open][id]"), function (d) { return d.id; });
    swap();
    open.forEach(function (id) {
      var again = document.getElementById(id);
      if (again && el.contains(again)) again.open = true;
    });
  }

  // A page of several live parts (data-live-part="name") gets them all in one response and swaps
  // each in place, so what sits between them (an open panel) is left alone.
  function swapParts(el, html) {
    var tpl = document.createElement("template");
    tpl.innerHTML = html;
    tpl.content.querySelectorAll("[data-live-part]").forEach(function (fresh) {
      var current = el.querySelector('[data-live-part="' + fresh.dataset.livePart + '"]');
      if (current) current.innerHTML = fresh.innerHTML;
    });
  }

  function applyRow(el, msg) {
    var existing = el.querySelector('tr[data-key="' + CSS.escape(String(msg.key)) + '"]');
    var tpl = document.createElement("template");
    tpl.innerHTML = msg.html.trim();
    var row = tpl.content.firstElementChild;
    if (!row) return;
    if (existing) {
      existing.replaceWith(row);
    } else if (el.dataset.liveList === "top") {
      var empty = el.querySelector("tr.empty-row");
      if (empty) empty.remove();
      row.classList.add("new");
      el.insertBefore(row, el.firstElementChild);
    }
  }

  function connect(el) {
    var refresh = el.dataset.liveRefresh ? refresher(el) : null;
    // A write the page made itself (a person's feedback) asks for a re-read without waiting for a message.
    el.addEventListener("live:refresh", function () { if (refresh) refresh(); });
    var delay = 500;
    function open() {
      var proto = location.protocol === "https:" ? "wss://" : "ws://";
      var ws = new WebSocket(proto + location.host + el.dataset.liveWs);
      ws.onopen = function () {
        setState("open");
        if (refresh) refresh();  // re-read what changed before this subscription began
        delay = 500;
      };
      ws.onmessage = function (event) {
        var msg;
        try { msg = JSON.parse(event.data); } catch (e) { return; }
        if (msg.type === "row") applyRow(el, msg);
        else if (msg.type === "remove") {
          var gone = el.querySelector('tr[data-key="' + CSS.escape(String(msg.key)) + '"]');
          if (gone) gone.remove();
        } else if (msg.type === "changed" && refresh) refresh();
        el.dispatchEvent(new CustomEvent("live:message", {bubbles: true, detail: msg}));
      };
      ws.onclose = function (event) {
        setState("closed");
        if (event.code === 4403 || event.code === 4404) return;  // not allowed or gone: do not retry
        setTimeout(open, delay);
        delay = Math.min(delay * 2, 10000);
      };
    }
    open();
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-live-ws]").forEach(connect);
  });
})();
