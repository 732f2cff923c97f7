// Polls the order's API resource and updates status and history without a reload.
(function () {
  "use strict";
  const section = document.getElementById("order");
  if (!section) return;
  const url = section.dataset.statusUrl;
  const statusEl = document.getElementById("order-status");
  const progressEl = document.getElementById("order-progress");
  const eventsEl = document.getElementById("order-events");
  const cancelForm = document.getElementById("cancel-form");
  let delay = 1000;

  function render(order) {
    statusEl.textContent = order.status_display;
    statusEl.className = "status status-" + order.status;
    cancelForm.hidden = !order.can_cancel;
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
        // The receipt is rendered by the server: fetch the page again once the payment has an outcome.
        const receipt = document.getElementById("receipt");
        if (receipt && receipt.dataset.final !== "1" && ["paid", "fulfilled", "payment_failed"].includes(order.status)) {
          window.location.reload();
          return;
        }
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
