// A small canvas time-series chart for one account's margin over the day (with its collateral as a
// reference line): nice axis ticks, min/max decimation per pixel column, last-value tag, hover read-out.

import { compact, clock, clockShort, money } from "./format.js";

const TIME_STEPS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600].map((s) => s * 1000);

function niceStep(span, target) {
  const raw = span / Math.max(1, target);
  const mag = 10 ** Math.floor(Math.log10(raw));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * mag >= raw) return m * mag;
  return 10 * mag;
}

function css(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

export class LineChart {
  constructor(canvas) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d");
    this.series = { t: [], margin: [], collateral: [] };
    this.hover = null;
    this.pending = false;
    this.colors = {
      grid: css("--chart-grid") || "#232a33",
      axis: css("--muted") || "#8792a2",
      line: css("--accent") || "#4da3ff",
      collateral: css("--collateral") || "#a78bfa",
      text: css("--text") || "#d7dde5",
      panel: css("--panel") || "#151a21",
    };
    new ResizeObserver(() => this.request()).observe(canvas);
    canvas.addEventListener("mousemove", (e) => {
      const r = canvas.getBoundingClientRect();
      this.hover = { x: e.clientX - r.left, y: e.clientY - r.top };
      this.request();
    });
    canvas.addEventListener("mouseleave", () => {
      this.hover = null;
      this.request();
    });
  }

  /** Series as parallel arrays: t (ms since the epoch, ascending), margin, collateral. */
  setData(series) {
    this.series = series;
    this.request();
  }

  request() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.draw();
    });
  }

  draw() {
    const { canvas, ctx, colors } = this;
    const dpr = window.devicePixelRatio || 1;
    const W = canvas.clientWidth;
    const H = canvas.clientHeight;
    if (!W || !H) return;
    if (canvas.width !== Math.round(W * dpr) || canvas.height !== Math.round(H * dpr)) {
      canvas.width = Math.round(W * dpr);
      canvas.height = Math.round(H * dpr);
    }
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, W, H);
    ctx.font = "11px " + (css("--font-num") || "sans-serif");

    const { t, margin, collateral } = this.series;
    const n = t.length;
    const pad = { l: 8, r: 74, t: 12, b: 22 };
    const pw = W - pad.l - pad.r;
    const ph = H - pad.t - pad.b;
    if (n === 0) {
      ctx.fillStyle = colors.axis;
      ctx.textAlign = "center";
      ctx.fillText("waiting for margin rows…", W / 2, H / 2);
      return;
    }

    // ranges
    let t0 = t[0];
    let t1 = t[n - 1];
    if (t1 - t0 < 10_000) t0 = t1 - 10_000; // at least 10 s wide
    let lo = Infinity;
    let hi = -Infinity;
    for (let i = 0; i < n; i++) {
      const m = margin[i];
      if (m < lo) lo = m;
      if (m > hi) hi = m;
    }
    const coll = collateral[n - 1];
    const showColl = Number.isFinite(coll) && coll > 0 && hi >= 0.9 * coll; // else a label, not a squashed line
    if (showColl) {
      hi = Math.max(hi, coll);
      lo = Math.min(lo, coll);
    }
    if (hi - lo < Math.max(1, Math.abs(hi) * 0.002)) {
      const mid = (hi + lo) / 2;
      const half = Math.max(1, Math.abs(mid) * 0.001);
      lo = mid - half;
      hi = mid + half;
    }
    const padY = (hi - lo) * 0.08;
    lo -= padY;
    hi += padY;
    const X = (v) => pad.l + ((v - t0) / (t1 - t0)) * pw;
    const Y = (v) => pad.t + (1 - (v - lo) / (hi - lo)) * ph;

    // grid + y labels
    const ystep = niceStep(hi - lo, Math.max(2, Math.floor(ph / 42)));
    ctx.strokeStyle = colors.grid;
    ctx.lineWidth = 1;
    ctx.fillStyle = colors.axis;
    ctx.textAlign = "left";
    ctx.textBaseline = "middle";
    for (let v = Math.ceil(lo / ystep) * ystep; v <= hi; v += ystep) {
      const y = Math.round(Y(v)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(pad.l, y);
      ctx.lineTo(pad.l + pw, y);
      ctx.stroke();
      ctx.fillText(compact(v, ystep), pad.l + pw + 8, y);
    }
    // x labels
    const span = t1 - t0;
    const xstep = TIME_STEPS.find((s) => span / s <= Math.max(2, pw / 90)) || TIME_STEPS[TIME_STEPS.length - 1];
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (let v = Math.ceil(t0 / xstep) * xstep; v <= t1; v += xstep) {
      const x = Math.round(X(v)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(x, pad.t);
      ctx.lineTo(x, pad.t + ph);
      ctx.stroke();
      ctx.fillText(xstep >= 60_000 ? clockShort(v) : clock(v), x, pad.t + ph + 6);
    }

    // collateral reference
    if (showColl) {
      const y = Math.round(Y(coll)) + 0.5;
      ctx.save();
      ctx.strokeStyle = colors.collateral;
      ctx.setLineDash([5, 4]);
      ctx.beginPath();
      ctx.moveTo(pad.l, y);
      ctx.lineTo(pad.l + pw, y);
      ctx.stroke();
      ctx.restore();
    } else if (Number.isFinite(coll)) {
      ctx.fillStyle = colors.collateral;
      ctx.textAlign = "left";
      ctx.textBaseline = "top";
      ctx.fillText(`collateral ${money(coll)} ↑ (${Math.round((margin[n - 1] / coll) * 100)}% used)`, pad.l + 4, pad.t);
    }

    // margin line, decimated to min/max per pixel column
    ctx.save();
    ctx.beginPath();
    ctx.rect(pad.l, pad.t, pw, ph);
    ctx.clip();
    const path = new Path2D();
    let col = -1;
    let cmin = 0;
    let cmax = 0;
    let clast = 0;
    let started = false;
    const flush = () => {
      if (col < 0) return;
      const yMin = Y(cmin);
      const yMax = Y(cmax);
      if (!started) {
        path.moveTo(col, Y(clast === cmin ? cmax : cmin));
        started = true;
      }
      path.lineTo(col, yMin);
      path.lineTo(col, yMax);
      path.lineTo(col, Y(clast));
    };
    const dense = n > pw * 2;
    for (let i = 0; i < n; i++) {
      const x = X(t[i]);
      if (!dense) {
        if (i === 0) path.moveTo(x, Y(margin[i]));
        else path.lineTo(x, Y(margin[i]));
        continue;
      }
      const c = Math.round(x);
      if (c !== col) {
        flush();
        col = c;
        cmin = cmax = margin[i];
      }
      if (margin[i] < cmin) cmin = margin[i];
      if (margin[i] > cmax) cmax = margin[i];
      clast = margin[i];
    }
    if (dense) flush();
    // area under the line
    const area = new Path2D(path);
    area.lineTo(X(t[n - 1]), pad.t + ph);
    area.lineTo(X(t[0]), pad.t + ph);
    area.closePath();
    const grad = ctx.createLinearGradient(0, pad.t, 0, pad.t + ph);
    grad.addColorStop(0, "rgba(77,163,255,0.22)");
    grad.addColorStop(1, "rgba(77,163,255,0.0)");
    ctx.fillStyle = grad;
    ctx.fill(area);
    ctx.strokeStyle = colors.line;
    ctx.lineWidth = 1.5;
    ctx.lineJoin = "round";
    ctx.stroke(path);
    ctx.restore();

    // last value tag
    const last = margin[n - 1];
    let yLast = Y(last);
    if (showColl) {
      let yColl = Y(coll);
      if (Math.abs(yColl - yLast) < 17) { // keep both tags readable: push them apart
        const mid = (yColl + yLast) / 2;
        const up = yLast <= yColl ? -1 : 1;
        yLast = mid + up * 8.5;
        yColl = mid - up * 8.5;
      }
      this.tag(pad.l + pw + 2, yColl, compact(coll), colors.collateral, "#0b0e12");
    }
    this.tag(pad.l + pw + 2, yLast, compact(last, ystep / 10), colors.line, "#0b0e12");

    // hover read-out
    if (this.hover && this.hover.x >= pad.l && this.hover.x <= pad.l + pw) {
      const tv = t0 + ((this.hover.x - pad.l) / pw) * (t1 - t0);
      let a = 0;
      let b = n - 1;
      while (a < b) {
        const m = (a + b) >> 1;
        if (t[m] < tv) a = m + 1;
        else b = m;
      }
      const i = a > 0 && Math.abs(t[a - 1] - tv) < Math.abs(t[a] - tv) ? a - 1 : a;
      const x = X(t[i]);
      const y = Y(margin[i]);
      ctx.strokeStyle = colors.axis;
      ctx.setLineDash([2, 3]);
      ctx.beginPath();
      ctx.moveTo(Math.round(x) + 0.5, pad.t);
      ctx.lineTo(Math.round(x) + 0.5, pad.t + ph);
      ctx.stroke();
      ctx.setLineDash([]);
      ctx.fillStyle = colors.line;
      ctx.beginPath();
      ctx.arc(x, y, 3, 0, Math.PI * 2);
      ctx.fill();
      const label = `${clock(t[i])}  ${money(margin[i])}`;
      const w = ctx.measureText(label).width + 12;
      const bx = Math.min(Math.max(pad.l, x - w / 2), pad.l + pw - w);
      ctx.fillStyle = "rgba(11,14,18,0.92)";
      ctx.strokeStyle = colors.grid;
      ctx.fillRect(bx, pad.t, w, 18);
      ctx.strokeRect(bx + 0.5, pad.t + 0.5, w - 1, 17);
      ctx.fillStyle = colors.text;
      ctx.textAlign = "left";
      ctx.textBaseline = "middle";
      ctx.fillText(label, bx + 6, pad.t + 9);
    }
  }

  tag(x, y, text, bg, fg) {
    const { ctx } = this;
    const w = ctx.measureText(text).width + 10;
    ctx.fillStyle = bg;
    ctx.beginPath();
    ctx.moveTo(x, y);
    ctx.lineTo(x + 5, y - 8);
    ctx.lineTo(x + 5 + w, y - 8);
    ctx.lineTo(x + 5 + w, y + 8);
    ctx.lineTo(x + 5, y + 8);
    ctx.closePath();
    ctx.fill();
    ctx.fillStyle = fg;
    ctx.textAlign = "left";
    ctx.textBaseline = "middle";
    ctx.fillText(text, x + 10, y + 0.5);
  }
}

/** A table-cell sparkline: the last `windowMs` of a series, coloured by its direction. */
export function sparkline(canvas, t, v, windowMs, colors) {
  const dpr = window.devicePixelRatio || 1;
  const W = canvas.clientWidth;
  const H = canvas.clientHeight;
  if (!W || !H) return;
  if (canvas.width !== Math.round(W * dpr)) canvas.width = Math.round(W * dpr);
  if (canvas.height !== Math.round(H * dpr)) canvas.height = Math.round(H * dpr);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, W, H);
  const n = t.length;
  if (n < 2) return;
  const t1 = t[n - 1];
  let a = n - 1;
  while (a > 0 && t[a - 1] >= t1 - windowMs) a--;
  const t0 = t[a];
  const span = Math.max(1, t1 - t0);
  if (n - a < 2) return;
  let lo = Infinity;
  let hi = -Infinity;
  for (let i = a; i < n; i++) {
    if (v[i] < lo) lo = v[i];
    if (v[i] > hi) hi = v[i];
  }
  if (hi - lo < 1e-9) {
    lo -= 1;
    hi += 1;
  }
  const X = (x) => 1 + ((x - t0) / span) * (W - 2);
  const Y = (y) => 2 + (1 - (y - lo) / (hi - lo)) * (H - 4);
  ctx.beginPath();
  const step = Math.max(1, Math.floor((n - a) / (W * 2)));
  for (let i = a; i < n; i += step) {
    if (i === a) ctx.moveTo(X(t[i]), Y(v[i]));
    else ctx.lineTo(X(t[i]), Y(v[i]));
  }
  ctx.lineTo(X(t[n - 1]), Y(v[n - 1]));
  ctx.strokeStyle = v[n - 1] > v[a] ? colors.up : v[n - 1] < v[a] ? colors.down : colors.flat;
  ctx.lineWidth = 1.25;
  ctx.stroke();
}
