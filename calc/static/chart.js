// The day chart of one account's margin, with its collateral as a dashed reference line, drawn by uPlot
// (vendor/uPlot.iife.min.js, loaded by index.html before this module as the global `uPlot`): drag to zoom
// into a time window (double-click shows the whole day again), a crosshair with the time and margin under
// the cursor, the last values tagged on the axis, redrawn when its box is resized.
//
// A gap in the data is drawn as a gap, not as a line across the hours the system was down: consecutive
// points further apart than GAP_FACTOR times the series' median spacing, and at least GAP_MIN_MS, get a
// null point between them (`withGaps`), and uPlot breaks the line there (`spanGaps: false`).

import { clock, clockShort, compact, money } from "./format.js";

export const GAP_FACTOR = 10; // a gap: more than 10 x the median spacing between two points ...
export const GAP_MIN_MS = 10_000; // ... and more than 10 s (a quiet spell in a busy series is not a gap)
const MEDIAN_SAMPLE = 4096; // spacings sampled for the median (a day can hold 200,000 points)
const MIN_SPAN_MS = 10_000; // the time axis is at least 10 s wide
const AXIS_W = 74; // the value axis on the right (labels and the last-value tags)

const css = (name, fallback) =>
  getComputedStyle(document.documentElement).getPropertyValue(name).trim() || fallback;

/** The median spacing of ascending times `t`, from at most MEDIAN_SAMPLE strided pairs (0 for n < 2). */
export function medianStep(t) {
  const n = t.length;
  if (n < 2) return 0;
  const stride = Math.max(1, Math.floor((n - 1) / MEDIAN_SAMPLE));
  const d = [];
  for (let i = 1; i < n; i += stride) d.push(t[i] - t[i - 1]);
  d.sort((a, b) => a - b);
  return d[d.length >> 1];
}

/**
 * uPlot's data for a series {t: ms[], margin: [], collateral: []}: [t, margin, collateral] with a null point
 * in the middle of each gap (see the header), and the number of gaps.
 */
export function withGaps(series, factor = GAP_FACTOR, minMs = GAP_MIN_MS) {
  const { t, margin, collateral } = series;
  const limit = Math.max(minMs, factor * medianStep(t));
  const xs = [];
  const ms = [];
  const cs = [];
  let gaps = 0;
  for (let i = 0; i < t.length; i++) {
    if (i > 0 && t[i] - t[i - 1] > limit) {
      xs.push((t[i - 1] + t[i]) / 2);
      ms.push(null);
      cs.push(null);
      gaps += 1;
    }
    xs.push(t[i]);
    ms.push(margin[i]);
    cs.push(collateral[i]);
  }
  return { data: [xs, ms, cs], gaps };
}

/** The value range shown: the data's, at least 0.2% (or 1) high, with 8% padding above and below. */
function valueRange(lo, hi) {
  if (!Number.isFinite(lo) || !Number.isFinite(hi)) return [0, 1];
  if (hi - lo < Math.max(1, Math.abs(hi) * 0.002)) {
    const mid = (hi + lo) / 2;
    const half = Math.max(1, Math.abs(mid) * 0.001);
    [lo, hi] = [mid - half, mid + half];
  }
  const pad = (hi - lo) * 0.08;
  return [lo - pad, hi + pad];
}

export class MarginChart {
  /** `box`: an empty element the chart fills (it follows the element's size). */
  constructor(box) {
    this.box = box;
    this.series = { t: [], margin: [], collateral: [] };
    this.gaps = 0;
    this.zoomed = false; // a dragged time window stays while live rows arrive
    this.showColl = false;
    const c = {
      grid: css("--chart-grid", "#232a33"),
      axis: css("--muted", "#8792a2"),
      line: css("--accent", "#4da3ff"),
      collateral: css("--collateral", "#a78bfa"),
      font: `11px ${css("--font-num", "sans-serif")}`,
    };
    this.colors = c;
    const axis = { stroke: c.axis, grid: { stroke: c.grid, width: 1 }, ticks: { show: false }, font: c.font };
    const chart = this;
    this.u = new uPlot(
      {
        width: Math.max(1, box.clientWidth),
        height: Math.max(1, box.clientHeight),
        ms: 1, // times in ms since the epoch, as the page keeps them
        tzDate: (ms) => uPlot.tzDate(new Date(ms), "Etc/UTC"), // ticks on the tickerplant's (UTC) clock
        padding: [12, 0, 0, 8],
        legend: { show: false },
        cursor: {
          y: false,
          drag: { x: true, y: false, setScale: true },
          points: { size: 7, fill: c.line },
          bind: {
            dblclick: (u, target, handler) => (e) => {
              chart.zoomed = false;
              return handler(e);
            },
          },
        },
        scales: {
          x: { time: true, range: (u, lo, hi) => [Math.min(lo, hi - MIN_SPAN_MS), hi] },
          y: { range: (u, lo, hi) => valueRange(lo, hi) },
        },
        axes: [
          {
            ...axis,
            size: 22,
            space: 90,
            values: (u, splits, i, space, incr) =>
              splits.map((v) => (!u.data[0].length ? "" : incr >= 60_000 ? clockShort(v) : clock(v))),
          },
          {
            ...axis,
            side: 1,
            size: AXIS_W,
            space: 42,
            values: (u, splits, i, space, incr) =>
              splits.map((v) => (u.data[0].length ? compact(v, incr) : "")),
          },
        ],
        series: [
          {},
          {
            label: "margin",
            stroke: c.line,
            width: 1.5,
            spanGaps: false,
            points: { show: false },
            fill: (u) => {
              const g = u.ctx.createLinearGradient(0, u.bbox.top, 0, u.bbox.top + u.bbox.height);
              g.addColorStop(0, "rgba(77,163,255,0.22)");
              g.addColorStop(1, "rgba(77,163,255,0.0)");
              return g;
            },
          },
          {
            label: "collateral",
            stroke: c.collateral,
            width: 1,
            dash: [5, 4],
            spanGaps: false,
            points: { show: false },
            show: false,
          },
        ],
        hooks: {
          setSelect: [(u) => u.select.width > 0 && (chart.zoomed = true)],
          setCursor: [(u) => chart.hover(u)],
          draw: [(u) => chart.decorate(u)],
        },
      },
      [[], [], []],
      box,
    );
    this.tip = document.createElement("div");
    this.tip.className = "chart-tip";
    this.tip.hidden = true;
    this.u.over.append(this.tip);
    new ResizeObserver(() => {
      const w = box.clientWidth;
      const h = box.clientHeight;
      if (w && h && (w !== this.u.width || h !== this.u.height)) this.u.setSize({ width: w, height: h });
    }).observe(box);
  }

  /** Series as parallel arrays: t (ms since the epoch, ascending), margin, collateral. */
  setData(series) {
    this.series = series;
    const { data, gaps } = withGaps(series);
    this.gaps = gaps;
    const n = series.t.length;
    const coll = n ? series.collateral[n - 1] : NaN;
    let hi = -Infinity;
    for (const m of series.margin) if (m > hi) hi = m;
    // the collateral line only when the margin comes near it; else a label (not a squashed margin line)
    const showColl = Number.isFinite(coll) && coll > 0 && hi >= 0.9 * coll;
    if (showColl !== this.showColl) {
      this.showColl = showColl;
      this.u.setSeries(2, { show: showColl });
    }
    this.u.setData(data, !this.zoomed);
  }

  /** The crosshair read-out: time and margin of the point under the cursor. */
  hover(u) {
    const i = u.cursor.idx;
    const m = i == null ? null : u.data[1][i];
    if (m == null) {
      this.tip.hidden = true;
      return;
    }
    this.tip.textContent = `${clock(u.data[0][i])}  ${money(m)}`;
    this.tip.hidden = false;
    const w = this.tip.offsetWidth;
    this.tip.style.left = `${Math.min(Math.max(0, u.cursor.left - w / 2), u.over.clientWidth - w)}px`;
  }

  /** After each draw: the waiting text, the collateral label or tag, the last-value tag. */
  decorate(u) {
    const { ctx } = u;
    const px = uPlot.pxRatio;
    const { t, margin, collateral } = this.series;
    const n = t.length;
    ctx.save();
    ctx.font = this.colors.font.replace(/^\d+px/, `${11 * px}px`);
    ctx.textBaseline = "middle";
    if (!n) {
      ctx.fillStyle = this.colors.axis;
      ctx.textAlign = "center";
      const { left, top, width, height } = u.bbox;
      ctx.fillText("waiting for margin rows…", left + width / 2, top + height / 2);
      ctx.restore();
      return;
    }
    const last = margin[n - 1];
    const coll = collateral[n - 1];
    const x = u.bbox.left + u.bbox.width + 2 * px;
    let yLast = u.valToPos(last, "y", true);
    if (this.showColl) {
      let yColl = u.valToPos(coll, "y", true);
      if (Math.abs(yColl - yLast) < 17 * px) {
        // keep both tags readable: push them apart
        const mid = (yColl + yLast) / 2;
        const up = yLast <= yColl ? -1 : 1;
        yLast = mid + up * 8.5 * px;
        yColl = mid - up * 8.5 * px;
      }
      this.tag(ctx, x, yColl, compact(coll), this.colors.collateral, px);
    } else if (Number.isFinite(coll)) {
      ctx.fillStyle = this.colors.collateral;
      ctx.textAlign = "left";
      const used = Math.round((last / coll) * 100);
      const label = `collateral ${money(coll)} ↑ (${used}% used)`;
      ctx.fillText(label, u.bbox.left + 4 * px, u.bbox.top + 7 * px);
    }
    const ys = u.scales.y;
    const step = ys.max > ys.min ? (ys.max - ys.min) / 50 : 0;
    this.tag(ctx, x, yLast, compact(last, step), this.colors.line, px);
    ctx.restore();
  }

  tag(ctx, x, y, text, bg, px) {
    const w = ctx.measureText(text).width + 10 * px;
    ctx.fillStyle = bg;
    ctx.beginPath();
    ctx.moveTo(x, y);
    ctx.lineTo(x + 5 * px, y - 8 * px);
    ctx.lineTo(x + 5 * px + w, y - 8 * px);
    ctx.lineTo(x + 5 * px + w, y + 8 * px);
    ctx.lineTo(x + 5 * px, y + 8 * px);
    ctx.closePath();
    ctx.fill();
    ctx.fillStyle = "#0b0e12";
    ctx.textAlign = "left";
    ctx.fillText(text, x + 10 * px, y + 0.5 * px);
  }
}
