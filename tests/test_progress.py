"""Progress output off a terminal: whole lines at each quarter, never frames joined by \\r."""

from __future__ import annotations

import io

import pytest

from captioner.progress import tqdm


@pytest.fixture(autouse=True)
def _no_forcing(monkeypatch):
    monkeypatch.delenv("CAPTIONER_PROGRESS", raising=False)


def test_off_a_terminal_a_loop_writes_four_lines_at_the_quarters():
    out = io.StringIO()
    for _ in tqdm(range(1000), desc="epoch 1/3", file=out):
        pass
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [line.split(" (")[0] for line in lines] == ["epoch 1/3: 250/1000", "epoch 1/3: 500/1000",
                                                       "epoch 1/3: 750/1000", "epoch 1/3: 1000/1000"]
    assert lines[-1].split("(")[1].startswith("100%)")


def test_a_loop_cut_short_and_one_of_unknown_length_end_with_one_line_each():
    out = io.StringIO()
    bar = tqdm(total=10, desc="decode", file=out)
    bar.update(3)
    bar.close()
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[0]]
    assert out.getvalue().startswith("decode: 3/10 (30%)")
    out = io.StringIO()
    for _ in tqdm(iter(range(7)), desc="read", file=out):
        pass
    assert out.getvalue().count("\n") == 1 and out.getvalue().startswith("read: 7 [")


def test_disabled_bars_write_nothing_and_bars_can_be_forced(monkeypatch):
    out = io.StringIO()
    for _ in tqdm(range(10), file=out, disable=True):
        pass
    assert out.getvalue() == ""
    monkeypatch.setenv("CAPTIONER_PROGRESS", "bars")
    out = io.StringIO()
    for _ in tqdm(range(10), file=out, mininterval=0):
        pass
    assert "\r" in out.getvalue()  # tqdm's own in-place redraws


def test_no_module_draws_tqdm_bars_directly():
    """Every progress bar in the package goes through captioner.progress (line mode off a terminal)."""
    import pathlib
    import re

    package = pathlib.Path(__file__).resolve().parents[1] / "captioner"
    direct = [str(p.relative_to(package)) for p in package.rglob("*.py")
              if p.name != "progress.py" and re.search(r"^\s*(from tqdm|import tqdm)", p.read_text(), re.M)]
    assert direct == []
