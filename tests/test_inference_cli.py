"""The inference commands as a user and a program meet them: bad images among good ones lose
nothing, results a program can read, devices, paths, overrides after flags, slim checkpoints,
and ``from captioner import Captioner`` with every input type it documents."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.cli import main
from captioner.errors import CaptionerError


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def trained(shapes_root, tmp_path_factory):
    """A tiny trained checkpoint, shared by this module's tests (read-only)."""
    from conftest import TINY_OVERRIDES

    from captioner.config import load_config
    from captioner.train import fit

    out = tmp_path_factory.mktemp("run")
    cfg = load_config(None, [*TINY_OVERRIDES, f"data.root={shapes_root}", f"train.out_dir={out}/run", "name=tiny",
                             "train.epochs=1"])
    return fit(cfg, quiet=True).run_dir / "best.pt"


@pytest.fixture
def images(shapes_root, tmp_path):
    """(good1, bad, good2, missing): two real test images around a truncated one, and a path that is not there."""
    good = sorted((shapes_root / "test").glob("*.png"))[:2]
    bad = tmp_path / "bad.png"
    bad.write_bytes(good[0].read_bytes()[:100])
    return good[0], bad, good[1], tmp_path / "missing.png"


# ----------------------------------------------------------------------------- bad images lose nothing

def test_caption_captions_every_readable_image_and_names_each_bad_one(capsys, trained, images):
    good1, bad, good2, missing = images
    code, out, err = run(capsys, "caption", good1, bad, good2, missing, "-c", trained)
    assert code == 1
    lines = out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(good1), str(good2)]
    assert all(len(line.split("\t")) == 2 and line.split("\t")[1] for line in lines)
    assert f"error: {bad}: truncated PNG" in err and f"error: {missing}: no such file" in err
    assert "2 of 4 images could not be read" in err and "Traceback" not in err


def test_caption_all_good_exits_0(capsys, trained, images):
    code, out, err = run(capsys, "caption", images[0], images[2], "-c", trained)
    assert code == 0 and len(out.strip().splitlines()) == 2 and err == ""


def test_visualize_and_report_skip_bad_images_and_exit_1(capsys, trained, images, tmp_path):
    good1, bad, good2, _ = images
    code, out, err = run(capsys, "visualize", good1, bad, good2, "-c", trained, "--out", tmp_path / "vis")
    assert code == 1 and f"{bad}: truncated PNG" in err
    assert sorted(p.name for p in (tmp_path / "vis").glob("*.png")) == sorted([good1.name, good2.name])
    code, out, err = run(capsys, "report", trained, "--images", good1, bad, good2, "--out", tmp_path / "rep")
    assert code == 1 and f"{bad}: truncated PNG" in err and "(2 images" in out
    page = (tmp_path / "rep" / "report.html").read_text()
    assert good1.name in page and good2.name in page and "bad.png" not in page


def test_evaluate_scores_the_readable_images_and_lists_the_bad_ones(capsys, trained, shapes_root, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(shapes_root, root)
    victim = sorted((root / "test").glob("*.png"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    code, out, err = run(capsys, "evaluate", trained, "--data-root", root, "--beam", "1", "--no-java",
                         "--out", tmp_path / "eval")
    assert code == 1 and f"{victim}: truncated PNG" in err
    metrics = json.loads((tmp_path / "eval" / "metrics_test.json").read_text())
    n_test = len(list((root / "test").glob("*.png")))
    assert metrics["images"] == n_test - 1
    assert metrics["skipped_images"] == [{"file": str(victim), "reason": metrics["skipped_images"][0]["reason"]}]
    ids = {c["image_id"] for c in json.loads((tmp_path / "eval" / "captions_test.json").read_text())}
    assert int(victim.stem) not in ids and len(ids) == n_test - 1


# ----------------------------------------------------------------------------- output a program can read

def test_caption_takes_folders_and_writes_coco_results(capsys, trained, shapes_root, tmp_path):
    folder = shapes_root / "test"
    out_file = tmp_path / "out" / "results.json"
    code, out, _ = run(capsys, "caption", folder, "-c", trained, "--out", out_file, "--beam", "1")
    assert code == 0
    results = json.loads(out_file.read_text())
    files = sorted(folder.glob("*.png"))
    assert [r["image_id"] for r in results] == [int(f.stem) for f in files]  # 002701.png -> 2701
    assert set(results[0]) == {"image_id", "caption"}
    printed = dict(line.split("\t") for line in out.strip().splitlines())
    assert [printed[str(f)] for f in files] == [r["caption"] for r in results]


def test_caption_jsonl_has_the_nbest_with_scores_best_first(capsys, trained, images, tmp_path):
    out_file = tmp_path / "nbest.jsonl"
    code, _, _ = run(capsys, "caption", images[0], images[2], "-c", trained, "--beam", "3", "--n-best", "3",
                     "--out", out_file)
    assert code == 0
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["file"] for r in rows] == [str(images[0]), str(images[2])]
    for row in rows:
        assert len(row["nbest"]) == 3 and row["caption"] == row["nbest"][0]["caption"]
        scores = [c["score"] for c in row["nbest"]]
        assert all(s <= 0 for s in scores) and row["score"] == scores[0]
    code, _, err = run(capsys, "caption", images[0], "-c", trained, "--beam", "2", "--n-best", "3")
    assert code == 2 and "--n-best 3" in err


def test_image_ids_fall_back_to_positions_when_names_have_no_distinct_numbers():
    from captioner.results import image_ids

    assert image_ids(["a/COCO_val2014_000000391895.jpg", "b/7.png"]) == [391895, 7]
    assert image_ids(["cat.jpg", "dog.jpg"]) == [1, 2]
    assert image_ids(["x/1.png", "y/1.png"]) == [1, 2]  # repeated numbers


# ----------------------------------------------------------------------------- Python API

def test_from_captioner_import_captioner_and_every_input_type(trained, images):
    from captioner import Captioner

    model = Captioner.from_checkpoint(trained)
    path = images[0]
    pil = Image.open(path).convert("RGB")
    array = np.array(pil)  # (H, W, 3) uint8
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255  # (3, H, W) in [0, 1]
    reference = model.caption(path, beam_size=1)
    for one in (str(path), pil, array, array.astype(np.float32) / 255, tensor, (tensor * 255).to(torch.uint8)):
        result = model.caption(one, beam_size=1)
        assert result.words == reference.words
        torch.testing.assert_close(result.alphas, reference.alphas, atol=2e-3, rtol=0)
    batch = model.caption(torch.stack([tensor, tensor]), beam_size=1)
    assert [r.words for r in batch] == [reference.words] * 2
    assert len(model.caption(np.stack([array, array]), beam_size=1)) == 2
    assert [r.words for r in model.caption([path, pil, tensor], beam_size=1)] == [reference.words] * 3


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(2, 8, 8), "1, 3 or 4 channels"),
    (np.zeros((8,)), "(H, W, C)"),
    (42, "cannot caption a int"),
])
def test_caption_rejects_what_is_not_an_image(trained, bad, message):
    from captioner import Captioner

    with pytest.raises(CaptionerError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Captioner.from_checkpoint(trained).caption(bad)


@pytest.mark.parametrize("kwargs", [{"beam_size": 0}, {"max_len": 0}, {"beam_size": -1}])
def test_caption_beam_size_zero_is_an_error_not_the_default(trained, images, kwargs):
    from captioner import Captioner

    with pytest.raises(CaptionerError, match="must be >= 1"):
        Captioner.from_checkpoint(trained).caption(images[0], **kwargs)


def test_python_dash_m_captioner_runs_the_cli(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    ok = subprocess.run([sys.executable, "-m", "captioner", "--help"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and "caption" in ok.stdout and "export" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "captioner", "caption", "x.png", "-c", str(tmp_path / "no.pt")],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("error: checkpoint not found")


# ----------------------------------------------------------------------------- devices

@pytest.mark.parametrize("command", ["caption", "visualize", "report", "evaluate"])
def test_device_defaults_to_auto(command):
    from captioner.cli import build_parser

    argv = {"caption": ["caption", "x.png", "-c", "m.pt"], "visualize": ["visualize", "x.png", "-c", "m.pt", "--out", "o"],
            "report": ["report", "m.pt", "--images", "x.png", "--out", "o"], "evaluate": ["evaluate", "m.pt"]}[command]
    assert build_parser().parse_args(argv).device == "auto"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu_is_one_line_exit_2(capsys, trained, images):
    code, out, err = run(capsys, "caption", images[0], "-c", trained, "--device", "cuda")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: --device cuda: no CUDA GPU is available") and "Traceback" not in err
    code, _, err = run(capsys, "caption", images[0], "-c", trained, "--device", "tpu9")
    assert code == 2 and "unknown device 'tpu9'" in err


# ----------------------------------------------------------------------------- paths, overrides, export

def test_train_accepts_overrides_after_flags(capsys, shapes_root, tmp_path, monkeypatch):
    import captioner.train

    seen = {}

    def fake_fit(cfg, quiet):
        seen["cfg"] = cfg
        raise KeyboardInterrupt  # stop before any training: only the parsed config matters here

    monkeypatch.setattr(captioner.train, "fit", fake_fit)
    code, _, _ = run(capsys, "train", "configs/shapes_soft.yaml", "--resume", "auto", "train.epochs=3",
                     "--quiet", "train.lr=0.01")
    assert code == 130
    cfg = seen["cfg"]
    assert (cfg.train.resume, cfg.train.epochs, cfg.train.lr) == ("auto", 3, 0.01)
    with pytest.raises(SystemExit) as info:  # argparse's usage error, as for any unknown flag
        run(capsys, "train", "configs/shapes_soft.yaml", "--resume", "auto", "--bogus")
    assert info.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_evaluate_names_data_root_when_the_data_moved(capsys, trained, tmp_path):
    from captioner.checkpoint import load_checkpoint, save_checkpoint

    data = load_checkpoint(trained)
    data["config"]["data"]["format"] = "coco"
    data["config"]["data"]["root"] = str(tmp_path / "gone")
    moved = tmp_path / "moved.pt"
    save_checkpoint(moved, {k: v for k, v in data.items() if k != "format_version"})
    code, _, err = run(capsys, "evaluate", moved, "--no-java")
    assert code == 2 and "--data-root" in err and str(tmp_path / "gone") in err


def test_export_writes_a_slim_checkpoint_that_captions_the_same(capsys, trained, images, tmp_path):
    from captioner import Captioner
    from captioner.checkpoint import load_checkpoint

    slim, last = tmp_path / "slim.pt", trained.parent / "last.pt"  # last.pt: everything a resume needs
    code, out, _ = run(capsys, "export", last, "--out", slim)
    assert code == 0 and "wrote" in out
    assert set(load_checkpoint(slim)) == {"format_version", "config", "vocab", "model"}
    assert "optimizer" in load_checkpoint(last)
    assert slim.stat().st_size < last.stat().st_size
    a = Captioner.from_checkpoint(last).caption(images[0], beam_size=1)
    b = Captioner.from_checkpoint(slim).caption(images[0], beam_size=1)
    assert a.words == b.words
    code, _, err = run(capsys, "export", trained, "--out", trained)
    assert code == 2 and "overwrite its source" in err


def test_visualize_warns_about_words_outside_the_vocabulary(capsys, trained, images, tmp_path):
    code, _, err = run(capsys, "visualize", images[0], "-c", trained, "--out", tmp_path / "v",
                       "--caption", "a zebra circle flamingo")
    assert code == 0
    assert "warning: not in the model's vocabulary, read as <unk>: flamingo, zebra" in err
