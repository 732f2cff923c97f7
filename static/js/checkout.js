// Checkout: a new address's (or card's) fields show only while "A new ..." is chosen. Without this
// script every field shows, and the server ignores the ones a saved choice makes unnecessary.
(function () {
  "use strict";
  document.querySelectorAll("fieldset[data-choice]").forEach(function (fieldset) {
    const name = fieldset.dataset.choice;
    const fields = document.querySelector('[data-new-for="' + name + '"]');
    if (!fields) return;
    function update() {
      const chosen = fieldset.querySelector('input[name="' + name + '"]:checked');
      fields.hidden = Boolean(chosen) && chosen.value !== "new";
    }
    fieldset.addEventListener("change", update);
    update();
  });
})();
