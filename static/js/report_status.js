// Polls the reports API and updates each unfinished report's status, progress and file link without a reload.
(function () {
  "use strict";
  const table = document.getElementById("reports");
  if (!table) return;
  const url = table.dataset.statusUrl;
  const FINISHED = ["done", "failed"];
  let delay = 1000;

  function unfinishedRows() {
    return Array.from(table.querySelectorAll("tr[data-report-id][data-finished='0']"));
  }

  function render(row, report) {
    const status = row.querySelector("[data-role=status]");
    status.textContent = report.status_display;
    status.className = "status status-" + report.status;
    const progress = row.querySelector("[data-role=progress]");
    progress.value = report.progress;
    progress.textContent = report.progress + "%";
    row.querySelector("[data-role=rows]").textContent = report.rows_written + " rows";
    const file = row.querySelector("[data-role=file]");
    if (report.status === "done") {
      const link = document.createElement("a");
      link.href = row.dataset.downloadUrl;
      link.download = "";
      link.textContent = "Download";
      file.replaceChildren(link);
    } else if (report.status === "failed") {
      const reason = document.createElement("span");
      reason.className = "bad";
      reason.textContent = report.failure_reason;
      file.replaceChildren(reason);
    }
    if (FINISHED.includes(report.status)) row.dataset.finished = "1";
  }

  async function poll() {
    try {
      const response = await fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" });
      if (response.ok) {
        const page = await response.json();
        const byId = new Map(page.items.map(function (report) { return [String(report.id), report]; }));
        unfinishedRows().forEach(function (row) {
          const report = byId.get(row.dataset.reportId);
          if (report) render(row, report);
        });
        delay = 1000;
      } else {
        delay = Math.min(delay * 2, 15000);
      }
    } catch (err) {
      delay = Math.min(delay * 2, 15000);
    }
    if (unfinishedRows().length) setTimeout(poll, delay);
  }

  if (unfinishedRows().length) setTimeout(poll, delay);
})();
