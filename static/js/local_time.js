// One time format on every page, in the viewer's time zone: each <time data-local> the server
// rendered in UTC (the text kept without script) is rewritten here; pages that add times use ShopTime.element.
(function () {
  "use strict";
  const DATE_TIME = new Intl.DateTimeFormat(undefined, {
    year: "numeric",
    month: "short",
    day: "numeric",
    hour: "2-digit",
    minute: "2-digit",
    timeZoneName: "short",
  });
  // A calendar date (a billing period) is the same day everywhere: never shifted by a zone.
  const DATE = new Intl.DateTimeFormat(undefined, { year: "numeric", month: "short", day: "numeric", timeZone: "UTC" });

  function render(el) {
    const value = el.getAttribute("datetime");
    const date = el.dataset.local === "date" ? new Date(value + "T00:00:00Z") : new Date(value);
    if (Number.isNaN(date.getTime())) return;
    el.textContent = (el.dataset.local === "date" ? DATE : DATE_TIME).format(date);
  }

  function element(value, kind) {
    const el = document.createElement("time");
    el.setAttribute("datetime", value);
    el.dataset.local = kind || "datetime";
    el.textContent = value;
    render(el);
    return el;
  }

  function renderAll(root) {
    (root || document).querySelectorAll("time[data-local]").forEach(render);
  }

  window.ShopTime = { element: element, render: render, renderAll: renderAll };
  renderAll(document);
})();
