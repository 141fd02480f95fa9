"""fit() behaviour a user meets: resuming more than once within an epoch, and skipped bad images.

Slow (each trains the tiny model for an epoch or two); ``tools/mutation.py train`` runs them.
"""

import json
import shutil

import pytest
import torch

from captioner.checkpoint import load_checkpoint
from captioner.train import fit

pytestmark = pytest.mark.slow

SMALL_BATCHES = ["train.batch_size=4", "train.epochs=1", "train.val_images=4", "decode.max_len=4"]


def test_stopped_twice_in_one_epoch_and_resumed_equals_uninterrupted(tiny_config, tmp_path):
    straight = fit(tiny_config(*SMALL_BATCHES, f"train.out_dir={tmp_path}/straight"), quiet=True)
    split = [*SMALL_BATCHES, f"train.out_dir={tmp_path}/split"]
    fit(tiny_config(*split, "train.max_steps=2"), quiet=True)
    second = fit(tiny_config(*split, "train.max_steps=5", "train.resume=auto"), quiet=True)
    trainer = load_checkpoint(second.run_dir / "last.pt")["trainer"]
    assert (trainer["epoch"], trainer["batch"], trainer["step"]) == (0, 5, 5)  # five batches into epoch 1
    done = fit(tiny_config(*split, "train.resume=auto"), quiet=True)
    a, b = load_checkpoint(straight.run_dir / "last.pt"), load_checkpoint(done.run_dir / "last.pt")
    assert a["trainer"]["step"] == b["trainer"]["step"] > 5
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_images_the_check_marks_bad_never_reach_training(shapes_root, tiny_config, tmp_path, capsys):
    """With data.bad_images=skip an unreadable training image is logged and left out; reading it in
    training would stop the run with a DataError."""
    root = tmp_path / "shapes"
    shutil.copytree(shapes_root, root)
    bad = sorted((root / "train").glob("*.png"))[3]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    cfg = tiny_config(*SMALL_BATCHES, f"data.root={root}", "data.bad_images=skip", "train.max_steps=3")
    result = fit(cfg)
    said = [line for line in capsys.readouterr().out.splitlines() if line.endswith("skipped (data.bad_images=skip)")]
    assert len(said) == 1 and said[0].startswith("train: 1 of ") and str(bad) in said[0]  # the user is told
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in records if r.get("split") == "train" and "skipped_images" in r]
    assert [p for p, _ in skipped[0]["skipped_images"]] == [str(bad)]
    assert load_checkpoint(result.run_dir / "last.pt")["trainer"]["step"] == 3


def test_a_run_resumed_after_a_mid_epoch_stop_remembers_the_best_score_of_that_stop(tiny_config, tmp_path):
    """The validation at a max_steps stop may write best.pt; last.pt must then carry that best
    score, or the resumed run would count any later score as better and overwrite best.pt."""
    stopped = fit(tiny_config(*SMALL_BATCHES, "train.max_steps=2"), quiet=True)
    last, best = load_checkpoint(stopped.run_dir / "last.pt"), load_checkpoint(stopped.run_dir / "best.pt")
    assert last["trainer"]["best_score"] == best["trainer"]["best_score"] == stopped.best_score >= 0
    assert (last["trainer"]["epoch"], last["trainer"]["batch"], last["trainer"]["step"]) == (0, 2, 2)
