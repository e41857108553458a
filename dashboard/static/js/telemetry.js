// Telemetry per class and release, as time series for the charts.
//
// Two sources, one shape. Devices' own summaries (devices/+/telemetry, schemas/telemetry.py)
// are merged here into 10-second buckets, exactly as they merge anywhere: counts add, the
// log-spaced latency buckets add (quantiles read high by at most 10 %), confidence bins
// and label counts add. Once the coordinator publishes its aggregate for a class
// (classes/{class}/telemetry, retained), that class is charted from the aggregate and its
// devices' summaries are no longer merged here. Memory is bounded: at most MAX_SERIES
// (class, release) series of MAX_BUCKETS buckets, MAX_LABELS labels a bucket.

import { decodeMap, shaped } from "./wire.js";

export const BUCKET_S = 10;
const MAX_BUCKETS = 60; // ten minutes
const MAX_SERIES = 64;
const MAX_LABELS = 64;
const OTHER = "…other";
const GAMMA = 1.1; // schemas.telemetry.LATENCY_GAMMA
const CONFIDENCE_BINS = 10;

function emptyBucket() {
  return { count: 0, errors: 0, latency: new Map(), confidence: new Array(CONFIDENCE_BINS).fill(0), labels: new Map() };
}

function addLabels(into, labels) {
  for (const [label, n] of labels) {
    if (into.has(label) || into.size < MAX_LABELS - 1) into.set(label, (into.get(label) ?? 0) + n);
    else into.set(OTHER, (into.get(OTHER) ?? 0) + n);
  }
}

function addSummary(bucket, s) {
  bucket.count += s.count;
  bucket.errors += s.errors;
  for (const pair of s.latency_ms.buckets ?? []) {
    const [index, n] = pair;
    if (Number.isInteger(index) && Number.isFinite(n)) bucket.latency.set(index, (bucket.latency.get(index) ?? 0) + n);
  }
  s.confidence.forEach((n, i) => {
    if (i < CONFIDENCE_BINS && Number.isFinite(n)) bucket.confidence[i] += n;
  });
  addLabels(bucket.labels, Object.entries(s.labels).filter(([, n]) => Number.isFinite(n)));
}

// The upper bound of the log bucket holding quantile q, as LogHistogram.quantile.
export function quantile(latency, q) {
  const indexes = [...latency.keys()].sort((a, b) => a - b);
  const total = indexes.reduce((sum, i) => sum + latency.get(i), 0);
  if (total === 0) return null;
  let seen = 0;
  for (const i of indexes) {
    seen += latency.get(i);
    if (seen >= q * total) return GAMMA ** i;
  }
  return GAMMA ** indexes[indexes.length - 1];
}

// One chart point from a bucket (or a merge of buckets) spanning `seconds`.
function point(t, b, seconds) {
  return {
    t,
    count: b.count,
    rate: b.count / seconds,
    errorRate: b.count ? b.errors / b.count : null,
    p50: quantile(b.latency, 0.5),
    p95: quantile(b.latency, 0.95),
    p99: quantile(b.latency, 0.99),
  };
}

function merged(buckets) {
  const total = emptyBucket();
  for (const b of buckets) {
    total.count += b.count;
    total.errors += b.errors;
    for (const [i, n] of b.latency) total.latency.set(i, (total.latency.get(i) ?? 0) + n);
    b.confidence.forEach((n, i) => (total.confidence[i] += n));
    addLabels(total.labels, b.labels);
  }
  return total;
}

export class TelemetryBook {
  constructor() {
    this.series = new Map(); // "class\0release" -> {cls, release, buckets: Map(start -> bucket), touched}
    this.aggregates = new Map(); // class -> the coordinator's aggregate, as published
    this.dirty = false;
  }

  // A device's summary; `cls` from its state (null: not known yet, dropped).
  takeSummary(cls, payload) {
    if (!cls || this.aggregates.has(cls)) return; // the coordinator's aggregate counts them
    const s = shaped(decodeMap(payload), "TelemetrySummary");
    const key = `${cls}\u0000${s.release ?? "–"}`;
    let series = this.series.get(key);
    if (!series) {
      series = { cls, release: s.release ?? "–", buckets: new Map(), touched: 0 };
      this.series.set(key, series);
      this._bound();
    }
    const start = Math.floor(s.window_end / BUCKET_S) * BUCKET_S;
    let bucket = series.buckets.get(start);
    if (!bucket) {
      bucket = emptyBucket();
      series.buckets.set(start, bucket);
      for (const old of [...series.buckets.keys()].sort((a, b) => a - b).slice(0, -MAX_BUCKETS)) series.buckets.delete(old);
    }
    addSummary(bucket, s);
    series.touched = Math.max(series.touched, s.window_end);
    this.dirty = true;
  }

  // The coordinator's retained aggregate of a class (schemas.classtelemetry.ClassTelemetry;
  // an empty payload: cleared). It holds each release's last minute and hour, no history:
  // the lines are drawn from the minutes of the aggregates the page received.
  takeAggregate(cls, payload) {
    if (payload.byteLength === 0) {
      this.aggregates.delete(cls);
      this.dirty = true;
      return;
    }
    const aggregate = shaped(decodeMap(payload), "ClassTelemetry");
    for (const r of aggregate.releases) shaped(r.minute ?? {}, "WindowStats");
    this.aggregates.set(cls, aggregate);
    for (const r of aggregate.releases) {
      const key = `${cls}\u0000${r.release}`;
      let series = this.series.get(key);
      if (!series || !series.points) {
        series = { cls, release: String(r.release), buckets: new Map(), points: [], touched: 0 };
        this.series.set(key, series);
        this._bound();
      }
      const m = r.minute;
      if (series.points.at(-1)?.t !== aggregate.at) {
        series.points.push({ t: aggregate.at, count: m.inferences, rate: m.rate_per_s, errorRate: m.error_rate, p50: m.p50_ms, p95: m.p95_ms, p99: m.p99_ms });
        if (series.points.length > MAX_BUCKETS) series.points.shift();
      }
      series.touched = aggregate.at;
    }
    this.dirty = true;
  }

  _fromAggregate(cls) {
    return this.aggregates
      .get(cls)
      .releases.map((r) => fromRelease(r, this.series.get(`${cls}\u0000${r.release}`)?.points ?? []))
      .sort((a, b) => a.release.localeCompare(b.release));
  }

  _bound() {
    if (this.series.size <= MAX_SERIES) return;
    const [stalest] = [...this.series.entries()].sort((a, b) => a[1].touched - b[1].touched)[0];
    this.series.delete(stalest);
  }

  // The classes that have telemetry, sorted.
  classes() {
    const names = new Set([...this.aggregates.keys()]);
    for (const s of this.series.values()) names.add(s.cls);
    return [...names].sort();
  }

  // Per release of `cls`: {release, points (oldest first), latest (the last minute):
  // {rate, errorRate, p50, p95, p99, confidence, labels}, drift, breach}.
  view(cls, now) {
    if (this.aggregates.has(cls)) return this._fromAggregate(cls);
    const views = [];
    for (const s of this.series.values()) {
      if (s.cls !== cls) continue;
      const starts = [...s.buckets.keys()].sort((a, b) => a - b);
      // The bucket still filling is left out of the lines: it would read as a drop.
      const done = starts.filter((t) => t + BUCKET_S <= now);
      const lastMinute = done.filter((t) => t > now - 60 - BUCKET_S).map((t) => s.buckets.get(t));
      const minute = merged(lastMinute);
      views.push({
        release: s.release,
        points: done.map((t) => point(t + BUCKET_S, s.buckets.get(t), BUCKET_S)),
        latest: { ...point(now, minute, Math.max(lastMinute.length, 1) * BUCKET_S), confidence: minute.confidence, labels: topLabels(minute.labels) },
        drift: null,
        breach: null,
      });
    }
    return views.sort((a, b) => a.release.localeCompare(b.release));
  }
}

function topLabels(labels, n = 8) {
  return [...labels.entries()].sort((a, b) => b[1] - a[1]).slice(0, n);
}

// A release of the aggregate: its last minute, drift and health as published.
function fromRelease(r, points) {
  const m = r.minute;
  return {
    release: String(r.release),
    points,
    latest: {
      count: m.inferences, rate: m.rate_per_s, errorRate: m.error_rate, p50: m.p50_ms, p95: m.p95_ms, p99: m.p99_ms,
      confidence: Array.isArray(m.confidence) ? m.confidence : new Array(CONFIDENCE_BINS).fill(0),
      labels: topLabels(new Map(Object.entries(m.labels ?? {}))),
    },
    drift: r.drift ?? null,
    breach: r.health ?? null,
  };
}
