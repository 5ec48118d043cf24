// Number and time formatting for the dashboard: thousands separators, signed changes, compact axis
// labels, UTC clock times, and the colour band of a utilisation level.

const money0 = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
const pct1 = new Intl.NumberFormat("en-US", { style: "percent", minimumFractionDigits: 1, maximumFractionDigits: 1 });

const finite = (x) => typeof x === "number" && Number.isFinite(x);

/** 1234567.8 -> "1,234,568"; negatives with a real minus sign (same width as +). */
export function money(x) {
  if (!finite(x)) return "—";
  const r = Math.round(x);
  return r < 0 ? "\u2212" + money0.format(-r) : money0.format(r);
}

/** Signed change: "+1,234" / "−1,234" (a real minus sign, so columns align). */
export function signed(x) {
  if (!finite(x)) return "—";
  const body = money(Math.abs(x));
  if (body === "0") return body;
  return (x > 0 ? "+" : "−") + body;
}

/** 0.6361 -> "63.6%" (negatives with a real minus sign) */
export function pct(x) {
  if (!finite(x)) return "—";
  return x < 0 ? "\u2212" + pct1.format(-x) : pct1.format(x);
}

export function signedPct(x) {
  if (!finite(x)) return "—";
  const body = pct1.format(Math.abs(x));
  return (x > 0 ? "+" : x < 0 ? "−" : "") + body;
}

/** An option position's Greeks for a driver row: "Δ +1,343 · Γ −92.4 · ν −42.7k" (delta in underlying
 * units, gamma per unit of the underlying's price, vega per 1.00 of vol); "" when `d` has none. */
export function greeks(d) {
  if (!finite(d.delta)) return "";
  const g = Math.abs(d.gamma) >= 100 ? compact(d.gamma) : (d.gamma < 0 ? "\u2212" : "") + Math.abs(d.gamma).toFixed(1);
  return `\u0394 ${signed(d.delta)} \u00b7 \u0393 ${g} \u00b7 \u03bd ${compact(d.vega)}`;
}

/** Axis labels: 1.25M, 222.5k, 950; `step` (the tick spacing) sets the decimals so ticks stay distinct. */
export function compact(x, step = 0) {
  const a = Math.max(Math.abs(x), Math.abs(step));
  const [unit, suffix] = a >= 1e9 ? [1e9, "B"] : a >= 1e6 ? [1e6, "M"] : a >= 1e3 ? [1e3, "k"] : [1, ""];
  let digits = 0;
  if (step > 0) {
    while (digits < 3 && Math.abs(Math.round((step / unit) * 10 ** digits) - (step / unit) * 10 ** digits) > 1e-6) digits++;
  } else {
    digits = Math.abs(x) / unit >= 100 ? 0 : Math.abs(x) / unit >= 10 ? 1 : 2;
  }
  const body = (Math.abs(x) / unit).toFixed(digits);
  return (x < 0 ? "\u2212" : "") + body + suffix;
}

const pad = (n) => String(n).padStart(2, "0");

/** ms since the epoch -> "14:05:09" (UTC, the tickerplant's clock). */
export function clock(ms) {
  if (!finite(ms)) return "—";
  const d = new Date(ms);
  return `${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())}:${pad(d.getUTCSeconds())}`;
}

export function clockShort(ms) {
  const d = new Date(ms);
  return `${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())}`;
}

/** Display bands of utilisation (margin / collateral). Colour only; the alert rules live in config. */
export const BANDS = [
  { upto: 0.6, name: "ok" },
  { upto: 0.8, name: "watch" },
  { upto: 0.9, name: "high" },
  { upto: 1.0, name: "breach" },
  { upto: Infinity, name: "call" },
];

export function band(u) {
  if (!finite(u)) return "none";
  return BANDS.find((b) => u < b.upto).name;
}

/** Human names of the margin models in margin rows. */
export const MODEL_NAMES = { var: "VaR", hvar: "HS VaR", stress: "Stress", span: "SPAN", prisma: "Prisma-like", span2: "SPAN 2-like" };

export function modelName(m) {
  return MODEL_NAMES[m] || m || "—";
}
