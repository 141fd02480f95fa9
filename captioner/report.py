"""A self-contained HTML report: n-best captions per image, hover a word to see where it looked.

``write_report(model, images, out_dir)`` writes ``<out_dir>/report.html``: one static file
with everything inline (images as base64 data URIs, the attention maps as JSON, the
script and the style), so it opens from disk with no server and no network. Per image it
lists the beam's n-best captions with their log-probabilities; hovering, focusing or
clicking (to pin) a word draws that word's attention map over the image in a
``<canvas>``, in the same frame, colours and transparency as :mod:`captioner.visualize`
(grid cell (r, c) covers rows r*H/h .. (r+1)*H/h and columns c*W/w .. (c+1)*W/w of the
original image; each cell's weight is drawn at the centre of its feature's receptive field,
``model.encoder.cell_origin``, and bilinear between). The run's metrics (``metrics_<split>.json``
from ``captioner evaluate``) go on top when given.

Letters: B batch, N n-best, T steps, L = h * w locations.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image

from captioner.config import DecodeConfig
from captioner.data.images import load_image
from captioner.decoding import beam_search
from captioner.errors import CaptionerError
from captioner.metrics import DISPLAY_NAMES as METRIC_NAMES
from captioner.metrics import METRICS
from captioner.model import Captioner, CaptionResult
from captioner.progress import tqdm
from captioner.visualize import as_rgb, display_size, support_box

DISPLAY_SIDE = 420  # CSS pixels of an image's longer side on the page
EMBED_SIDE = 840  # images larger than this are downscaled before embedding (sharp on 2x screens)


@dataclass
class ReportImage:
    """One image of the report (any PIL mode) and its captions (best first)."""

    name: str
    image: Image.Image
    captions: list[CaptionResult]


# ----------------------------------------------------------------------------- decoding

@torch.no_grad()
def nbest_captions(model: Captioner, images: Sequence[Image.Image], *, beam_size: int, n_best: int,
                   max_len: int | None = None, batch_size: int = 8, progress: bool = False) -> list[list[CaptionResult]]:
    """The ``n_best`` beam-search captions of each image, best first, each with its per-word
    attention; ``score`` is the caption's log-probability.

    Args:
        images: PIL images (any mode; the model sees them as RGB).
        beam_size: K (1 is greedy); n_best: N <= K.
        max_len: default the checkpoint's ``decode.max_len`` (its length penalty is used too).
        progress: a progress bar over batches.
    """
    decode = model.config.decode if model.config else DecodeConfig()
    ids = {"start_id": model.vocab.start_id, "end_id": model.vocab.end_id, "pad_id": model.vocab.pad_id}
    was = model.training
    model.eval()
    tf = model.encoder.transform()
    results: list[list[CaptionResult]] = []
    for k in tqdm(range(0, len(images), batch_size), desc="beam search", unit="batch", disable=not progress):
        pixels = torch.stack([tf(as_rgb(im)) for im in images[k:k + batch_size]]).to(model.device)  # (B, 3, S, S)
        dec = beam_search(model.decoder, model.encode(pixels), beam_size=beam_size, n_best=n_best,
                          max_len=max_len or decode.max_len, length_penalty=decode.length_penalty,
                          no_repeat_ngram=decode.no_repeat_ngram, **ids)
        T = dec.tokens.shape[2]
        for i in range(dec.tokens.shape[0]):
            captions = []
            for j in range(n_best):
                n = int(dec.lengths[i, j])
                captions.append(CaptionResult(
                    words=model.vocab.decode(dec.tokens[i, j, :n].tolist()),
                    alphas=dec.alphas[i, j, :min(n + 1, T)].float().cpu(),  # (words + 1, L)
                    betas=dec.betas[i, j, :min(n + 1, T)].float().cpu(),
                    grid=model.encoder.grid, score=float(dec.log_probs[i, j]),
                ))
            results.append(captions)
    model.train(was)
    return results


# ----------------------------------------------------------------------------- page pieces

def _data_uri(image: Image.Image) -> str:
    """The image as the model sees it (RGB), downscaled to EMBED_SIDE at most, as a PNG data URI
    when small, else JPEG."""
    image = as_rgb(image)
    W, H = image.size
    if max(W, H) > EMBED_SIDE:
        H, W = display_size((H, W), EMBED_SIDE)
        image = image.resize((W, H), Image.BICUBIC)
    buffer = io.BytesIO()
    if W * H <= 256 * 256:
        image.save(buffer, format="PNG")
        kind = "png"
    else:
        image.save(buffer, format="JPEG", quality=90)
        kind = "jpeg"
    return f"data:image/{kind};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def _caption_data(result: CaptionResult) -> dict:
    """Per token (words, then ``<end>``): the map over the grid scaled to peak 1 (3 decimals;
    exact zeros stay zero), the support box and beta."""
    alphas = result.alphas.float()
    peaks = alphas.amax(dim=1, keepdim=True).clamp_min(1e-12)  # (T, 1)
    maps = np.round((alphas / peaks).numpy(), 3)
    return {"words": [*result.words, "<end>"][:len(alphas)],
            "betas": [round(float(b), 3) for b in result.betas],
            "maps": [[float(v) for v in row] for row in maps],
            "boxes": [support_box(row, result.grid) for row in alphas]}


def _metrics_html(metrics: dict) -> str:
    """The metrics of ``captioner evaluate`` as a table (x100), with attention correctness,
    CHAIR and relation accuracy when the evaluation had them."""
    scores, unavailable = metrics.get("scores", {}), metrics.get("unavailable", {})
    head, cells = [], []
    for key in METRICS:
        if key in scores or key in unavailable:
            head.append(f"<th>{METRIC_NAMES[key]}</th>")
            value = f"{100 * scores[key]:.1f}" if key in scores else "n/a"
            why = html.escape(unavailable.get(key, ""), quote=True)
            cells.append(f'<td title="{why}">{value}</td>')
    correctness = metrics.get("attention_correctness") or {}
    if correctness.get("score") is not None:
        head.append("<th>attention correctness</th>")
        cells.append(f'<td>{100 * correctness["score"]:.1f} <small>(uniform {100 * correctness["uniform"]:.1f}, '
                     f'{correctness["words"]} words)</small></td>')
    chair = metrics.get("chair") or {}  # the errors BLEU does not see: absent objects, wrong relations
    for name, key, count in (("CHAIR_s", "chair_s", ("hallucinated_captions", "captions")),
                             ("CHAIR_i", "chair_i", ("hallucinated", "mentions")),
                             ("relations that hold", "relation_accuracy", ("relations_correct", "relations"))):
        value = chair.get(key)
        if value is not None and math.isfinite(value):
            head.append(f"<th>{name}</th>")
            cells.append(f"<td>{100 * value:.1f} <small>({chair[count[0]]} of {chair[count[1]]})</small></td>")
    what = " \u00b7 ".join(str(part) for part in (
        f"{metrics['split']} split" if "split" in metrics else None,
        f"{metrics['images']} images" if "images" in metrics else None,
        f"beam {metrics['beam_size']}" if "beam_size" in metrics else None) if part)
    return (f'<section class="metrics"><h2>Metrics <small>{html.escape(what)} (x100)</small></h2>'
            f'<table><tr>{"".join(head)}</tr><tr>{"".join(cells)}</tr></table></section>')


def _item_html(index: int, item: ReportImage) -> str:
    """One image with its canvas overlay and its captions; every token is a focusable span."""
    W, H = item.image.size
    Hd, Wd = display_size((H, W), DISPLAY_SIDE)
    rows = []
    for j, result in enumerate(item.captions):
        tokens = [*result.words, "<end>"][:len(result.alphas)]
        spans = "".join(
            f'<span class="word{" end" if t == len(result.words) else ""}" tabindex="0" data-caption="{j}" '
            f'data-step="{t}">{html.escape(word)}</span> ' for t, word in enumerate(tokens))
        rows.append(f'<li class="caption" data-caption="{j}"><span class="logp" title="log-probability">'
                    f'{result.score:.2f}</span> {spans}</li>')
    return (f'<article class="item" data-image="{index}">'
            f'<figure class="view" data-shown=""><div class="frame" style="width:{Wd}px;height:{Hd}px">'
            f'<img src="{_data_uri(item.image)}" alt="{html.escape(item.name, quote=True)}" '
            f'width="{Wd}" height="{Hd}"><canvas></canvas></div>'
            f'<figcaption><b>{html.escape(item.name)}</b> {W}\u00d7{H} \u00b7 '
            f'<span class="now">hover or click a word</span></figcaption></figure>'
            f'<ol class="captions">{"".join(rows)}</ol></article>')


_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1100px; padding: 1.5em; color: #222; }
h1 { font-size: 1.5em; margin: 0 0 .2em; } h2 { font-size: 1.1em; } small { color: #666; font-weight: normal; }
.info, .controls { color: #555; } .controls label { margin-right: 1.5em; }
table { border-collapse: collapse; } th, td { padding: .25em .8em; border-bottom: 1px solid #ddd; text-align: right; }
.item { display: flex; gap: 1.5em; align-items: flex-start; padding: 1.2em 0; border-top: 1px solid #eee; flex-wrap: wrap; }
.view { margin: 0; } .frame { position: relative; max-width: 100%; overflow: hidden; }
.frame img { display: block; width: 100%; height: 100%; image-rendering: auto; }
.frame canvas { position: absolute; inset: 0; width: 100%; height: 100%; pointer-events: none; }
figcaption { font-size: .9em; color: #555; margin-top: .4em; }
.captions { flex: 1; min-width: 300px; margin: 0; padding-left: 1.5em; }
.caption { margin: .35em 0; } .logp { color: #888; font-size: .85em; margin-right: .4em; font-variant-numeric: tabular-nums; }
.word { cursor: pointer; border-radius: 3px; padding: 0 .1em; }
.word:hover, .word:focus { background: #ffe9a8; outline: none; }
.word.active { background: #ffd34d; } .word.pinned { background: #f5a623; color: white; }
.word.end { color: #999; font-size: .85em; }
"""

_SCRIPT = r"""
"use strict";
const DATA = JSON.parse(document.getElementById("report-data").textContent);
const settings = { opacity: DATA.opacity, smooth: DATA.smooth };

// Resample a (sh, sw) row-major map to (dh, dw) bilinearly, the weight of cell (r, c) at
// (r + oy, c + ox) cells: origin [0.5, 0.5] is the cell's centre, as torch's
// interpolate(mode="bilinear", align_corners=False); the encoder's cell_origin is where the
// cell's feature looks (captioner.visualize.upsample_maps).
function resample(src, sh, sw, dh, dw, origin = [0.5, 0.5]) {
  const out = new Float32Array(dh * dw);
  for (let y = 0; y < dh; y++) {
    const sy = Math.min(Math.max((y + 0.5) * sh / dh - origin[0], 0), sh - 1);
    const y0 = Math.floor(sy), y1 = Math.min(y0 + 1, sh - 1), fy = sy - y0;
    for (let x = 0; x < dw; x++) {
      const sx = Math.min(Math.max((x + 0.5) * sw / dw - origin[1], 0), sw - 1);
      const x0 = Math.floor(sx), x1 = Math.min(x0 + 1, sw - 1), fx = sx - x0;
      out[y * dw + x] = (1 - fy) * ((1 - fx) * src[y0 * sw + x0] + fx * src[y0 * sw + x1]) +
                        fy * ((1 - fx) * src[y1 * sw + x0] + fx * src[y1 * sw + x1]);
    }
  }
  return out;
}

// Gaussian blur (sigma in cells) at 8 pixels per cell, edges replicated, renormalised to peak 1:
// the smoothing of captioner.visualize.attention_maps. Returns [map, rows, cols].
function smoothed(map, grid, sigma, origin) {
  const S = 8, [h, w] = grid, H = h * S, W = w * S, r = Math.ceil(3 * sigma * S);
  const taps = Array.from({ length: 2 * r + 1 }, (_, k) => Math.exp(-((k - r) ** 2) / (2 * (sigma * S) ** 2)));
  const total = taps.reduce((a, b) => a + b);
  let m = resample(map, h, w, H, W, origin);
  for (const [n, len, step, stride] of [[H, W, 1, W], [W, H, W, 1]]) {  // along rows, then along columns
    const out = new Float32Array(H * W);
    for (let line = 0; line < n; line++) {
      for (let i = 0; i < len; i++) {
        let acc = 0;
        for (let k = -r; k <= r; k++) acc += taps[k + r] * m[line * stride + Math.min(Math.max(i + k, 0), len - 1) * step];
        out[line * stride + i * step] = acc / total;
      }
    }
    m = out;
  }
  const peak = m.reduce((a, b) => Math.max(a, b), 1e-12);
  return [m.map(v => v / peak), H, W];
}

// The map over the whole image: colour map, transparency ~ attention, and the support box.
function draw(canvas, map, grid, box, origin) {
  const [h, w] = grid;
  const frame = canvas.parentElement;
  const W = Math.max(Math.round(frame.clientWidth * devicePixelRatio), 8 * w);
  const H = Math.max(Math.round(frame.clientHeight * devicePixelRatio), 8 * h);
  canvas.width = W;
  canvas.height = H;
  const smooth = settings.smooth > 0;
  const [src, sh, sw] = smooth ? smoothed(map, grid, settings.smooth, origin) : [map, h, w];
  const values = resample(src, sh, sw, H, W, smooth ? [0.5, 0.5] : origin);  // smoothed: already in place
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(W, H);
  for (let i = 0; i < values.length; i++) {
    const v = Math.min(Math.max(values[i], 0), 1), c = DATA.cmap[Math.round(v * 255)];
    image.data.set([c[0], c[1], c[2], Math.round(255 * settings.opacity * v)], 4 * i);
  }
  ctx.putImageData(image, 0, 0);
  if (box) {  // the cells that got any weight: hard attention's cell, local attention's window
    const [r0, c0, r1, c1] = box;
    ctx.strokeStyle = "white";
    ctx.lineWidth = Math.max(1.5, W / 250);
    ctx.strokeRect(c0 * W / w, r0 * H / h, (c1 - c0 + 1) * W / w, (r1 - r0 + 1) * H / h);
  }
}

function show(article, word) {
  const item = DATA.images[article.dataset.image];
  const figure = article.querySelector(".view"), canvas = figure.querySelector("canvas");
  article.querySelectorAll(".word.active").forEach(w => w.classList.remove("active"));
  if (!word) {
    canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
    figure.dataset.shown = "";
    figure.querySelector(".now").textContent = "hover or click a word";
    return;
  }
  const caption = item.captions[word.dataset.caption], step = Number(word.dataset.step);
  word.classList.add("active");
  draw(canvas, caption.maps[step], item.grid, caption.boxes[step], item.origin);
  figure.dataset.shown = word.dataset.caption + ":" + step;
  figure.querySelector(".now").textContent =
    "\u201c" + caption.words[step] + "\u201d \u00b7 \u03b2 = " + caption.betas[step].toFixed(2);
}

const pinned = article => article.querySelector(".word.pinned");

document.querySelectorAll(".item").forEach(article => {
  const words = article.querySelector(".captions");
  words.addEventListener("mouseover", e => { if (e.target.matches(".word")) show(article, e.target); });
  words.addEventListener("focusin", e => { if (e.target.matches(".word")) show(article, e.target); });
  words.addEventListener("mouseleave", () => show(article, pinned(article)));
  words.addEventListener("click", e => {
    if (!e.target.matches(".word")) return;
    const was = pinned(article);
    if (was) was.classList.remove("pinned");
    if (was !== e.target) e.target.classList.add("pinned");
    show(article, pinned(article) || e.target);
  });
});

function redrawAll() {
  document.querySelectorAll(".item").forEach(article => {
    const shown = article.querySelector(".view").dataset.shown;
    if (shown) {
      const [j, t] = shown.split(":");
      show(article, article.querySelector('.word[data-caption="' + j + '"][data-step="' + t + '"]'));
    }
  });
}
for (const key of ["opacity", "smooth"]) {
  document.getElementById(key).addEventListener("input", e => { settings[key] = Number(e.target.value); redrawAll(); });
}
window.addEventListener("resize", redrawAll);
"""


def render_report(items: Sequence[ReportImage], *, title: str = "Where the model looks", info: str = "",
                  metrics: dict | None = None, cmap: str = "jet", opacity: float = 0.7, smooth: float = 0.0,
                  origin: tuple[float, float] = (0.5, 0.5)) -> str:
    """The report page as one HTML string (no external resources).

    Args:
        items: the images and their captions (each caption's alphas (words + 1, L) over its grid).
        info: a line under the title (model, checkpoint).
        metrics: the content of a ``metrics_<split>.json`` written by ``captioner evaluate``.
        cmap, opacity, smooth: the look of the maps, as in :func:`captioner.visualize.attention_figure`
            (the page has sliders for opacity and smoothing).
        origin: where a cell's weight is drawn, in cells from its top-left corner: (0.5, 0.5) the
            cell's centre, ``model.encoder.cell_origin`` where its feature looks.
    """
    lut = (matplotlib.colormaps[cmap](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(int).tolist()  # (256, 3)
    data = {"cmap": lut, "opacity": opacity, "smooth": smooth,
            "images": [{"name": item.name, "size": list(item.image.size),
                        "grid": list(item.captions[0].grid) if item.captions else [1, 1],
                        "origin": [float(origin[0]), float(origin[1])],
                        "captions": [_caption_data(c) for c in item.captions]} for item in items]}
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")  # cannot close the script tag
    controls = (f'<p class="controls"><label>opacity <input id="opacity" type="range" min="0" max="1" step="0.05" '
                f'value="{opacity}"></label><label>smoothing (cells) <input id="smooth" type="range" min="0" '
                f'max="2" step="0.1" value="{smooth}"></label> hover a word to see where the model looked; '
                f'click to pin it</p>')
    body = "".join(_item_html(i, item) for i, item in enumerate(items))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>'
            f'<h1>{html.escape(title)}</h1><p class="info">{html.escape(info)}</p>'
            f'{_metrics_html(metrics) if metrics else ""}{controls}{body}'
            f'<script type="application/json" id="report-data">{payload}</script>'
            f'<script>{_SCRIPT}</script></body></html>\n')


# ----------------------------------------------------------------------------- the job

def read_metrics(path: str | Path) -> dict:
    """A ``metrics_<split>.json`` written by ``captioner evaluate``; a wrong file is a CaptionerError."""
    path = Path(path)
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CaptionerError(f"metrics file not found: {path}") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CaptionerError(f"{path}: not a readable JSON file ({err})") from None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("scores"), dict):
        raise CaptionerError(f"{path}: not a metrics file written by captioner evaluate (no 'scores')")
    return metrics


def write_report(model: Captioner, images: Sequence[str | Path], out_dir: str | Path, *, beam_size: int = 3,
                 n_best: int | None = None, max_len: int | None = None, metrics: str | Path | None = None,
                 title: str = "Where the model looks", checkpoint: str = "", smooth: float = 0.0,
                 progress: bool = False, on_bad_image: Callable[[Path, str], None] | None = None) -> Path:
    """Caption ``images`` with beam search and write ``<out_dir>/report.html``.

    Args:
        beam_size: K; n_best: captions shown per image (default K).
        metrics: a ``metrics_<split>.json`` from ``captioner evaluate`` to show on top.
        checkpoint: the checkpoint's path, named on the page.
        on_bad_image: called with (path, reason) for each unreadable image, which is then left
            out of the page; None: the first one raises :class:`CaptionerError`.

    Returns:
        The report's path.
    """
    n_best = n_best or beam_size
    if beam_size < 1 or not 1 <= n_best <= beam_size:
        raise CaptionerError(f"need beam >= 1 and 1 <= n-best <= beam; got beam {beam_size}, n-best {n_best}")
    scores = read_metrics(metrics) if metrics else None
    paths, pictures = [], []
    for path in tqdm([Path(p) for p in images], desc="read images", unit="img", disable=not progress):
        try:
            pictures.append(load_image(path))
        except CaptionerError as err:
            if on_bad_image is None:
                raise
            on_bad_image(path, str(err).removeprefix(f"{path}: "))
            continue
        paths.append(path)
    captions = nbest_captions(model, pictures, beam_size=beam_size, n_best=n_best, max_len=max_len, progress=progress)
    cfg = model.config
    info = " \u00b7 ".join(part for part in (
        f"checkpoint {checkpoint}" if checkpoint else "",
        f"{cfg.model.attention.name} attention, {cfg.model.encoder.backbone} encoder" if cfg else "",
        f"grid {model.encoder.grid[0]}\u00d7{model.encoder.grid[1]}", f"beam {beam_size}") if part)
    page = render_report([ReportImage(p.name, im, c) for p, im, c in zip(paths, pictures, captions)],
                         title=title, info=info, metrics=scores, smooth=smooth, origin=model.encoder.cell_origin)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "report.html"
    target.write_text(page, encoding="utf-8")
    return target
