"""The command line: user mistakes give one line and exit code 2, never a traceback."""

import subprocess
import sys

import pytest

from captioner.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_unknown_config_key_suggests(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  epochz: 2\n")
    code, _, err = run(capsys, "train", str(cfg))
    assert_one_line_error(code, err, "train.epochz", "train.epochs")


def test_bad_override_and_missing_config(capsys, tmp_path):
    assert_one_line_error(*run(capsys, "train", str(tmp_path / "none.yaml"))[::2], "not found")
    code, _, err = run(capsys, "train", "configs/shapes_soft.yaml", "model.attention.name=sofft",
                       f"data.root={tmp_path}/never_made")
    assert_one_line_error(code, err, "sofft", "soft")  # checked before any data is read
    assert not (tmp_path / "never_made").exists()
    code, _, err = run(capsys, "train", "configs/shapes_soft.yaml", "model.encoder.backbone=resnet9",
                       f"data.root={tmp_path}/never_made")
    assert_one_line_error(code, err, "resnet9", "resnet18")


def test_missing_checkpoint_and_image(capsys, tmp_path):
    code, _, err = run(capsys, "caption", "x.png", "--checkpoint", str(tmp_path / "none.pt"))
    assert_one_line_error(code, err, "checkpoint not found", "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    code, _, err = run(capsys, "caption", "x.png", "--checkpoint", str(tmp_path / "junk.pt"))
    assert_one_line_error(code, err, "junk.pt")


@pytest.mark.slow
def test_train_then_caption_good_and_corrupt_images(capsys, tiny_config, shapes_root, tmp_path):
    from captioner.train import fit

    run_dir = fit(tiny_config("train.epochs=1"), quiet=True).run_dir
    ckpt = str(run_dir / "best.pt")
    image = sorted((shapes_root / "test").glob("*.png"))[0]
    code, out, _ = run(capsys, "caption", str(image), "--checkpoint", ckpt)
    assert code == 0 and out.startswith(f"{image}\t") and len(out.strip().split("\t")) == 2
    bad = tmp_path / "bad.png"
    bad.write_bytes(image.read_bytes()[:100])  # truncated PNG
    code, out, err = run(capsys, "caption", str(bad), "--checkpoint", ckpt)
    assert code == 1 and out == "" and "bad.png: truncated PNG" in err and "Traceback" not in err
    code, out, err = run(capsys, "caption", str(tmp_path / "nope.jpg"), "--checkpoint", ckpt)
    assert code == 1 and out == "" and "nope.jpg: no such file" in err


def test_data_shapes_command(capsys, tmp_path):
    code, out, _ = run(capsys, "data", "shapes", "--out", str(tmp_path / "s"), "--n", "6", "--seed", "1")
    assert code == 0 and "wrote 6 images" in out
    assert (tmp_path / "s" / "annotations" / "captions_train.json").is_file()
    code, _, err = run(capsys, "data", "shapes", "--out", str(tmp_path / "t"), "--n", "0")
    assert_one_line_error(code, err, "--n")


def test_console_script_help_and_exit_code(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "captioner.cli", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "train" in ok.stdout and "caption" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "captioner.cli", "train", str(tmp_path / "x.yaml")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_features_extract_command(capsys, shapes_root, tmp_path):
    from conftest import TINY_OVERRIDES

    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: c\n")
    code, out, _ = run(capsys, "features", "extract", str(cfg), *TINY_OVERRIDES, f"data.root={shapes_root}",
                       f"data.feature_cache={tmp_path}/cache")
    assert code == 0 and "written to" in out
    assert (tmp_path / "cache" / "manifest.json").is_file()
    code, _, err = run(capsys, "features", "extract", str(cfg), *TINY_OVERRIDES, f"data.root={shapes_root}",
                       "model.encoder.fine_tune=1", f"data.feature_cache={tmp_path}/cache2")
    assert_one_line_error(code, err, "fine_tune")
