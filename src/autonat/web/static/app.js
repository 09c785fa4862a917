// autonat's status page: /api/status rendered, /api/events followed live (server-sent events).
// Every value from the daemon goes into the page as text, never as HTML: some of it comes from the router
// (error descriptions, model names) or from SIP peers (user names), and none of it is trusted.
// `?stream=N` (headless checks, kiosk snapshots): one event stream of N seconds, no reconnection.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(location.search);
  const oneShot = /^\d{1,4}$/.test(params.get("stream") || "") ? Number(params.get("stream")) : null;
  const MAX_EVENTS = 100;
  let clockOffset = 0; // the daemon's wall clock minus ours, in ms: lease countdowns follow the daemon
  let live = false; // true once the replay of recent events is over: later events happened while open
  let refreshTimer = null;

  // --- small helpers ------------------------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined) node.setAttribute(name, String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }
  const text = (id, value) => { $(id).textContent = value; };
  const show = (id, visible) => { $(id).hidden = !visible; };
  const now = () => Date.now() + clockOffset;
  const clock = (seconds) => new Date(seconds * 1000).toLocaleTimeString([], { hour12: false });
  const when = (seconds) => {
    const date = new Date(seconds * 1000);
    return date.toDateString() === new Date(now()).toDateString() ? clock(seconds) : date.toLocaleString();
  };
  function duration(seconds) {
    seconds = Math.max(0, Math.round(seconds));
    const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
    if (h) return `${h} h ${String(m).padStart(2, "0")} min`;
    if (m) return `${m} min ${String(s).padStart(2, "0")} s`;
    return `${s} s`;
  }
  function pairs(target, entries) {
    target.replaceChildren();
    for (const [label, value] of entries) {
      if (value === null || value === undefined || value === "") continue;
      target.append(el("dt", null, label), el("dd", null, value));
    }
  }

  // --- the status ---------------------------------------------------------------------------------
  async function refresh() {
    try {
      const reply = await fetch("/api/status", { cache: "no-store", credentials: "same-origin" });
      if (!reply.ok) throw new Error((await reply.text()).trim() || `HTTP ${reply.status}`);
      const status = await reply.json();
      clockOffset = status.now * 1000 - Date.now();
      render(status);
      text("updated", clock(status.now));
    } catch (error) {
      text("engine-error", `Cannot read the status: ${error.message}`);
      show("engine-error", true);
    }
  }

  function refreshSoon() {
    if (refreshTimer !== null) return;
    refreshTimer = setTimeout(() => { refreshTimer = null; refresh(); }, 150);
  }

  function render(status) {
    const engine = status.engine;
    renderSummary(engine);
    renderMappings(engine.mappings);
    renderRouter(status.router, engine);
    renderHistory(engine.address_history);
    renderProfiles(status.profiles);
    renderCalls(status.calls);
    renderRegistrations(status.registrations);
    renderDoctor(status.doctor);
  }

  function renderSummary(engine) {
    text("external-ip", engine.external_ip || "unknown");
    const history = engine.address_history || [];
    const last = history.length ? history[history.length - 1] : null;
    const source = [];
    if (engine.external_ip && engine.protocol) source.push(`from ${engine.protocol} via ${engine.gateway || "the router"}`);
    if (last && last.address === engine.external_ip) source.push(`since ${when(last.at)}`);
    if (engine.stun) {
      source.push(engine.stun.error ? `STUN ${engine.stun.server}: ${engine.stun.error}`
        : `STUN ${engine.stun.server} sees ${engine.stun.address}${engine.stun.matches_router ? " (agrees)" : " (differs)"}`);
    }
    text("external-source", source.join(" · "));
    text("protocol", engine.protocol || "none");
    text("gateway", engine.gateway || "unknown");
    text("engine-state", engine.state + (engine.mapping_enabled ? "" : " (mapping disabled)"));
    text("double-nat", engine.double_nat ? "yes" : "no");
    text("engine-error", engine.last_error || "");
    show("engine-error", Boolean(engine.last_error));
  }

  function renderMappings(mappings) {
    const body = $("mappings");
    body.replaceChildren();
    for (const m of mappings) {
      const external = m.external_port === null ? "" : `${m.external_ip || "?"}:${m.external_port}`;
      const lease = el("td", { class: "lease", "data-label": "Lease" });
      if (m.lease === 0) lease.textContent = "permanent";
      else if (m.expires_at !== null) lease.setAttribute("data-expires", m.expires_at);
      body.append(el("tr", { "data-key": `${m.proto}/${m.port}`, "data-state": m.state },
        el("td", { class: "key", "data-label": "Mapping" }, `${m.proto} ${m.port}`),
        el("td", { class: "external", "data-label": "External" }, external),
        el("td", { "data-label": "Owner" }, m.owner + (m.sticky ? " (sticky)" : "")),
        el("td", { "data-label": "Protocol" }, m.protocol || ""),
        el("td", { "data-label": "State" }, el("span", { class: `badge ${m.state}` }, m.state)),
        lease,
        el("td", { class: "error", "data-label": "Last error" }, m.last_error || "")));
    }
    text("mapping-count", mappings.length ? `(${mappings.length})` : "");
    body.closest("table").hidden = mappings.length === 0;
    show("no-mappings", mappings.length === 0);
    tick();
  }

  function tick() {
    for (const cell of document.querySelectorAll("[data-expires]")) {
      const left = Number(cell.getAttribute("data-expires")) - now() / 1000;
      cell.textContent = left > 0 ? duration(left) : "expired";
    }
  }

  function renderRouter(router, engine) {
    if (!router) {
      pairs($("router"), [["Gateway", engine.gateway || "not found yet"]]);
      $("protocols").replaceChildren();
      return;
    }
    pairs($("router"), [
      ["Gateway", router.gateway], ["Local address", router.local_address], ["Interface", router.interface],
      ["Selected", router.selected], ["Address kind", router.external_ip_kind],
      ["Probe", `${router.elapsed_ms} ms`],
    ]);
    const blocks = [];
    for (const [name, p] of Object.entries(router.protocols || {})) {
      const facts = [];
      if (p.epoch !== null && p.epoch !== undefined) facts.push(["Epoch", p.epoch]);
      for (const [key, value] of Object.entries(p)) {
        if (["available", "reason", "external_ip", "epoch", "elapsed_ms"].includes(key)) continue;
        if (value !== null && typeof value !== "object") facts.push([key.replaceAll("_", " "), value]);
      }
      const details = el("dl", { class: "pairs" });
      pairs(details, facts);
      const timing = p.elapsed_ms !== null && p.elapsed_ms !== undefined ? ` in ${p.elapsed_ms} ms` : "";
      blocks.push(el("div", { class: "protocol", "data-protocol": name },
        el("span", { class: `badge ${p.available ? "ok" : "bad"}` }, name), " ",
        p.available ? `answers${timing}` : p.reason, facts.length ? details : null));
    }
    $("protocols").replaceChildren(...blocks);
  }

  function renderHistory(history) {
    const list = $("history");
    list.replaceChildren();
    for (const entry of [...(history || [])].reverse()) {
      list.append(el("li", null, el("strong", null, entry.address || "none"), " ", el("span", { class: "muted" }, when(entry.at))));
    }
    if (!list.children.length) list.append(el("li", { class: "muted" }, "No address seen yet."));
  }

  function renderProfiles(profiles) {
    const box = $("profiles");
    box.replaceChildren();
    for (const p of profiles) {
      const sip = p.sip || {};
      const details = el("dl", { class: "pairs" });
      pairs(details, [
        ["Ext-SIP-IP", p.ext_sip_ip ? `${p.ext_sip_ip} (${p.ext_sip_ip_source})` : p.error ? "" : "none"],
        ["Ext-RTP-IP", p.ext_rtp_ip ? `${p.ext_rtp_ip} (${p.ext_rtp_ip_source})` : p.error ? "" : "none"],
        ["SIP-IP", p.sip_ip], ["RTP-IP", p.rtp_ip], ["URL", p.url], ["TLS URL", p.tls_url],
        ["Calls in / out", "CALLS-IN" in sip ? `${sip["CALLS-IN"]} / ${sip["CALLS-OUT"]} (${sip["FAILED-CALLS-IN"]} failed)` : ""],
        ["Live calls", sip["Live-Calls"]], ["Transports", sip.Transports],
      ]);
      box.append(el("div", { class: "profile", "data-profile": p.name },
        el("h3", null, p.name, p.auto_nat ? " " : "", p.auto_nat ? el("span", { class: "badge ok" }, "auto-nat") : null),
        p.error ? el("p", { class: "error" }, p.error) : null, details));
    }
    show("no-profiles", profiles.length === 0);
  }

  function renderCalls(calls) {
    const list = $("calls");
    list.replaceChildren();
    for (const call of calls) {
      const legs = (call.legs || []).map((leg) => `${leg.peer}${leg.advertised ? ` · media ${leg.advertised}` : ""}`);
      list.append(el("li", { "data-call": call.id },
        el("strong", null, call.number || call.id), " ", el("span", { class: "badge ok" }, call.state),
        ` ${call.kind} on ${call.profile} · ${duration(call.duration)}`,
        legs.length ? el("div", { class: "muted" }, legs.join(" ↔ ")) : null));
    }
    text("call-count", calls.length ? `(${calls.length})` : "");
    show("no-calls", calls.length === 0);
  }

  function renderRegistrations(registrations) {
    const list = $("registrations");
    list.replaceChildren();
    for (const r of registrations) {
      list.append(el("li", { "data-user": r.user },
        el("strong", null, r.user), ` from ${r.source} · expires in ${duration(r.expires)}`,
        el("div", { class: "muted" }, r.contact)));
    }
    text("registration-count", registrations.length ? `(${registrations.length})` : "");
    show("no-registrations", registrations.length === 0);
  }

  function renderDoctor(report) {
    const box = $("doctor");
    if (!report) {
      box.className = "muted";
      box.textContent = "no report yet";
      return;
    }
    box.className = "";
    // `autonat doctor` hands the daemon its summary (control verb doctor-report): its text lines, when.
    const when = typeof report.received === "number" ? new Date(report.received * 1000).toLocaleString() : "";
    const body = typeof report.text === "string" ? report.text : JSON.stringify(report, null, 2);
    box.replaceChildren(el("div", { class: "muted" }, when ? `autonat doctor, ${when}` : "autonat doctor"),
      el("pre", null, body));
  }

  // --- events -------------------------------------------------------------------------------------
  function describe(e) {
    const mapping = () => {
      const external = e.external_port ? ` → ${e.external_ip || "?"}:${e.external_port}` : "";
      return `${e.proto} ${e.port}${external}${e.protocol ? ` (${e.protocol})` : ""} · ${e.owner || ""}`;
    };
    switch (e.event) {
      case "nat-add": case "nat-renew": return mapping();
      case "nat-lost": return `${mapping()} · ${e.reason || ""}`;
      case "nat-error": return `${mapping()} · ${e.last_error || ""}`;
      case "nat-del": return `${e.proto} ${e.port} · ${e.owner || ""}`;
      case "external-address-change": return `${e.old} → ${e.new}`;
      case "router-reboot": return `${e.gateway || "router"}: ${e.reason || ""}`;
      case "double-nat": return `external ${e.external_ip || "?"}${e.reason ? ` · ${e.reason}` : ""}`;
      case "discovered": return `${e.protocol} via ${e.gateway}, external ${e.external_ip || "unknown"}`;
      case "call-start": return `${e.number} (${e.app}) from ${e.source} on ${e.profile}`;
      case "call-end": return `${e.call} on ${e.profile}: ${e.reason}`;
      case "sip-register": return `${e.user} from ${e.source} on ${e.profile}`;
      default: {
        const rest = { ...e };
        delete rest.event; delete rest.at;
        return JSON.stringify(rest);
      }
    }
  }

  function addEvent(e) {
    const list = $("events");
    list.prepend(el("li", { "data-event": e.event, "data-live": live ? "1" : "0" },
      el("time", null, clock(e.at)), el("span", { class: "kind" }, e.event), el("span", { class: "detail" }, describe(e))));
    while (list.children.length > MAX_EVENTS) list.lastElementChild.remove();
    show("no-events", false);
  }

  function setStream(state, label) {
    document.body.setAttribute("data-stream", state);
    const pill = $("stream");
    pill.className = `pill ${state}`;
    pill.textContent = label || state;
  }

  function follow() {
    const source = new EventSource(oneShot === null ? "/api/events" : `/api/events?seconds=${oneShot}`);
    source.onmessage = (message) => {
      let event;
      try { event = JSON.parse(message.data); } catch { return; }
      addEvent(event);
      if (live) refreshSoon();
    };
    source.addEventListener("live", () => { live = true; setStream("live"); refreshSoon(); });
    source.onerror = () => {
      live = false;
      if (oneShot !== null) { source.close(); setStream("ended", "stream ended"); return; }
      setStream("reconnecting");
    };
  }

  refresh();
  follow();
  setInterval(tick, 1000);
  setInterval(refresh, 15000); // what no event announces: registrations expiring, call durations
})();
