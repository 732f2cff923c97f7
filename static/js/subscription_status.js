// Polls each subscription whose charge is under way (payments/views.py: subscription_status) and
// updates its row and the payment history without a reload, the way the order page follows an order.
(function () {
  "use strict";
  const table = document.getElementById("subscriptions");
  const history = document.querySelector("#payments tbody");
  if (!table || !history) return;
  const delays = new Map();

  function cell(label, ...nodes) {
    const td = document.createElement("td");
    td.dataset.label = label;
    td.append(...nodes);
    return td;
  }

  function statusNodes(payment) {
    const status = document.createElement("span");
    status.className = "status status-" + payment.status;
    status.textContent = payment.status_display;
    const nodes = [status];
    if (payment.failure_reason) {
      const reason = document.createElement("span");
      reason.className = "muted";
      reason.textContent = payment.failure_reason;
      nodes.push(" ", reason);
    }
    return nodes;
  }

  // The same row the server renders (payments/subscriptions.html), updated in place or added on top.
  function renderPayment(payment, plan) {
    const existing = history.querySelector("tr[data-payment-id='" + payment.id + "']");
    if (existing) {
      existing.querySelector("[data-role=status]").replaceChildren(...statusNodes(payment));
      return;
    }
    const row = document.createElement("tr");
    row.dataset.paymentId = String(payment.id);
    const statusCell = cell("Status", ...statusNodes(payment));
    statusCell.dataset.role = "status";
    row.append(
      cell("Date", window.ShopTime.element(payment.created_at)),
      cell("Plan", plan),
      cell("Period", window.ShopTime.element(payment.billing_period, "date")),
      cell("Amount", "€" + payment.amount),
      statusCell
    );
    const empty = history.querySelector("tr[data-role=empty]");
    if (empty) empty.remove();
    history.prepend(row);
  }

  function renderSubscription(row, sub) {
    const status = row.querySelector("[data-role=status]");
    status.textContent = sub.status_display;
    status.className = "status status-" + sub.status;
    const state = sub.charging ? "charging" : sub.status;
    row.querySelectorAll("[data-when]").forEach(function (el) {
      el.hidden = el.dataset.when !== state;
    });
    row.querySelector("[data-role=period-start]").replaceChildren(
      window.ShopTime.element(sub.current_period_start, "date")
    );
    row.querySelector("[data-role=period-end]").replaceChildren(
      sub.status === "cancelled" ? "—" : window.ShopTime.element(sub.current_period_end, "date")
    );
    // Oldest first, so each new one lands on top as the server orders them (newest first).
    sub.payments.slice().reverse().forEach(function (payment) { renderPayment(payment, sub.plan); });
    row.dataset.settled = sub.charging ? "0" : "1";
  }

  async function poll(row) {
    let delay = delays.get(row) || 1000;
    try {
      const response = await fetch(row.dataset.statusUrl, {
        headers: { Accept: "application/json" },
        credentials: "same-origin",
      });
      if (response.ok) {
        renderSubscription(row, await response.json());
        delay = 1000;
      } else {
        delay = Math.min(delay * 2, 15000);
      }
    } catch (err) {
      delay = Math.min(delay * 2, 15000);
    }
    delays.set(row, delay);
    if (row.dataset.settled === "0") setTimeout(function () { poll(row); }, delay);
  }

  table.querySelectorAll("tr[data-subscription-id][data-settled='0']").forEach(function (row) {
    setTimeout(function () { poll(row); }, 1000);
  });
})();
