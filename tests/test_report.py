"""The HTML report: self-contained, n-best captions, and in a real headless browser hovering or
clicking a word draws that word's map over the right part of the image."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import select
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_visualize import one_hot, untrained_checkpoint

from captioner.cli import main
from captioner.model import Captioner, CaptionResult
from captioner.report import ReportImage, nbest_captions, render_report

GRID = (3, 5)
SIZE = (300, 150)  # (W, H): a wide image and a non-square grid
CELLS = [(0, 4), (2, 0), (1, 2)]  # where "left", "right" and <end> look


def synthetic_page(path: Path, origin: tuple[float, float] = (0.5, 0.5)) -> Path:
    """A report whose maps are one-hot at known cells, over a grey image."""
    best = CaptionResult(words=["left", "right"], alphas=one_hot(GRID, *CELLS), betas=torch.tensor([0.2, 0.4, 0.6]),
                         grid=GRID, score=-1.25)
    other = CaptionResult(words=["a"], alphas=torch.softmax(torch.randn(2, 15), 1), betas=torch.ones(2), grid=GRID,
                          score=-3.5)
    metrics = {"split": "test", "images": 2, "beam_size": 2, "scores": {"bleu4": 0.25, "cider": 1.5},
               "unavailable": {"meteor": "no Java"}, "attention_correctness": {"score": 0.5, "uniform": 0.1,
                                                                               "words": 7, "images": 2},
               "chair": {"chair_s": 0.25, "chair_i": 0.2, "relation_accuracy": float("nan"), "captions": 4,
                         "hallucinated_captions": 1, "mentions": 5, "hallucinated": 1, "relations": 0,
                         "relations_correct": 0}}
    item = ReportImage("grey.png", Image.new("RGB", SIZE, (128, 128, 128)), [best, other])
    path.write_text(render_report([item], metrics=metrics, info="synthetic", origin=origin), encoding="utf-8")
    return path


def test_page_is_self_contained_and_lists_the_n_best(tmp_path):
    page = synthetic_page(tmp_path / "report.html").read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page and "url(" not in page
    assert all(src.startswith("data:image/") for src in re.findall(r'src="([^"]*)"', page))
    assert page.count('class="caption"') == 2 and page.count('class="word') == 3 + 2  # words and <end>
    assert "CIDEr-D" in page and "150.0" in page and "attention correctness" in page
    assert "<th>CHAIR_s</th>" in page and "25.0 <small>(1 of 4)</small>" in page and "20.0 <small>(1 of 5)" in page
    assert "relations that hold" not in page  # none stated: no cell rather than nan
    payload = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.DOTALL).group(1)
    data = json.loads(payload)
    item = data["images"][0]
    assert item["grid"] == list(GRID) and item["size"] == list(SIZE) and len(data["cmap"]) == 256
    assert item["captions"][0]["boxes"][0] == [0, 4, 0, 4]  # a one-hot map outlines its cell


def test_nbest_captions_are_ranked_with_their_attention(tmp_path):
    model = Captioner.from_checkpoint(untrained_checkpoint(tmp_path / "tiny.pt"))
    images = [Image.new("RGB", (40, 30), (200, 40, 40)), Image.new("RGB", (20, 60), (40, 40, 200))]
    results = nbest_captions(model, images, beam_size=3, n_best=3, max_len=5)
    assert len(results) == 2 and all(len(r) == 3 for r in results)
    for captions in results:
        assert [c.score for c in captions] == sorted((c.score for c in captions), reverse=True)
        for c in captions:
            assert c.alphas.shape == (len(c.words) + 1, model.encoder.num_locations) and len(c.betas) == len(c.alphas)


# ----------------------------------------------------------------------------- the browser


def _above_4(fd: int) -> int:
    """Move a new pipe end above fd 4, so placing the child's fds 3 and 4 cannot clobber the other end."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 5)
    os.close(fd)
    return moved


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
    it reads commands on fd 3 and answers on fd 4, JSON messages ending in NUL). No driver needed."""

    def __init__(self, binary: str, profile: Path) -> None:
        commands, self._commands = (_above_4(fd) for fd in os.pipe())
        self._answers, answers = (_above_4(fd) for fd in os.pipe())
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"]
        quiet = [(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_WRONLY, 0) for fd in (1, 2)]
        self.pid = os.posix_spawn(binary, [binary, *flags], os.environ, file_actions=[
            (os.POSIX_SPAWN_DUP2, commands, 3), (os.POSIX_SPAWN_DUP2, answers, 4), *quiet])
        os.close(commands)
        os.close(answers)
        self._buffer, self._id, self.session = b"", 0, None

    def send(self, method: str, **params) -> dict:
        """Send one command (to the attached page, once there is one) and wait for its answer."""
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + 30
        while True:
            while b"\0" not in self._buffer:
                if not select.select([self._answers], [], [], max(0.0, deadline - time.monotonic()))[0]:
                    raise TimeoutError(f"chromium did not answer {method}")
                chunk = os.read(self._answers, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium exited")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]

    def open(self, url: str, width: int, height: int) -> None:
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        self.send("Page.navigate", url=url)
        deadline = time.monotonic() + 20
        while self.js(f"location.href === {json.dumps(url)} && document.readyState") != "complete":
            assert time.monotonic() < deadline, "the page did not load"
            time.sleep(0.05)

    def js(self, expression: str):
        answer = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in answer, answer["exceptionDetails"]
        return answer["result"].get("value")

    def mouse(self, kind: str, x: float, y: float) -> None:
        """``mouseMoved`` (hover), or a click as ``mousePressed`` then ``mouseReleased``."""
        for event in (["mousePressed", "mouseReleased"] if kind == "click" else [kind]):
            self.send("Input.dispatchMouseEvent", type=event, x=x, y=y, button="left", clickCount=1)

    def close(self) -> None:
        try:
            self.send("Browser.close")
        finally:
            deadline = time.monotonic() + 10
            while os.waitpid(self.pid, os.WNOHANG) == (0, 0):  # not exited yet
                if time.monotonic() > deadline:
                    os.kill(self.pid, signal.SIGKILL)
                time.sleep(0.05)
            os.close(self._commands)
            os.close(self._answers)


@pytest.fixture
def browser(tmp_path):
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("chromium is not installed (CI installs it: apt-get install chromium)")
    chrome = Chromium(binary, tmp_path / "profile")
    yield chrome
    chrome.close()


PEAK = """(() => {  // the canvas pixel with the most overlay opacity, as (x, y, width, height)
  const c = document.querySelector('.item canvas');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let best = -1, at = 0;
  for (let i = 3; i < d.length; i += 4) if (d[i] > best) { best = d[i]; at = (i - 3) / 4; }
  return [at % c.width + 0.5, Math.floor(at / c.width) + 0.5, c.width, c.height];
})()"""


CENTROID = """(() => {  // the overlay's opacity-weighted centre, outline box (white) left out, as (x, y, width, height)
  const c = document.querySelector('.item canvas');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let sx = 0, sy = 0, total = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (d[i] === 255 && d[i + 1] === 255 && d[i + 2] === 255) continue;
    const p = i / 4, a = d[i + 3];
    sx += a * (p % c.width + 0.5); sy += a * (Math.floor(p / c.width) + 0.5); total += a;
  }
  return [sx / total, sy / total, c.width, c.height];
})()"""


COVERED = """(() => {  // the share of canvas pixels the overlay colours visibly
  const c = document.querySelector('.item canvas');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 3; i < d.length; i += 4) n += d[i] > 25;
  return n / (c.width * c.height);
})()"""


def word_centre(browser: Chromium, caption: int, step: int) -> tuple[float, float]:
    r = browser.js(f"(() => {{ const r = document.querySelector('.word[data-caption=\"{caption}\"][data-step=\"{step}\"]')"
                   ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
    return r[0], r[1]


def peak_cell(browser: Chromium) -> tuple[int, int]:
    x, y, W, H = browser.js(PEAK)
    return int(y * GRID[0] / H), int(x * GRID[1] / W)


def test_hover_and_click_draw_the_word_map_in_a_real_browser(browser, tmp_path):
    page = synthetic_page(tmp_path / "report.html")
    browser.open(page.as_uri(), 1100, 700)
    shown = "document.querySelector('.view').dataset.shown"
    assert browser.js(shown) == ""
    same_box = ("(() => { const a = document.querySelector('.frame img').getBoundingClientRect(), "
                "b = document.querySelector('.frame canvas').getBoundingClientRect(); "
                "return [a.x, a.y, a.width, a.height]"
                ".every((v, i) => Math.abs(v - [b.x, b.y, b.width, b.height][i]) < 0.5); })()")
    assert browser.js(same_box), "the overlay canvas must cover exactly the image"
    assert browser.js("document.querySelector('.frame img').getBoundingClientRect().width / "
                      "document.querySelector('.frame img').getBoundingClientRect().height") == pytest.approx(2.0, rel=0.01)

    browser.mouse("mouseMoved", *word_centre(browser, 0, 0))  # hover "left"
    assert browser.js(shown) == "0:0" and peak_cell(browser) == CELLS[0]
    assert "\u03b2 = 0.20" in browser.js("document.querySelector('.now').textContent")

    browser.mouse("click", *word_centre(browser, 0, 1))  # click "right": pinned
    browser.mouse("mouseMoved", 5, 5)  # leave the captions: the pinned word stays
    assert browser.js(shown) == "0:1" and peak_cell(browser) == CELLS[1]

    browser.mouse("mouseMoved", *word_centre(browser, 0, 2))  # <end>
    assert browser.js(shown) == "0:2" and peak_cell(browser) == CELLS[2]

    browser.mouse("mouseMoved", 5, 5)  # back to the pinned word; then smooth it (Gaussian, 1 cell)
    sharp = browser.js(COVERED)
    browser.js("(() => { const s = document.getElementById('smooth'); s.value = 1; "
               "s.dispatchEvent(new Event('input')); })()")
    assert browser.js(COVERED) > 2 * sharp and peak_cell(browser) == CELLS[1]
    shot = tmp_path / "report.png"
    shot.write_bytes(base64.b64decode(browser.send("Page.captureScreenshot", format="png")["data"]))
    assert Image.open(shot).size == (1100, 700)
    print(f"screenshot: {shot}")


def test_a_cells_weight_is_drawn_where_its_feature_looks(browser, tmp_path):
    """With the receptive-field origin (0, 0) a one-hot cell's map is centred on its top-left
    corner, with the default (0.5, 0.5) on its centre; as captioner.visualize draws it."""
    peaks = {}
    for origin in ((0.5, 0.5), (0.0, 0.0)):
        page = synthetic_page(tmp_path / f"report-{origin[0]}.html", origin=origin)
        browser.open(page.as_uri(), 1100, 700)
        browser.mouse("mouseMoved", *word_centre(browser, 0, 2))  # <end>: cell (1, 2) of the 3 x 5 grid
        x, y, W, H = browser.js(CENTROID)
        peaks[origin] = (y * GRID[0] / H, x * GRID[1] / W)  # in cells
    assert peaks[(0.5, 0.5)] == (pytest.approx(1.5, abs=0.05), pytest.approx(2.5, abs=0.05))
    assert peaks[(0.0, 0.0)] == (pytest.approx(1.0, abs=0.05), pytest.approx(2.0, abs=0.05))


# ----------------------------------------------------------------------------- the command


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_report_with_metrics_and_folders(tmp_path, capsys, make_image):
    checkpoint = untrained_checkpoint(tmp_path / "tiny.pt")
    make_image(tmp_path / "imgs" / "a.png", (50, 30))
    Image.new("L", (20, 40), 90).save(tmp_path / "imgs" / "b.png")
    Image.new("RGBA", (30, 30), (0, 0, 255, 128)).save(tmp_path / "c.png")
    metrics = tmp_path / "metrics_test.json"
    metrics.write_text(json.dumps({"split": "test", "images": 3, "beam_size": 2, "scores": {"cider": 0.5}}))
    code, out, _ = run(capsys, "report", checkpoint, "--images", tmp_path / "imgs", tmp_path / "c.png",
                       "--out", tmp_path / "r", "--beam", 2, "--metrics", metrics)
    page = (tmp_path / "r" / "report.html").read_text(encoding="utf-8")
    assert code == 0 and "wrote" in out and page.count('class="item"') == 3 and page.count('class="caption"') == 6
    assert "CIDEr-D" in page and "50.0" in page


@pytest.mark.parametrize("problem", ["missing image", "bad checkpoint", "bad metrics", "n-best over beam"])
def test_cli_report_errors_are_one_line(problem, tmp_path, capsys, make_image):
    image = make_image(tmp_path / "ok.png")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "metrics.json").write_text("{not json")
    good = untrained_checkpoint(tmp_path / "tiny.pt") if problem != "bad checkpoint" else None
    argv, fragment = {
        "missing image": ([good, "--images", tmp_path / "nope.png", image], "nope.png"),
        "bad checkpoint": ([tmp_path / "junk.pt", "--images", image], "junk.pt"),
        "bad metrics": ([good, "--images", image, "--metrics", tmp_path / "metrics.json"], "metrics.json"),
        "n-best over beam": ([good, "--images", image, "--beam", 2, "--n-best", 3], "n-best"),
    }[problem]
    code, _, err = run(capsys, "report", *argv, "--out", tmp_path / "r")
    if problem == "missing image":  # named; the readable image is still reported; exit 1 at the end
        assert code == 1 and err.startswith(f"error: {tmp_path / 'nope.png'}: no such file")
        assert len([line for line in err.splitlines() if line.startswith("error: ")]) == 2 and "\r" not in err
        assert "ok.png" in (tmp_path / "r" / "report.html").read_text()
        return
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and fragment in err, err
    assert not (tmp_path / "r" / "report.html").exists()
