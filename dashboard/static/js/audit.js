// The audit trail: every decision the coordinator logged, and why, newest first. The
// coordinator keeps it in its own data folder (audit.sqlite), not on the broker, so the
// dashboard's server reads it there (`edgefleet dashboard --data`) and the page fetches
// the newest entries from it every few seconds.

import { el, replace, stamp } from "./dom.js";

export class AuditTrail {
  constructor(container, available) {
    this.rollout = "";
    this._entries = [];
    this._note = available ? "loading…" : "The audit trail is read from the coordinator's data folder: start the dashboard with --data.";
    this._select = el("select", { "aria-label": "rollout", onchange: (e) => this.choose(e.target.value) });
    this._options = null;
    this._body = el("div");
    replace(container, el("div", { class: "filters" }, this._select), this._body);
    this.available = available;
  }

  async refresh() {
    if (!this.available) return;
    const query = this.rollout ? `?rollout=${encodeURIComponent(this.rollout)}` : "";
    try {
      const answer = await fetch(`audit.json${query}`, { cache: "no-store" });
      const document = await answer.json();
      if (!answer.ok) throw new Error(document.error ?? answer.statusText);
      this._entries = Array.isArray(document.entries) ? document.entries : [];
      this._note = this._entries.length ? null : (document.note ?? "no entries yet");
    } catch (error) {
      this._note = `audit trail unavailable: ${error.message}`;
    }
  }

  choose(rollout) {
    this.rollout = rollout;
    this.refresh().then(() => this.render());
  }

  render(rolloutIds = []) {
    const signature = rolloutIds.join("\u0000");
    if (signature !== this._options) {
      this._options = signature;
      replace(this._select, el("option", { value: "" }, "every rollout"), rolloutIds.map((id) => el("option", { value: id, selected: id === this.rollout }, id)));
    }
    if (this._note) {
      replace(this._body, el("p", { class: "muted" }, this._note));
      return;
    }
    replace(
      this._body,
      el(
        "table",
        { class: "audit" },
        el("thead", {}, el("tr", {}, ["at", "rollout", "decision", "why"].map((h) => el("th", {}, h)))),
        el(
          "tbody",
          {},
          [...this._entries].reverse().map((e) =>
            el(
              "tr",
              { dataset: { event: String(e.event ?? ""), rollout: String(e.rollout ?? "") } },
              el("td", { class: "nowrap" }, stamp(e.at)),
              el("td", { class: "mono" }, String(e.rollout ?? "")),
              el("td", {}, String(e.event ?? "?")),
              el("td", {}, String(e.detail ?? "")),
            ),
          ),
        ),
      ),
    );
  }
}
