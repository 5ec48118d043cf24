// A table-cell sparkline: the last minutes of one account's margin on a small canvas, coloured by its
// direction (up is adverse).

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
