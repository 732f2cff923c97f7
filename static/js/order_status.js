// Polls the order's API resource and updates status, the plain-words message, receipt, refunds and
// history without a reload. The messages are the page's own (orders/order_detail.html, data-when):
// this script only shows the one that matches the order's state and fills in its details. It stops
// once the order's status is final and no refund of it is still on its way.
(function () {
  "use strict";
  const section = document.getElementById("order");
  if (!section) return;
  const url = section.dataset.statusUrl;
  const slowAfter = Number(section.dataset.slowAfter || 60) * 1000;
  const statusEl = document.getElementById("order-status");
  const stateEl = document.getElementById("order-state");
  const slowEl = document.getElementById("order-slow");
  const eventsEl = document.getElementById("order-events");
  const cancelForm = document.getElementById("cancel-form");
  const receiptEl = document.getElementById("receipt");
  const holdEl = document.getElementById("order-hold");
  const progressEl = document.getElementById("order-progress");
  const refundsEl = document.getElementById("refunds");
  const TERMINAL = [
    "fulfilled", "rejected", "payment_failed", "cancelled", "expired", "refunded", "partially_refunded",
  ];
  const BUSY = ["pending", "confirmed", "paid"];
  let delay = 1000;

  // The page's state: the status, but a cancelled order that was paid is being refunded
  // (orders.views.page_state decides the same on the server).
  function stateOf(order) {
    if (order.status === "cancelled" && order.payment && order.payment.status === "succeeded") {
      return "cancelled_paid";
    }
    return order.status;
  }

  function refunding(order) {
    return order.refunds.some(function (refund) { return refund.status === "requested"; });
  }

  // Every element that says which states it belongs to is shown for those only.
  function showFor(state) {
    document.querySelectorAll("#order [data-when], #receipt [data-when]").forEach(function (el) {
      el.hidden = !el.dataset.when.split(" ").includes(state);
    });
    stateEl.dataset.status = state;
  }

  function entry(term, ...nodes) {
    const dt = document.createElement("dt");
    dt.textContent = term;
    const dd = document.createElement("dd");
    dd.append(...nodes);
    return [dt, dd];
  }

  function code(text) {
    const el = document.createElement("code");
    el.textContent = text || "—";
    return el;
  }

  // The same receipt the server renders (orders/order_detail.html), from the order's payment.
  function renderReceipt(payment) {
    if (!receiptEl || !payment) return;
    const status = document.createElement("span");
    status.className = "status status-" + payment.status;
    status.textContent = payment.status_display;
    const paymentNodes = [status];
    if (payment.failure_reason) {
      const reason = document.createElement("span");
      reason.className = "muted";
      reason.textContent = payment.failure_reason;
      paymentNodes.push(" ", reason);
    }
    const list = document.createElement("dl");
    list.append(
      ...entry("Payment", ...paymentNodes),
      ...entry("Amount", "€" + payment.amount + " " + payment.currency),
      ...entry("Charge", code(payment.provider_charge_id)),
      ...entry("Reference", code(payment.reference)),
      ...entry("Date", window.ShopTime.element(payment.updated_at))
    );
    receiptEl.replaceChildren(receiptEl.querySelector("h2"), list, refundsEl);
    receiptEl.dataset.final = payment.status !== "processing" ? "1" : "0";
  }

  function statusBadge(status, text) {
    const badge = document.createElement("span");
    badge.className = "status status-" + status;
    badge.textContent = text;
    return badge;
  }

  function cell(label, ...nodes) {
    const td = document.createElement("td");
    td.dataset.label = label;
    td.append(...nodes);
    return td;
  }

  // The same table of refunds the server renders, oldest first.
  function renderRefunds(refunds) {
    if (!refundsEl) return;
    refundsEl.hidden = refunds.length === 0;
    refundsEl.querySelector("tbody").replaceChildren(...refunds.map(function (refund) {
      const row = document.createElement("tr");
      row.append(
        cell("Amount", "€" + refund.amount + " " + refund.currency),
        cell("Status", statusBadge(refund.status, refund.status_display)),
        cell("Date", window.ShopTime.element(refund.updated_at))
      );
      return row;
    }));
  }

  // The names of the lines a rejection found short, from its event's note ("out of stock: SKU, ...").
  function soldOut(order) {
    const rejected = order.events.find(function (event) { return event.to_status === "rejected"; });
    const skus = rejected ? rejected.note.split(": ").slice(1).join(": ").split(", ") : [];
    return order.items
      .filter(function (item) { return skus.includes(item.sku); })
      .map(function (item) { return item.name; })
      .join(", ");
  }

  function renderDetails(order) {
    const reasonEl = stateEl.querySelector("[data-role=failure-reason]");
    const reason = order.payment && order.payment.failure_reason;
    reasonEl.textContent = reason ? " (" + reason + ")" : "";
    stateEl.querySelector("[data-role=sold-out]").textContent = soldOut(order) || "some items";
    holdEl.textContent = order.hold_reason || "";
    holdEl.hidden = !order.hold_reason;
    const last = order.refunds[order.refunds.length - 1];
    stateEl.querySelector("[data-role=refund-failed]").hidden = !(last && last.status === "failed");
  }

  function renderSlow(order, serverNow) {
    const since = serverNow - Date.parse(order.updated_at);
    slowEl.hidden = !(BUSY.includes(order.status) && since > slowAfter);
  }

  function render(order, serverNow) {
    statusEl.textContent = order.status_display;
    statusEl.className = "status status-" + order.status;
    cancelForm.hidden = !order.can_cancel;
    showFor(stateOf(order));
    progressEl.hidden = !(BUSY.includes(order.status) || refunding(order));
    renderDetails(order);
    renderSlow(order, serverNow);
    renderReceipt(order.payment);
    renderRefunds(order.refunds);
    eventsEl.replaceChildren(...order.events.map(function (event) {
      const li = document.createElement("li");
      li.append(window.ShopTime.element(event.created_at), " " + event.to_status + (event.note ? " — " + event.note : ""));
      return li;
    }));
  }

  async function poll() {
    try {
      const response = await fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" });
      if (response.ok) {
        const order = await response.json();
        // The server's clock, not the viewer's, decides whether a step is slow.
        const serverNow = Date.parse(response.headers.get("Date") || "") || Date.now();
        render(order, serverNow);
        if (TERMINAL.includes(order.status) && !refunding(order)) return;
        // A hold ends when staff act or a step resumes by itself: minutes, not seconds. A refund takes the
        // provider a moment; one it cannot answer now is asked again with backoff (payments.tasks).
        delay = order.status === "on_hold" ? 5000 : TERMINAL.includes(order.status) ? 2000 : 1000;
      } else {
        delay = Math.min(delay * 2, 15000);
      }
    } catch (err) {
      delay = Math.min(delay * 2, 15000);
    }
    setTimeout(poll, delay);
  }

  if (section.dataset.terminal !== "1") setTimeout(poll, delay);
})();
