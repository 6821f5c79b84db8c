// Inline SVG charts: lines over time (or steps) and stacked bars. No library, no remote anything.
const NS = "http://www.w3.org/2000/svg";
const W = 480;
const H = 180;
const PAD = { left: 46, right: 10, top: 10, bottom: 24 };

function svg(tag, attrs = {}, text) {
  const n = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, String(v));
  if (text !== undefined) n.textContent = text;
  return n;
}

function extent(values, zero) {
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  if (zero) lo = Math.min(lo, 0);
  if (hi === lo) hi = zero ? lo + (Math.abs(lo) || 1) : lo + 1;
  return [lo, hi];
}

function frame(title, yFormat, [ylo, yhi], xLabels) {
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": title });
  root.append(svg("title", {}, title));
  const grid = svg("g", { class: "grid" });
  for (let i = 0; i <= 4; i++) {
    const y = PAD.top + ((H - PAD.top - PAD.bottom) * i) / 4;
    grid.append(svg("line", { x1: PAD.left, x2: W - PAD.right, y1: y, y2: y }));
    grid.append(svg("text", { x: PAD.left - 4, y: y + 4, class: "tick", "text-anchor": "end" }, yFormat(yhi - ((yhi - ylo) * i) / 4)));
  }
  root.append(grid);
  const [first, last] = xLabels;
  root.append(svg("text", { x: PAD.left, y: H - 6, class: "tick" }, first));
  root.append(svg("text", { x: W - PAD.right, y: H - 6, class: "tick", "text-anchor": "end" }, last));
  return root;
}

function legend(series) {
  const box = document.createElement("div");
  box.className = "legend";
  for (const s of series) {
    const item = document.createElement("span");
    const swatch = document.createElement("i");
    swatch.className = `swatch ${s.cls}`;
    item.append(swatch, document.createTextNode(s.name));
    box.append(item);
  }
  return box;
}

/**
 * A line chart: series = [{name, cls, points: [[x, y], ...]}] (null y values break the line).
 * Returns a <figure> with the SVG, a legend and a caption; an empty state when there is no data.
 */
export function lineChart(title, series, { yFormat = (v) => v.toFixed(1), xFormat = String, zero = true } = {}) {
  const fig = document.createElement("figure");
  fig.className = "chart-box";
  const caption = document.createElement("figcaption");
  caption.textContent = title;
  fig.append(caption);
  const all = series.flatMap((s) => s.points.filter((p) => p[1] !== null && p[1] !== undefined && Number.isFinite(p[1])));
  if (all.length < 1) {
    const empty = document.createElement("p");
    empty.className = "muted chart-empty";
    empty.textContent = "no data yet";
    fig.append(empty);
    return fig;
  }
  const [xlo, xhi] = extent(series.flatMap((s) => s.points.map((p) => p[0])), false); // the whole span, gaps too
  const [ylo, yhi] = extent(all.map((p) => p[1]), zero);
  const root = frame(title, yFormat, [ylo, yhi], [xFormat(xlo), xFormat(xhi)]);
  const sx = (x) => PAD.left + ((x - xlo) / (xhi - xlo)) * (W - PAD.left - PAD.right);
  const sy = (y) => H - PAD.bottom - ((y - ylo) / (yhi - ylo)) * (H - PAD.top - PAD.bottom);
  for (const s of series) {
    let d = "";
    let pen = false;
    for (const [x, y] of s.points) {
      if (y === null || y === undefined || !Number.isFinite(y)) {
        pen = false;
        continue;
      }
      d += `${pen ? "L" : "M"}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`;
      pen = true;
    }
    if (d) root.append(svg("path", { d, class: `line ${s.cls}`, "data-series": s.name }));
    const lastPoint = s.points.filter((p) => p[1] !== null && Number.isFinite(p[1])).at(-1);
    if (lastPoint) root.append(svg("circle", { cx: sx(lastPoint[0]).toFixed(1), cy: sy(lastPoint[1]).toFixed(1), r: 2.5, class: `dot ${s.cls}` }));
  }
  const latest = series.map((s) => {
    const p = s.points.filter((q) => q[1] !== null && Number.isFinite(q[1])).at(-1);
    return p ? `${s.name} ${yFormat(p[1])}` : null;
  }).filter(Boolean).join(", ");
  root.setAttribute("aria-label", `${title}: latest ${latest}`);
  fig.append(root, legend(series));
  return fig;
}

/** Stacked bars: buckets = [{label, values: {seriesName: n}}], series = [{name, cls}]. */
export function barChart(title, buckets, series, { yFormat = (v) => v.toFixed(0) } = {}) {
  const fig = document.createElement("figure");
  fig.className = "chart-box";
  const caption = document.createElement("figcaption");
  caption.textContent = title;
  fig.append(caption);
  const totals = buckets.map((b) => series.reduce((sum, s) => sum + (b.values[s.name] || 0), 0));
  if (!totals.some((t) => t > 0)) {
    const empty = document.createElement("p");
    empty.className = "muted chart-empty";
    empty.textContent = "no data yet";
    fig.append(empty);
    return fig;
  }
  const yhi = 4 * Math.ceil(Math.max(...totals) / 4); // counts: four whole-number grid steps
  const root = frame(title, yFormat, [0, yhi], [buckets[0].label, buckets.at(-1).label]);
  const slot = (W - PAD.left - PAD.right) / buckets.length;
  const scale = (H - PAD.top - PAD.bottom) / yhi;
  buckets.forEach((b, i) => {
    let base = H - PAD.bottom;
    for (const s of series) {
      const v = b.values[s.name] || 0;
      if (!v) continue;
      const h = v * scale;
      base -= h;
      const rect = svg("rect", { x: (PAD.left + i * slot + slot * 0.15).toFixed(1), y: base.toFixed(1), width: (slot * 0.7).toFixed(1), height: h.toFixed(1), class: `bar ${s.cls}` });
      rect.append(svg("title", {}, `${b.label}: ${v} ${s.name}`));
      root.append(rect);
    }
  });
  fig.append(root, legend(series));
  return fig;
}
