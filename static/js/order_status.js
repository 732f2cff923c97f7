// Polls the order's API resource and updates status, receipt and history without a reload.
(function () {
  "use strict";
  const section = document.getElementById("order");
  if (!section) return;
  const url = section.dataset.statusUrl;
  const statusEl = document.getElementById("order-status");
  const progressEl = document.getElementById("order-progress");
  const eventsEl = document.getElementById("order-events");
  const cancelForm = document.getElementById("cancel-form");
  const receiptEl = document.getElementById("receipt");
  const holdEl = document.getElementById("order-hold");
  let delay = 1000;

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
      ...entry("Date", payment.updated_at.slice(0, 16).replace("T", " "))
    );
    receiptEl.replaceChildren(receiptEl.querySelector("h2"), list);
    receiptEl.dataset.final = payment.status !== "processing" ? "1" : "0";
  }

  function render(order) {
    statusEl.textContent = order.status_display;
    statusEl.className = "status status-" + order.status;
    cancelForm.hidden = !order.can_cancel;
    // On hold: a plain message instead of a spinner; polling goes on (the hold may end by itself).
    holdEl.textContent = order.hold_reason || "";
    holdEl.hidden = !order.hold_reason;
    progressEl.hidden = Boolean(order.hold_reason);
    renderReceipt(order.payment);
    eventsEl.replaceChildren(...order.events.map(function (event) {
      const li = document.createElement("li");
      const time = document.createElement("time");
      time.dateTime = event.created_at;
      time.textContent = new Date(event.created_at).toLocaleTimeString();
      li.append(time, " " + event.to_status + (event.note ? " — " + event.note : ""));
      return li;
    }));
  }

  async function poll() {
    try {
      const response = await fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" });
      if (response.ok) {
        const order = await response.json();
        render(order);
        if (["fulfilled", "rejected", "payment_failed", "cancelled"].includes(order.status)) {
          progressEl.hidden = true;
          return;
        }
        delay = 1000;
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
