// The control panel's little JavaScript: live Lync validation, commits through /api/v1,
// the Connections page refreshing itself. No framework, no build step.
"use strict";

const csrf = () => document.querySelector('meta[name="csrf-token"]').content;
const jsonData = (id) => JSON.parse(document.getElementById(id).textContent);
let fileVersion = null;

async function api(method, path, body) {
  const opts = { method, headers: { "X-CSRF-Token": csrf(), "Accept": "application/json" },
                 credentials: "same-origin" };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const resp = await fetch(path, opts);
  let data = {};
  try { data = await resp.json(); } catch (e) { data = { error: `HTTP ${resp.status}` }; }
  return { status: resp.status, data };
}

function list(ul, items) {
  ul.replaceChildren(...items.map((t) => { const li = document.createElement("li"); li.textContent = t; return li; }));
}

function flash(text) {
  sessionStorage.setItem("flash", text);
}

// After a commit: wait (up to 10 seconds) for the running edge's live reload of that version and
// say what it did, or that it refused the file, or that it has not picked it up yet.
async function applied(version) {
  for (let i = 0; i < 50; i++) {  // up to 10 s: a file watch polls every second
    const r = await api("GET", "/api/v1/status");
    const last = r.status === 200 ? r.data.last_reload : null;
    if (last && last.version === version) {
      return last.ok ? `applied by the running edge: ${last.changes.join("; ") || "nothing changed"}.`
        : `the running edge refused it and keeps the previous configuration: ${last.errors.join("; ")}`;
    }
    await new Promise((done) => setTimeout(done, 200));
  }
  return "written; the running edge has not reloaded it yet (its file watch or SIGHUP applies it).";
}

function showFlash() {
  const el = document.getElementById("flash");
  const text = sessionStorage.getItem("flash");
  if (el && text) { el.textContent = text; el.hidden = false; sessionStorage.removeItem("flash"); }
}

// --- XMPP Federated Partners --------------------------------------------------------------

function globToRegExp(glob) {
  const esc = glob.replace(/[.+^${}()|[\]\\]/g, "\\$&").replace(/\*/g, ".*").replace(/\?/g, ".");
  return new RegExp(glob.includes("*") || glob.includes("?") ? `^${esc}$` : esc, "i");
}

function partnersPage() {
  showFlash();
  fileVersion = jsonData("file-version");
  const filter = document.getElementById("filter");
  filter.addEventListener("input", () => {
    const re = globToRegExp(filter.value.trim());
    for (const tr of document.querySelectorAll("#partners tbody tr[data-domain]")) {
      tr.hidden = !tr.dataset.domains.split(" ").some((d) => re.test(d));
    }
  });
  const dialog = document.getElementById("confirm-remove");
  let target = null;
  for (const button of document.querySelectorAll("button.remove")) {
    button.addEventListener("click", async () => {
      target = button.dataset.domain;
      document.getElementById("remove-domain").textContent = target;
      document.getElementById("remove-error").textContent = "";
      const dry = await api("DELETE", `/api/v1/partners/${encodeURIComponent(target)}?dry_run=1`,
                            { version: fileVersion });
      document.getElementById("remove-diff").textContent = dry.data.diff || "";
      dialog.showModal();
    });
  }
  document.getElementById("remove-confirm").addEventListener("click", async (ev) => {
    ev.preventDefault();
    const r = await api("DELETE", `/api/v1/partners/${encodeURIComponent(target)}`,
                        { version: fileVersion });
    if (r.status === 200) {
      flash(`Partner ${target} removed; ${await applied(r.data.version)}`);
      location.reload();
    } else {
      document.getElementById("remove-error").textContent = r.data.error;
    }
  });
}

function formFields(form) {
  const v = (name) => form.elements[name].value.trim();
  const fields = {
    description: v("description"), type: v("type"), tls: v("tls"), sasl: v("sasl"),
    dialback: form.elements.dialback.checked, keepalive: form.elements.keepalive.checked,
    additional_domains: v("additional_domains").split(/[\s,]+/).filter(Boolean),
    connection_limit: v("connection_limit") === "" ? null : Number(v("connection_limit")),
    proxy_fqdn: v("proxy_fqdn") === "" ? null : v("proxy_fqdn"),
    trust: v("trust"),
    pin_sha256: v("pin_sha256").split(/\s+/).filter(Boolean),
  };
  if (!fields.pin_sha256.length) fields.pin_sha256 = null;
  if (form.dataset.mode === "new") fields.domain = v("domain");
  if (fields.description === "") fields.description = null;
  if (!fields.additional_domains.length) fields.additional_domains = null;  // key left out
  return fields;
}

function partnerFormPage() {
  fileVersion = jsonData("file-version");
  const matrix = jsonData("matrix");
  const form = document.getElementById("partner-form");
  const commit = document.getElementById("commit");
  const aside = document.getElementById("validation");
  const endpoint = form.dataset.mode === "new" ? "/api/v1/partners"
    : `/api/v1/partners/${encodeURIComponent(form.dataset.domain)}`;
  const method = form.dataset.mode === "new" ? "POST" : "PUT";
  let rowInvalid = false, serverInvalid = false, timer = null, seq = 0;

  function localCheck() {
    const tls = form.elements.tls.value, sasl = form.elements.sasl.value;
    const dialback = form.elements.dialback.checked;
    const row = matrix.find((r) => r.tls === tls && r.sasl === sasl && r.dialback === dialback);
    aside.className = `validation ${row.verdict}`;
    document.getElementById("matrix-row").textContent =
      `Row ${row.row}: ${row.verdict}` + (row.verdict === "invalid" ? " - cannot be committed" : "");
    document.getElementById("matrix-methods").textContent =
      `Expected methods: ${row.methods.join(", ") || "none"}`;
    document.getElementById("matrix-message").textContent = row.message;
    rowInvalid = row.verdict === "invalid";
    commit.disabled = rowInvalid || serverInvalid;
  }

  async function serverCheck() {
    const mine = ++seq;
    const r = await api(method, `${endpoint}?dry_run=1`, { version: fileVersion, partner: formFields(form) });
    if (mine !== seq) return;  // a newer check is on its way
    const errors = r.status === 200 ? [] : (r.data.errors || [r.data.error]);
    list(document.getElementById("server-errors"), errors);
    list(document.getElementById("server-warnings"), r.status === 200 ? r.data.warnings : []);
    document.getElementById("diff").textContent = r.status === 200 ? r.data.diff : "";
    serverInvalid = r.status === 422;
    commit.disabled = rowInvalid || serverInvalid;
  }

  const changed = () => { localCheck(); clearTimeout(timer); timer = setTimeout(serverCheck, 250); };
  form.addEventListener("input", changed);
  form.addEventListener("change", changed);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    localCheck();
    const result = document.getElementById("commit-result");
    if (rowInvalid) { result.textContent = "This combination is an invalid row of the Lync matrix."; return; }
    const r = await api(method, endpoint, { version: fileVersion, partner: formFields(form) });
    if (r.status === 200 || r.status === 201) {
      const name = form.dataset.mode === "new" ? formFields(form).domain : form.dataset.domain;
      flash(`Partner ${name} committed` + (r.data.warnings.length ? ` (warnings: ${r.data.warnings.join("; ")})` : "")
            + `; ${await applied(r.data.version)}`);
      location.href = "/partners";
    } else if (r.status === 409) {
      result.textContent = `${r.data.error} - reload the page to see the current file.`;
    } else {
      result.textContent = r.data.error;
      list(document.getElementById("server-errors"), r.data.errors || [r.data.error]);
    }
  });
  localCheck();
  serverCheck();
}

// --- Connections ---------------------------------------------------------------------------

function ago(now, t) {
  const s = Math.max(0, Math.floor(now - t));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  return `${Math.floor(s / 3600)} h ${Math.floor(s % 3600 / 60)} min ago`;
}

function connectionsPage() {
  const tbody = document.querySelector("#streams tbody");
  async function refresh() {
    const r = await api("GET", "/api/v1/streams");
    if (r.status !== 200) { document.getElementById("refreshed").textContent = r.data.error; return; }
    const rows = r.data.streams.map((s) => {
      const tr = document.createElement("tr");
      tr.dataset.direction = s.direction;
      tr.dataset.remote = s.remote;
      const cells = [s.direction, s.local, s.remote, s.peer, s.mechanism,
        (s.tls_version ? `${s.tls_version} ${s.tls_cipher || ""}` : "no TLS") + (s.direct_tls ? " (Direct TLS)" : ""),
        ago(r.data.now, s.since),
        `${s.stanzas_in} / ${s.stanzas_out}`, `${s.bytes_in} / ${s.bytes_out}`, String(s.queue)];
      cells.forEach((text, i) => {
        const td = document.createElement("td");
        td.textContent = text;
        if (i === 2) td.className = "remote";
        if (i === 4) td.className = "mechanism";
        tr.appendChild(td);
      });
      return tr;
    });
    if (!rows.length) {
      const tr = document.createElement("tr");
      tr.className = "empty";
      tr.innerHTML = '<td colspan="10" class="muted">No stream open.</td>';
      rows.push(tr);
    }
    tbody.replaceChildren(...rows);
    document.getElementById("refreshed").textContent = `Updated ${new Date().toLocaleTimeString()}.`;
  }
  setInterval(refresh, 2000);
  refresh();
}

// --- Gateway settings ----------------------------------------------------------------------

function settingsPage() {
  fileVersion = jsonData("file-version");
  const form = document.getElementById("settings-form");
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const settings = {};
    for (const input of form.querySelectorAll("input[data-type]")) {
      if (input.dataset.type === "bool") settings[input.name] = input.checked;
      else if (input.dataset.type === "int") settings[input.name] = Number(input.value);
      else if (input.value !== "") settings[input.name] = input.value;
    }
    const r = await api("PUT", "/api/v1/settings", { version: fileVersion, settings });
    const out = document.getElementById("settings-result");
    if (r.status === 200) {
      fileVersion = r.data.version;
      out.className = "ok";
      out.textContent = `Committed; ${await applied(r.data.version)}`;
      list(document.getElementById("settings-errors"), []);
    } else {
      out.className = "error";
      out.textContent = r.data.error;
      list(document.getElementById("settings-errors"), r.data.errors || []);
    }
  });
}

// The partner page's Probe button (issue 13): POST /api/v1/partners/{domain}/probe, then the
// steps, the diagnosis and the settings that will work, as `edgeproxy probe` prints them.
function probeButton() {
  const button = document.getElementById("probe-run");
  if (!button) return;
  button.addEventListener("click", async () => {
    button.disabled = true;
    const label = button.textContent;
    button.textContent = "Probing...";
    const diagnosis = document.getElementById("probe-diagnosis");
    diagnosis.textContent = "";
    const r = await api("POST", `/api/v1/partners/${encodeURIComponent(button.dataset.domain)}/probe`);
    button.disabled = false;
    button.textContent = label;
    if (r.status !== 200) {
      diagnosis.className = "error";
      diagnosis.textContent = r.data.error || `HTTP ${r.status}`;
      return;
    }
    diagnosis.className = "";
    diagnosis.textContent = r.data.diagnosis;
    const steps = document.getElementById("probe-steps");
    steps.replaceChildren(...r.data.steps.map((step) => {
      const li = document.createElement("li");
      li.className = `outcome-${step.status}`;
      li.textContent = `${step.status} ${step.topic}: ${step.text}`;
      return li;
    }));
    const ul = document.createElement("ul");
    document.getElementById("probe-settings").replaceChildren(ul);
    list(ul, r.data.recommendations.map((rec) => `Row ${rec.row}: ${rec.command}`));
  });
}

// "Pin current certificate" (issue 15): POST /api/v1/partners/{domain}/pin adds the key the
// partner presented last to its pin_sha256 (a file edit like any other), then the partner list says what the edge did.
function pinButton() {
  const button = document.getElementById("pin-current");
  if (!button) return;
  button.addEventListener("click", async () => {
    button.disabled = true;
    const domain = button.dataset.domain;
    const r = await api("POST", `/api/v1/partners/${encodeURIComponent(domain)}/pin`,
                        { version: jsonData("file-version") });
    if (r.status === 200) {
      flash(`Partner ${domain}: current certificate pinned; ${await applied(r.data.version)}`);
      location.href = "/partners";
    } else {
      button.disabled = false;
      document.getElementById("pin-result").textContent = r.data.error;
    }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  probeButton();
  pinButton();
  const page = document.body.dataset.page;
  ({ partners: partnersPage, partner_form: partnerFormPage, connections: connectionsPage,
     settings: settingsPage }[page] || (() => {}))();
});
