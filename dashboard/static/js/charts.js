// Charts drawn as SVG: a line chart of time series and small bar charts. Each chart is
// rebuilt from the series it is given; the telemetry view redraws at most every few seconds.

import { number } from "./dom.js";

const SVG = "http://www.w3.org/2000/svg";
export const COLORS = ["#2b7bb9", "#e07b24", "#3a9d5d", "#b8415a", "#7a5cb8", "#8c6d3a", "#d45fa8", "#5f7a8c"];

function svg(tag, attrs = {}, text = null) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (text !== null) node.textContent = text;
  return node;
}

// Lines of `series` [{name, color, points: [{t, y}]}] over time; `limit` a dashed line
// (a budget), if given.
export function lineChart({ title, series, limit = null, width = 420, height = 150, format = number }) {
  const pad = { left: 44, right: 8, top: 18, bottom: 18 };
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img", "aria-label": title });
  root.append(svg("text", { x: pad.left, y: 12, class: "chart-title" }, title));
  const points = series.flatMap((s) => s.points.filter((p) => Number.isFinite(p.y)));
  if (points.length === 0) {
    root.append(svg("text", { x: width / 2, y: height / 2, class: "chart-empty", "text-anchor": "middle" }, "no data yet"));
    return root;
  }
  const t0 = Math.min(...points.map((p) => p.t));
  const t1 = Math.max(...points.map((p) => p.t), t0 + 1);
  const top = Math.max(...points.map((p) => p.y), Number.isFinite(limit) ? limit : 0) * 1.1 || 1;
  const x = (t) => pad.left + ((t - t0) / (t1 - t0)) * (width - pad.left - pad.right);
  const y = (v) => height - pad.bottom - (v / top) * (height - pad.top - pad.bottom);
  for (const v of [0, top / 2, top]) {
    root.append(svg("line", { x1: pad.left, x2: width - pad.right, y1: y(v), y2: y(v), class: "grid" }));
    root.append(svg("text", { x: pad.left - 4, y: y(v) + 3, class: "axis", "text-anchor": "end" }, format(v)));
  }
  const minutes = Math.round((t1 - t0) / 60);
  root.append(svg("text", { x: width - pad.right, y: height - 4, class: "axis", "text-anchor": "end" }, minutes ? `last ${minutes} min` : "now"));
  if (Number.isFinite(limit)) {
    root.append(svg("line", { x1: pad.left, x2: width - pad.right, y1: y(limit), y2: y(limit), class: "limit" }));
  }
  for (const s of series) {
    const ps = s.points.filter((p) => Number.isFinite(p.y));
    if (ps.length === 1) root.append(svg("circle", { cx: x(ps[0].t), cy: y(ps[0].y), r: 2.5, fill: s.color }));
    if (ps.length > 1) {
      const d = ps.map((p, i) => `${i ? "L" : "M"}${x(p.t).toFixed(1)},${y(p.y).toFixed(1)}`).join("");
      root.append(svg("path", { d, stroke: s.color, class: "line" }));
    }
  }
  return root;
}

// Vertical bars of `values`, `labels` under them (a histogram).
export function bars({ title, values, labels, width = 200, height = 70, color = COLORS[0] }) {
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart bars", role: "img", "aria-label": title });
  root.append(svg("text", { x: 0, y: 10, class: "chart-title" }, title));
  const top = Math.max(...values, 1);
  const w = width / values.length;
  values.forEach((v, i) => {
    const h = (v / top) * (height - 26);
    root.append(svg("rect", { x: i * w + 1, y: height - 12 - h, width: w - 2, height: Math.max(h, 0.5), fill: color }));
    if (labels[i]) root.append(svg("text", { x: i * w + w / 2, y: height - 2, class: "axis", "text-anchor": "middle" }, labels[i]));
  });
  return root;
}
