// Rollouts, wave by wave and class by class, with their reasons: the live ones first,
// then the most recent that ended. A card per rollout: its phase and reason, a row per
// class (its lane: waves passed, the wave it is in, counts, what it waits for, why), and
// the decisions the page saw arrive.

import { ago, clock, el, percent, replace, waveName } from "./dom.js";

const SHOWN_FINAL = 12; // ended rollouts shown under the live ones
const PHASE_TEXT = { wave: "in progress", paused: "paused", completed: "completed", rolled_back: "rolled back", rejected: "rejected", passed: "passed" };

export function renderRollouts(container, fleet, now) {
  const entries = [...fleet.rollouts.values()].filter((e) => e.status);
  const live = entries.filter((e) => !isFinal(e.status.phase)).sort(byUpdate);
  const ended = entries.filter((e) => isFinal(e.status.phase)).sort(byUpdate);
  const shown = [...live, ...ended.slice(0, SHOWN_FINAL)];
  const more = ended.length > SHOWN_FINAL ? el("p", { class: "muted" }, `${ended.length - SHOWN_FINAL} older rollouts not shown`) : null;
  replace(
    container,
    shown.length ? shown.map((e) => card(e, now)) : el("p", { class: "muted" }, "No rollout status retained on the broker yet."),
    more,
  );
}

function isFinal(phase) {
  return phase === "completed" || phase === "rolled_back" || phase === "rejected";
}

function byUpdate(a, b) {
  return b.status.updated_at - a.status.updated_at;
}

function card(entry, now) {
  const s = entry.status;
  const waves = s.waves?.length ? s.waves : (s.waves_percent ?? []).map((p) => ({ percent: p }));
  const total = Math.max(waves.length, 1);
  const where = isFinal(s.phase) ? "" : ` · wave ${Math.min(s.wave + 1, total)} of ${total}`;
  return el(
    "article",
    { class: `card rollout phase-${s.phase}`, dataset: { rollout: s.id, phase: s.phase, wave: s.wave } },
    el(
      "header",
      {},
      el("h3", {}, s.id),
      el("span", { class: `badge phase-${s.phase}` }, PHASE_TEXT[s.phase] ?? s.phase),
      el("span", { class: "muted" }, `${where} · generation ${s.generation} · updated ${ago(now - s.updated_at)}`),
    ),
    s.reason ? el("p", { class: "reason" }, el("span", { class: "reason-text" }, s.reason), s.cause ? el("span", { class: "cause" }, s.cause) : null) : null,
    lanesTable(s, waves),
    timeline(entry, waves),
  );
}

function lanesTable(s, waves) {
  const lanes = Object.entries(s.lanes ?? {}).sort(([a], [b]) => a.localeCompare(b));
  if (lanes.length === 0) return null;
  const head = ["class", "phase", "waves", "reach", "healthy / targeted", "unhealthy", "silent", "pending", "release", "why"];
  return el(
    "table",
    { class: "lanes" },
    el("thead", {}, el("tr", {}, head.map((h) => el("th", {}, h)))),
    el(
      "tbody",
      {},
      lanes.map(([cls, lane]) =>
        el(
          "tr",
          { dataset: { class: cls, phase: lane.phase, wave: lane.wave } },
          el("td", {}, cls),
          el("td", {}, el("span", { class: `badge phase-${lane.phase}` }, PHASE_TEXT[lane.phase] ?? lane.phase)),
          el("td", {}, waveSteps(lane, waves)),
          el("td", {}, percent(lane.cutoff_bp / 10000, 0)),
          el("td", { class: "num" }, `${lane.counts.healthy} / ${lane.counts.targeted}`, agreement(lane.counts)),
          el("td", { class: lane.counts.unhealthy ? "num bad" : "num" }, lane.counts.unhealthy),
          el("td", { class: lane.counts.silent ? "num bad" : "num" }, lane.counts.silent, lane.silent?.length ? el("div", { class: "ids" }, lane.silent.slice(0, 5).join(", ")) : null),
          el("td", { class: "num" }, lane.counts.pending),
          el("td", { class: "mono" }, s.releases?.[cls] ?? "–"),
          el("td", { class: "why" }, lane.waiting ? el("div", { class: "waiting" }, lane.waiting) : null, lane.reason ?? ""),
        ),
      ),
    ),
  );
}

// A shadow soak's agreement with the stable model, where devices reported one.
function agreement(counts) {
  const n = counts.shadow_inferences ?? 0;
  if (!n) return null;
  return el("div", { class: "ids" }, `shadow agreement ${percent((counts.agreed ?? 0) / n, 1)} of ${n}`);
}

// One step per wave: passed, the current one, the one it failed in, or still to come.
function waveSteps(lane, waves) {
  return el(
    "ol",
    { class: "waves" },
    waves.map((wave, i) => {
      let state = "todo";
      if (i < lane.wave || lane.phase === "completed" || lane.phase === "passed") state = "done";
      else if (i === lane.wave) state = lane.phase === "rolled_back" ? "failed" : "current";
      return el("li", { class: state, title: `wave ${i + 1}: ${waveName(wave)}`, dataset: { wave: i } }, waveName(wave));
    }),
  );
}

function timeline(entry, waves) {
  if (entry.timeline.length === 0) return null;
  const said = (e) => {
    if (e.phase === "wave" || e.phase === "paused") return `${PHASE_TEXT[e.phase]}: wave ${e.wave + 1} (${waveName(waves[e.wave])})`;
    return PHASE_TEXT[e.phase] ?? e.phase;
  };
  return el(
    "details",
    { class: "timeline", open: true },
    el("summary", {}, `What the page saw (${entry.timeline.length})`),
    el(
      "ol",
      {},
      [...entry.timeline].reverse().map((e) =>
        el(
          "li",
          { dataset: { class: e.cls ?? "", phase: e.phase, wave: e.wave } },
          el("time", {}, clock(e.at)),
          el("strong", {}, e.cls ?? "rollout"),
          ` ${said(e)}`,
          e.reason ? el("span", { class: "muted" }, ` — ${e.reason}`) : null,
        ),
      ),
    ),
  );
}
