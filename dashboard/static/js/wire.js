// The wire format, read in the browser: topics (schemas/topics.py) and payloads
// (schemas/codec.py: one msgpack map per message, with `v: 1`; schemas/envelope.py: signed
// documents are `{v, kind, body: bytes, sigs}` whose body is another msgpack map).
//
// The page only shows what it reads: it does not verify envelope signatures (devices and
// the coordinator do that before acting on a manifest). Every payload is untrusted: it is
// size-capped before decoding, and a message whose shape is not the schema's is counted
// and dropped, never shown.

export const MAX_MESSAGE_BYTES = 256 * 1024; // schemas.codec.MAX_MESSAGE_BYTES
const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/; // schemas.topics.NAME_PATTERN
const CHANNELS = new Set(["presence", "state", "health", "telemetry", "events"]);

export class WireError extends Error {}

const decoder = new globalThis.MessagePack.Decoder({
  maxStrLength: MAX_MESSAGE_BYTES,
  maxBinLength: MAX_MESSAGE_BYTES,
  maxArrayLength: 65536,
  maxMapLength: 65536,
  maxExtLength: 0,
});

// The filters the page subscribes to, below `prefix` (fleet/v1).
export function filters(prefix) {
  return [
    `${prefix}/rollouts/+/status`,
    `${prefix}/classes/+/manifest`,
    `${prefix}/classes/+/telemetry`,
    `${prefix}/devices/+/presence`,
    `${prefix}/devices/+/state`,
    `${prefix}/devices/+/health`,
    `${prefix}/devices/+/telemetry`,
    `${prefix}/coordinator/presence`,
  ];
}

// A topic taken apart: {kind, name, channel}, or null for one the page does not read.
export function parseTopic(prefix, topic) {
  if (!topic.startsWith(`${prefix}/`)) return null;
  const parts = topic.slice(prefix.length + 1).split("/");
  if (parts.length === 2 && parts[0] === "coordinator" && parts[1] === "presence") {
    return { kind: "coordinator_presence", name: null, channel: null };
  }
  if (parts.length !== 3 || !NAME.test(parts[1])) return null;
  const [area, name, leaf] = parts;
  if (area === "rollouts" && leaf === "status") return { kind: "rollout_status", name, channel: null };
  if (area === "classes" && leaf === "manifest") return { kind: "class_manifest", name, channel: null };
  if (area === "classes" && leaf === "telemetry") return { kind: "class_telemetry", name, channel: null };
  if (area === "devices" && CHANNELS.has(leaf)) return { kind: "device", name, channel: leaf };
  return null;
}

// One msgpack map of schema version 1.
export function decodeMap(payload) {
  if (payload.byteLength > MAX_MESSAGE_BYTES) throw new WireError(`${payload.byteLength} bytes: over the cap`);
  let value;
  try {
    value = decoder.decode(payload);
  } catch (error) {
    throw new WireError(`not msgpack: ${error.message}`);
  }
  if (value === null || typeof value !== "object" || Array.isArray(value) || value instanceof Uint8Array) {
    throw new WireError("not a map");
  }
  if (value.v !== 1) throw new WireError(`schema version ${value.v}`);
  return value;
}

// The body of a signed envelope of `kind`, decoded WITHOUT checking its signatures.
export function envelopeBody(payload, kind) {
  const envelope = decodeMap(payload);
  if (envelope.kind !== kind) throw new WireError(`envelope of kind ${envelope.kind}, not ${kind}`);
  if (!(envelope.body instanceof Uint8Array)) throw new WireError("envelope without a body");
  return decodeMap(envelope.body);
}

export function presence(payload) {
  const text = new TextDecoder().decode(payload);
  if (text !== "online" && text !== "offline") throw new WireError("presence is neither online nor offline");
  return text;
}

// What each kind of message must hold for the page to show it: field -> type test.
const isText = (x) => typeof x === "string";
const isNumber = (x) => typeof x === "number" && Number.isFinite(x);
const isTextOrNull = (x) => x === null || isText(x);
const isMap = (x) => x !== null && typeof x === "object" && !Array.isArray(x) && !(x instanceof Uint8Array);
const SHAPES = {
  RolloutStatus: { id: isText, phase: isText, wave: isNumber, counts: isMap, classes: Array.isArray, updated_at: isNumber },
  Manifest: { hw_class: isText, seq: isNumber, issued_at: isNumber, expires_at: isNumber },
  DeviceState: { device_id: isText, hw_class: isText, mode: isText, active_release: isTextOrNull, updated_at: isNumber },
  HealthReport: { device_id: isText, release: isText, verdict: isText, reasons: Array.isArray, at: isNumber },
  ClassTelemetry: { hw_class: isText, at: isNumber, releases: Array.isArray },
  WindowStats: { inferences: isNumber, rate_per_s: isNumber, confidence: Array.isArray, labels: isMap },
  TelemetrySummary: {
    device_id: isText, release: isTextOrNull, window_start: isNumber, window_end: isNumber,
    count: isNumber, errors: isNumber, latency_ms: isMap, confidence: Array.isArray, labels: isMap,
  },
};

export function shaped(value, name) {
  for (const [field, test] of Object.entries(SHAPES[name])) {
    if (!test(value[field])) throw new WireError(`${name}.${field} is missing or of another type`);
  }
  return value;
}
