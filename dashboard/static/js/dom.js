// Small DOM and formatting helpers. Every text from the wire goes into the page through
// textContent (el's string children), never as HTML: device ids, reasons and labels are
// written by devices and operators, and a page must not run what they send.

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    if (Array.isArray(child)) append(node, child);
    else node.append(child instanceof Node ? child : String(child));
  }
}

export function replace(container, ...children) {
  container.replaceChildren();
  append(container, children);
}

export function ago(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
  const s = Math.max(0, seconds);
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 172800) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

export function clock(epochSeconds) {
  if (!Number.isFinite(epochSeconds)) return "–";
  return new Date(epochSeconds * 1000).toLocaleTimeString([], { hour12: false });
}

export function stamp(epochSeconds) {
  if (!Number.isFinite(epochSeconds)) return "–";
  const d = new Date(epochSeconds * 1000);
  return `${d.toLocaleDateString()} ${d.toLocaleTimeString([], { hour12: false })}`;
}

export function percent(fraction, digits = 1) {
  return Number.isFinite(fraction) ? `${(fraction * 100).toFixed(digits)}%` : "–";
}

export function number(value, digits = 1) {
  if (!Number.isFinite(value)) return "–";
  return Math.abs(value) >= 100 ? String(Math.round(value)) : value.toFixed(digits);
}

export function bytes(n) {
  if (!Number.isFinite(n)) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

// A release as the protocol names it: name, variant and the start of its digest.
export function releaseId(release) {
  if (!release) return null;
  const variant = release.variant ? `:${release.variant}` : "";
  return `${release.name}${variant}@${String(release.artifact?.sha256 ?? "").slice(0, 12)}`;
}

// A wave as the CLI says it: "25%" or "5 devices".
export function waveName(wave) {
  if (!wave) return "?";
  return wave.percent !== null && wave.percent !== undefined
    ? `${wave.percent}%`
    : `${wave.count} devices`;
}
