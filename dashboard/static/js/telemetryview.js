// Telemetry per class and release: inference rate, p95 latency (against the class's
// budget), error rate over the last minutes, and for each release its last minute:
// quantiles, the confidence histogram, the labels it predicts most, drift and breaches.

import { COLORS, bars, lineChart } from "./charts.js";
import { el, number, percent, replace } from "./dom.js";

export function renderTelemetry(container, book, fleet, now) {
  const classes = book.classes();
  if (classes.length === 0) {
    replace(container, el("p", { class: "muted" }, "No telemetry yet: devices send a summary every window (10 s by default)."));
    return;
  }
  replace(container, classes.map((cls) => card(cls, book.view(cls, now), fleet.classes.get(cls)?.manifest, book.aggregates.has(cls))));
}

function card(cls, views, manifest, aggregated) {
  const color = new Map(views.map((v, i) => [v.release, COLORS[i % COLORS.length]]));
  const lines = (pick) => views.map((v) => ({ name: v.release, color: color.get(v.release), points: v.points.map((p) => ({ t: p.t, y: pick(p) })) }));
  const budget = manifest?.stable?.health?.p95_latency_ms;
  return el(
    "article",
    { class: "card telemetry", dataset: { class: cls } },
    el("header", {}, el("h3", {}, cls), el("span", { class: "muted" }, aggregated ? "from the coordinator's aggregate" : "merged here from the devices' summaries")),
    el(
      "div",
      { class: "charts" },
      lineChart({ title: "inferences / s", series: lines((p) => p.rate) }),
      lineChart({ title: "p95 latency (ms); dashed: stable budget", series: lines((p) => p.p95), limit: budget }),
      lineChart({ title: "error rate", series: lines((p) => p.errorRate), format: (v) => percent(v, 0) }),
    ),
    el(
      "table",
      { class: "per-release" },
      el("thead", {}, el("tr", {}, ["release (last minute)", "inferences / s", "errors", "p50", "p95", "p99", "confidence", "top labels", "drift", "health"].map((h) => el("th", {}, h)))),
      el("tbody", {}, views.map((v) => releaseRow(v, color.get(v.release)))),
    ),
  );
}

function releaseRow(v, color) {
  const l = v.latest;
  const ms = (x) => (Number.isFinite(x) ? `${number(x, 2)} ms` : "–");
  return el(
    "tr",
    { dataset: { release: v.release } },
    el("td", { class: "mono" }, swatch(color), v.release),
    el("td", { class: "num" }, number(l.rate)),
    el("td", { class: "num" }, percent(l.errorRate)),
    el("td", { class: "num" }, ms(l.p50)),
    el("td", { class: "num" }, ms(l.p95)),
    el("td", { class: "num" }, ms(l.p99)),
    el("td", {}, bars({ title: "", values: l.confidence, labels: ["0", "", "", "", "", ".5", "", "", "", "1"], width: 120, height: 40, color })),
    el("td", { class: "labels" }, labelShares(l.labels, l.count)),
    el("td", {}, drift(v.drift)),
    el("td", {}, health(v.breach)),
  );
}

function swatch(color) {
  const span = el("span", { class: "swatch" });
  span.style.background = color; // through the CSSOM: the page's CSP refuses inline styles
  return span;
}

// The labels a release predicts most, each with its share of the last minute.
function labelShares(labels, count) {
  const total = count || labels.reduce((sum, [, n]) => sum + n, 0);
  return labels.map(([label, n]) => el("span", { class: "label", title: `${n} predictions` }, `${label}: ${percent(n / total, 0)}`));
}

// Drift from the release's reference distribution (schemas.classtelemetry.DriftStatus).
function drift(d) {
  if (!d) return "–";
  if (d.confidence_psi === null && d.labels_psi === null) return el("span", { class: "muted" }, d.reference ? "not judged yet" : "gathering reference");
  const text = `PSI ${number(d.confidence_psi, 2)} conf, ${number(d.labels_psi, 2)} labels (alert > ${d.psi_threshold})`;
  return el("span", { class: d.alert ? "badge bad" : "badge", dataset: { drift: d.alert ? "alert" : "ok" } }, d.alert ? `drift: ${text}` : text);
}

// Health after the soak: the release against its budget (schemas.classtelemetry.HealthStatus).
function health(h) {
  if (!h) return "–";
  if (!h.breach) return el("span", { class: "badge healthy" }, h.window_s === null ? "not judged yet" : "within budget");
  return el("span", { class: "badge bad", dataset: { breach: "breach" }, title: (h.reasons ?? []).join("; ") }, `breach: ${(h.reasons ?? []).join("; ")}`);
}
