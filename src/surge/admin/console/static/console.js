// Live overview: each new point the server samples arrives as an SSE "tick"; the charts are
// re-rendered by the server and swapped in. No framework, no inline script (CSP).
(function () {
  "use strict";
  if (document.body.dataset.view !== "overview" || !window.EventSource) return;
  var charts = document.getElementById("charts");
  if (!charts) return;
  var busy = false;
  function refresh() {
    if (busy) return;
    busy = true;
    fetch("/admin/fragments/charts", { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (html === null) return;
        var box = document.createElement("div");
        box.innerHTML = html;
        var fresh = box.querySelector("#charts");
        if (fresh) charts.replaceWith(fresh), (charts = fresh);
        document.body.dataset.updated = String(Date.now());
      })
      .finally(function () { busy = false; });
  }
  var source = new EventSource("/admin/events");
  source.addEventListener("tick", refresh);
})();
