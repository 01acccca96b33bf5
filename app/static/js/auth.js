// The API key form. When a call answers 401 the form appears (focus in its input); the key
// entered is held for this tab's session (api.js) and the waiting calls are sent again with it.
// "Forget key" in the top bar drops the key. With auth off the API never answers 401, so
// nothing here ever shows.

import { forgetKey, heldKey, holdKey, onKeyChange, setKeyPrompt } from "./api.js";
import { show, showError } from "./dom.js";

const $ = (id) => document.getElementById(id);

/** Wire the key form and the "Forget key" control; call before the first API call. */
export function mountKeyForm() {
  const panel = $("key-panel");
  const form = $("key-form");
  const input = $("key-input");
  const error = $("key-error");
  let release = null; // resolves the prompt the waiting calls share
  let returnFocus = null; // where focus was when the form appeared, to give it back

  setKeyPrompt(({ refused, message }) => new Promise((resolve) => {
    release = resolve;
    showError(error, refused ? refusal(message) : null);
    input.setAttribute("aria-invalid", String(refused));
    if (panel.hidden) returnFocus = document.activeElement;
    show(panel, true);
    input.focus();
  }));

  // A submit button in a <form>: Enter in the input submits too.
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) {
      showError(error, "Enter a key first.");
      input.focus();
      return;
    }
    holdKey(key);
    input.value = "";
    showError(error, null);
    show(panel, false);
    restoreFocus(returnFocus);
    release?.();
    release = null;
  });

  mountForgetControl();
}

/** The refusal line: the server's words, and what to do. */
function refusal(message) {
  const why = message ? ` (${message.replace(/[.!]$/, "")})` : "";
  return `The server refused that key${why}. Check it and try again.`;
}

/** Give focus back to ELEMENT if it is still on the page (the form that had it is now hidden). */
function restoreFocus(element) {
  if (element && element.isConnected && element !== document.body) element.focus();
}

/** "API key in use · Forget key" in the top bar while a key is held. */
function mountForgetControl() {
  const state = $("key-state");
  const button = $("forget-key");
  const sync = (key) => {
    show(button, key !== null);
    if (key !== null) state.textContent = "API key in use";
    show(state, key !== null || state.dataset.forgotten === "true");
  };
  button.addEventListener("click", () => {
    // The button disappears: say what happened where focus lands, so no one is left on nothing.
    state.dataset.forgotten = "true";
    state.textContent = "API key forgotten";
    forgetKey();
    state.focus();
  });
  onKeyChange((key) => {
    if (key !== null) delete state.dataset.forgotten;
    sync(key);
  });
  sync(heldKey());
}
