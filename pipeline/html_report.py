"""One self-contained HTML report: summary, metrics, loss curve, and per-prompt image rows.

`write_report(path, report)` writes a single file that opens from disk with nothing loaded from
the network: images are inline PNG data URIs, the CSS is inline, the loss curve is an inline SVG,
and there are no scripts or external fonts. Every piece of text goes through `html.escape`.

Stable class names for tests and tooling: `img.sample`, `img.other` (the same prompt and noise under
another condition, e.g. the text alone), `img.real`, `img.neighbour`, `table.metrics`, `svg.loss`.
"""
from __future__ import annotations

import base64
import io
import math
from html import escape
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.files import atomic_path

THUMB_PX = 96
PLOT_W, PLOT_H = 1060, 300
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 64, 16, 14, 40

CSS = """
body{margin:0;background:#f5f6f8;color:#1f2328;font:14px/1.45 system-ui,-apple-system,"Segoe UI",
Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1160px;margin:0 auto;padding:24px 28px 48px}
h1{font-size:24px;margin:0 0 16px}
h2{font-size:17px;margin:28px 0 10px;padding-bottom:4px;border-bottom:1px solid #d8dce2}
.card{background:#fff;border:1px solid #e1e4e8;border-radius:8px;padding:14px 18px;margin:0 0 14px}
dl.summary{display:grid;grid-template-columns:max-content 1fr;gap:4px 18px;margin:0}
dl.summary dt{color:#57606a;font-weight:600}
dl.summary dd{margin:0;font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;
font-size:13px;word-break:break-all}
table.metrics{border-collapse:collapse;width:100%;background:#fff}
table.metrics th,table.metrics td{text-align:left;padding:6px 10px;border-bottom:1px solid #eaecef;
vertical-align:top}
table.metrics th{background:#f0f2f5;font-weight:600;color:#3a4048}
td.value{font-variant-numeric:tabular-nums;white-space:nowrap}
td.value .ci{color:#6e7781;font-size:12px;margin-left:6px}
td.note,td.ref{color:#57606a}
svg.loss{display:block;width:100%;height:auto;background:#fff}
svg.loss text{font:11px system-ui,sans-serif;fill:#57606a}
.legend{font-size:12px;color:#57606a;margin-top:4px}
.legend span{display:inline-block;width:18px;height:3px;vertical-align:middle;margin:0 4px 0 12px}
.prompt h3{margin:0 0 10px;font-size:15px}
.prompt h3 q{font-weight:600}
.groups{display:flex;flex-wrap:wrap;gap:10px 28px;align-items:flex-start}
.group .label{font-size:11px;text-transform:uppercase;letter-spacing:.05em;color:#6e7781;
margin-bottom:4px}
.row{display:flex;flex-wrap:wrap;gap:6px}
figure{margin:0;width:96px}
figcaption{font-size:11px;line-height:1.3;color:#3a4048;margin-top:3px}
figcaption .cap{overflow:hidden;display:-webkit-box;-webkit-line-clamp:3;-webkit-box-orient:vertical;
word-break:break-word}
figcaption .sim{display:block;color:#6e7781;font-variant-numeric:tabular-nums}
img.sample,img.other,img.real,img.neighbour,.noimg{width:96px;height:96px;image-rendering:pixelated;
border-radius:4px;border:1px solid #d0d7de;display:block;background:#fff}
img.real{border:2px solid #2da44e;width:94px;height:94px}
img.other{border:1px dashed #8c959f}
.noimg{display:flex;align-items:center;justify-content:center;color:#8c959f;font-size:11px;
background:repeating-linear-gradient(45deg,#f3f4f6,#f3f4f6 6px,#e9ebee 6px,#e9ebee 12px)}
p.empty{color:#6e7781;font-style:italic;margin:0}
.notes p{margin:0 0 8px}
"""


def png_data_uri(image) -> str:
    """An image array (HxW, HxWx3 or HxWx4; uint8, or floats in [0, 1]) as a PNG data URI."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.asarray(arr, np.float64)
        if arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.nan_to_num(arr), 0, 255).round().astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(image, cls: str, alt: str) -> str:
    if image is None:
        return f'<div class="noimg" title="{escape(alt)}">no image</div>'
    return f'<img class="{cls}" src="{png_data_uri(image)}" alt="{escape(alt)}" title="{escape(alt)}">'


def _num(value) -> str:
    if value is None:
        return "—"
    value = float(value)
    if not math.isfinite(value):
        return escape(str(value))
    return f"{value:.4g}"


def summary_html(summary) -> str:
    if not summary:
        return ""
    items = "".join(f"<dt>{escape(str(k))}</dt><dd>{escape(str(v))}</dd>" for k, v in summary)
    return f'<section class="card"><dl class="summary">{items}</dl></section>'


def metrics_html(metrics, title: str = "Metrics") -> str:
    if not metrics:
        return f'<h2>{escape(title)}</h2><p class="empty">No metrics.</p>'
    rows = []
    for m in metrics:
        ci = ""
        if m.get("low") is not None or m.get("high") is not None:
            ci = f'<span class="ci">[{_num(m.get("low"))}, {_num(m.get("high"))}]</span>'
        rows.append(
            f'<tr><td class="name">{escape(str(m.get("name", "")))}</td>'
            f'<td class="value">{_num(m.get("value"))}{ci}</td>'
            f'<td class="ref">{escape(str(m.get("reference") or ""))}</td>'
            f'<td class="note">{escape(str(m.get("note") or ""))}</td></tr>')
    head = "<tr><th>metric</th><th>value [low, high]</th><th>reference</th><th>note</th></tr>"
    return (f'<h2>{escape(title)}</h2><table class="metrics"><thead>{head}</thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def smooth(values: np.ndarray) -> np.ndarray:
    """Exponential moving average with a span of about 1/15 of the curve, bias-corrected."""
    alpha = 2.0 / (max(2.0, len(values) / 15.0) + 1.0)
    out, acc, weight = np.empty_like(values), 0.0, 0.0
    for i, v in enumerate(values):
        acc = (1 - alpha) * acc + alpha * v
        weight = (1 - alpha) * weight + alpha
        out[i] = acc / weight
    return out


def linear_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / target
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks between lo and hi (> 0): decades, or 1-2-5 steps, or every digit, whatever gives >= 3."""
    for mults in ((1,), (1, 2, 5), (1, 2, 3, 4, 5, 6, 7, 8, 9)):
        ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
                 for m in mults if lo * (1 - 1e-9) <= m * 10.0 ** e <= hi * (1 + 1e-9)]
        if len(ticks) >= 3:
            return ticks
    return linear_ticks(lo, hi, 4)


def _path(xs, ys) -> str:
    return "M" + " L".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys))


def loss_svg(loss) -> str:
    """The loss curve as an inline SVG line plot; a log-scale y axis when every loss is positive."""
    pts = [(float(s), float(v)) for s, v in loss if v is not None and math.isfinite(float(v))]
    if not pts:
        return '<p class="empty">No finite loss values to plot.</p>'
    steps, vals = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    use_log = bool(np.all(vals > 0))
    tf = np.log10 if use_log else (lambda a: np.asarray(a, float))
    lo, hi = float(vals.min()), float(vals.max())
    if use_log:
        lo, hi = (lo / 1.5, hi * 1.5) if hi / lo < 1.5 else (lo / 1.05, hi * 1.05)
    elif hi == lo:
        lo, hi = lo - 1.0, hi + 1.0
    x0, x1 = float(steps.min()), float(steps.max())
    x1 = x1 if x1 > x0 else x0 + 1.0
    t_lo, t_hi = float(tf(lo)), float(tf(hi))
    iw, ih = PLOT_W - MARGIN_L - MARGIN_R, PLOT_H - MARGIN_T - MARGIN_B

    def sx(a):
        return MARGIN_L + (np.asarray(a, float) - x0) / (x1 - x0) * iw

    def sy(a):
        return MARGIN_T + (t_hi - tf(np.asarray(a, float))) / (t_hi - t_lo) * ih

    parts = [f'<rect x="{MARGIN_L}" y="{MARGIN_T}" width="{iw}" height="{ih}" fill="#fbfcfd" '
             f'stroke="#d0d7de"/>']
    for t in (log_ticks(lo, hi) if use_log else linear_ticks(lo, hi, 5)):
        y = float(sy(t))
        parts.append(f'<line x1="{MARGIN_L}" x2="{MARGIN_L + iw}" y1="{y:.1f}" y2="{y:.1f}" '
                     f'stroke="#e6e9ed"/><text x="{MARGIN_L - 6}" y="{y + 4:.1f}" '
                     f'text-anchor="end">{escape(f"{t:.3g}")}</text>')
    for t in linear_ticks(x0, x1, 8):
        x = float(sx(t))
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{MARGIN_T + ih}" y2="{MARGIN_T + ih + 4}" '
                     f'stroke="#8c959f"/><text x="{x:.1f}" y="{MARGIN_T + ih + 17}" '
                     f'text-anchor="middle">{escape(f"{t:g}")}</text>')
    parts.append(f'<text x="{MARGIN_L + iw / 2:.0f}" y="{PLOT_H - 6}" text-anchor="middle">step</text>')
    parts.append(f'<text transform="translate(14,{MARGIN_T + ih / 2:.0f}) rotate(-90)" '
                 f'text-anchor="middle">loss{" (log)" if use_log else ""}</text>')
    xs, ys = sx(steps), sy(vals)
    parts.append(f'<path class="raw" d="{_path(xs, ys)}" fill="none" stroke="#9ec5fe" stroke-width="1.2"/>')
    if len(pts) >= 5:
        parts.append(f'<path class="smooth" d="{_path(xs, sy(smooth(vals)))}" fill="none" '
                     f'stroke="#0b5cd5" stroke-width="2.2" stroke-linejoin="round"/>')
    if len(pts) == 1:
        parts.append(f'<circle cx="{xs[0]:.1f}" cy="{ys[0]:.1f}" r="3" fill="#0b5cd5"/>')
    return (f'<svg class="loss" viewBox="0 0 {PLOT_W} {PLOT_H}" width="{PLOT_W}" height="{PLOT_H}" '
            f'role="img" aria-label="training loss curve">{"".join(parts)}</svg>'
            '<div class="legend"><span style="background:#9ec5fe"></span>raw'
            '<span style="background:#0b5cd5"></span>smoothed (EMA)'
            f' &middot; {len(pts)} points, last loss {_num(vals[-1])}</div>')


def loss_html(loss) -> str:
    if not loss:
        return ('<h2>Training loss</h2><p class="empty">No loss curve: there is no metrics.jsonl '
                'for this run.</p>')
    return f'<h2>Training loss</h2><section class="card">{loss_svg(loss)}</section>'


def _group(label: str, body: str) -> str:
    return f'<div class="group"><div class="label">{escape(label)}</div><div class="row">{body}</div></div>'


def prompt_html(entry: dict) -> str:
    prompt = str(entry.get("prompt", ""))
    samples = entry.get("samples") or []
    sample_tags = "".join(_img(s, "sample", f"sample {i + 1}: {prompt}") for i, s in enumerate(samples))
    groups = [_group(f"samples ({len(samples)})", sample_tags or '<p class="empty">none</p>')]
    for label, images in entry.get("others") or []:  # the same noise under another condition, beside them
        tags = "".join(_img(s, "other", f"{label} {i + 1}: {prompt}") for i, s in enumerate(images))
        groups.append(_group(f"{label} ({len(images)})", tags or '<p class="empty">none</p>'))
    groups.append(_group("real held-out", _img(entry.get("real"), "real", f"real held-out: {prompt}")))
    figures = []
    for n in entry.get("neighbours") or []:
        caption = str(n.get("caption", ""))
        sim = n.get("similarity")
        sim_text = "—" if sim is None else f"{float(sim):.3f}"
        figures.append(f'<figure>{_img(n.get("image"), "neighbour", caption)}'
                       f'<figcaption title="{escape(caption)}"><span class="cap">{escape(caption)}</span>'
                       f'<span class="sim">sim {sim_text}</span></figcaption></figure>')
    groups.append(_group(f"retrieved neighbours ({len(figures)})",
                         "".join(figures) or '<p class="empty">none</p>'))
    return (f'<section class="card prompt"><h3><q>{escape(prompt)}</q></h3>'
            f'<div class="groups">{"".join(groups)}</div></section>')


def render_report(report: dict) -> str:
    """The whole report as one HTML string."""
    title = escape(str(report.get("title") or "KNN-Diffusion report"))
    prompts = report.get("prompts") or []
    body = [f"<h1>{title}</h1>", summary_html(report.get("summary") or []),
            metrics_html(report.get("metrics") or []),
            *(metrics_html(rows, title) for title, rows in report.get("tables") or []),
            loss_html(report.get("loss") or []), f"<h2>Prompts ({len(prompts)})</h2>"]
    body += [prompt_html(p) for p in prompts] or ['<p class="empty">No prompts.</p>']
    notes = report.get("notes") or []
    if notes:
        body.append('<h2>Notes</h2><section class="card notes">'
                    + "".join(f"<p>{escape(str(n))}</p>" for n in notes) + "</section>")
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{title}</title><style>{CSS}</style></head>\n"
            f"<body><main>{''.join(body)}</main></body></html>\n")


def write_report(path, report: dict) -> Path:
    """Render `report` and write it atomically to `path`."""
    path = Path(path)
    with atomic_path(path, fsync=True) as tmp:
        tmp.write_text(render_report(report), encoding="utf-8")
    return path
