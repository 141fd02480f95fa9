"""tools/compare_runs.py: two runs' metrics.jsonl side by side."""

import importlib.util
import json
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("compare_runs", Path(__file__).parent.parent / "tools" / "compare_runs.py")
compare_runs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_runs)


def write_run(folder: Path, xents: list[float]) -> Path:
    folder.mkdir()
    lines = [{"step": 5, "epoch": 1, "loss": 9.0, "xent": 9.0}]  # a step line: not an epoch's
    lines += [{"epoch": e, "train_xent": x, "val_cider": 1.0 + e / 10, "minutes": e / 2} for e, x in enumerate(xents, 1)]
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(row) for row in lines) + "\n")
    return folder


def test_the_table_lines_up_epochs_and_reports_the_largest_difference(tmp_path, capsys):
    a = write_run(tmp_path / "fp32", [2.0, 1.0, 0.5])
    b = write_run(tmp_path / "bf16", [2.02, 0.99])
    assert compare_runs.main([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert rows == ["| 1 | 2.0000 | 2.0200 | +1.00% | 1.100 | 1.100 | 0.5 | 0.5 |",
                    "| 2 | 1.0000 | 0.9900 | -1.00% | 1.200 | 1.200 | 1.0 | 1.0 |"]
    assert "| 3 " not in out  # epochs only one run has are left out
    assert "largest difference in training cross-entropy: 1.00% over 2 epochs" in out


def test_a_plot_is_written(tmp_path):
    a, b = write_run(tmp_path / "a", [2.0, 1.0]), write_run(tmp_path / "b", [2.0, 1.1])
    compare_runs.main([str(a), str(b), "--plot", str(tmp_path / "c.png")])
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_missing_or_broken_metrics_file_is_named(tmp_path):
    with pytest.raises(SystemExit, match="metrics.jsonl: not found"):
        compare_runs.main([str(tmp_path), str(tmp_path)])
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "train_xent": 1.0}\nnot json\n')
    with pytest.raises(SystemExit, match="line 2: not JSON"):
        compare_runs.main([str(tmp_path), str(tmp_path)])
