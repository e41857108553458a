// The fleet as the page knows it, kept from the wire: devices, class manifests and rollout
// statuses. Taking a message is O(1); nothing is drawn here. Views ask for what they show
// (one page of devices, counts per class) when they are redrawn, at most a few times a
// second whatever the message rate.

import { decodeMap, envelopeBody, presence, shaped } from "./wire.js";

const MAX_ROLLOUTS = 300; // statuses kept: the coordinator keeps at most 256 refused ids
const MAX_TIMELINE = 100; // decisions kept per rollout

export class Fleet {
  constructor() {
    this.devices = new Map(); // id -> device row
    this.classes = new Map(); // class -> {manifest, seq}
    this.rollouts = new Map(); // id -> {status, timeline}
    this.coordinator = null; // "online" | "offline" | null
    this.dirty = new Set(); // which views need a redraw: devices, classes, rollouts
    this._ids = []; // device ids, sorted when _sorted
    this._sorted = true;
  }

  // A message of a device channel, a manifest or a status; `payload` is a Uint8Array.
  take(parsed, payload) {
    const empty = payload.byteLength === 0; // a cleared retained topic
    switch (parsed.kind) {
      case "rollout_status":
        return empty ? this._forget(this.rollouts, parsed.name, "rollouts") : this._status(shaped(decodeMap(payload), "RolloutStatus"));
      case "class_manifest":
        return empty ? this._forget(this.classes, parsed.name, "classes") : this._manifest(parsed.name, payload);
      case "coordinator_presence":
        this.coordinator = empty ? null : presence(payload);
        return this.dirty.add("classes");
      case "device":
        return this._device(parsed.name, parsed.channel, payload, empty);
      default:
        return undefined;
    }
  }

  _forget(map, key, view) {
    map.delete(key);
    this.dirty.add(view);
  }

  _manifest(hwClass, payload) {
    const manifest = shaped(envelopeBody(payload, "manifest"), "Manifest");
    this.classes.set(hwClass, { manifest, seq: manifest.seq });
    this.dirty.add("classes");
  }

  _status(status) {
    let entry = this.rollouts.get(status.id);
    if (!entry) {
      entry = { status: null, timeline: [] };
      this.rollouts.set(status.id, entry);
      this._boundRollouts();
    }
    _note(entry, status);
    entry.status = status;
    this.dirty.add("rollouts");
  }

  _boundRollouts() {
    if (this.rollouts.size <= MAX_ROLLOUTS) return;
    let oldest = null;
    for (const [id, entry] of this.rollouts) {
      const at = entry.status?.updated_at ?? 0;
      if (oldest === null || at < oldest[1]) oldest = [id, at];
    }
    this.rollouts.delete(oldest[0]);
  }

  _row(id) {
    let row = this.devices.get(id);
    if (!row) {
      row = { id, cls: null, release: null, target: null, mode: null, online: false, verdict: null,
        verdictRelease: null, reasons: [], lastSeen: null, rollout: null, inferences: 0, degraded: null };
      this.devices.set(id, row);
      this._ids.push(id);
      this._sorted = false;
    }
    return row;
  }

  _device(id, channel, payload, empty) {
    if (channel === "telemetry" || channel === "events") return; // telemetry goes to the book
    if (empty && !this.devices.has(id)) return;
    const row = this._row(id);
    if (channel === "presence") row.online = !empty && presence(payload) === "online";
    else if (channel === "state") _state(row, empty ? null : shaped(decodeMap(payload), "DeviceState"));
    else if (channel === "health") _health(row, empty ? null : shaped(decodeMap(payload), "HealthReport"));
    this.dirty.add("devices");
  }

  // The class a device is of (from its state), for telemetry.
  classOf(id) {
    return this.devices.get(id)?.cls ?? null;
  }

  // One page of devices matching `filter`, by id: {rows, total}.
  query(filter, offset, limit) {
    if (!this._sorted) {
      this._ids = [...this.devices.keys()].sort();
      this._sorted = true;
    }
    const rows = [];
    let total = 0;
    for (const id of this._ids) {
      const row = this.devices.get(id);
      if (!row || !_matches(row, filter)) continue;
      if (total >= offset && rows.length < limit) rows.push(row);
      total += 1;
    }
    return { rows, total };
  }

  // Per class: devices, online, by mode, by release, healthy, unhealthy; and the values
  // the device filters offer.
  summary() {
    const perClass = new Map();
    const facets = { cls: new Set(), release: new Set(), mode: new Set() };
    for (const row of this.devices.values()) {
      const key = row.cls ?? "(no state)";
      let c = perClass.get(key);
      if (!c) perClass.set(key, (c = { devices: 0, online: 0, modes: new Map(), releases: new Map(), healthy: 0, unhealthy: 0 }));
      c.devices += 1;
      c.online += row.online ? 1 : 0;
      c.modes.set(row.mode ?? "–", (c.modes.get(row.mode ?? "–") ?? 0) + 1);
      c.releases.set(row.release ?? "–", (c.releases.get(row.release ?? "–") ?? 0) + 1);
      const verdict = verdictOf(row);
      if (verdict === "healthy") c.healthy += 1;
      if (verdict === "unhealthy") c.unhealthy += 1;
      if (row.cls) facets.cls.add(row.cls);
      if (row.release) facets.release.add(row.release);
      if (row.mode) facets.mode.add(row.mode);
    }
    return { perClass, facets };
  }
}

function _state(row, state) {
  if (state === null) {
    Object.assign(row, { cls: null, release: null, target: null, mode: null, rollout: null, lastSeen: null });
    return;
  }
  row.cls = state.hw_class;
  row.release = state.active_release;
  row.target = state.target_release ?? null;
  row.mode = state.mode;
  row.rollout = state.rollout_id ?? null;
  row.lastSeen = state.updated_at;
  row.inferences = state.inferences_total ?? 0;
  row.degraded = state.degraded_reason ?? null;
}

function _health(row, report) {
  row.verdict = report?.verdict ?? null;
  row.verdictRelease = report?.release ?? null;
  row.reasons = report?.reasons ?? [];
}

// The verdict of a device's last health report on the release it runs (as `fleet ls`).
export function verdictOf(row) {
  return row.verdict !== null && row.verdictRelease === row.release ? row.verdict : null;
}

function _matches(row, f) {
  if (f.text && !row.id.toLowerCase().includes(f.text)) return false;
  if (f.cls && row.cls !== f.cls) return false;
  if (f.release && row.release !== f.release) return false;
  if (f.mode && row.mode !== f.mode) return false;
  if (f.health && (verdictOf(row) ?? "none") !== f.health) return false;
  if (f.link && (row.online ? "online" : "offline") !== f.link) return false;
  return true;
}

// A rollout's decisions as the page saw them arrive: one entry per change of phase or
// wave, of the rollout and of each class, with the reason given then.
function _note(entry, status) {
  const before = entry.status;
  const seen = (phase, wave, prev) => !prev || prev.phase !== phase || prev.wave !== wave;
  const push = (cls, phase, wave, reason, cause) => {
    entry.timeline.push({ at: status.updated_at, cls, phase, wave, reason: reason ?? null, cause: cause ?? null });
    if (entry.timeline.length > MAX_TIMELINE) entry.timeline.shift();
  };
  for (const [cls, lane] of Object.entries(status.lanes ?? {})) {
    if (seen(lane.phase, lane.wave, before?.lanes?.[cls])) push(cls, lane.phase, lane.wave, lane.reason, lane.cause);
  }
  const lanes = Object.keys(status.lanes ?? {}).length;
  if (!before || before.phase !== status.phase || (!lanes && before.wave !== status.wave)) {
    push(null, status.phase, status.wave, status.reason, status.cause);
  }
}
