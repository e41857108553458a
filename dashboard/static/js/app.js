// The dashboard page: connects to the broker over MQTT 5 WebSockets (through the
// dashboard server's relay) with the read-only account the server hands it, keeps the
// fleet from what arrives, and redraws each view at most every REDRAW_MS, only when what
// it shows changed (or its clock moved): messages never draw anything themselves.

import { AuditTrail } from "./audit.js";
import { renderClasses } from "./classes.js";
import { DeviceTable } from "./devices.js";
import { el, replace } from "./dom.js";
import { Fleet } from "./fleet.js";
import { renderRollouts } from "./rollouts.js";
import { TelemetryBook } from "./telemetry.js";
import { renderTelemetry } from "./telemetryview.js";
import { filters, parseTopic } from "./wire.js";

const REDRAW_MS = 500;
const CLOCK_MS = 5000; // redraw ages ("12 s ago") and telemetry windows at least this often
const AUDIT_MS = 5000;
const SESSION_TAKEN_OVER = 0x8e;

const $ = (id) => document.getElementById(id);

async function main() {
  const config = await (await fetch("config.json", { cache: "no-store" })).json();
  const fleet = new Fleet();
  const book = new TelemetryBook();
  const stats = { messages: 0, dropped: 0, lastDropped: null, link: "connecting…" };
  const devices = new DeviceTable($("devices"), () => fleet.dirty.add("devices"));
  const audit = new AuditTrail($("audit"), config.audit);

  const client = globalThis.mqtt.connect(`ws://${location.host}/mqtt`, {
    protocolVersion: 5,
    username: config.username,
    password: config.password,
    clientId: config.username, // the broker binds the session to the account anyway
    clean: true,
    keepalive: 30,
    reconnectPeriod: 2000,
    connectTimeout: 10000,
  });
  // For tests and the curious: the page's state and its (read-only) client.
  globalThis.edgefleet = { client, fleet, book, stats };

  let subscribed = false;
  client.on("connect", () => {
    stats.link = "connected";
    if (!subscribed) client.subscribe(filters(config.prefix), { qos: 0 }); // MQTT.js re-subscribes after a reconnect
    subscribed = true;
    fleet.dirty.add("header");
  });
  client.on("reconnect", () => link(stats, fleet, "reconnecting…"));
  client.on("close", () => link(stats, fleet, stats.link.startsWith("another") ? stats.link : "disconnected"));
  client.on("error", (error) => link(stats, fleet, `error: ${error.message}`));
  client.on("disconnect", (packet) => {
    if (packet.reasonCode === SESSION_TAKEN_OVER) {
      // One account is one session: another tab or program logged in with it.
      client.end(true);
      link(stats, fleet, `another page or program logged in as ${config.username}: reload to take over, or give each viewer an account of its own`);
    }
  });
  client.on("message", (topic, payload) => take(config.prefix, topic, payload, { fleet, book, stats }));

  let lastClock = 0;
  let lastAudit = -AUDIT_MS;
  setInterval(() => {
    const now = Date.now() / 1000;
    if (performance.now() - lastClock >= CLOCK_MS) {
      lastClock = performance.now();
      for (const view of ["devices", "rollouts", "classes", "telemetry", "header"]) fleet.dirty.add(view);
    }
    if (book.dirty) fleet.dirty.add("telemetry");
    redraw(fleet.dirty, { fleet, book, devices, audit, stats, now });
    fleet.dirty.clear();
    book.dirty = false;
    if (performance.now() - lastAudit >= AUDIT_MS) {
      lastAudit = performance.now();
      audit.refresh().then(() => audit.render([...fleet.rollouts.keys()].sort()));
    }
  }, REDRAW_MS);
}

function link(stats, fleet, text) {
  stats.link = text;
  fleet.dirty.add("header");
}

function take(prefix, topic, payload, { fleet, book, stats }) {
  stats.messages += 1;
  const parsed = parseTopic(prefix, topic);
  if (parsed === null) return;
  try {
    if (parsed.kind === "device" && parsed.channel === "telemetry") {
      if (payload.byteLength) book.takeSummary(fleet.classOf(parsed.name), payload);
    } else if (parsed.kind === "class_telemetry") book.takeAggregate(parsed.name, payload);
    else fleet.take(parsed, payload);
  } catch (error) {
    // Hostile or foreign payloads are counted and dropped; they never stop the page.
    stats.dropped += 1;
    stats.lastDropped = `${topic}: ${error.message}`.slice(0, 300);
  }
  fleet.dirty.add("header");
}

function redraw(dirty, { fleet, book, devices, stats, now }) {
  if (dirty.has("rollouts")) renderRollouts($("rollouts"), fleet, now);
  const summary = dirty.has("classes") || dirty.has("devices") ? fleet.summary() : null;
  if (summary) renderClasses($("classes"), fleet, summary, now);
  if (dirty.has("devices")) devices.render(fleet, summary.facets, now);
  if (dirty.has("telemetry")) renderTelemetry($("telemetry"), book, fleet, now);
  if (dirty.has("header")) header(fleet, stats);
}

function header(fleet, stats) {
  let online = 0;
  for (const row of fleet.devices.values()) online += row.online ? 1 : 0;
  const live = [...fleet.rollouts.values()].filter((e) => e.status && ["wave", "paused"].includes(e.status.phase)).length;
  const linkClass = stats.link === "connected" ? "badge online" : "badge offline";
  replace(
    $("status"),
    el("span", { class: linkClass, id: "link" }, `broker: ${stats.link}`),
    el("span", { class: fleet.coordinator === "online" ? "badge online" : "badge offline" }, `coordinator: ${fleet.coordinator ?? "unknown"}`),
    el("span", {}, `${fleet.devices.size} devices, ${online} online`),
    el("span", {}, `${live} live rollouts`),
    el("span", { class: "muted" }, `${stats.messages} messages`),
    stats.dropped ? el("span", { class: "badge bad", title: stats.lastDropped }, `${stats.dropped} undecodable`) : null,
  );
}

main().catch((error) => {
  replace($("status"), el("span", { class: "badge bad" }, `dashboard failed to start: ${error.message}`));
});
