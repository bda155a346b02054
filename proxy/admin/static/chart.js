// The activity chart: events per hour or day as stacked bars, drawn as SVG by hand (no
// library: this is all a bar chart needs). Each bar is a button: it narrows the time range
// to its hour or day.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const SERIES = {
  action: [["C", "create"], ["R", "read"], ["U", "update"], ["D", "delete"], ["E", "execute"], ["?", "none"]],
  outcome: [["0", "success"], ["4", "minor failure"], ["8", "serious failure"], ["12", "major failure"], ["?", "none"]],
};

function svg(name, attrs = {}) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

// Draw `data` (from /api/activity) into `box`, split by "action" or "outcome"; `narrow`
// is called with a bucket when its bar is chosen.
function drawChart(box, data, split, narrow) {
  box.replaceChildren();
  const buckets = data.buckets || [];
  const series = SERIES[split];
  // Drawn at the size it is shown, so that text keeps its size and the bars fill the width.
  const width = Math.max(320, Math.round(box.clientWidth || 1000));
  const height = 110;
  const left = 44;
  const bottom = 20;
  const top = 8;
  const max = Math.max(1, ...buckets.map((b) => b.events));
  const plot = svg("svg", {
    viewBox: `0 0 ${width} ${height + bottom + top}`, class: "chart", role: "group",
    "aria-label": `events per ${data.bucket}, by ${split}`,
  });
  const scale = (n) => (n / max) * height;
  plot.appendChild(svg("line", { x1: left, x2: width, y1: top + height, y2: top + height, class: "axis" }));
  for (const [value, label] of [[max, String(max)], [0, "0"]]) {
    const text = svg("text", { x: left - 6, y: top + height - scale(value) + 4, class: "tick", "text-anchor": "end" });
    text.textContent = label;
    plot.appendChild(text);
  }
  const slot = (width - left) / Math.max(buckets.length, 1);
  const bar = Math.max(1, Math.min(40, slot * 0.8));
  buckets.forEach((bucket, i) => {
    const x = left + i * slot + (slot - bar) / 2;
    const counts = split === "action" ? bucket.byAction : bucket.byOutcome;
    const label = (data.bucket === "day" ? showDay(bucket.start) : showTime(bucket.start, false)) +
      `: ${bucket.events} events (` + series.filter(([k]) => counts[k]).map(([k, name]) => `${name} ${counts[k]}`).join(", ") +
      `). Show only this ${data.bucket}.`;
    const group = svg("g", { class: "bar", tabindex: "0", role: "button", "aria-label": label });
    const title = svg("title");
    title.textContent = label;
    group.appendChild(title);
    let y = top + height;
    for (const [key] of series) {
      const n = counts[key] || 0;
      if (!n) continue;
      const h = Math.max(scale(n), 1);
      y -= h;
      group.appendChild(svg("rect", { x, y, width: bar, height: h, class: `s-${split}-${key === "?" ? "none" : key}` }));
    }
    // The whole column answers a click, not only the coloured part.
    group.insertBefore(svg("rect", { x: left + i * slot, y: top, width: slot, height, class: "hit" }), group.children[1]);
    group.addEventListener("click", () => narrow(bucket));
    group.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); narrow(bucket); }
    });
    plot.appendChild(group);
  });
  const marks = buckets.length > 1 ? [0, Math.floor((buckets.length - 1) / 2), buckets.length - 1] : [0];
  for (const i of new Set(marks)) {
    if (!buckets[i]) continue;
    const text = svg("text", {
      x: left + i * slot + slot / 2, y: top + height + 15, class: "tick",
      "text-anchor": i === 0 && buckets.length > 1 ? "start" : i === buckets.length - 1 && buckets.length > 1 ? "end" : "middle",
    });
    text.textContent = data.bucket === "day" ? showDay(buckets[i].start) : showTime(buckets[i].start, false);
    plot.appendChild(text);
  }
  box.appendChild(plot);
  const legend = document.createElement("ul");
  legend.className = "legend";
  for (const [key, name] of series) {
    if (!buckets.some((b) => (split === "action" ? b.byAction : b.byOutcome)[key])) continue;
    const item = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = `swatch s-${split}-${key === "?" ? "none" : key}`;
    item.append(swatch, ` ${key === "?" ? "" : key + " "}${name}`);
    legend.appendChild(item);
  }
  box.appendChild(legend);
}
