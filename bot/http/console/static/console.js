// The console's only script: every element with data-live="URL" re-reads its HTML fragment from URL every
// two seconds and swaps it in when it changed, so new conversations and turns appear without a reload.
"use strict";

const LIVE_MS = 2000;

async function refresh(element) {
  try {
    const response = await fetch(element.dataset.live, { credentials: "same-origin", cache: "no-store" });
    if (response.status === 401) { window.location = "/admin/login"; return; }
    if (!response.ok) return;
    const html = await response.text();
    if (html !== element.dataset.lastHtml) {
      element.dataset.lastHtml = html;
      element.innerHTML = html;
    }
  } catch (error) {
    // the server restarting: try again at the next tick
  }
}

function confirmForms() {
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  }
}

document.addEventListener("DOMContentLoaded", () => {
  for (const element of document.querySelectorAll("[data-live]")) {
    setInterval(() => refresh(element), LIVE_MS);
  }
  confirmForms();
});
