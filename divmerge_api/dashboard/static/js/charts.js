// Inline SVG charts: the loss curve (training loss per step, held-out per epoch) and the coefficient heatmap (groups x tasks, a
// diverging colour scale centred on 0). Values show on hover and, for the heatmap, with the arrow keys.

const NS = "http://www.w3.org/2000/svg";

function s(tag, attrs = {}, text) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

/** A label that fits: the last segment of a path ("/models/sst2-expert" -> "sst2-expert"), then cut. */
function short(name, max) {
  const str = String(name);
  const last = str.includes("/") ? str.split("/").filter(Boolean).pop() || str : str;
  return last.length > max ? `${last.slice(0, max - 1)}…` : last;
}

const fmt = (v) => (Math.abs(v) >= 1000 || (Math.abs(v) < 0.001 && v !== 0) ? v.toExponential(2) : v.toPrecision(4));

/**
 * Draw losses[] (the training loss, one per step) into container and, when given, heldout[] (rows
 * [epoch, step, mean, per-task ...]: the objective on the held-out inputs, step 0 before the first step)
 * as a second curve with a dot per epoch and the lowest one marked; readout shows the step under the pointer.
 */
export function lossCurve(container, losses, readout, heldout = []) {
  const W = 640;
  const H = 260;
  const m = { l: 56, r: 12, t: 24, b: 36 };
  const n = losses.length;
  const held = (heldout || []).filter((r) => r && typeof r[2] === "number" && Number.isFinite(r[2]));
  const all = [...losses, ...held.map((r) => r[2])];
  let lo = Math.min(...all);
  let hi = Math.max(...all);
  if (hi === lo) {
    hi += Math.abs(hi) * 0.05 || 1;
    lo -= Math.abs(lo) * 0.05 || 1;
  }
  // x is the step: the training loss of step i + 1 at losses[i]; held-out rows at their own step (0 first)
  const first = held.length ? 0 : 1;
  const last = Math.max(n, ...held.map((r) => r[1]));
  const xs = (step) => m.l + (last === first ? 0.5 : (step - first) / (last - first)) * (W - m.l - m.r);
  const x = (i) => xs(i + 1);
  const y = (v) => m.t + (1 - (v - lo) / (hi - lo)) * (H - m.t - m.b);
  let best = -1;
  held.forEach((r, k) => {
    if (best < 0 || r[2] < held[best][2]) best = k;
  });
  let label = `Loss per step: ${n} step${n === 1 ? "" : "s"}, first ${fmt(losses[0])}, last ${fmt(losses[n - 1])}`;
  if (held.length) label += `; held-out ${fmt(held[0][2])} at step ${held[0][1]}, lowest ${fmt(held[best][2])} after epoch ${held[best][0]}`;
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": label, class: "loss" });
  svg.append(s("title", {}, label));
  const axes = s("g", { class: "axis" });
  for (let k = 0; k <= 4; k++) {
    const v = lo + ((hi - lo) * k) / 4;
    axes.append(s("line", { x1: m.l, x2: W - m.r, y1: y(v), y2: y(v), class: "grid" }));
    axes.append(s("text", { x: m.l - 6, y: y(v) + 4, "text-anchor": "end" }, fmt(v)));
  }
  const ticks = [...new Set([first, Math.round((first + last) / 2), last])];
  for (const t of ticks) axes.append(s("text", { x: xs(t), y: H - m.b + 18, "text-anchor": "middle" }, t));
  axes.append(s("text", { x: (m.l + W - m.r) / 2, y: H - 4, "text-anchor": "middle" }, "step"));
  svg.append(axes);
  svg.append(s("polyline", { points: losses.map((v, i) => `${x(i)},${y(v)}`).join(" "), class: "line train" }));
  if (held.length) {
    svg.append(s("polyline", { points: held.map((r) => `${xs(r[1])},${y(r[2])}`).join(" "), class: "line heldout" }));
    held.forEach((r, k) => {
      const attrs = { r: k === best ? 5 : 3, cx: xs(r[1]), cy: y(r[2]), class: k === best ? "heldout-dot best" : "heldout-dot", "data-epoch": r[0] };
      svg.append(s("circle", attrs));
    });
    const legend = s("g", { class: "legend-lines" });
    legend.append(s("line", { x1: m.l + 4, x2: m.l + 24, y1: 10, y2: 10, class: "line train" }));
    legend.append(s("text", { x: m.l + 28, y: 14 }, "train"));
    legend.append(s("line", { x1: m.l + 78, x2: m.l + 98, y1: 10, y2: 10, class: "line heldout" }));
    legend.append(s("text", { x: m.l + 102, y: 14 }, "held-out (per epoch; ringed: kept)"));
    svg.append(legend);
  }
  const dot = s("circle", { r: 4, class: "dot", cx: x(n - 1), cy: y(losses[n - 1]) });
  svg.append(dot);
  const heldAt = (step) => {
    let row = null;
    for (const r of held) if (r[1] <= step) row = r;
    return row;
  };
  const point = (i) => {
    dot.setAttribute("cx", x(i));
    dot.setAttribute("cy", y(losses[i]));
    const r = heldAt(i + 1);
    const extra = r ? ` · held-out ${fmt(r[2])} (epoch ${r[0]})` : "";
    if (readout) readout.textContent = `step ${i + 1}: loss ${fmt(losses[i])}${extra}`;
  };
  svg.addEventListener("pointermove", (ev) => {
    const box = svg.getBoundingClientRect();
    const px = ((ev.clientX - box.left) / box.width) * W;
    const step = first + ((px - m.l) / (W - m.l - m.r)) * (last - first);
    point(Math.max(0, Math.min(n - 1, Math.round(step) - 1)));
  });
  container.replaceChildren(svg);
  if (readout) {
    const tail = held.length ? `; lowest held-out ${fmt(held[best][2])} after epoch ${held[best][0]} (kept)` : "";
    readout.textContent = `${n} steps, last loss ${fmt(losses[n - 1])}${tail}`;
  }
}

/** Diverging scale: blue (negative) - near white (0) - red (positive), t in [-1, 1]. */
export function divergingColour(t) {
  const mix = (a, b, u) => a.map((c, i) => Math.round(c + (b[i] - c) * u));
  const mid = [247, 247, 247];
  const rgb = t < 0 ? mix(mid, [33, 102, 172], Math.min(1, -t)) : mix(mid, [178, 24, 43], Math.min(1, t));
  return `rgb(${rgb.join(",")})`;
}

/** Draw values[group][task] as a heatmap with a legend; hover or arrow keys show one cell's value. */
export function heatmap(container, { groups, tasks, values }, readout) {
  const maxAbs = Math.max(1e-12, ...values.flat().map((v) => Math.abs(v)));
  const W = 640;
  const labelW = Math.min(200, 8 + 7 * Math.max(...groups.map((g) => short(g, 28).length)));
  const top = 40;
  const cellW = (W - labelW - 8) / tasks.length;
  const cellH = Math.max(4, Math.min(28, 560 / groups.length));
  const legendH = 44;
  const H = top + cellH * groups.length + legendH;
  const label = `Coefficients of ${groups.length} groups by ${tasks.length} tasks, from ${fmt(Math.min(...values.flat()))} to ${fmt(Math.max(...values.flat()))}`;
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": label, tabindex: 0, class: "heatmap" });
  svg.append(s("title", {}, label));
  tasks.forEach((t, j) => {
    const name = short(t, Math.max(4, Math.floor(cellW / 7)));
    svg.append(s("text", { x: labelW + cellW * (j + 0.5), y: top - 10, "text-anchor": "middle", class: "tick" }, name));
  });
  const every = Math.ceil(12 / cellH); // label every k-th group when rows are thin
  const cells = [];
  groups.forEach((g, i) => {
    if (i % every === 0) {
      const name = short(g, 28);
      svg.append(s("text", { x: labelW - 6, y: top + cellH * (i + 0.5) + 4, "text-anchor": "end", class: "tick" }, name));
    }
    cells.push(
      tasks.map((t, j) => {
        const v = values[i][j];
        const rect = s("rect", {
          x: labelW + cellW * j,
          y: top + cellH * i,
          width: cellW,
          height: cellH,
          fill: divergingColour(v / maxAbs),
          "data-value": v,
        });
        rect.append(s("title", {}, `${g} × ${t}: ${v.toFixed(4)}`));
        svg.append(rect);
        return rect;
      }),
    );
  });
  const focus = s("rect", { class: "cell-focus", width: cellW, height: cellH, x: labelW, y: top, visibility: "hidden" });
  svg.append(focus);
  // legend: -max .. 0 .. +max
  const grad = s("linearGradient", { id: "coef-scale" });
  for (const k of [0, 0.25, 0.5, 0.75, 1]) grad.append(s("stop", { offset: k, "stop-color": divergingColour(2 * k - 1) }));
  const defs = s("defs");
  defs.append(grad);
  svg.append(defs);
  const ly = H - legendH + 12;
  const lx = labelW;
  const lw = Math.min(280, W - labelW - 8);
  svg.append(s("rect", { x: lx, y: ly, width: lw, height: 10, fill: "url(#coef-scale)", class: "legend" }));
  for (const [k, v] of [[0, -maxAbs], [0.5, 0], [1, maxAbs]]) {
    svg.append(s("text", { x: lx + lw * k, y: ly + 26, "text-anchor": "middle", class: "tick" }, fmt(v)));
  }
  let cur = [0, 0];
  const select = (i, j) => {
    cur = [i, j];
    focus.setAttribute("x", labelW + cellW * j);
    focus.setAttribute("y", top + cellH * i);
    focus.setAttribute("visibility", "visible");
    if (readout) readout.textContent = `${groups[i]} × ${tasks[j]}: ${values[i][j].toFixed(4)}`;
  };
  svg.addEventListener("pointerover", (ev) => {
    for (let i = 0; i < cells.length; i++) {
      const j = cells[i].indexOf(ev.target);
      if (j >= 0) return select(i, j);
    }
  });
  svg.addEventListener("focus", () => select(...cur));
  svg.addEventListener("keydown", (ev) => {
    const moves = { ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1] };
    const d = moves[ev.key];
    if (!d) return;
    ev.preventDefault();
    select(Math.max(0, Math.min(groups.length - 1, cur[0] + d[0])), Math.max(0, Math.min(tasks.length - 1, cur[1] + d[1])));
  });
  container.replaceChildren(svg);
  if (readout) readout.textContent = "Hover a cell, or focus the chart and use the arrow keys, to read its value.";
}
