// The devices, searchable by id and filtered by class, release, mode, health and link;
// one page of PAGE rows drawn at a time, so 10,000 devices cost what 50 do to draw.

import { ago, el, replace } from "./dom.js";
import { verdictOf } from "./fleet.js";

const PAGE = 50;

export class DeviceTable {
  constructor(container, onChange) {
    this.filter = { text: "", cls: "", release: "", mode: "", health: "", link: "" };
    this.offset = 0;
    this._onChange = onChange;
    this._selects = {};
    const search = el("input", { type: "search", placeholder: "device id contains…", "aria-label": "search devices", oninput: (e) => this._set("text", e.target.value.trim().toLowerCase()) });
    const controls = [search];
    for (const [key, label] of [["cls", "class"], ["release", "release"], ["mode", "mode"], ["health", "health"], ["link", "link"]]) {
      const select = el("select", { "aria-label": label, dataset: { filter: key }, onchange: (e) => this._set(key, e.target.value) });
      this._selects[key] = { select, label, options: null };
      controls.push(select);
    }
    this._options("health", ["healthy", "unhealthy", "none"]);
    this._options("link", ["online", "offline"]);
    this._count = el("span", { class: "muted count" });
    this._prev = el("button", { type: "button", onclick: () => this._page(-1) }, "‹ previous");
    this._next = el("button", { type: "button", onclick: () => this._page(1) }, "next ›");
    this._body = el("tbody");
    const head = ["device", "class", "release", "mode", "health", "last seen", "link"];
    replace(
      container,
      el("div", { class: "filters" }, controls),
      el("table", { class: "devices" }, el("thead", {}, el("tr", {}, head.map((h) => el("th", {}, h)))), this._body),
      el("div", { class: "pager" }, this._prev, this._count, this._next),
    );
  }

  _set(key, value) {
    this.filter[key] = value;
    this.offset = 0;
    this._onChange();
  }

  _page(step) {
    this.offset = Math.max(0, this.offset + step * PAGE);
    this._onChange();
  }

  // Refill a select's options only when the values offered changed (keeps its focus).
  _options(key, values) {
    const entry = this._selects[key];
    const signature = values.join("\u0000");
    if (signature === entry.options) return;
    entry.options = signature;
    const current = this.filter[key];
    replace(entry.select, el("option", { value: "" }, `any ${entry.label}`), values.map((v) => el("option", { value: v, selected: v === current }, v)));
  }

  render(fleet, facets, now) {
    this._options("cls", [...facets.cls].sort());
    this._options("release", [...facets.release].sort());
    this._options("mode", [...facets.mode].sort());
    let { rows, total } = fleet.query(this.filter, this.offset, PAGE);
    if (rows.length === 0 && this.offset > 0 && total > 0) {
      this.offset = Math.floor((total - 1) / PAGE) * PAGE;
      ({ rows, total } = fleet.query(this.filter, this.offset, PAGE));
    }
    replace(this._body, rows.length ? rows.map((r) => row(r, now)) : el("tr", {}, el("td", { colspan: 7, class: "muted" }, "no device matches")));
    const last = Math.min(this.offset + PAGE, total);
    this._count.textContent = total ? `${this.offset + 1}–${last} of ${total} (${fleet.devices.size} in all)` : `0 of ${fleet.devices.size}`;
    this._prev.disabled = this.offset === 0;
    this._next.disabled = last >= total;
  }
}

function row(r, now) {
  const verdict = verdictOf(r);
  return el(
    "tr",
    { dataset: { device: r.id } },
    el("td", { class: "mono" }, r.id),
    el("td", {}, r.cls ?? "–"),
    el("td", { class: "mono" }, r.release ?? "–", r.target && r.target !== r.release ? el("div", { class: "muted" }, `→ ${r.target}`) : null),
    el("td", {}, el("span", { class: `badge mode-${r.mode}` }, r.mode ?? "–"), r.degraded ? el("div", { class: "muted" }, r.degraded) : null),
    el("td", { title: r.reasons.join("; ") }, verdict ? el("span", { class: `badge ${verdict}` }, verdict) : "–", verdict === "unhealthy" && r.reasons.length ? el("div", { class: "muted" }, r.reasons[0]) : null),
    el("td", {}, r.lastSeen === null ? "–" : ago(now - r.lastSeen)),
    el("td", {}, el("span", { class: r.online ? "badge online" : "badge offline" }, r.online ? "online" : "offline")),
  );
}
