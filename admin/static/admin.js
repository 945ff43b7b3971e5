// Toolio sidecar admin page. Plain JS, no build step, no third-party code.
//
// Security notes:
// * The admin key is typed into a password field, sent once to POST api/session and cleared;
//   it never goes to localStorage / sessionStorage / cookies readable by script. The session
//   lives in an HttpOnly cookie; the CSRF token is kept only in this closure's memory.
// * All data is written with textContent / DOM APIs, never innerHTML (no markup injection).
// * CSP forbids inline script, style and handlers: everything is wired up here.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const state = { csrf: null, actor: null, keys: [], roles: [], auditBefore: null, activityKey: null };

  // ---- API ---------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, body) {
      super((body && body.message) || `Request failed (HTTP ${status})`);
      this.status = status;
      this.code = body && body.error;
      this.field = body && body.field;
    }
  }

  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    const init = { method, headers, credentials: "same-origin", cache: "no-store" };
    if (method !== "GET" && state.csrf) headers["X-CSRF-Token"] = state.csrf;
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    // Relative to /admin/ so the page also works behind a path-prefixing proxy.
    const resp = await fetch(`api/${path}`, init);
    let data = null;
    try {
      data = await resp.json();
    } catch (_) {
      data = null;
    }
    if (!resp.ok) {
      const err = new ApiError(resp.status, data);
      if (resp.status === 401 && path !== "session") {
        showLogin("Your session has ended. Sign in again.");
      }
      throw err;
    }
    return data;
  }

  // ---- small helpers -----------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  function showAlert(node, message) {
    node.textContent = message || "";
    node.hidden = !message;
  }

  function announce(message) {
    const node = $("announcer");
    node.textContent = "";
    // A fresh text node after a tick makes screen readers read repeated messages too.
    window.setTimeout(() => { node.textContent = message; }, 30);
  }

  const relative = new Intl.RelativeTimeFormat("en", { numeric: "auto" });
  const dateFormat = new Intl.DateTimeFormat("en", { year: "numeric", month: "short", day: "numeric" });
  const timeFormat = new Intl.DateTimeFormat("en", {
    year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit",
  });

  function ago(iso) {
    const seconds = (Date.parse(iso) - Date.now()) / 1000;
    const steps = [[60, "second"], [60, "minute"], [24, "hour"], [30, "day"], [12, "month"]];
    let value = seconds;
    for (const [size, unit] of steps) {
      if (Math.abs(value) < size) {
        return unit === "second" && Math.abs(value) < 45 ? "just now" : relative.format(Math.round(value), unit);
      }
      value /= size;
    }
    return relative.format(Math.round(value), "year");
  }

  function timeCell(iso, format, empty) {
    if (!iso) return el("td", { class: "muted" }, empty);
    return el("td", {}, el("time", { datetime: iso, title: timeFormat.format(new Date(iso)) }, format(iso)));
  }

  // ---- views -------------------------------------------------------------------------------

  function showLogin(message) {
    state.csrf = null;
    state.actor = null;
    closeMenu(false);
    for (const id of ["add-dialog", "key-dialog", "activity-dialog"]) {
      const dialog = $(id);
      if (dialog.open) dialog.close();
    }
    $("loading").hidden = true;
    $("app-view").hidden = true;
    $("account").hidden = true;
    $("login-view").hidden = false;
    showAlert($("login-error"), message || "");
    $("login-key").focus();
  }

  async function showApp(session) {
    state.csrf = session.csrf_token;
    state.actor = session.actor;
    $("actor").textContent = session.actor;
    $("loading").hidden = true;
    $("login-view").hidden = true;
    $("account").hidden = false;
    $("app-view").hidden = false;
    showAlert($("app-error"), "");
    selectTab("keys", false);
    await Promise.all([loadKeys(), loadRoles()]);
  }

  async function login(event) {
    event.preventDefault();
    const input = $("login-key");
    const key = input.value.trim();
    // The key leaves the DOM right away; only the request below ever sees it.
    input.value = "";
    if (!key) {
      showAlert($("login-error"), "Paste an admin API key.");
      input.focus();
      return;
    }
    const submit = $("login-submit");
    submit.disabled = true;
    try {
      const session = await api("POST", "session", { key });
      await showApp(session);
    } catch (err) {
      showAlert($("login-error"), err.message);
      input.focus();
    } finally {
      submit.disabled = false;
    }
  }

  async function logout() {
    try {
      await api("DELETE", "session");
    } catch (_) {
      // Already ended server-side: the login view is the right place either way.
    }
    state.keys = [];
    $("keys-body").replaceChildren();
    $("audit-body").replaceChildren();
    $("roles-body").replaceChildren();
    showLogin("You have signed out.");
  }

  // ---- tabs (WAI-ARIA tabs pattern) ---------------------------------------------------------

  const TABS = ["keys", "audit", "roles"];

  function selectTab(name, focus) {
    for (const tab of TABS) {
      const button = $(`tab-${tab}`);
      const selected = tab === name;
      button.setAttribute("aria-selected", String(selected));
      button.tabIndex = selected ? 0 : -1;
      $(`panel-${tab}`).hidden = !selected;
    }
    if (focus) $(`tab-${name}`).focus();
    if (name === "audit") {
      fillKeyFilter();
      loadAudit(true);
    }
  }

  function tabKeydown(event) {
    const index = TABS.indexOf(event.currentTarget.id.slice(4));
    let next = null;
    if (event.key === "ArrowRight") next = (index + 1) % TABS.length;
    else if (event.key === "ArrowLeft") next = (index - 1 + TABS.length) % TABS.length;
    else if (event.key === "Home") next = 0;
    else if (event.key === "End") next = TABS.length - 1;
    if (next === null) return;
    event.preventDefault();
    selectTab(TABS[next], true);
  }

  // ---- keys table ---------------------------------------------------------------------------

  async function loadKeys() {
    try {
      const data = await api("GET", "keys");
      state.keys = data.keys;
      renderKeys();
    } catch (err) {
      if (err.status !== 401) showAlert($("app-error"), err.message);
    }
  }

  async function loadRoles() {
    try {
      const data = await api("GET", "roles");
      state.roles = data.roles;
      const select = $("key-roles");
      select.replaceChildren(...state.roles.map((role) => el("option", {
        value: role.name,
        title: `Permissions: ${role.permissions.join(", ") || "none"}. Tools: ${toolsText(role.tools)}.`,
        text: role.description ? `${role.name} — ${role.description}` : role.name,
      })));
      select.size = Math.min(Math.max(state.roles.length, 2), 6);
      $("roles-body").replaceChildren(...state.roles.map(roleRow));
    } catch (err) {
      if (err.status !== 401) showAlert($("app-error"), err.message);
    }
  }

  // A role's tools: null allows every tool, [] none (docs/reference/config.md, [roles.NAME]).
  function toolsText(tools) {
    if (tools === null || tools === undefined) return "all tools";
    return tools.length ? tools.join(", ") : "none";
  }

  function roleRow(role) {
    const list = (items, cls) => items.map((item) => el("span", { class: cls, text: item }));
    let tools;
    if (role.tools === null || role.tools === undefined) tools = el("td", { class: "muted", text: "All tools" });
    else if (role.tools.length === 0) tools = el("td", { class: "muted", text: "No tools" });
    else tools = el("td", { "aria-label": `Tool patterns: ${role.tools.join(", ")}` }, ...list(role.tools, "pill pill-pattern"));
    return el("tr", {},
      el("th", { scope: "row", class: "key-name", text: role.name }),
      el("td", { text: role.description || "—" }),
      role.permissions.length ? el("td", {}, ...list(role.permissions, "pill")) : el("td", { class: "muted", text: "None" }),
      tools,
    );
  }

  function statusBadge(status) {
    const label = status === "enabled" ? "Enabled" : "Disabled";
    return el("span", { class: `badge badge-${status}` }, el("span", { class: "dot", "aria-hidden": "true" }), label);
  }

  function keyRow(key) {
    const roles = el("td", { class: "roles" },
      ...key.roles.map((role) => el("span", { class: "pill", text: role })));
    const actions = el("button", {
      type: "button",
      class: "btn btn-ghost btn-sm actions-button",
      "aria-haspopup": "menu",
      "aria-expanded": "false",
      "aria-label": `Actions for ${key.name}`,
    }, el("span", { "aria-hidden": "true", text: "⋯" }), " Actions");
    actions.addEventListener("click", (event) => {
      event.stopPropagation();
      openMenu(key.id, actions, anchorOf(actions));
    });
    const row = el("tr", {
      tabindex: "0",
      "data-key-id": key.id,
      class: key.status === "disabled" ? "row-disabled" : null,
      "aria-label": `${key.name}, ${key.status}`,
    },
      el("td", { class: "name" }, el("span", { class: "key-name", text: key.name })),
      el("td", {}, el("code", { class: "preview", text: key.preview })),
      roles,
      el("td", { class: "status" }, statusBadge(key.status)),
      timeCell(key.last_used_at, ago, "Never"),
      timeCell(key.created_at, (iso) => dateFormat.format(new Date(iso)), "—"),
      el("td", { class: "col-actions" }, actions),
    );
    row.addEventListener("contextmenu", (event) => {
      event.preventDefault();
      // A keyboard-initiated contextmenu event has no pointer position: anchor at the row.
      const fromPointer = event.button === 2 && (event.clientX !== 0 || event.clientY !== 0);
      openMenu(key.id, row, fromPointer ? { x: event.clientX, y: event.clientY } : anchorOf(row));
    });
    row.addEventListener("keydown", (event) => {
      if (event.target !== row) return;
      if (event.key === "ContextMenu" || (event.shiftKey && event.key === "F10")) {
        event.preventDefault();
        openMenu(key.id, row, anchorOf(row));
      }
    });
    return row;
  }

  function renderKeys() {
    const body = $("keys-body");
    body.replaceChildren(...state.keys.map(keyRow));
    $("keys-empty").hidden = state.keys.length > 0;
    $("keys-table").hidden = state.keys.length === 0;
  }

  function replaceKey(updated) {
    const index = state.keys.findIndex((k) => k.id === updated.id);
    if (index >= 0) state.keys[index] = updated;
    else state.keys.push(updated);
    const old = document.querySelector(`tr[data-key-id="${CSS.escape(updated.id)}"]`);
    const row = keyRow(updated);
    if (old) old.replaceWith(row);
    else renderKeys();
    $("keys-empty").hidden = state.keys.length > 0;
    $("keys-table").hidden = state.keys.length === 0;
    return row;
  }

  async function setStatus(keyId, action) {
    const key = state.keys.find((k) => k.id === keyId);
    showAlert($("app-error"), "");
    try {
      const updated = await api("POST", `keys/${encodeURIComponent(keyId)}/${action}`);
      const row = replaceKey(updated);
      row.focus();
      announce(`${updated.name} is now ${updated.status}.`);
    } catch (err) {
      if (err.status !== 401) showAlert($("app-error"), `Could not ${action} ${key ? key.name : "the key"}: ${err.message}`);
    }
  }

  // ---- context menu (WAI-ARIA menu pattern) -----------------------------------------------

  let menuInvoker = null;

  function anchorOf(node) {
    const rect = node.getBoundingClientRect();
    return { x: rect.left + Math.min(rect.width, 48), y: rect.bottom };
  }

  function menuItems() {
    return Array.from($("row-menu").querySelectorAll('[role="menuitem"]'));
  }

  function openMenu(keyId, invoker, at) {
    const key = state.keys.find((k) => k.id === keyId);
    if (!key) return;
    closeMenu(false);
    const menu = $("row-menu");
    const action = key.status === "enabled" ? "disable" : "enable";
    const item = el("button", {
      type: "button",
      role: "menuitem",
      tabindex: "-1",
      class: `menu-item menu-item-${action}`,
      text: action === "disable" ? "Disable" : "Enable",
    });
    item.addEventListener("click", () => {
      closeMenu(true);
      setStatus(keyId, action);
    });
    const activity = el("button", {
      type: "button",
      role: "menuitem",
      tabindex: "-1",
      class: "menu-item menu-item-activity",
      text: "Activity",
    });
    activity.addEventListener("click", () => {
      const returnTo = invoker.closest("tr") || invoker;
      closeMenu(false);
      openActivity(keyId, returnTo);
    });
    menu.replaceChildren(el("div", { class: "menu-label", "aria-hidden": "true", text: key.name }), item, activity);
    menu.setAttribute("aria-label", `Actions for ${key.name}`);
    menu.hidden = false;
    // Keep the menu inside the viewport.
    const width = menu.offsetWidth;
    const height = menu.offsetHeight;
    const x = Math.max(8, Math.min(at.x, window.innerWidth - width - 8));
    const y = Math.max(8, Math.min(at.y, window.innerHeight - height - 8));
    menu.style.left = `${x + window.scrollX}px`;
    menu.style.top = `${y + window.scrollY}px`;
    menuInvoker = invoker;
    if (invoker.matches(".actions-button")) invoker.setAttribute("aria-expanded", "true");
    const row = invoker.closest("tr");
    if (row) row.classList.add("row-active");
    menuItems()[0].focus();
  }

  function closeMenu(restoreFocus) {
    const menu = $("row-menu");
    if (menu.hidden) return;
    menu.hidden = true;
    menu.replaceChildren();
    for (const row of document.querySelectorAll("tr.row-active")) row.classList.remove("row-active");
    const invoker = menuInvoker;
    menuInvoker = null;
    if (invoker) {
      if (invoker.matches(".actions-button")) invoker.setAttribute("aria-expanded", "false");
      if (restoreFocus && invoker.isConnected) invoker.focus();
    }
  }

  function menuKeydown(event) {
    const items = menuItems();
    const index = items.indexOf(document.activeElement);
    let next = null;
    switch (event.key) {
      case "ArrowDown": next = (index + 1) % items.length; break;
      case "ArrowUp": next = (index - 1 + items.length) % items.length; break;
      case "Home": next = 0; break;
      case "End": next = items.length - 1; break;
      case "Escape":
        event.preventDefault();
        closeMenu(true);
        return;
      case "Tab":
        event.preventDefault();
        closeMenu(true);
        return;
      default: return;
    }
    event.preventDefault();
    items[next].focus();
  }

  // ---- add key ------------------------------------------------------------------------------

  function openAddDialog() {
    $("add-form").reset();
    showAlert($("add-error"), "");
    for (const option of $("key-roles").options) option.selected = false;
    $("key-name").removeAttribute("aria-invalid");
    $("key-roles").removeAttribute("aria-invalid");
    $("add-dialog").showModal();
    $("key-name").focus();
  }

  // A plain click toggles an option, so picking several roles needs no Ctrl / Cmd.
  function toggleOption(event) {
    const option = event.target;
    if (!(option instanceof HTMLOptionElement)) return;
    event.preventDefault();
    option.selected = !option.selected;
    option.parentElement.focus();
    option.parentElement.dispatchEvent(new Event("change", { bubbles: true }));
  }

  async function saveKey(event) {
    event.preventDefault();
    const name = $("key-name").value.trim();
    const roles = Array.from($("key-roles").selectedOptions, (o) => o.value);
    const error = $("add-error");
    $("key-name").removeAttribute("aria-invalid");
    $("key-roles").removeAttribute("aria-invalid");
    if (!name) return fieldError("name", "Enter a name for the key.");
    if (roles.length === 0) return fieldError("roles", "Pick at least one role.");
    const save = $("add-save");
    save.disabled = true;
    try {
      const created = await api("POST", "keys", { name, roles });
      const { key, ...publicPart } = created;
      $("add-dialog").close();
      replaceKey(publicPart);
      showKey(key, publicPart.name);
    } catch (err) {
      if (err.field === "name" || err.field === "roles") fieldError(err.field, err.message);
      else if (err.status !== 401) showAlert(error, err.message);
    } finally {
      save.disabled = false;
    }
  }

  function fieldError(field, message) {
    const input = field === "name" ? $("key-name") : $("key-roles");
    input.setAttribute("aria-invalid", "true");
    showAlert($("add-error"), message);
    input.focus();
  }

  // ---- the one-time key dialog --------------------------------------------------------------

  function showKey(key, name) {
    const box = $("key-box");
    const input = el("input", {
      class: "input mono key-value",
      id: "new-key",
      readonly: true,
      spellcheck: "false",
      autocomplete: "off",
      "aria-label": `API key for ${name}`,
    });
    input.value = key;
    const copy = el("button", { type: "button", class: "btn btn-primary", id: "copy-key", text: "Copy" });
    copy.addEventListener("click", () => copyKey(input, copy));
    input.addEventListener("focus", () => input.select());
    box.replaceChildren(input, copy);
    $("copy-status").textContent = "";
    $("key-title").textContent = `Copy your new API key for ${name}`;
    $("key-dialog").showModal();
    copy.focus();
  }

  async function copyKey(input, button) {
    let copied = false;
    try {
      await navigator.clipboard.writeText(input.value);
      copied = true;
    } catch (_) {
      // Clipboard API refused (permissions, insecure context): select and use the old command.
      input.focus();
      input.select();
      try {
        copied = document.execCommand("copy");
      } catch (_) {
        copied = false;
      }
    }
    $("copy-status").textContent = copied ? "Copied to the clipboard." : "Select the key and copy it manually.";
    if (copied) {
      button.textContent = "Copied";
      window.setTimeout(() => { if (button.isConnected) button.textContent = "Copy"; }, 2000);
    }
  }

  function forgetKey() {
    // Closing the dialog (Done or Escape) removes the key from the DOM: it exists only here.
    const input = $("new-key");
    if (input) input.value = "";
    $("key-box").replaceChildren();
    $("copy-status").textContent = "";
    const row = document.querySelector("#keys-body tr:last-child");
    if (row) row.focus();
  }

  // ---- audit --------------------------------------------------------------------------------

  const AUDIT_PAGE = 50;

  const ACTION_LABELS = {
    "key.created": "Key created",
    "key.disabled": "Key disabled",
    "key.enabled": "Key enabled",
    "key.rotated": "Key rotated",
    "key.expired": "Key expired",
    "key.imported": "Key imported",
    "admin.login": "Signed in",
    "admin.login_failed": "Sign-in failed",
    "admin.logout": "Signed out",
    "auth.failed": "Authentication failed",
    "tool.called": "Tool called",
  };

  function auditDetails(event) {
    const details = event.details || {};
    if (event.action === "tool.called") return `${details.tool} · ${details.outcome}`;
    if (event.action === "auth.failed" && details.count) return `${details.count} attempt${details.count === 1 ? "" : "s"}`;
    return "";
  }

  function auditRow(event) {
    const denied = event.action === "tool.called" && event.details && event.details.outcome === "denied";
    const tone = event.action.endsWith("failed") || denied ? "warn" : event.action === "key.disabled" ? "off" : "ok";
    const details = auditDetails(event);
    return el("tr", {},
      timeCell(event.time, (iso) => timeFormat.format(new Date(iso)), "—"),
      el("td", {}, el("span", { class: `action action-${tone}`, title: event.action },
        ACTION_LABELS[event.action] || event.action)),
      el("td", { text: event.actor }),
      event.key_name ? el("td", {}, el("span", { class: "key-name", text: event.key_name }))
        : el("td", { class: "muted", text: "—" }),
      el("td", { class: "mono muted", text: event.client || "—" }),
      el("td", { class: "details", text: details || "—" }),
    );
  }

  function fillActionFilter() {
    const select = $("audit-action");
    select.replaceChildren(el("option", { value: "", text: "All actions" }),
      ...Object.entries(ACTION_LABELS).map(([action, label]) => el("option", { value: action, text: label })));
  }

  // The key filter lists the keys of the table; a key picked before stays picked.
  function fillKeyFilter() {
    const select = $("audit-key");
    const current = select.value;
    const keys = [...state.keys].sort((a, b) => a.name.localeCompare(b.name));
    select.replaceChildren(el("option", { value: "", text: "All keys" }),
      ...keys.map((key) => el("option", { value: key.id, text: key.name })));
    select.value = keys.some((key) => key.id === current) ? current : "";
  }

  async function loadAudit(fresh) {
    if (fresh) state.auditBefore = null;
    const query = new URLSearchParams({ limit: String(AUDIT_PAGE) });
    if (state.auditBefore) query.set("before", String(state.auditBefore));
    const action = $("audit-action").value;
    const keyId = $("audit-key").value;
    if (action) query.set("action", action);
    if (keyId) query.set("key_id", keyId);
    try {
      const data = await api("GET", `audit?${query}`);
      const rows = data.events.map(auditRow);
      if (fresh) $("audit-body").replaceChildren(...rows);
      else $("audit-body").append(...rows);
      state.auditBefore = data.next_before;
      $("audit-more").hidden = !data.next_before;
      const count = $("audit-body").children.length;
      $("audit-empty").hidden = count > 0;
      $("audit-table").hidden = count === 0;
      if (fresh && (action || keyId)) announce(count ? `${count}${data.next_before ? "+" : ""} matching events.` : "No matching events.");
    } catch (err) {
      if (err.status !== 401) showAlert($("app-error"), err.message);
    }
  }

  // ---- a key's activity (its MCP tool calls) -------------------------------------------------

  let activityReturn = null;

  function outcomeBadge(outcome) {
    const allowed = outcome === "allowed";
    return el("span", { class: `badge badge-${allowed ? "allowed" : "denied"}` },
      el("span", { class: "dot", "aria-hidden": "true" }), allowed ? "Allowed" : "Denied");
  }

  async function openActivity(keyId, returnTo) {
    const key = state.keys.find((k) => k.id === keyId);
    if (!key) return;
    state.activityKey = key;
    activityReturn = returnTo;
    $("activity-title").textContent = `Activity of ${key.name}`;
    $("activity-summary").textContent = "Loading…";
    $("activity-tools-body").replaceChildren();
    $("activity-recent-body").replaceChildren();
    for (const id of ["activity-tools", "activity-recent", "activity-tools-empty", "activity-recent-empty"]) $(id).hidden = true;
    showAlert($("activity-error"), "");
    const dialog = $("activity-dialog");
    if (!dialog.open) dialog.showModal();
    $("activity-close").focus();
    try {
      const data = await api("GET", `keys/${encodeURIComponent(keyId)}/activity`);
      if (state.activityKey !== key || !dialog.open) return;
      renderActivity(key, data);
    } catch (err) {
      if (err.status !== 401) {
        $("activity-summary").textContent = "";
        showAlert($("activity-error"), `Could not load the activity of ${key.name}: ${err.message}`);
      }
    }
  }

  function renderActivity(key, data) {
    const tools = data.tools_24h.map((usage) => el("tr", {},
      el("th", { scope: "row", class: "tool", text: usage.tool }),
      el("td", { class: "num", text: String(usage.allowed) }),
      el("td", { class: "num", text: String(usage.denied) }),
    ));
    $("activity-tools-body").replaceChildren(...tools);
    $("activity-tools").hidden = tools.length === 0;
    $("activity-tools-empty").hidden = tools.length > 0;
    const recent = data.recent.map((event) => el("tr", {},
      timeCell(event.time, (iso) => timeFormat.format(new Date(iso)), "—"),
      el("td", { class: "tool", text: event.details.tool }),
      el("td", {}, outcomeBadge(event.details.outcome)),
      el("td", { class: "mono muted", text: event.client || "—" }),
    ));
    $("activity-recent-body").replaceChildren(...recent);
    $("activity-recent").hidden = recent.length === 0;
    $("activity-recent-empty").hidden = recent.length > 0;
    const calls = data.tools_24h.reduce((sum, usage) => sum + usage.allowed + usage.denied, 0);
    const denied = data.tools_24h.reduce((sum, usage) => sum + usage.denied, 0);
    const summary = calls
      ? `${calls} tool call${calls === 1 ? "" : "s"} in the last 24 hours, ${denied} denied.`
      : "No tool calls in the last 24 hours.";
    $("activity-summary").textContent = summary;
    announce(`Activity of ${key.name}: ${summary}`);
  }

  function activityClosed() {
    state.activityKey = null;
    const target = activityReturn;
    activityReturn = null;
    // The row may have been re-rendered meanwhile: focus its current version.
    const row = target && target.dataset && target.dataset.keyId
      ? document.querySelector(`tr[data-key-id="${CSS.escape(target.dataset.keyId)}"]`) : target;
    if (row && row.isConnected) row.focus();
  }

  function showActivityInAudit() {
    const key = state.activityKey;
    activityReturn = null;  // focus goes to the Audit tab, not back to the row
    $("activity-dialog").close();
    if (!key) return;
    fillKeyFilter();
    $("audit-action").value = "tool.called";
    $("audit-key").value = key.id;
    selectTab("audit", true);
  }

  // ---- start --------------------------------------------------------------------------------

  function wire() {
    $("login-form").addEventListener("submit", login);
    $("logout").addEventListener("click", logout);
    for (const tab of TABS) {
      $(`tab-${tab}`).addEventListener("click", () => selectTab(tab, false));
      $(`tab-${tab}`).addEventListener("keydown", tabKeydown);
    }
    $("add-key").addEventListener("click", openAddDialog);
    $("add-cancel").addEventListener("click", () => $("add-dialog").close());
    $("add-form").addEventListener("submit", saveKey);
    $("key-roles").addEventListener("mousedown", toggleOption);
    $("key-done").addEventListener("click", () => $("key-dialog").close());
    $("key-dialog").addEventListener("close", forgetKey);
    $("audit-refresh").addEventListener("click", () => loadAudit(true));
    $("audit-more").addEventListener("click", () => loadAudit(false));
    fillActionFilter();
    $("audit-action").addEventListener("change", () => loadAudit(true));
    $("audit-key").addEventListener("change", () => loadAudit(true));
    $("audit-filters").addEventListener("submit", (event) => event.preventDefault());
    $("activity-close").addEventListener("click", () => $("activity-dialog").close());
    $("activity-audit").addEventListener("click", showActivityInAudit);
    $("activity-dialog").addEventListener("close", activityClosed);
    const menu = $("row-menu");
    menu.addEventListener("keydown", menuKeydown);
    document.addEventListener("mousedown", (event) => {
      if (!menu.hidden && !menu.contains(event.target)) closeMenu(false);
    });
    window.addEventListener("resize", () => closeMenu(false));
  }

  async function start() {
    wire();
    // The server marks the page when the request carried a live session cookie, so a signed-out
    // visit does not even ask (and log a 401).
    const marker = document.querySelector('meta[name="toolio-session"]');
    if (!marker || marker.content !== "active") {
      showLogin("");
      return;
    }
    try {
      await showApp(await api("GET", "session"));
    } catch (_) {
      showLogin("");
    }
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
