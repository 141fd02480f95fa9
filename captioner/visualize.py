"""Where the model looked: per-word attention maps drawn over the image.

``attention_figure(image, words, alphas, grid)`` draws one panel for the image and one per
word, the word's attention map upsampled to the image, coloured and overlaid with
transparency, titled with the word and its gate value beta (Section 4.2.1 of the paper).
Figures are plain ``matplotlib.figure.Figure`` objects rendered by the non-interactive Agg
canvas: no pyplot, no global backend state, so this runs on servers and inside notebooks.

The frame. The encoder resizes the WHOLE image to a square without cropping
(``captioner.encoder.image_transform``), so grid cell (r, c) of an (h, w) grid covers rows
r*H/h .. (r+1)*H/h and columns c*W/w .. (c+1)*W/w of the ORIGINAL H x W image, whatever
its aspect ratio. Every map here is drawn in that frame: the panels' data coordinates are
original-image pixels, and a cell's value sits at the cell's centre, or with ``origin``
(``visualize_images`` passes ``model.encoder.cell_origin``) at the centre of the receptive
field of the feature it weighs: where the model looked.

Letters: N maps (words), L = h * w grid locations, H x W the original image, and
Hm x Wm the resolution a map is rendered at.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image
from torch import Tensor

from captioner.correctness import upsample_maps
from captioner.data.images import load_image
from captioner.errors import CaptionerError
from captioner.model import Captioner, CaptionResult, ImageLike
from captioner.progress import tqdm
from captioner.vocab import UNK, tokenize

DISPLAY_SIDE = 384  # the longer side of a panel's image, in rendered pixels
MIN_CELL_PIXELS = 8  # a map is rendered with at least this many pixels per grid cell


# ----------------------------------------------------------------------------- maps

def _gaussian_blur(maps: Tensor, sigma: tuple[float, float]) -> Tensor:
    """Separable Gaussian blur of (N, 1, Hm, Wm) maps, sigma (rows, cols) in pixels; edges replicated."""
    for axis, s in enumerate(sigma):
        if s <= 0:
            continue
        radius = max(1, math.ceil(3 * s))
        taps = torch.exp(-torch.arange(-radius, radius + 1, dtype=maps.dtype) ** 2 / (2 * s * s))
        taps = taps / taps.sum()  # (2r+1,)
        if axis == 0:  # rows
            maps = F.conv2d(F.pad(maps, (0, 0, radius, radius), mode="replicate"), taps.view(1, 1, -1, 1))
        else:  # columns
            maps = F.conv2d(F.pad(maps, (radius, radius, 0, 0), mode="replicate"), taps.view(1, 1, 1, -1))
    return maps


NORMALIZATIONS = ("word", "caption", "absolute")


def attention_maps(alphas: Tensor | np.ndarray, grid: tuple[int, int], size: tuple[int, int], *,
                   smooth: float = 0.0, interpolation: str = "bilinear", normalize: str = "word",
                   origin: tuple[float, float] = (0.5, 0.5)) -> np.ndarray:
    """Attention weights over the grid -> maps over the original image frame, for display.

    Grid cell (r, c) covers rows r*Hm/h .. (r+1)*Hm/h and columns c*Wm/w .. (c+1)*Wm/w of
    the output (the encoder saw the whole image stretched to a square), and its weight is
    placed at the cell's centre before interpolating.

    Args:
        alphas: (N, L) or (L,) non-negative weights, L = h * w row-major.
        grid: (h, w).
        size: (Hm, Wm) of the output; give the image's aspect ratio (the original
            (H, W) or a scaled copy).
        smooth: sigma of an extra Gaussian blur in grid cells (0: none; the paper's
            figures were smoothed, ~0.5-1 cell looks alike).
        interpolation: ``bilinear``, ``bicubic`` (clamped at 0) or ``nearest`` (blocky cells).
        normalize: the colour scale. ``word``: each map divided by its own maximum (shows the
            shape of every map, but a nearly uniform map looks as hot as a peaked one);
            ``caption``: all N maps divided by their common maximum (maps compare across
            words); ``absolute``: the weights as they are (1 = all attention on one cell).
        origin: bilinear only: where a cell's weight sits, in cells from its top-left corner;
            (0.5, 0.5) the cell's centre, ``model.encoder.cell_origin`` the centre of the
            receptive field of the feature the weight was given to (where the model looked).

    Returns:
        (N, Hm, Wm) float32 in [0, 1] (an all-zero map stays 0).
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {', '.join(NORMALIZATIONS)}; got {normalize!r}")
    h, w = grid
    maps = torch.as_tensor(alphas).detach().to("cpu", torch.float32)
    if maps.ndim == 1:
        maps = maps.unsqueeze(0)
    if maps.ndim != 2 or maps.shape[1] != h * w:
        raise ValueError(f"alphas of shape {tuple(maps.shape)} do not fit a {h} x {w} grid (L = {h * w})")
    if interpolation not in ("bilinear", "bicubic", "nearest"):
        raise ValueError(f"interpolation must be bilinear, bicubic or nearest; got {interpolation!r}")
    maps = maps.clamp_min(0).reshape(-1, 1, h, w)  # (N, 1, h, w)
    if maps.shape[0] == 0:  # no words (a caption that is only <end>): no maps
        return np.zeros((0, *size), dtype=np.float32)
    if interpolation == "bilinear":  # the weight of cell r at (r + origin) * Hm / h
        up = upsample_maps(maps, grid, size, origin=origin).float().unsqueeze(1)  # (N, 1, Hm, Wm)
    else:
        extra = {} if interpolation == "nearest" else {"align_corners": False}  # cell centres at (r + 0.5) * Hm / h
        up = F.interpolate(maps, size=tuple(size), mode=interpolation, **extra).clamp_min(0)  # (N, 1, Hm, Wm)
    if smooth > 0:
        up = _gaussian_blur(up, (smooth * size[0] / h, smooth * size[1] / w))
    if normalize == "absolute":
        return up.clamp_max(1.0)[:, 0].numpy()
    dims = (2, 3) if normalize == "word" else (0, 1, 2, 3)
    peak = up.amax(dim=dims, keepdim=True)  # (N, 1, 1, 1) or (1, 1, 1, 1)
    return (up / peak.clamp_min(1e-12))[:, 0].numpy()


def peakedness(alphas: Tensor | np.ndarray) -> np.ndarray:
    """How peaked each map is: its maximum over uniform attention's (1 / L). 1 is uniform,
    L is all attention on one cell. alphas (N, L) -> (N,)."""
    a = torch.as_tensor(alphas).detach().to("cpu", torch.float32)
    return (a.amax(dim=-1) * a.shape[-1]).numpy()


def support_box(alpha: Tensor | np.ndarray, grid: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """The cells with any weight, as (row0, col0, row1, col1) inclusive, or None when every
    cell has weight. Hard attention's one-hot map gives its chosen cell; restricted local
    attention gives its window; soft attention (a softmax) gives None.

    Args:
        alpha: (L,) weights over an (h, w) grid.
    """
    h, w = grid
    nonzero = np.asarray(torch.as_tensor(alpha).detach().cpu().reshape(h, w) > 0)  # (h, w)
    if nonzero.all() or not nonzero.any():
        return None
    rows, cols = np.nonzero(nonzero.any(1))[0], np.nonzero(nonzero.any(0))[0]
    return int(rows[0]), int(cols[0]), int(rows[-1]), int(cols[-1])


def overlay(maps: np.ndarray, *, cmap: str = "jet", opacity: float = 0.7) -> np.ndarray:
    """Colour (..., Hm, Wm) maps in [0, 1] as RGBA whose transparency follows the map: where the
    model did not look the image shows through; at the peak the colour covers ``opacity``.

    Returns:
        (..., Hm, Wm, 4) float32 RGBA in [0, 1].
    """
    rgba = matplotlib.colormaps[cmap](maps).astype(np.float32)  # (..., Hm, Wm, 4)
    rgba[..., 3] = opacity * maps
    return rgba


# ----------------------------------------------------------------------------- figures

def as_rgb(image: ImageLike) -> Image.Image:
    """The image as the model sees it (``convert("RGB")``; a path is opened): any PIL mode
    (L, RGBA, P, 1, I;16, ...) works."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    return load_image(image)


def display_size(size: tuple[int, int], longest: int = DISPLAY_SIDE) -> tuple[int, int]:
    """(H, W) scaled so the longer side is ``longest`` pixels (up or down), each side >= 1."""
    H, W = size
    scale = longest / max(H, W)
    return max(1, round(H * scale)), max(1, round(W * scale))


def attention_figure(image: ImageLike, words: Sequence[str], alphas: Tensor | np.ndarray, grid: tuple[int, int], *,
                     betas: Tensor | np.ndarray | Sequence[float] | None = None, title: str | None = None,
                     smooth: float = 0.0, interpolation: str = "bilinear", cmap: str = "jet",
                     opacity: float = 0.7, outline: bool = True, columns: int = 5,
                     panel_inches: float = 2.2, normalize: str = "caption",
                     origin: tuple[float, float] = (0.5, 0.5)) -> Figure:
    """One panel for the image, then one per word with its attention map over the image.

    The map of grid cell (r, c) is drawn over rows r*H/h .. (r+1)*H/h and columns
    c*W/w .. (c+1)*W/w of the ORIGINAL H x W image: the encoder stretched the whole image
    to a square without cropping, so the grid covers the whole original frame, whatever
    its aspect ratio. The axes' data coordinates are original-image pixels.

    Args:
        image: a PIL image (any mode) or a path.
        words: the N words to show (a caption's words, no specials).
        alphas: (N, L) or (N + 1, L) attention weights (a trailing ``<end>`` row is not drawn),
            L = h * w row-major, as in :class:`~captioner.model.CaptionResult`.
        grid: (h, w).
        betas: (N,) or (N + 1,) gate values, shown in the titles.
        title: the figure's title (default: the caption).
        smooth, interpolation, normalize, origin: see :func:`attention_maps` (default ``caption``:
            one colour scale for all the caption's maps). Each title also gives the map's peak over
            uniform attention (:func:`peakedness`), whatever the scale.
        cmap, opacity: see :func:`overlay`.
        outline: frame the cells that got any weight when that is not the whole grid
            (hard attention's chosen cell, local attention's window).
        columns: panels per row.
        panel_inches: width of a panel.

    Returns:
        A matplotlib Figure with 1 + N image axes (on an Agg canvas: ``fig.savefig(path)``).
    """
    picture = as_rgb(image)
    W, H = picture.size
    h, w = grid
    alphas = torch.as_tensor(alphas).detach().to("cpu", torch.float32)
    n = len(words)
    if alphas.ndim != 2 or alphas.shape[0] not in (n, n + 1):
        raise ValueError(f"alphas of shape {tuple(alphas.shape)} do not fit {n} words (need ({n} or {n + 1}, L))")
    gates = None if betas is None else [float(b) for b in list(betas)[:n]]
    Hd, Wd = display_size((H, W))
    shown = np.asarray(picture.resize((Wd, Hd), Image.BICUBIC))  # (Hd, Wd, 3), drawn over the original frame
    Hm, Wm = max(Hd, MIN_CELL_PIXELS * h), max(Wd, MIN_CELL_PIXELS * w)
    colours = overlay(attention_maps(alphas[:n], grid, (Hm, Wm), smooth=smooth, interpolation=interpolation,
                                     normalize=normalize, origin=origin), cmap=cmap, opacity=opacity)  # (N, Hm, Wm, 4)
    peaks = peakedness(alphas[:n])  # (N,)

    cols = max(1, min(columns, n + 1))
    rows = math.ceil((n + 1) / cols)
    aspect = min(max(H / W, 0.15), 3.0)  # panel height / width, bounded for extreme shapes
    fig = Figure(figsize=(cols * panel_inches, rows * (panel_inches * aspect + 0.5) + 0.4), layout="constrained")
    FigureCanvasAgg(fig)
    extent = (0, W, H, 0)  # (left, right, bottom, top) in original-image pixels
    for k in range(n + 1):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.set_axis_off()
        ax.imshow(shown, extent=extent, interpolation="antialiased")
        ax.set_xlim(0, W)
        ax.set_ylim(H, 0)
        if k == 0:
            ax.set_title(f"image {W}\u00d7{H}", fontsize=9)
            continue
        ax.imshow(colours[k - 1], extent=extent, interpolation="antialiased")
        box = support_box(alphas[k - 1], grid) if outline else None
        if box is not None:
            r0, c0, r1, c1 = box
            ax.add_patch(Rectangle((c0 * W / w, r0 * H / h), (c1 - c0 + 1) * W / w, (r1 - r0 + 1) * H / h,
                                   fill=False, edgecolor="white", linewidth=1.2))
        detail = f"peak {peaks[k - 1]:.1f}\u00d7 uniform"
        if gates is not None:
            detail = f"\u03b2 = {gates[k - 1]:.2f} \u00b7 " + detail
        label = f"{words[k - 1]}\n{detail}"
        ax.set_title(label, fontsize=10)
    fig.suptitle(title if title is not None else " ".join(words), fontsize=11)
    return fig


def result_figure(image: ImageLike, result: CaptionResult, **options) -> Figure:
    """:func:`attention_figure` for a :class:`~captioner.model.CaptionResult` (title: caption and log p)."""
    options.setdefault("title", f"{result.text}   (log p = {result.score:.2f})")
    return attention_figure(image, result.words, result.alphas, result.grid, betas=result.betas, **options)


# ----------------------------------------------------------------------------- captions to draw

@torch.no_grad()
def teacher_forced(model: Captioner, image: ImageLike, caption: str) -> CaptionResult:
    """The attention the model pays while reading a GIVEN caption (teacher forcing), e.g. a
    reference caption: ``model.decoder(features, captions).probs``, the distribution each word's
    location came from (for soft attention the weights used; for hard attention the location
    probabilities, whose argmax is the location used at test time), as ``Captioner.caption`` gives.

    Words outside the vocabulary are shown as ``<unk>`` (that is what the model read).

    Returns:
        A CaptionResult with alphas (len(words) + 1, L) (the last row: ``<end>``) and
        score = log p(caption | image).
    """
    words = tokenize(caption)
    if not words:
        raise CaptionerError(f"the caption {caption!r} has no words")
    was = model.training
    model.eval()
    pixels = model.encoder.transform()(as_rgb(image)).unsqueeze(0).to(model.device)  # (1, 3, S, S)
    ids = torch.tensor([model.vocab.encode(words)], device=model.device)  # (1, T+1): <start> words <end>
    out = model.decoder(model.encode(pixels), ids)
    log_probs = torch.log_softmax(out.logits[0].float(), dim=-1)  # (T, V)
    score = float(log_probs.gather(1, ids[0, 1:].unsqueeze(1)).sum())
    model.train(was)
    return CaptionResult(words=[w if w in model.vocab else UNK for w in words], alphas=out.probs[0].cpu(),
                         betas=out.betas[0].cpu(), grid=model.encoder.grid, score=score)


@dataclass
class Visualized:
    """One drawn image: the image file, what was drawn, and the PNG."""

    image: Path
    result: CaptionResult
    figure: Path


def _unique_names(paths: Sequence[Path]) -> list[str]:
    """File stems, with ``-2``, ``-3`` ... added to repeats."""
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        seen[path.stem] = seen.get(path.stem, 0) + 1
        names.append(path.stem if seen[path.stem] == 1 else f"{path.stem}-{seen[path.stem]}")
    return names


def visualize_images(model: Captioner, images: Sequence[str | Path], out_dir: str | Path, *,
                     beam_size: int | None = None, caption: str | None = None, max_len: int | None = None,
                     smooth: float = 0.0, normalize: str = "caption", dpi: int = 110, progress: bool = False,
                     on_bad_image: Callable[[Path, str], None] | None = None) -> list[Visualized]:
    """Caption each image (beam search, greedy for beam 1; or read the given ``caption``
    with teacher forcing) and write ``<out_dir>/<image stem>.png``.

    Args:
        beam_size, max_len: default to the checkpoint's ``decode`` section.
        caption: draw the attention for this caption instead of a generated one.
        smooth, normalize: see :func:`attention_maps`.
        on_bad_image: called with (path, reason) for each missing or unreadable image, which is
            then skipped; None: the first one raises :class:`CaptionerError` before anything is drawn.
    """
    if caption is not None and not tokenize(caption):
        raise CaptionerError(f"the caption {caption!r} has no words")
    paths = [Path(p) for p in images]
    missing = [p for p in paths if not p.is_file()]
    if missing and on_bad_image is None:
        raise CaptionerError(f"image not found: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = []
    for path, name in tqdm(list(zip(paths, _unique_names(paths))), desc="visualize", unit="img", disable=not progress):
        try:
            picture = load_image(path)
        except CaptionerError as err:
            if on_bad_image is None:
                raise
            on_bad_image(path, str(err).removeprefix(f"{path}: "))
            continue
        if caption is not None:
            result = teacher_forced(model, picture, caption)
        else:
            result = model.caption(picture, beam_size=beam_size, max_len=max_len)
        fig = result_figure(picture, result, smooth=smooth, normalize=normalize, origin=model.encoder.cell_origin)
        target = out / f"{name}.png"
        fig.savefig(target, dpi=dpi, bbox_inches="tight", pad_inches=0.08)
        done.append(Visualized(path, result, target))
    return done
