// Hardware classes as their manifests say (the release each runs, the variant, the
// candidate of a live rollout and how far it reaches) and as their devices report
// (how many, online, by release and mode, healthy).

import { bytes, el, percent, releaseId, replace, stamp } from "./dom.js";

export function renderClasses(container, fleet, { perClass }, now) {
  const names = [...new Set([...fleet.classes.keys(), ...perClass.keys()])].sort();
  replace(
    container,
    names.length ? names.map((name) => card(name, fleet.classes.get(name)?.manifest, perClass.get(name), now)) : el("p", { class: "muted" }, "No class manifest or device seen yet."),
  );
}

function card(name, manifest, counts, now) {
  return el(
    "article",
    { class: "card class", dataset: { class: name } },
    el(
      "header",
      {},
      el("h3", {}, name),
      manifest ? el("span", { class: "muted" }, `manifest seq ${manifest.seq} · issued ${stamp(manifest.issued_at)}`) : el("span", { class: "muted" }, "no manifest"),
      manifest && manifest.expires_at < now ? el("span", { class: "badge bad" }, "expired") : null,
    ),
    manifest ? releases(manifest) : null,
    counts ? deviceCounts(counts) : el("p", { class: "muted" }, "no device reports yet"),
  );
}

function releases(manifest) {
  const rows = [];
  if (manifest.stable) rows.push(["stable", manifest.stable, null]);
  if (manifest.rollout) rows.push([`candidate of ${manifest.rollout.id}`, manifest.rollout.candidate, manifest.rollout]);
  if (rows.length === 0) return el("p", { class: "muted" }, "no release yet");
  return el(
    "table",
    { class: "releases" },
    el("thead", {}, el("tr", {}, ["", "release", "variant", "size", "providers", "budget (p95, errors, soak)", "reach"].map((h) => el("th", {}, h)))),
    el(
      "tbody",
      {},
      rows.map(([role, r, cohort]) =>
        el(
          "tr",
          { dataset: { role: cohort ? "candidate" : "stable" } },
          el("td", {}, role),
          el("td", { class: "mono" }, releaseId(r)),
          el("td", {}, r.variant ?? "–"),
          el("td", { class: "num" }, bytes(r.artifact?.size)),
          el("td", {}, (r.runtime?.providers ?? []).join(", ")),
          el("td", {}, r.health ? `${r.health.p95_latency_ms} ms, ${percent(r.health.max_error_rate)}, ${r.health.soak_seconds} s` : "–"),
          el("td", {}, cohort ? `${percent(cohort.cutoff_bp / 10000, 0)}${cohort.canaries?.length ? ` + ${cohort.canaries.length} canaries` : ""}` : "the rest"),
        ),
      ),
    ),
  );
}

function deviceCounts(c) {
  const list = (map) => [...map.entries()].sort((a, b) => b[1] - a[1]).map(([k, n]) => el("li", {}, el("span", { class: "mono" }, k), ` × ${n}`));
  return el(
    "div",
    { class: "counts" },
    el("p", {}, `${c.devices} devices, ${c.online} online · ${c.healthy} healthy, ${c.unhealthy} unhealthy on the release they run`),
    el("div", { class: "columns" }, el("div", {}, el("h4", {}, "running"), el("ul", {}, list(c.releases))), el("div", {}, el("h4", {}, "mode"), el("ul", {}, list(c.modes)))),
  );
}
