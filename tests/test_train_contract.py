"""train.py where a user meets it: the data order, the optimizer and scheduler a config
builds, which checkpoints are written when and where a resume starts, what metrics.jsonl
and the progress lines say, the budgets, the non-finite policy, clipping and the gradient
scaler, early stopping and the learning-rate schedule.

The helpers are tested directly (fast). The runs train the tiny model for a few batches;
where a test needs validation scores it controls, a Trainer subclass returns them from
``validate`` (the documented extension point), so the epoch-end logic runs without decoding.
"""

from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace

import pytest
import torch

import captioner.train as train_module
from captioner.checkpoint import load_checkpoint, save_checkpoint
from captioner.config import TrainConfig, replace
from captioner.data.records import Caption, ImageRecord
from captioner.distributed import Dist
from captioner.errors import CaptionerError, CheckpointError, ConfigError
from captioner.model import Captioner
from captioner.train import (
    Trainer,
    TrainingError,
    Validation,
    _Log,
    _rng_state,
    _set_rng_state,
    _trainer_state,
    build_optimizer,
    build_scheduler,
    epoch_order,
    images_per_batch,
    most_common_caption,
)
from captioner.vocab import Vocabulary

# 32 train images x 5 captions = 160 captions: batches of 32 make 5 steps an epoch
FIVE_STEPS = ["train.batch_size=32", "train.val_images=2", "decode.max_len=4", "train.log_every=1000"]


def lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def position(path):
    tr = load_checkpoint(path)["trainer"]
    return tr["epoch"], tr["batch"], tr["step"]


def scripted(scores):
    """A Trainer whose validations score ``scores[0]``, ``scores[1]``, ... (CIDEr-D, BLEU-4), after
    decoding the val images as a real validation does (the model in eval mode)."""

    class Scripted(Trainer):
        def validate(self):
            super().validate()
            value = scores.pop(0)
            return Validation({"cider": value, "bleu4": value / 2}, {r.image_id: "a shape" for r in self.val_records})

    return Scripted


# ----------------------------------------------------------------------------- helpers


def test_epoch_order_is_a_function_of_seed_and_epoch_and_skips_whole_batches():
    t = TrainConfig(seed=7, batch_size=4)
    full = epoch_order(20, t, 3)
    assert sorted(full) == list(range(20))
    assert epoch_order(20, t, 3) == full
    assert epoch_order(20, t, 4) != full and epoch_order(20, replace(t, seed=8), 3) != full
    assert epoch_order(20, t, 3, 2) == full[8:]  # two batches of train.batch_size=4 already seen
    assert epoch_order(20, t, 3, 2, batch_size=3) == full[6:]  # two batches of 3 images
    # A run's order is part of its record: a mid-epoch checkpoint of an earlier version resumes
    # on the batches it would have seen (these are the orders runs have always had).
    assert epoch_order(10, replace(t, seed=1), 0) == [6, 1, 3, 7, 4, 8, 0, 5, 2, 9]
    assert epoch_order(10, replace(t, seed=1), 2) == [0, 9, 1, 6, 2, 3, 5, 8, 4, 7]
    assert epoch_order(10, replace(t, seed=0), 1) == [5, 6, 1, 2, 0, 8, 9, 3, 7, 4]


def test_images_per_batch_keeps_about_batch_size_captions_and_at_least_one_image():
    assert images_per_batch(TrainConfig(batch_size=16, captions_per_image=5)) == 3
    assert images_per_batch(TrainConfig(batch_size=10, captions_per_image=2)) == 5
    assert images_per_batch(TrainConfig(batch_size=4, captions_per_image=5)) == 1


def test_the_baseline_caption_is_the_most_frequent_tokenized_training_caption(tmp_path):
    def record(i, *texts):
        return ImageRecord(i, tmp_path / f"{i}.png", tuple(Caption(t) for t in texts), "train")

    records = [record(0, "A dog runs.", "a cat"), record(1, "a dog  RUNS", "a bird"), record(2, "a cat sits")]
    assert most_common_caption(records) == ["a", "dog", "runs"]


def test_resume_state_is_checked_and_old_checkpoints_resume_at_the_epoch_start():
    def ckpt(**trainer):
        return {"optimizer": {}, "loss": {}, "trainer": {"epoch": 2, "step": 9, "best_score": 0.5, "bad_epochs": 1,
                                                         "history": [], "rng": {}, **trainer}}

    assert _trainer_state(ckpt(), "old.pt")["batch"] == 0  # saved at an epoch end, before batch positions
    assert _trainer_state(ckpt(batch=3), "new.pt")["batch"] == 3
    assert _trainer_state(ckpt(), "x.pt")["epoch"] == 2
    for key in ("epoch", "step", "best_score", "bad_epochs", "history", "rng"):
        broken = ckpt()
        del broken["trainer"][key]
        with pytest.raises(CheckpointError, match=f"x.pt: cannot resume from this checkpoint.*\\({key} missing"):
            _trainer_state(broken, "x.pt")
    with pytest.raises(CheckpointError, match=r"\(epoch, step, best_score, bad_epochs, history, rng missing"):
        _trainer_state({"optimizer": {}, "loss": {}, "model": {}}, "x.pt")
    for part in ("optimizer", "loss"):
        broken = ckpt()
        del broken[part]
        with pytest.raises(CheckpointError, match=r"\(optimizer/loss missing"):
            _trainer_state(broken, "x.pt")


def test_the_saved_random_state_restores_torch_and_python_draws():
    state = _rng_state()
    first = torch.rand(3), random.random()
    torch.manual_seed(123)
    random.seed(123)
    _set_rng_state(state)
    second = torch.rand(3), random.random()
    assert torch.equal(first[0], second[0]) and first[1] == second[1]


def test_the_log_prints_unless_quiet_and_writes_json_lines_and_the_board_only_when_asked(tmp_path, capsys):
    class Board:
        def __init__(self):
            self.entries = []

        def record(self, entry):
            self.entries.append(entry)

    board = Board()
    log = _Log(tmp_path / "metrics.jsonl", quiet=False, board=board)
    log.say("hello there")
    log.record({"step": 1})
    log.record({"step": 2, "loss": 0.5})
    assert "hello there" in capsys.readouterr().out
    assert lines(tmp_path) == board.entries == [{"step": 1}, {"step": 2, "loss": 0.5}]

    other = Board()
    silent = _Log(tmp_path / "rank1" / "metrics.jsonl", quiet=True, write=False, board=other)
    silent.say("not shown")
    silent.record({"step": 3})
    assert capsys.readouterr().out == "" and other.entries == [] and not (tmp_path / "rank1").exists()


def test_the_optimizer_trains_the_decoder_at_lr_and_a_fine_tuned_encoder_at_encoder_lr(tiny_config):
    cfg = tiny_config("model.encoder.fine_tune=1", "train.lr=0.01", "train.encoder_lr=0.001")
    model = Captioner.from_config(cfg, Vocabulary.build(["a red square"]), load_weights=False)
    encoder = [p for p in model.encoder.parameters() if p.requires_grad]
    assert encoder and any(not p.requires_grad for p in model.encoder.parameters())  # fine_tune=1: part of it
    decoder = [p for n, p in model.named_parameters() if not n.startswith("encoder.")]
    opt = build_optimizer(cfg, model)
    first, second = opt.param_groups
    assert [id(p) for p in first["params"]] == [id(p) for p in decoder] and first["lr"] == 0.01
    assert [id(p) for p in second["params"]] == [id(p) for p in encoder] and second["lr"] == 0.001

    frozen = Captioner.from_config(tiny_config(), Vocabulary.build(["a red square"]), load_weights=False)
    assert len(build_optimizer(tiny_config(), frozen).param_groups) == 1  # nothing of the encoder trains

    # train.context_lr: the grid context and the layout read-out at their own rate, after the rest
    geometry = tiny_config("model.encoder.context_layers=1", "train.layout_weight=1", "train.lr=0.01",
                           "train.context_lr=0.05")
    model = Captioner.from_config(geometry, Vocabulary.build(["a red square"]), load_weights=False)
    rest, apart = build_optimizer(geometry, model).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)].split(".")[0] for p in apart["params"]} == {"context", "layout"} and apart["lr"] == 0.05
    assert not {names[id(p)].split(".")[0] for p in rest["params"]} & {"context", "layout"} and rest["lr"] == 0.01
    assert len(rest["params"]) + len(apart["params"]) == len([p for p in model.parameters() if p.requires_grad])
    assert len(build_optimizer(replace(geometry, train=replace(geometry.train, context_lr=None)), model)
               .param_groups) == 1
    with pytest.raises(ConfigError, match="train.context_lr must be > 0"):
        tiny_config("train.context_lr=0")

    for name, kind in [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("rmsprop", torch.optim.RMSprop),
                       ("sgd", torch.optim.SGD)]:
        opt = build_optimizer(tiny_config(f"train.optimizer={name}"), frozen)
        assert type(opt) is kind, name
        if name != "rmsprop":  # the fused kernel on the CPU (torch has none for RMSprop)
            assert opt.defaults["fused"] is True, name


def test_the_scheduler_a_config_names():
    def sched(**train):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return opt, build_scheduler(SimpleNamespace(train=TrainConfig(**train)), opt)

    _, plateau = sched(scheduler="plateau", lr_decay=0.5, lr_patience=3)
    assert isinstance(plateau, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert (plateau.mode, plateau.factor, plateau.patience) == ("max", 0.5, 3)  # higher val scores are better
    opt, cosine = sched(scheduler="cosine", epochs=4)
    lrs = []
    for _ in range(4):
        opt.step()
        cosine.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12) and lrs[1] == pytest.approx(0.5)  # over train.epochs
    for patience, every in [(0, 1), (1, 1), (3, 3)]:  # step: decay every lr_patience epochs (at least 1)
        opt, step = sched(scheduler="step", lr_decay=0.5, lr_patience=patience)
        seen = []
        for _ in range(6):
            opt.step()
            step.step()
            seen.append(opt.param_groups[0]["lr"])
        assert seen == [0.5 ** ((k + 1) // every) for k in range(6)], patience
    assert sched(scheduler="none")[1] is None
    opt, linear = sched(scheduler="linear", lr_final=0.1)  # the Trainer sets the share of the budget spent
    seen = []
    for spent in (0.0, 0.5, 1.0, 1.5, -1.0):
        linear.set(spent)
        seen.append(opt.param_groups[0]["lr"])
    assert seen == pytest.approx([1.0, 0.55, 0.1, 0.1, 1.0])
    linear.set(0.25)
    linear.step()  # an epoch's end moves nothing
    assert opt.param_groups[0]["lr"] == pytest.approx(0.775)
    other, again = sched(scheduler="linear", lr_final=0.1)
    again.load_state_dict(linear.state_dict())  # a resume: the same rate, and the same start to fall from
    assert other.param_groups[0]["lr"] == pytest.approx(0.775) and again.base == [1.0]


# ----------------------------------------------------------------------------- setup


def test_rank_zero_writes_the_run_folder_and_other_ranks_write_and_say_nothing(tiny_config, tmp_path, monkeypatch,
                                                                                capsys):
    run = tmp_path / "deep" / "er" / "run"
    run.mkdir(parents=True)
    (run / "last.pt.x1y2.tmp").write_bytes(b"half")  # a write a killed run left
    trainer = Trainer(tiny_config(f"train.out_dir={run}"))
    trainer.setup_process()
    assert (run / "config.yaml").is_file() and not (run / "last.pt.x1y2.tmp").exists()
    assert not (run / "tensorboard").exists()  # train.tensorboard is off
    assert "removed last.pt.x1y2.tmp: a checkpoint write that a killed run left unfinished" in capsys.readouterr().out
    again = Trainer(tiny_config(f"train.out_dir={run}", "train.seed=5"), quiet=True)
    again.setup_process()  # the folder may exist
    drawn = torch.rand(2), random.random()  # train.seed seeds torch and Python
    torch.manual_seed(5)
    random.seed(5)
    assert torch.equal(drawn[0], torch.rand(2)) and drawn[1] == random.random()
    quiet = Trainer(tiny_config(f"train.out_dir={run}"), quiet=True)
    quiet.setup_process()
    quiet.log.say("shh")
    assert capsys.readouterr().out == ""

    fresh = tmp_path / "new" / "nested" / "run"
    Trainer(tiny_config(f"train.out_dir={fresh}"), quiet=True).setup_process()
    assert (fresh / "config.yaml").is_file()  # the run folder and its parents are made

    # a misspelt name fails at once, before any data is read or a run folder is made
    never = tmp_path / "never"
    with pytest.raises(ConfigError, match="sofft"):
        Trainer(tiny_config("model.attention.name=sofft", f"data.root={tmp_path}/no-data",
                            f"train.out_dir={never}"), quiet=True).setup()
    assert not never.exists()

    # under torchrun: rank 1 of 2, on a machine with GPUs
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(train_module, "init_distributed", lambda device: Dist(rank=1, world=2, local_rank=1))
    other = tmp_path / "rank1"
    rank1 = Trainer(tiny_config(f"train.out_dir={other}", "train.tensorboard=true", "train.device=auto"))
    rank1.setup_process()
    assert rank1.device == torch.device("cuda", 1)  # each process its local rank's GPU
    rank1.log.say("from rank 1")
    rank1.log.record({"step": 1})
    assert not other.exists() and capsys.readouterr().out == ""
    on_cpu = Trainer(tiny_config(f"train.out_dir={other}", "train.device=cpu"))
    on_cpu.setup_process()
    assert on_cpu.device == torch.device("cpu")  # train.device=cpu keeps every rank on the CPU


@pytest.mark.slow
def test_progress_output_only_with_train_progress_and_not_quiet(tiny_config, capsys, monkeypatch):
    monkeypatch.setenv("CAPTIONER_PROGRESS", "lines")
    for progress, quiet, shown in [(True, False, True), (False, False, False), (True, True, False)]:
        trainer = Trainer(tiny_config(f"train.progress={str(progress).lower()}", *FIVE_STEPS, "train.epochs=1",
                                      "train.max_steps=2"), quiet=quiet)
        trainer.run()
        err = capsys.readouterr().err
        assert ("epoch 1/1" in err) == shown, (progress, quiet, err)
        assert "" not in err.splitlines()  # whole progress lines, no blank ones between them


@pytest.mark.slow
def test_setup_reports_the_run_and_picks_what_a_sample_is(tiny_config, tmp_path, capsys):
    trainer = Trainer(tiny_config("train.batch_size=16"))
    trainer.setup()
    out = capsys.readouterr().out
    assert (trainer.epoch, trainer.step, trainer.bad_epochs, trainer.skipped) == (0, 0, 0, 0)
    assert trainer.cached and not trainer.per_image and trainer.n_batches == 10  # 160 captions / 16
    assert not trainer.scaler.is_enabled()  # a gradient scaler only with fp16
    vocab = json.loads((trainer.run_dir / "vocab.json").read_text())
    assert Vocabulary.from_dict(vocab) == trainer.vocab
    assert f"run {trainer.run_dir}: 32 train / 4 val images, {len(trainer.vocab)} words" in out
    assert "batches of 16 captions: each image encoded once per run" in out
    assert f"baseline (\"{trainer.baseline_caption}\" for every image): val cider" in out
    scores = trainer.score_captions({r.image_id: "a red square" for r in trainer.val_records})
    assert {"bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider", "chair_s", "chair_i"} <= set(scores)
    assert "meteor" not in scores and "spice" not in scores  # validation is pure Python, no Java
    before = _rng_state()
    trainer.validate()  # draws nothing from the global RNGs: a checkpoint taken after it resumes exactly
    after = _rng_state()
    assert torch.equal(before["torch"], after["torch"]) and before["python"] == after["python"]

    pixels = Trainer(tiny_config("train.batch_size=16", "train.cache_features=false", "train.captions_per_image=0",
                                 f"train.out_dir={tmp_path}/pixels"))
    pixels.setup()
    assert not pixels.cached and not pixels.per_image and pixels.n_batches == 10
    assert "each image encoded once per caption (train.captions_per_image=0)" in capsys.readouterr().out

    images = Trainer(tiny_config("train.batch_size=16", "train.cache_features=false", "train.captions_per_image=1",
                                 f"train.out_dir={tmp_path}/images"))
    images.setup()
    assert images.per_image and images.batch_size == 16 and images.n_batches == 2  # 32 images / 16
    assert "batches of 16 images x up to 1 captions (32 captions per epoch)" in capsys.readouterr().out

    tuned = Trainer(tiny_config("model.encoder.fine_tune=1", f"train.out_dir={tmp_path}/tuned"), quiet=True)
    tuned.setup()
    assert not tuned.cached and tuned.per_image and tuned.train_feats is None

    with pytest.raises(CaptionerError, match="train.amp=fp16 needs a CUDA GPU"):
        Trainer(tiny_config("train.amp=fp16", f"train.out_dir={tmp_path}/fp16"), quiet=True).setup()


@pytest.mark.slow
def test_features_come_from_the_on_disk_cache_when_it_holds_this_encoder(tiny_config, tmp_path, capsys):
    from captioner.data import load_split
    from captioner.data.cache import extract

    first = Trainer(tiny_config("train.val_images=2"), quiet=True)
    first.setup()
    folder = tmp_path / "features"
    extract(first.model.encoder, first.train_records, folder, split="train")
    extract(first.model.encoder, load_split(first.cfg.data, "val"), folder, split="val")
    second = Trainer(tiny_config("train.val_images=2", f"data.feature_cache={folder}",
                                 f"train.out_dir={tmp_path}/second"))
    second.setup()
    assert f"features from the cache {folder}" in capsys.readouterr().out
    assert torch.allclose(second.val_feats.float(), first.val_feats.float(), atol=1e-2)
    assert len(second.val_feats) == 2

    partial = tmp_path / "train-only"  # a cache of one split is not used: both are encoded now
    extract(first.model.encoder, first.train_records, partial, split="train")
    third = Trainer(tiny_config("train.val_images=2", f"data.feature_cache={partial}",
                                f"train.out_dir={tmp_path}/third"))
    third.setup()
    assert "features from the cache" not in capsys.readouterr().out
    assert torch.allclose(third.val_feats, first.val_feats) and len(third.train_feats) == 32


@pytest.mark.slow
def test_init_from_starts_from_the_weights_only_and_only_on_a_fresh_run(tiny_config, tmp_path, capsys):
    source = Trainer(tiny_config(*FIVE_STEPS, "train.epochs=1", "train.max_steps=2",
                                 f"train.out_dir={tmp_path}/source"), quiet=True).run()
    weights = load_checkpoint(source.run_dir / "last.pt")["model"]
    start = tmp_path / "start" / "last.pt"
    init = Trainer(tiny_config(*FIVE_STEPS, f"train.init_from={source.run_dir / 'last.pt'}",
                               f"train.out_dir={tmp_path}/start"))
    init.setup()
    assert f"model weights from {source.run_dir / 'last.pt'} (train.init_from)" in capsys.readouterr().out
    for key, value in init.model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    assert init.step == 0 and init.opt.state_dict()["state"] == {}

    # the started run's own last.pt, resumed with init_from still set: the resume wins
    init.t = replace(init.t, max_steps=1)
    init.train()
    own = load_checkpoint(start)["model"]
    again = Trainer(tiny_config(*FIVE_STEPS, f"train.init_from={tmp_path / 'source' / 'last.pt'}",
                                f"train.out_dir={tmp_path}/start", "train.resume=auto"), quiet=True)
    again.setup()
    for key, value in again.model.state_dict().items():
        assert torch.equal(value, own[key]), key

    other = load_checkpoint(source.run_dir / "last.pt")
    other["vocab"] = Vocabulary.build(["zebra"]).to_dict()
    save_checkpoint(tmp_path / "zebra.pt", other)
    with pytest.raises(CheckpointError, match="zebra.pt: train.init_from: the checkpoint's vocabulary differs"):
        Trainer(tiny_config(*FIVE_STEPS, f"train.init_from={tmp_path / 'zebra.pt'}",
                            f"train.out_dir={tmp_path}/zebra"), quiet=True).setup()


# ----------------------------------------------------------------------------- train


@pytest.mark.slow
def test_a_run_writes_checkpoints_metrics_and_steps_where_the_config_says(tiny_config, monkeypatch, capsys):
    """Two epochs of five steps, checkpoint_every=2, log_every=2, a step scheduler halving
    the learning rate every epoch, a clock advancing 6 s a step."""
    clock = [1000.0]
    monkeypatch.setattr(train_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    saved, losses, modes = [], [], []

    class Recording(scripted([0.2, 0.1])):
        def compute_loss(self, batch):
            loss = super().compute_loss(batch)
            modes.append(self.model.training)
            losses.append((self.epoch, loss.total.item()))
            clock[0] += 6.0
            return loss

        def save_checkpoint(self, name, epoch, batch):
            saved.append((name, epoch, batch, self.step))
            super().save_checkpoint(name, epoch, batch)

    cfg = tiny_config(*FIVE_STEPS, "train.epochs=2", "train.log_every=2", "train.checkpoint_every=2",
                      "train.scheduler=step", "train.lr_patience=1", "train.lr_decay=0.5", "train.lr=0.004",
                      "model.decoder.dropout=0.3", "train.patience=0")
    result = Recording(cfg).run()
    out = capsys.readouterr().out
    assert (result.epochs, result.best_score) == (2, 0.2)
    assert all(modes) and len(modes) == 10  # training mode (dropout on) in every step, after validations too
    assert saved == [("last.pt", 0, 2, 2), ("last.pt", 0, 4, 4), ("last.pt", 1, 0, 5), ("best.pt", 1, 0, 5),
                     ("last.pt", 1, 1, 6), ("last.pt", 1, 3, 8), ("last.pt", 2, 0, 10)]
    assert position(result.run_dir / "last.pt") == (2, 0, 10) and position(result.run_dir / "best.pt") == (1, 0, 5)

    records = lines(result.run_dir)
    steps = [r for r in records if "loss" in r]
    assert [(r["step"], r["epoch"], r["lr"]) for r in steps] == [
        (2, 1, 0.004), (4, 1, 0.004), (6, 2, 0.002), (8, 2, 0.002), (10, 2, 0.002)]
    assert [r["loss"] for r in steps] == [losses[k - 1][1] for k in (2, 4, 6, 8, 10)]
    epochs = [r for r in records if "val_cider" in r]
    assert epochs == result.history
    for entry, number in zip(epochs, (1, 2)):
        mine = [value for epoch, value in losses if epoch == number - 1]
        assert entry["epoch"] == number and entry["step"] == 5 * number
        assert entry["train_loss"] == pytest.approx(sum(mine) / 5, rel=1e-12)
        assert 0 < entry["train_xent"] <= entry["train_loss"] + 1e-9
        assert entry["minutes"] == pytest.approx(number * 5 * 6 / 60)
        assert entry["baseline_cider"] == result.baseline_score
    assert [e["lr"] for e in epochs] == [0.002, 0.001]  # halved after each epoch
    assert [e["val_cider"] for e in epochs] == [0.2, 0.1] and epochs[0]["example"] == "a shape"
    assert "epoch 1: loss" in out and "val cider 0.2000  BLEU-4 0.1000 (best)" in out
    assert "val cider 0.1000  BLEU-4 0.0500  e.g." in out  # epoch 2: not the best
    assert f"done: best val cider 0.2000 (baseline {result.baseline_score:.4f}); checkpoint" in out


@pytest.mark.slow
def test_linear_decay_spends_the_rate_over_the_budget_that_ends_the_run_first(tiny_config, tmp_path, monkeypatch):
    """train.scheduler=linear, lr 0.004 to 0: over two epochs of five steps; over max_steps=4;
    over max_minutes=0.5 with a clock advancing 6 s a step (five steps' worth)."""
    clock = [1000.0]
    monkeypatch.setattr(train_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))

    def rates(name, *overrides):
        class Ticking(scripted([0.2, 0.1])):
            def compute_loss(self, batch):
                clock[0] += 6.0
                return super().compute_loss(batch)

        cfg = tiny_config(*FIVE_STEPS, "train.epochs=2", "train.log_every=1", "train.scheduler=linear",
                          "train.lr=0.004", "train.patience=0", f"train.out_dir={tmp_path}/{name}", *overrides)
        return [r["lr"] for r in lines(Ticking(cfg).run().run_dir) if "loss" in r]  # each step's own rate

    assert rates("epochs") == pytest.approx([0.004 * (1 - k / 10) for k in range(10)])
    assert rates("steps", "train.max_steps=4") == pytest.approx([0.004 * (1 - k / 4) for k in range(4)])
    # a step sets its rate when the clock reads 6 s for each step before it; the limit stops the
    # run after the first step that ends past 30 s (the sixth, at rate 0)
    assert rates("minutes", "train.max_minutes=0.5") == pytest.approx([0.004 * (1 - k / 5) for k in range(6)])
    # lr_final: the floor, a fraction of the rate
    assert rates("floor", "train.lr_final=0.5")[-1] == pytest.approx(0.004 * (1 - 0.5 * 9 / 10))


@pytest.mark.slow
def test_a_linear_run_killed_and_resumed_ends_as_the_straight_one(tiny_config, tmp_path):
    """Killed in step 8 of 10, resumed from the epoch-end last.pt: the same rates and weights."""
    common = [*FIVE_STEPS, "train.epochs=2", "train.scheduler=linear", "model.decoder.dropout=0.3"]
    straight = Trainer(tiny_config(*common, f"train.out_dir={tmp_path}/straight"), quiet=True).run()

    class Killed(Trainer):
        def compute_loss(self, batch):
            if self.step == 7:
                raise KeyboardInterrupt
            return super().compute_loss(batch)

    with pytest.raises(KeyboardInterrupt):
        Killed(tiny_config(*common, f"train.out_dir={tmp_path}/split"), quiet=True).run()
    resumed = Trainer(tiny_config(*common, f"train.out_dir={tmp_path}/split", "train.resume=auto"), quiet=True).run()
    a, b = load_checkpoint(straight.run_dir / "last.pt"), load_checkpoint(resumed.run_dir / "last.pt")
    assert a["scheduler"] == b["scheduler"] and a["scheduler"]["spent"] == pytest.approx(0.9)
    assert [e["lr"] for e in resumed.history] == [e["lr"] for e in straight.history]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_a_resume_whose_optimizer_groups_changed_says_so(tiny_config, tmp_path):
    common = [*FIVE_STEPS, "model.encoder.context_layers=1", f"train.out_dir={tmp_path}/run"]
    Trainer(tiny_config(*common, "train.max_steps=1"), quiet=True).run()
    with pytest.raises(CheckpointError, match=r"last\.pt: its optimizer state does not fit .*train\.context_lr"):
        Trainer(tiny_config(*common, "train.context_lr=0.01", "train.resume=auto"), quiet=True).run()


@pytest.mark.slow
def test_patience_stops_after_epochs_without_a_better_score_and_plateau_decays_the_lr(tiny_config, capsys):
    """One step an epoch; validation scores 0.3, 0.5, 0.5 (not better), 0.4: the second bad epoch
    stops the run; ReduceLROnPlateau (patience 0) halves the lr after each bad epoch."""
    losses = []

    class OneStep(scripted([0.3, 0.5, 0.5, 0.4, 0.9, 0.9])):
        def compute_loss(self, batch):
            loss = super().compute_loss(batch)
            losses.append(loss.total.item())
            return loss

    cfg = tiny_config("train.batch_size=256", "train.val_images=2", "train.epochs=6", "train.patience=2",
                      "train.scheduler=plateau", "train.lr_patience=0", "train.lr_decay=0.5", "train.lr=0.004")
    result = OneStep(cfg).run()
    out = capsys.readouterr().out
    assert result.epochs == 4 and result.best_score == 0.5 and len(result.history) == 4
    assert [e["lr"] for e in result.history] == [0.004, 0.004, 0.002, 0.001]
    assert [e["train_loss"] for e in result.history] == losses  # the one step's loss
    assert position(result.run_dir / "best.pt") == (2, 0, 2) and position(result.run_dir / "last.pt") == (4, 0, 4)
    assert load_checkpoint(result.run_dir / "last.pt")["trainer"]["bad_epochs"] == 2
    assert "stopping early: no better val cider for 2 epochs" in out
    assert out.count("(best)") == 2


@pytest.mark.slow
def test_max_steps_stops_mid_epoch_and_resumes_there_until_the_run_ends(tiny_config, tmp_path, capsys):
    common = [*FIVE_STEPS, "train.epochs=2", f"train.out_dir={tmp_path}/run"]
    stopped = scripted([0.4])(tiny_config(*common, "train.max_steps=3")).run()
    assert position(stopped.run_dir / "last.pt") == (0, 3, 3) and position(stopped.run_dir / "best.pt") == (0, 3, 3)
    assert (stopped.epochs, stopped.best_score, stopped.history) == (1, 0.4, [])
    assert "stopping in epoch 1 at step 3 (train.max_minutes=0.0, train.max_steps=3); val cider 0.4000" in (
        capsys.readouterr().out)

    # the same score again: not better, best.pt stays where it was
    again = scripted([0.4])(tiny_config(*common, "train.max_steps=4", "train.resume=auto")).run()
    assert f"resumed from {again.run_dir / 'last.pt'} at epoch 1, batch 3, step 3" in capsys.readouterr().out
    assert position(again.run_dir / "last.pt") == (0, 4, 4) and position(again.run_dir / "best.pt") == (0, 3, 3)

    # max_steps at the epoch's last step: the epoch ends normally, validated, and the run stops
    ends = scripted([0.3])(tiny_config(*common, "train.max_steps=5", "train.resume=auto")).run()
    assert position(ends.run_dir / "last.pt") == (1, 0, 5) and len(ends.history) == 1 and ends.epochs == 1
    assert ends.best_score == 0.4 and position(ends.run_dir / "best.pt") == (0, 3, 3)

    done = scripted([0.6])(tiny_config(*common, "train.resume=auto")).run()
    assert position(done.run_dir / "last.pt") == (2, 0, 10) and done.epochs == 2
    assert [e["epoch"] for e in done.history] == [1, 2] and position(done.run_dir / "best.pt") == (2, 0, 10)


@pytest.mark.slow
def test_resumed_at_an_epoch_end_the_schedule_and_dropout_go_on_as_uninterrupted(tiny_config, tmp_path, capsys):
    common = [*FIVE_STEPS, "train.epochs=3", "train.scheduler=step", "train.lr_patience=2", "train.lr_decay=0.5",
              "model.decoder.dropout=0.3", "model.attention.name=hard"]  # hard: the REINFORCE baseline too
    straight = Trainer(tiny_config(*common, f"train.out_dir={tmp_path}/straight"), quiet=True).run()
    Trainer(tiny_config(*common, f"train.out_dir={tmp_path}/split", "train.max_steps=5"), quiet=True).run()
    resumed = Trainer(tiny_config(*common, f"train.out_dir={tmp_path}/split", "train.resume=auto")).run()
    assert "at epoch 2, batch 0, step 5" in capsys.readouterr().out
    assert [e["lr"] for e in resumed.history] == [e["lr"] for e in straight.history] == [0.003, 0.0015, 0.0015]
    a, b = load_checkpoint(straight.run_dir / "last.pt"), load_checkpoint(resumed.run_dir / "last.pt")
    for part in ("model", "loss"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)

    # a run started without a scheduler can go on with one
    Trainer(tiny_config(*FIVE_STEPS, "train.scheduler=none", "train.max_steps=1", f"train.out_dir={tmp_path}/none"),
            quiet=True).run()
    later = Trainer(tiny_config(*FIVE_STEPS, "train.scheduler=step", "train.max_steps=2", "train.resume=auto",
                                f"train.out_dir={tmp_path}/none"), quiet=True).run()
    assert position(later.run_dir / "last.pt") == (0, 2, 2)


@pytest.mark.slow
def test_images_with_more_captions_than_a_batch_takes_show_other_captions_each_epoch(tiny_config):
    """cache_features=false, captions_per_image=2: each epoch draws another 2 of an image's 5 captions."""
    seen = []

    class Watch(scripted([0.1, 0.1])):
        def compute_loss(self, batch):
            seen.append((self.epoch, [tuple(c.tolist()) for c in batch.captions]))
            return super().compute_loss(batch)

    result = Watch(tiny_config("train.cache_features=false", "train.captions_per_image=2", "train.batch_size=64",
                               "train.val_images=2", "decode.max_len=4", "train.epochs=2"), quiet=True).run()
    assert result.epochs == 2 and [epoch for epoch, _ in seen] == [0, 1]  # one batch of 32 images an epoch
    first, second = (set(captions) for _, captions in seen)
    assert len(seen[0][1]) == len(seen[1][1]) == 64 and first != second


@pytest.mark.slow
def test_max_minutes_stops_at_the_first_step_past_the_limit(tiny_config, monkeypatch):
    """train.max_minutes=2: a clock at 60, 120, 121, 122, 123 s after the start when steps end
    stops the run after the third step, the first past 120 s."""
    clock = [5000.0]
    ticks = iter([60.0, 60.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    monkeypatch.setattr(train_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))

    class Clocked(scripted([0.1])):
        def compute_loss(self, batch):
            clock[0] += next(ticks)
            return super().compute_loss(batch)

    result = Clocked(tiny_config(*FIVE_STEPS, "train.epochs=1", "train.max_minutes=2"), quiet=True).run()
    assert position(result.run_dir / "last.pt") == (0, 3, 3)


@pytest.mark.slow
def test_non_finite_losses_are_skipped_counted_and_logged_up_to_max_skipped(tiny_config, tmp_path, capsys):
    def poisoned(bad_calls):
        calls = []

        class Poisoned(scripted([0.1])):
            def compute_loss(self, batch):
                loss = super().compute_loss(batch)
                calls.append(len(calls))
                if calls[-1] in bad_calls:
                    loss.total = loss.total * float("nan")
                return loss

        return Poisoned

    skip = [*FIVE_STEPS, "train.epochs=1", "train.nonfinite=skip", "train.max_skipped=2"]
    result = poisoned({1, 3})(tiny_config(*skip, f"train.out_dir={tmp_path}/skip")).run()
    assert position(result.run_dir / "last.pt") == (1, 0, 3)  # five batches, three steps
    skipped = [r for r in lines(result.run_dir) if "skipped_nonfinite" in r]
    assert skipped == [{"step": 1, "epoch": 1, "batch": 2, "skipped_nonfinite": 1},
                       {"step": 2, "epoch": 1, "batch": 4, "skipped_nonfinite": 2}]
    assert math.isfinite(result.history[0]["train_loss"])
    out = capsys.readouterr().out
    assert "skipped a batch with a non-finite loss at step 2 (epoch 1, batch 2) (1 so far)" in out

    with pytest.raises(TrainingError, match=r"3 batches had a non-finite loss \(more than train.max_skipped=2\)"):
        poisoned({0, 1, 2})(tiny_config(*skip, f"train.out_dir={tmp_path}/many"), quiet=True).run()
    with pytest.raises(TrainingError, match=r"the loss became nan at step 2 \(epoch 1, batch 2\); the last good"):
        poisoned({1})(tiny_config(*FIVE_STEPS, f"train.out_dir={tmp_path}/stop"), quiet=True).run()


@pytest.mark.slow
def test_gradients_are_unscaled_then_clipped_to_grad_clip(tiny_config, tmp_path):
    """Plain SGD at lr 1: each step moves the parameters by exactly the clipped gradient's
    norm, grad_clip; with a gradient scaler (as fp16 uses) too, the scale undone before clipping."""
    def step_sizes(*overrides, scaler=None):
        snapshots = []

        class Snap(scripted([0.1])):
            def compute_loss(self, batch):
                snapshots.append([p.detach().clone() for p in self.model.parameters() if p.requires_grad])
                return super().compute_loss(batch)

        cfg = tiny_config(*FIVE_STEPS, "train.optimizer=sgd", "train.momentum=0", "train.lr=1.0",
                          "train.scheduler=none", "train.max_steps=2", f"train.out_dir={tmp_path}/{len(overrides)}"
                          f"{scaler is not None}", *overrides)
        trainer = Snap(cfg, quiet=True)
        trainer.setup()
        if scaler is not None:
            trainer.scaler = scaler
        trainer.train()
        snapshots.append([p.detach().clone() for p in trainer.model.parameters() if p.requires_grad])
        return [math.sqrt(sum(float((b - a).pow(2).sum()) for a, b in zip(x, y)))
                for x, y in zip(snapshots, snapshots[1:])]

    assert step_sizes("train.grad_clip=0.01") == pytest.approx([0.01, 0.01], rel=1e-4)
    scaled = step_sizes("train.grad_clip=0.01", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    assert scaled == pytest.approx([0.01, 0.01], rel=1e-4)
    unclipped = step_sizes("train.grad_clip=0")
    assert min(unclipped) > 0.05  # no clipping: the whole gradient


@pytest.mark.slow
def test_without_amp_the_step_runs_in_float32(tiny_config, monkeypatch):
    """train.amp=none: the training step enters no autocast (on the CPU it would run in bf16)."""
    seen = []
    real = torch.autocast

    def recording(device_type, dtype=None, enabled=True, **kw):
        seen.append(enabled)
        return real(device_type, dtype=dtype, enabled=enabled, **kw)

    monkeypatch.setattr(torch, "autocast", recording)
    scripted([0.1])(tiny_config(*FIVE_STEPS, "train.epochs=1", "train.max_steps=2"), quiet=True).run()
    assert seen and not any(seen)


# ----------------------------------------------------------------------------- cleanup, TensorBoard


def test_cleanup_of_a_distributed_run_logs_the_ranks_difference_and_ends_the_group(tiny_config, tmp_path, monkeypatch,
                                                                                   capsys):
    class Board:
        closed = False

        def record(self, entry):
            pass

        def close(self):
            self.closed = True

    ended = []
    monkeypatch.setattr(train_module, "max_parameter_difference", lambda model, ddp: 2.5e-7)
    monkeypatch.setattr(train_module, "finish", lambda ddp: ended.append(ddp.world))
    trainer = Trainer(tiny_config())
    trainer.ddp, trainer.model, trainer.run_dir = Dist(rank=0, world=2), None, tmp_path
    trainer.log = _Log(tmp_path / "metrics.jsonl", quiet=False, board=Board())
    trainer.best, trainer.baseline = 0.75, {"cider": 0.125}
    trainer.cleanup()
    assert lines(tmp_path) == [{"ddp_world_size": 2, "ddp_max_parameter_difference": 2.5e-7}]
    assert ended == [2] and trainer.log.board.closed
    out = capsys.readouterr().out
    assert "2 processes; largest parameter difference between ranks: 2.5e-07" in out
    assert f"done: best val cider 0.7500 (baseline 0.1250); checkpoint {tmp_path / 'best.pt'}" in out


@pytest.mark.slow
def test_tensorboard_gets_every_metrics_line_and_the_greedy_attention_figures(tiny_config, monkeypatch):
    import captioner.visualize

    class Board:
        def __init__(self, log_dir):
            self.entries, self.figures, self.closed = [], [], False

        def record(self, entry):
            self.entries.append(entry)

        def figure(self, tag, figure, step):
            self.figures.append((tag, figure, step))

        def close(self):
            self.closed = True

    shown = []
    monkeypatch.setattr(train_module, "Board", Board)
    monkeypatch.setattr(captioner.visualize, "result_figure", lambda path, result: shown.append(result) or "figure")
    trainer = Trainer(tiny_config(*FIVE_STEPS, "train.epochs=1", "train.tensorboard=true", "train.log_every=2"),
                      quiet=True)
    trainer.run()
    board = trainer.log.board
    assert board.entries == lines(trainer.run_dir) and board.closed
    assert [(tag, step) for tag, _, step in board.figures] == [
        (f"attention/{r.path.name}", 5) for r in trainer.val_records[:2]]
    val = trainer.validate()
    assert [" ".join(r.words) for r in shown] == [val.captions[r.image_id] for r in trainer.val_records[:2]]
