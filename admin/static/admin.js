// Toolio sidecar admin page. Plain JS, no build step, no third-party code.
//
// Security notes:
// * The admin key is typed into a password field, sent once to POST api/session and cleared;
//   it never goes to localStorage / sessionStorage / cookies readable by script. The session
//   lives in an HttpOnly cookie; the CSRF token is kept only in this closure's memory.
// * All data is written with textContent / DOM APIs, never innerHTML (no markup injection).
// * CSP forbids inline script, style and handlers: everything is wired up here.
//
// Scale: the keys table shows one page of the API's keyset paging (PAGE_SIZE rows); search,
// filters and sort are server-side queries, so the page costs the same with ten keys or ten
// thousand. performance marks time each query ("toolio:keys-requested" when it is sent,
// "toolio:keys-rendered" once its rows are in the table; bench/admin_page.py reads them).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const PAGE_SIZE = 25;
  const SEARCH_DELAY_MS = 150;
  const DEFAULT_SORT = "-created";
  const state = {
    csrf: null, actor: null, keyId: null, keys: [], roles: [], auditBefore: null, activityKey: null,
    // The table's query and where its page starts: cursors[i] opens page i (null: the first).
    query: { q: "", status: "", role: "", sort: DEFAULT_SORT },
    cursors: [null], next: null, listSeq: 0, loaded: false,
    active: { row: 1, col: 0 }, // the grid's one tab stop (row 0 is the header row)
    paths: null, // the API's paths, from its OpenAPI document (to find optional endpoints)
  };

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

  function timeNode(iso, format) {
    return el("time", { datetime: iso, title: timeFormat.format(new Date(iso)) }, format(iso));
  }

  function timeCell(iso, format, empty, className) {
    if (!iso) return el("td", { class: `${className} muted`, role: "gridcell", tabindex: "-1" }, empty);
    return el("td", { class: className, role: "gridcell", tabindex: "-1" }, timeNode(iso, format));
  }

  function isPast(iso) {
    return Boolean(iso) && Date.parse(iso) <= Date.now();
  }

  // A datetime-local value (the browser's local time) as RFC 3339 UTC, or null.
  function localToIso(value) {
    if (!value) return null;
    const when = new Date(value);
    return Number.isNaN(when.getTime()) ? null : when.toISOString();
  }

  function fromNow(milliseconds) {
    return new Date(Date.now() + milliseconds).toISOString();
  }

  const HOUR = 3600 * 1000;
  const DAY = 24 * HOUR;

  // ---- views -------------------------------------------------------------------------------

  const DIALOGS = ["add-dialog", "key-dialog", "rotate-dialog", "limit-dialog", "detail-dialog", "confirm-dialog",
    "activity-dialog"];

  function showLogin(message) {
    state.csrf = null;
    state.actor = null;
    state.keyId = null;
    closeMenu(false);
    for (const id of DIALOGS) {
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
    state.keyId = session.key_id;
    $("actor").textContent = session.actor;
    // The workspace whose keys and audit this page shows (the signed-in key's own).
    $("workspace").textContent = session.workspace || "";
    $("workspace").hidden = $("workspace-sep").hidden = !session.workspace;
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

  // ---- keys: loading a page -----------------------------------------------------------------

  function filtered() {
    const q = state.query;
    return Boolean(q.q || q.status || q.role);
  }

  // Load the page that starts at cursors[last]; a newer load makes an older answer stale.
  async function loadKeys() {
    const seq = ++state.listSeq;
    const cursor = state.cursors[state.cursors.length - 1];
    const params = new URLSearchParams({ limit: String(PAGE_SIZE), sort: state.query.sort });
    for (const name of ["q", "status", "role"]) {
      if (state.query[name]) params.set(name, state.query[name]);
    }
    if (cursor) params.set("cursor", cursor);
    $("keys-table").setAttribute("aria-busy", "true");
    performance.mark("toolio:keys-requested");
    try {
      const data = await api("GET", `keys?${params}`);
      if (seq !== state.listSeq) return;
      state.keys = data.keys;
      state.next = data.next_cursor;
      state.loaded = true;
      renderKeys(null);
    } catch (err) {
      if (seq === state.listSeq && err.status !== 401) showAlert($("app-error"), err.message);
    } finally {
      if (seq === state.listSeq) $("keys-table").removeAttribute("aria-busy");
    }
  }

  // A new query starts again at the first page.
  function requery() {
    state.cursors = [null];
    state.next = null;
    // The tab stop goes back to the first key, unless it is on a header (a sort button).
    if (state.active.row > 0) state.active = { row: 1, col: state.active.col };
    loadKeys();
  }

  let searchTimer = null;

  function searchInput() {
    window.clearTimeout(searchTimer);
    // A short pause after the last keystroke: one query per word typed, not per letter.
    searchTimer = window.setTimeout(() => {
      const q = $("key-search").value.trim();
      if (q === state.query.q) return;
      state.query.q = q;
      requery();
    }, SEARCH_DELAY_MS);
  }

  function filterChange() {
    state.query.status = $("filter-status").value;
    state.query.role = $("filter-role").value;
    requery();
  }

  function clearFilters() {
    $("key-search").value = "";
    $("filter-status").value = "";
    $("filter-role").value = "";
    state.query.q = state.query.status = state.query.role = "";
    requery();
    $("key-search").focus();
  }

  function sortBy(field) {
    const current = state.query.sort;
    // Names read best A to Z first; times newest first.
    const first = field === "name" ? field : `-${field}`;
    const flipped = first.startsWith("-") ? field : `-${field}`;
    state.query.sort = current === first ? flipped : first;
    requery();
  }

  function pageStep(delta) {
    if (delta > 0 && state.next) state.cursors.push(state.next);
    else if (delta < 0 && state.cursors.length > 1) state.cursors.pop();
    else return;
    // Focus stays on the pager button (press again for the page after); Tab back into the
    // table lands on the new page's first row.
    state.active = { row: 1, col: state.active.col };
    loadKeys();
  }

  async function loadRoles() {
    try {
      const data = await api("GET", "roles");
      state.roles = data.roles;
      $("key-roles-list").replaceChildren(...state.roles.map((role, index) => {
        // Named by the role alone; the description, permissions and tools are its description.
        const hint = `role-hint-${index}`;
        const box = el("input", { type: "checkbox", name: "roles", value: role.name, class: "check-input",
          "aria-label": role.name, "aria-describedby": hint });
        return el("label", { class: "check" }, box,
          el("span", { class: "check-text" }, el("span", { class: "check-name", text: role.name }),
            el("span", { class: "check-hint", id: hint,
              // A role without a rate limit is unlimited: nothing to say (docs/reference/limits.md).
              text: [role.description, role.permissions.join(", "), `tools: ${toolsText(role.tools)}`,
                role.rate_limit ? `rate limit: ${role.rate_limit}` : ""].filter(Boolean).join(" · ") })));
      }));
      const filter = $("filter-role");
      const chosen = filter.value;
      filter.replaceChildren(el("option", { value: "", text: "All roles" }),
        ...state.roles.map((role) => el("option", { value: role.name, text: role.name })));
      filter.value = chosen;
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

  // ---- keys: the table (WAI-ARIA grid pattern, one tab stop) ----------------------------------

  function statusBadge(key) {
    if (key.status === "enabled" && isPast(key.expires_at)) {
      return el("span", { class: "badge badge-expired" }, el("span", { class: "dot", "aria-hidden": "true" }), "Expired");
    }
    const label = key.status === "enabled" ? "Enabled" : "Disabled";
    return el("span", { class: `badge badge-${key.status}` }, el("span", { class: "dot", "aria-hidden": "true" }), label);
  }

  // A line under the badge for what is coming: a scheduled disable or an expiry.
  function statusNote(key) {
    if (key.status !== "enabled") return null;
    if (key.disable_at) return el("span", { class: "status-note" }, "Disables ", timeNode(key.disable_at, ago));
    if (key.expires_at && !isPast(key.expires_at)) {
      return el("span", { class: "status-note" }, "Expires ", timeNode(key.expires_at, ago));
    }
    return null;
  }

  function cell(className, ...children) {
    return el("td", { class: className, role: "gridcell", tabindex: "-1" }, ...children);
  }

  function keyRow(key) {
    const name = el("button", { type: "button", class: "key-name link", tabindex: "-1", text: key.name });
    name.addEventListener("click", () => openDetails(key.id, name));
    const actions = el("button", {
      type: "button",
      class: "btn btn-ghost btn-sm actions-button",
      tabindex: "-1",
      "aria-haspopup": "menu",
      "aria-expanded": "false",
      "aria-label": `Actions for ${key.name}`,
    }, el("span", { "aria-hidden": "true", text: "⋯" }), el("span", { class: "actions-label", text: " Actions" }));
    actions.addEventListener("click", (event) => {
      event.stopPropagation();
      openMenu(key.id, actions, anchorOf(actions));
    });
    const row = el("tr", {
      "data-key-id": key.id,
      class: key.status === "disabled" ? "row-disabled" : null,
    },
      cell("col-name", name, key.id === state.keyId ? el("span", { class: "you", text: "you" }) : null,
        // Shown instead of the Roles column on narrow screens.
        el("span", { class: "name-roles", text: key.roles.join(", ") })),
      cell("col-preview", el("code", { class: "preview", text: key.preview })),
      cell("col-roles roles", ...key.roles.map((role) => el("span", { class: "pill", text: role }))),
      cell("col-status status", statusBadge(key), statusNote(key)),
      timeCell(key.last_used_at, ago, "Never", "col-used"),
      timeCell(key.created_at, (iso) => dateFormat.format(new Date(iso)), "—", "col-created"),
      cell("col-actions", actions),
    );
    row.addEventListener("contextmenu", (event) => {
      event.preventDefault();
      // A keyboard-initiated contextmenu event has no pointer position: anchor at the row.
      const fromPointer = event.button === 2 && (event.clientX !== 0 || event.clientY !== 0);
      const invoker = gridTarget(event.target.closest("td") || row.cells[0]);
      openMenu(key.id, invoker, fromPointer ? { x: event.clientX, y: event.clientY } : anchorOf(invoker));
    });
    return row;
  }

  function rangeText() {
    const count = state.keys.length;
    const start = (state.cursors.length - 1) * PAGE_SIZE;
    const noun = filtered() ? "matching key" : "key";
    if (count === 0) return "";
    if (start === 0 && !state.next) return `${count} ${noun}${count === 1 ? "" : "s"}`;
    return `Showing ${start + 1}–${start + count}${state.next ? "" : " (the last page)"}`;
  }

  function renderKeys(focus) {
    const body = $("keys-body");
    body.replaceChildren(...state.keys.map(keyRow));
    const empty = state.keys.length === 0;
    $("keys-empty").hidden = !empty;
    $("keys-table").hidden = empty;
    const none = !filtered() && state.cursors.length === 1;
    $("keys-empty-title").textContent = none ? "No API keys yet" : "No keys match";
    $("keys-empty-text").textContent = none ? "Create one to let an agent reach the MCP server."
      : "Try another search, or clear the filters.";
    $("clear-filters").hidden = none;
    $("page-prev").disabled = state.cursors.length <= 1;
    $("page-next").disabled = !state.next;
    $("keys-range").textContent = rangeText();
    for (const th of document.querySelectorAll("#keys-table th[data-sort]")) {
      const field = th.dataset.sort;
      const sort = state.query.sort;
      const order = sort === field ? "ascending" : sort === `-${field}` ? "descending" : "none";
      th.setAttribute("aria-sort", order);
      th.querySelector(".sort-mark").textContent = order === "ascending" ? " ↑" : order === "descending" ? " ↓" : "";
    }
    setActive(focus || state.active, Boolean(focus));
    performance.mark("toolio:keys-rendered");
  }

  function gridRows() {
    return [document.querySelector("#keys-table thead tr"), ...$("keys-body").rows];
  }

  // What takes focus in a cell: its one control (sort button, name, ⋯ button), else the cell.
  function gridTarget(td) {
    return td.querySelector("button") || td;
  }

  // Columns hidden by the narrow layout are skipped by the arrow keys.
  function visibleColumns() {
    const header = document.querySelector("#keys-table thead tr");
    return Array.from(header.cells, (c, i) => (c.getClientRects().length > 0 ? i : -1)).filter((i) => i >= 0);
  }

  // Make (row, col) the grid's single tab stop; focus it if asked.
  function setActive(position, focus) {
    const rows = gridRows();
    const columns = visibleColumns();
    const row = Math.max(0, Math.min(position.row, rows.length - 1));
    let col = position.col;
    if (!columns.includes(col)) col = columns.find((c) => c >= col) ?? columns[columns.length - 1] ?? 0;
    state.active = { row, col };
    for (const [r, tr] of rows.entries()) {
      for (const [c, td] of Array.from(tr.cells).entries()) {
        gridTarget(td).tabIndex = r === row && c === col ? 0 : -1;
      }
    }
    if (focus) {
      const target = gridTarget(rows[row].cells[col]);
      target.focus();
      target.scrollIntoView({ block: "nearest" });
    }
  }

  function positionOf(node) {
    const td = node && node.closest && node.closest("#keys-table td, #keys-table th");
    if (!td) return null;
    const tr = td.parentElement;
    return { row: gridRows().indexOf(tr), col: td.cellIndex };
  }

  function gridKeydown(event) {
    const at = positionOf(event.target);
    if (!at || at.row < 0) return;
    const rows = gridRows();
    const columns = visibleColumns();
    const index = columns.indexOf(at.col);
    const key = rows[at.row].dataset ? rows[at.row].dataset.keyId : undefined;
    let { row, col } = at;
    if (event.key === "ContextMenu" || (event.shiftKey && event.key === "F10")) {
      if (!key) return;
      event.preventDefault();
      openMenu(key, event.target, anchorOf(event.target));
      return;
    }
    switch (event.key) {
      case "ArrowDown": row = Math.min(row + 1, rows.length - 1); break;
      case "ArrowUp": row = Math.max(row - 1, 0); break;
      case "ArrowRight": col = columns[Math.min(index + 1, columns.length - 1)]; break;
      case "ArrowLeft": col = columns[Math.max(index - 1, 0)]; break;
      case "Home":
        col = columns[0];
        if (event.ctrlKey) row = 0;
        break;
      case "End":
        col = columns[columns.length - 1];
        if (event.ctrlKey) row = rows.length - 1;
        break;
      case "PageDown": row = Math.min(row + 10, rows.length - 1); break;
      case "PageUp": row = Math.max(row - 10, 0); break;
      case "Enter":
        // A cell's own control (name, sort, ⋯) answers Enter itself; a plain cell opens the key.
        if (!key || event.target.tagName === "BUTTON") return;
        event.preventDefault();
        openDetails(key, event.target);
        return;
      default: return;
    }
    event.preventDefault();
    setActive({ row, col }, true);
  }

  function gridFocusin(event) {
    const at = positionOf(event.target);
    if (at && at.row >= 0 && (at.row !== state.active.row || at.col !== state.active.col)) setActive(at, false);
  }

  function focusKey(keyId) {
    const row = gridRows().findIndex((tr) => tr.dataset && tr.dataset.keyId === keyId);
    if (row > 0) setActive({ row, col: state.active.row > 0 ? state.active.col : 0 }, true);
  }

  function findKey(keyId) {
    return state.keys.find((k) => k.id === keyId);
  }

  // Show a changed or new key at once (a new one at the top of the page), keeping focus.
  function replaceKey(updated) {
    const index = state.keys.findIndex((k) => k.id === updated.id);
    if (index >= 0) state.keys[index] = updated;
    else state.keys.unshift(updated);
    state.loaded = true;
    renderKeys(null);
  }

  async function setStatus(keyId, action, confirmed) {
    const key = findKey(keyId) || (detailKey && detailKey.id === keyId ? detailKey : null);
    if (action === "disable" && keyId === state.keyId && !confirmed) {
      confirmOwnDisable(key);
      return;
    }
    showAlert($("app-error"), "");
    try {
      const updated = await api("POST", `keys/${encodeURIComponent(keyId)}/${action}`);
      if (keyId === state.keyId && updated.status === "disabled") {
        showLogin(`You disabled ${updated.name}, the key you were signed in with. Sign in with another admin key.`);
        return;
      }
      replaceKey(updated);
      if (detailKey && detailKey.id === keyId && $("detail-dialog").open) fillDetails(updated);
      else focusKey(keyId);
      announce(`${updated.name} is now ${updated.status}.`);
    } catch (err) {
      if (err.status !== 401) showAlert($("app-error"), `Could not ${action} ${key ? key.name : "the key"}: ${err.message}`);
    }
  }

  // ---- confirm before disabling the key this session uses -----------------------------------

  let confirmTarget = null;

  function confirmOwnDisable(key) {
    confirmTarget = key ? key.id : state.keyId;
    $("confirm-text").textContent = `You are signed in with ${key ? key.name : "this key"}. Disabling it stops `
      + "every client that uses it and ends this session at once. You will need another admin key to sign in again.";
    $("confirm-dialog").showModal();
    $("confirm-cancel").focus();
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

  function menuItem(label, className, run) {
    const item = el("button", { type: "button", role: "menuitem", tabindex: "-1", class: `menu-item ${className}`, text: label });
    item.addEventListener("click", () => {
      closeMenu(true);
      run();
    });
    return item;
  }

  function openMenu(keyId, invoker, at) {
    const key = findKey(keyId);
    if (!key) return;
    closeMenu(false);
    const menu = $("row-menu");
    const action = key.status === "enabled" ? "disable" : "enable";
    menu.replaceChildren(
      el("div", { class: "menu-label", "aria-hidden": "true", text: key.name }),
      menuItem("View details", "menu-item-details", () => openDetails(keyId, invoker)),
      menuItem("Activity", "menu-item-activity", () => openActivity(keyId, invoker)),
      menuItem("Rotate…", "menu-item-rotate", () => openRotate(keyId, invoker)),
      menuItem("Set rate limit…", "menu-item-limit", () => openLimit(keyId, invoker)),
      el("div", { class: "menu-sep", role: "separator" }),
      menuItem(action === "disable" ? "Disable" : "Enable", `menu-item-${action}`, () => setStatus(keyId, action, false)),
    );
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
      case "Tab":
        event.preventDefault();
        closeMenu(true);
        return;
      default: return;
    }
    event.preventDefault();
    items[next].focus();
  }

  // Where focus goes back when a dialog closes: the control that opened it, if still there.
  let returnFocus = null;

  function restoreFocus() {
    const target = returnFocus;
    returnFocus = null;
    if (target && target.isConnected) target.focus();
  }

  // ---- add key ------------------------------------------------------------------------------

  function roleBoxes() {
    return Array.from($("key-roles-list").querySelectorAll("input[type=checkbox]"));
  }

  function openAddDialog() {
    $("add-form").reset();
    clearFieldErrors("add");
    $("key-expiry-at").hidden = true;
    returnFocus = $("add-key");
    $("add-dialog").showModal();
    $("key-name").focus();
  }

  function expiryValue() {
    const choice = $("key-expiry").value;
    if (!choice) return null;
    if (choice === "at") return localToIso($("key-expiry-at").value) || "";
    return fromNow(Number(choice) * DAY);
  }

  async function saveKey(event) {
    event.preventDefault();
    const name = $("key-name").value.trim();
    const roles = roleBoxes().filter((box) => box.checked).map((box) => box.value);
    clearFieldErrors("add");
    if (!name) return fieldError("add", "name", "Enter a name for the key.");
    if (roles.length === 0) return fieldError("add", "roles", "Pick at least one role.");
    const expiry = expiryValue();
    if (expiry === "") return fieldError("add", "expires_at", "Pick the date and time when the key expires.");
    const body = { name, roles };
    if (expiry) body.expires_at = expiry;
    // Empty: no limit of its own, its roles' applies (docs/reference/limits.md).
    const rateLimit = $("key-rate-limit").value.trim();
    if (rateLimit) body.rate_limit = rateLimit;
    const save = $("add-save");
    save.disabled = true;
    try {
      const created = await api("POST", "keys", body);
      const { key, ...publicPart } = created;
      returnFocus = null;
      $("add-dialog").close();
      replaceKey(publicPart);
      showKey(key, publicPart, null);
    } catch (err) {
      if (["name", "roles", "expires_at", "rate_limit"].includes(err.field)) fieldError("add", err.field, err.message);
      else if (err.status !== 401) showAlert($("add-error"), err.message);
    } finally {
      save.disabled = false;
    }
  }

  const FIELDS = {
    add: { error: "add-error", name: "key-name", roles: "key-roles", expires_at: "key-expiry",
      rate_limit: "key-rate-limit" },
    rotate: { error: "rotate-error", name: "rotate-name", disable_old_at: "rotate-disable" },
    limit: { error: "limit-error", rate_limit: "limit-value" },
  };

  function fieldError(form, field, message) {
    const input = $(FIELDS[form][field]);
    input.setAttribute("aria-invalid", "true");
    showAlert($(FIELDS[form].error), message);
    const target = input.tagName === "FIELDSET" ? input.querySelector("input") : input;
    if (target) target.focus();
  }

  function clearFieldErrors(form) {
    for (const [field, id] of Object.entries(FIELDS[form])) {
      if (field !== "error") $(id).removeAttribute("aria-invalid");
    }
    showAlert($(FIELDS[form].error), "");
  }

  // An error about a field goes away as soon as that field is changed.
  function clearOnEdit(form, field) {
    const input = $(FIELDS[form][field]);
    if (input.getAttribute("aria-invalid") === "true") {
      input.removeAttribute("aria-invalid");
      showAlert($(FIELDS[form].error), "");
    }
  }

  // ---- rotate -------------------------------------------------------------------------------

  let rotating = null;

  function suggestName(name) {
    // ci-bot -> ci-bot-2, ci-bot-2 -> ci-bot-3 (capped to the 64-character name limit).
    const match = /^(.*?)-(\d+)$/.exec(name);
    const next = match ? `${match[1]}-${Number(match[2]) + 1}` : `${name}-2`;
    return next.length <= 64 ? next : next.slice(next.length - 64);
  }

  function openRotate(keyId, invoker) {
    const key = findKey(keyId) || (detailKey && detailKey.id === keyId ? detailKey : null);
    if (!key) return;
    rotating = key;
    $("rotate-form").reset();
    clearFieldErrors("rotate");
    $("rotate-disable-at").hidden = true;
    $("rotate-title").textContent = `Rotate ${key.name}`;
    $("rotate-name").value = suggestName(key.name);
    returnFocus = invoker || null;
    $("rotate-dialog").showModal();
    $("rotate-name").focus();
    $("rotate-name").select();
  }

  function disableOldValue() {
    const choice = $("rotate-disable").value;
    if (!choice) return null;
    if (choice === "at") return localToIso($("rotate-disable-at").value) || "";
    return fromNow({ "1h": HOUR, "1d": DAY, "7d": 7 * DAY }[choice]);
  }

  async function saveRotate(event) {
    event.preventDefault();
    const old = rotating;
    const name = $("rotate-name").value.trim();
    clearFieldErrors("rotate");
    if (!name) return fieldError("rotate", "name", "Enter a name for the new key.");
    const when = disableOldValue();
    if (when === "") return fieldError("rotate", "disable_old_at", "Pick when to disable the old key.");
    const body = { name };
    if (when) body.disable_old_at = when;
    const save = $("rotate-save");
    save.disabled = true;
    try {
      const rotated = await api("POST", `keys/${encodeURIComponent(old.id)}/rotate`, body);
      const { key, rotated_from: before, disable_old_at: disableAt, ...publicPart } = rotated;
      returnFocus = null;
      $("rotate-dialog").close();
      if ($("detail-dialog").open) $("detail-dialog").close();
      replaceKey(before);
      replaceKey(publicPart);
      const note = disableAt
        ? `${before.name} will be disabled on ${timeFormat.format(new Date(disableAt))}. Move its clients to the new key before then.`
        : `${before.name} still works. Once its clients use the new key (see its Last used), disable ${before.name}.`;
      showKey(key, publicPart, note);
    } catch (err) {
      if (err.field === "name" || err.field === "disable_old_at") fieldError("rotate", err.field, err.message);
      else if (err.status !== 401) showAlert($("rotate-error"), err.message);
    } finally {
      save.disabled = false;
    }
  }

  // ---- a key's own rate limit (PATCH api/keys/{id}, docs/reference/limits.md) -----------------

  let limiting = null;

  // "600/minute (its own)" or "600/minute (from its roles)": what holds the key, and why.
  function rateLimitText(key) {
    return `${key.effective_rate_limit} (${key.rate_limit_source === "key" ? "its own" : "from its roles"})`;
  }

  function openLimit(keyId, invoker) {
    const key = findKey(keyId) || (detailKey && detailKey.id === keyId ? detailKey : null);
    if (!key) return;
    limiting = key;
    $("limit-form").reset();
    clearFieldErrors("limit");
    $("limit-title").textContent = `Rate limit of ${key.name}`;
    $("limit-value").value = key.rate_limit || "";
    $("limit-value").placeholder = key.rate_limit_source === "roles"
      ? `Its roles' limit: ${key.effective_rate_limit}` : "Its roles' limit";
    returnFocus = invoker || null;
    $("limit-dialog").showModal();
    $("limit-value").focus();
    $("limit-value").select();
  }

  async function saveLimit(event) {
    event.preventDefault();
    const key = limiting;
    const value = $("limit-value").value.trim();
    clearFieldErrors("limit");
    const save = $("limit-save");
    save.disabled = true;
    try {
      // A JSON merge patch (RFC 7396): null removes the key's own limit.
      const updated = await api("PATCH", `keys/${encodeURIComponent(key.id)}`, { rate_limit: value || null });
      $("limit-dialog").close();
      replaceKey(updated);
      if (detailKey && detailKey.id === updated.id && $("detail-dialog").open) fillDetails(updated);
      announce(`${updated.name}: rate limit ${rateLimitText(updated)}.`);
    } catch (err) {
      if (err.field === "rate_limit") fieldError("limit", "rate_limit", err.message);
      else if (err.status !== 401) showAlert($("limit-error"), err.message);
    } finally {
      save.disabled = false;
    }
  }

  // ---- key details ----------------------------------------------------------------------------

  let detailKey = null;

  function detailRow(label, ...value) {
    return [el("dt", { text: label }), el("dd", {}, ...value)];
  }

  function when(iso, empty) {
    if (!iso) return el("span", { class: "muted", text: empty });
    return el("span", {}, timeFormat.format(new Date(iso)), el("span", { class: "muted", text: ` (${ago(iso)})` }));
  }

  function fillDetails(key) {
    detailKey = key;
    $("detail-title").textContent = key.name;
    $("detail-status").replaceChildren(statusBadge(key));
    $("detail-self").hidden = key.id !== state.keyId;
    $("detail-fields").replaceChildren(
      ...detailRow("Key ID", el("code", { text: key.id })),
      ...detailRow("Key preview", el("code", { class: "preview", text: key.preview })),
      ...detailRow("Roles", ...key.roles.map((role) => el("span", { class: "pill", text: role }))),
      ...detailRow("Permissions", key.permissions.length ? key.permissions.join(", ") : el("span", { class: "muted", text: "none" })),
      ...detailRow("Created", when(key.created_at, "—"), ` by ${key.created_by}`),
      ...detailRow("Last used", when(key.last_used_at, "Never")),
      ...detailRow("Expires", when(key.expires_at, "Never")),
      ...detailRow("Scheduled disable", when(key.disable_at, "None")),
      ...detailRow("Rate limit", rateLimitText(key)),
      ...(key.disabled_at ? detailRow("Disabled", when(key.disabled_at, "—")) : []),
    );
    $("detail-toggle").textContent = key.status === "enabled" ? "Disable" : "Enable";
    $("detail-toggle").className = `btn ${key.status === "enabled" ? "btn-danger-soft" : "btn-secondary"}`;
  }

  async function openDetails(keyId, invoker) {
    const known = findKey(keyId);
    returnFocus = invoker || null;
    try {
      const key = known || await api("GET", `keys/${encodeURIComponent(keyId)}`);
      fillDetails(key);
    } catch (err) {
      if (err.status !== 401) showAlert($("app-error"), err.message);
      return;
    }
    $("key-activity-body").replaceChildren(el("p", { class: "muted", text: "Loading…" }));
    $("detail-dialog").showModal();
    $("detail-close").focus();
    loadActivity(keyId);
  }

  // Hook for the key's recent calls: GET api/keys/{id}/activity, where this sidecar has it (it
  // is found in the API's OpenAPI document, so a sidecar without it is never asked and never
  // 404s). Its answer: {"recent": [tool.called audit events], "tools_24h": [{tool, allowed, denied}]}.
  const RECENT_CALLS = 10;

  async function loadActivity(keyId) {
    const body = $("key-activity-body");
    const none = () => body.replaceChildren(el("p", { class: "muted", text: "No activity recorded." }));
    try {
      if (state.paths === null) state.paths = Object.keys((await api("GET", "openapi.json")).paths || {});
      if (!state.paths.includes("/admin/api/keys/{id}/activity")) return none();
      const data = await api("GET", `keys/${encodeURIComponent(keyId)}/activity`);
      if (!detailKey || detailKey.id !== keyId) return undefined;
      const events = ((data && (data.recent || data.events)) || []).slice(0, RECENT_CALLS);
      const usage = (data && data.tools_24h) || [];
      if (events.length === 0 && usage.length === 0) return none();
      const calls = usage.reduce((sum, u) => sum + (u.allowed || 0) + (u.denied || 0), 0);
      const denied = usage.reduce((sum, u) => sum + (u.denied || 0), 0);
      body.replaceChildren(
        el("p", { class: "muted", text: calls ? `${calls} tool call${calls === 1 ? "" : "s"} in the last 24 hours, `
          + `${denied} denied.` : "No tool calls in the last 24 hours." }),
        el("ul", { class: "activity-list" }, ...events.map((event) => {
          const details = event.details || {};
          return el("li", {}, el("span", { class: "mono", text: String(details.tool || event.action || "call") }),
            details.outcome ? el("span", { class: `activity-outcome activity-${details.outcome}`, text: ` ${details.outcome}` }) : null,
            event.time ? el("span", { class: "muted" }, " · ", timeNode(event.time, ago)) : null);
        })));
    } catch (_) {
      none();
    }
    return undefined;
  }

  // ---- the one-time key dialog --------------------------------------------------------------

  function showKey(key, created, note) {
    const box = $("key-box");
    const input = el("input", {
      class: "input mono key-value",
      id: "new-key",
      readonly: true,
      spellcheck: "false",
      autocomplete: "off",
      "aria-label": `API key for ${created.name}`,
    });
    input.value = key;
    const copy = el("button", { type: "button", class: "btn btn-primary", id: "copy-key", text: "Copy" });
    copy.addEventListener("click", () => copyKey(input, copy));
    input.addEventListener("focus", () => input.select());
    box.replaceChildren(input, copy);
    $("copy-status").textContent = "";
    showAlert($("key-note"), note || "");
    $("key-title").textContent = `Copy your new API key for ${created.name}`;
    $("key-dialog").dataset.keyId = created.id;
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
    showAlert($("key-note"), "");
    focusKey($("key-dialog").dataset.keyId);
  }

  // ---- audit --------------------------------------------------------------------------------

  const AUDIT_PAGE = 50;

  const ACTION_LABELS = {
    "key.created": "Key created",
    "key.disabled": "Key disabled",
    "key.enabled": "Key enabled",
    "key.rotated": "Key rotated",
    "key.updated": "Key updated",
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
    if (event.action === "key.updated" && details.rate_limit) {
      const limit = (value) => value || "roles'";
      return `rate limit ${limit(details.rate_limit.from)} → ${limit(details.rate_limit.to)}`;
    }
    return "";
  }

  // Colour says what kind of event it is; the label always says it in words too.
  function actionTone(event) {
    const action = event.action;
    if (action.endsWith("failed")) return "warn";
    if (action === "tool.called") return event.details && event.details.outcome === "denied" ? "warn" : "plain";
    if (action === "key.disabled" || action === "key.expired") return "off";
    if (action === "key.created" || action === "key.enabled") return "on";
    return "plain";
  }

  function auditRow(event) {
    const details = auditDetails(event);
    return el("tr", {},
      event.time ? el("td", {}, timeNode(event.time, (iso) => timeFormat.format(new Date(iso))))
        : el("td", { class: "muted", text: "—" }),
      el("td", {}, el("span", { class: `action action-${actionTone(event)}`, title: event.action },
        ACTION_LABELS[event.action] || event.action)),
      el("td", { text: event.actor }),
      event.key_name ? el("td", {}, el("span", { class: "key-name", text: event.key_name }))
        : el("td", { class: "muted", text: "—" }),
      el("td", { class: "mono muted", text: event.client || "—" }),
      el("td", { class: "audit-details", text: details || "—" }),
    );
  }

  function fillActionFilter() {
    const select = $("audit-action");
    select.replaceChildren(el("option", { value: "", text: "All actions" }),
      ...Object.entries(ACTION_LABELS).map(([action, label]) => el("option", { value: action, text: label })));
  }

  // The key filter lists the keys of the table's current page (the table pages through the
  // workspace, so never every key); a key picked before stays picked, on that page or not.
  function fillKeyFilter(extra) {
    const select = $("audit-key");
    const current = select.value;
    const picked = select.selectedOptions[0];
    const keys = [...state.keys];
    if (extra && !keys.some((key) => key.id === extra.id)) keys.push(extra);
    if (current && !keys.some((key) => key.id === current) && picked) keys.push({ id: current, name: picked.textContent });
    keys.sort((a, b) => a.name.localeCompare(b.name));
    select.replaceChildren(el("option", { value: "", text: "All keys" }),
      ...keys.map((key) => el("option", { value: key.id, text: key.name })));
    select.value = current;
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
    const key = findKey(keyId) || (detailKey && detailKey.id === keyId ? detailKey : null);
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
      event.time ? el("td", {}, timeNode(event.time, (iso) => timeFormat.format(new Date(iso))))
        : el("td", { class: "muted", text: "—" }),
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
    const key = state.activityKey;
    state.activityKey = null;
    const target = activityReturn;
    activityReturn = null;
    if (!target) return;
    // Back to the control that opened it; if the table was re-rendered meanwhile, to the key's row.
    if (target.isConnected) target.focus();
    else if (key) focusKey(key.id);
  }

  function showActivityInAudit() {
    const key = state.activityKey;
    activityReturn = null;  // focus goes to the Audit tab, not back to the row
    $("activity-dialog").close();
    if (!key) return;
    fillKeyFilter(key);
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
    // Keys: search, filters, sort, pages, the grid.
    $("key-search").addEventListener("input", () => {
      performance.mark("toolio:search-input");
      searchInput();
    });
    $("key-search").addEventListener("keydown", (event) => {
      if (event.key === "Enter") {
        event.preventDefault();
        window.clearTimeout(searchTimer);
        state.query.q = $("key-search").value.trim();
        requery();
      }
    });
    $("filter-status").addEventListener("change", filterChange);
    $("filter-role").addEventListener("change", filterChange);
    $("clear-filters").addEventListener("click", clearFilters);
    for (const th of document.querySelectorAll("#keys-table th[data-sort]")) {
      th.querySelector("button").addEventListener("click", () => sortBy(th.dataset.sort));
    }
    $("page-prev").addEventListener("click", () => pageStep(-1));
    $("page-next").addEventListener("click", () => pageStep(1));
    $("keys-table").addEventListener("keydown", gridKeydown);
    $("keys-table").addEventListener("focusin", gridFocusin);
    // Add.
    $("add-key").addEventListener("click", openAddDialog);
    $("add-cancel").addEventListener("click", () => $("add-dialog").close());
    $("add-form").addEventListener("submit", saveKey);
    $("key-name").addEventListener("input", () => clearOnEdit("add", "name"));
    $("key-roles-list").addEventListener("change", () => clearOnEdit("add", "roles"));
    $("key-expiry").addEventListener("change", () => {
      $("key-expiry-at").hidden = $("key-expiry").value !== "at";
      clearOnEdit("add", "expires_at");
      if (!$("key-expiry-at").hidden) $("key-expiry-at").focus();
    });
    $("key-expiry-at").addEventListener("input", () => clearOnEdit("add", "expires_at"));
    $("key-rate-limit").addEventListener("input", () => clearOnEdit("add", "rate_limit"));
    $("add-dialog").addEventListener("close", restoreFocus);
    // Rotate.
    $("rotate-cancel").addEventListener("click", () => $("rotate-dialog").close());
    $("rotate-form").addEventListener("submit", saveRotate);
    $("rotate-name").addEventListener("input", () => clearOnEdit("rotate", "name"));
    $("rotate-disable").addEventListener("change", () => {
      $("rotate-disable-at").hidden = $("rotate-disable").value !== "at";
      clearOnEdit("rotate", "disable_old_at");
      if (!$("rotate-disable-at").hidden) $("rotate-disable-at").focus();
    });
    $("rotate-disable-at").addEventListener("input", () => clearOnEdit("rotate", "disable_old_at"));
    $("rotate-dialog").addEventListener("close", restoreFocus);
    // Rate limit.
    $("limit-cancel").addEventListener("click", () => $("limit-dialog").close());
    $("limit-form").addEventListener("submit", saveLimit);
    $("limit-value").addEventListener("input", () => clearOnEdit("limit", "rate_limit"));
    $("limit-dialog").addEventListener("close", () => {
      limiting = null;
      restoreFocus();
    });
    // Details.
    $("detail-close").addEventListener("click", () => $("detail-dialog").close());
    $("detail-rotate").addEventListener("click", () => detailKey && openRotate(detailKey.id, $("detail-rotate")));
    $("detail-toggle").addEventListener("click", () => {
      if (detailKey) setStatus(detailKey.id, detailKey.status === "enabled" ? "disable" : "enable", false);
    });
    $("detail-dialog").addEventListener("close", () => {
      detailKey = null;
      restoreFocus();
    });
    // Confirm disabling the signed-in key.
    $("confirm-cancel").addEventListener("click", () => $("confirm-dialog").close());
    $("confirm-ok").addEventListener("click", () => {
      const keyId = confirmTarget;
      $("confirm-dialog").close();
      if (keyId) setStatus(keyId, "disable", true);
    });
    $("confirm-dialog").addEventListener("close", () => { confirmTarget = null; });
    // The one-time key.
    $("key-done").addEventListener("click", () => $("key-dialog").close());
    $("key-dialog").addEventListener("close", forgetKey);
    // Audit.
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
