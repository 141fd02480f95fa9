"""The training loop: fit, validate by real decoding, checkpoint, resume, stop early.

``fit(cfg)`` is the whole job behind ``captioner train``: it builds a :class:`Trainer` and
runs its phases, each a method short enough to read alone (torchtune's recipes, minGPT's
``Trainer``)::

    setup()            process (seed, ranks, device, run folder, log) -> records and
                       vocabulary -> model, loss, optimizer, scheduler, restored state ->
                       features -> batches -> validation references and baseline -> step
    train()            for each epoch: train_epoch() -> end_epoch() (validate, schedule,
                       log, checkpoint, stop early) or stop_mid_epoch() on a time/step limit
      train_step()     one optimizer step: compute_loss(), the non-finite policy, backward
      validate()       greedy decoding of the val images, scored by score_captions()
      save_checkpoint  last.pt / best.pt: everything an exact resume needs
    cleanup()          ranks agree, the process group ends

With a frozen encoder (the paper's setting) each image is encoded once, before the first
epoch, and the epochs run on the stored features. When pixels go through the encoder in the
training step (a fine-tuned encoder, or ``train.cache_features: false``) a batch is made of
images, each with up to ``train.captions_per_image`` of its captions, so each image is
encoded once per epoch, not once per caption.

Validation decodes greedily (no teacher forcing) with the evaluation's own code and scores
BLEU-1..4, ROUGE-L and CIDEr-D (pure Python, no Java), and with an instances file CHAIR,
relation accuracy and ``grounded`` (CIDEr-D times the share of captions with nothing false);
``train.val_metric`` (CIDEr-D by default) picks the best checkpoint, ``best.pt``, and drives
early stopping; the latest is ``last.pt``; metrics go to ``metrics.jsonl``, one JSON object a
line.

To extend: a new validation score goes into :meth:`Trainer.score_captions` (every key it
returns is logged as ``val_<key>`` and ``baseline_<key>``); a new training objective
overrides :meth:`Trainer.compute_loss` (batch -> :class:`~captioner.losses.LossOutput`).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from dataclasses import replace as with_fields
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from captioner.augment import Mirror, pixel_dims
from captioner.board import Board
from captioner.chair import ChairScorer
from captioner.checkpoint import load_checkpoint, remove_stale_temporaries, save_checkpoint, slim
from captioner.config import Config, TrainConfig, config_to_dict, replace, save_config
from captioner.data import instances_file, load_split
from captioner.data.cache import default_cache_dir, open_cache
from captioner.data.dataset import CaptionBatch, CaptionDataset, ImageCaptionsDataset, collate_captions, collate_image_captions
from captioner.data.images import check_images
from captioner.data.records import ImageRecord
from captioner.device import hold_freed_memory, resolve_amp, resolve_device
from captioner.distributed import finish, init_distributed, max_parameter_difference, shard, wrap
from captioner.ema import WeightAverage, averaged
from captioner.errors import CaptionerError, CheckpointError, ConfigError
from captioner.evaluate import decode_records, encode_records, references
from captioner.grounding import training_targets
from captioner.layout import layout_targets
from captioner.losses import CaptionLoss, LossOutput
from captioner.metrics import caption_metrics
from captioner.model import Captioner, check_names
from captioner.precision import DTYPES
from captioner.progress import tqdm
from captioner.registry import Registry
from captioner.vocab import Vocabulary, tokenize


class TrainingError(CaptionerError):
    """Training cannot go on (a non-finite loss, say)."""


@dataclass
class FitResult:
    """What a run produced."""

    run_dir: Path
    metric: str
    best_score: float
    baseline_score: float
    epochs: int
    history: list[dict] = field(default_factory=list)


def portable_config(cfg: Config) -> dict:
    """The config as a checkpoint stores it: ``data.root`` and ``data.feature_cache`` as
    absolute paths, so ``evaluate`` and the figures find the data from any folder."""
    data = cfg.data
    absolute = {"root": str(Path(data.root).resolve())}
    if data.feature_cache:
        absolute["feature_cache"] = str(Path(data.feature_cache).resolve())
    return config_to_dict(replace(cfg, data=replace(data, **absolute)))


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.train.out_dir.format(name=cfg.name))


# ----------------------------------------------------------------------------- helpers


def most_common_caption(records: Sequence[ImageRecord]) -> list[str]:
    """The baseline caption: the most frequent training caption (after tokenization)."""
    counts = Counter(" ".join(tokenize(c.text)) for r in records for c in r.captions)
    return counts.most_common(1)[0][0].split()


GEOMETRY_PARAMETERS = ("context.", "layout.")  # the grid context and the layout read-out: train.context_lr


def build_optimizer(cfg: Config, model: Captioner) -> torch.optim.Optimizer:
    t = cfg.train
    own = [(n, p) for n, p in model.named_parameters() if not n.startswith("encoder.") and p.requires_grad]
    apart = GEOMETRY_PARAMETERS if t.context_lr is not None else ()  # their own rate, train.context_lr
    groups = [{"params": [p for n, p in own if not n.startswith(apart)], "lr": t.lr}]
    encoder_params = [p for p in model.encoder.parameters() if p.requires_grad]
    if encoder_params:
        groups.append({"params": encoder_params, "lr": t.encoder_lr})
    geometry = [p for n, p in own if n.startswith(apart)]  # none when apart is ()
    if geometry:
        groups.append({"params": geometry, "lr": t.context_lr})
    # One fused kernel over all parameters where torch has it: ~5x faster than the default
    # Adam on a 2-core CPU for the paper's decoder (benchmarks/bench.py), the same update.
    fused = {"fused": True} if model.device.type in ("cpu", "cuda") else {}
    if t.optimizer == "adam":
        return torch.optim.Adam(groups, weight_decay=t.weight_decay, **fused)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, weight_decay=t.weight_decay, **fused)
    if t.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, momentum=t.momentum, weight_decay=t.weight_decay)
    return torch.optim.SGD(groups, momentum=t.momentum, weight_decay=t.weight_decay, **fused)


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all ``grads`` together (``torch.nn.utils.get_total_norm``'s value). Float32
    CPU gradients: the square root of the sum of each one's dot product with itself, the dots
    summed in float64. PyTorch's CPU ``vector_norm`` took 6.9 ms over the bench decoder's 80 MB
    of gradients where the dots take 1.5 (2 threads, an AMX Xeon), and it is the less exact of
    the two: over 5 M values it was 1.3e-4 off the float64 norm, the dots 2e-6. An inf or NaN
    gradient gives an inf or NaN norm, as PyTorch's does (its norm squares without scaling too:
    values past ~1e19 give inf either way). Other gradients: PyTorch's norm."""
    if grads and all(g.device.type == "cpu" and g.dtype == torch.float32 and g.is_contiguous() for g in grads):
        squares = torch.stack([torch.dot(g.view(-1), g.view(-1)) for g in grads]).double().sum()
        return squares.sqrt().float()
    return torch.nn.utils.get_total_norm(grads)


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` with the norm from :func:`total_norm`, and without its
    pass over every gradient when nothing is clipped. It multiplies each gradient by
    min(1, max_norm / (norm + 1e-6)) at every step, a factor of 1 included (on a GPU that
    spares a host sync); on a CPU the multiply by 1 is a pass over every gradient (4.6 ms of a
    bench training step) that changes no bit, so it is skipped there. Returns the total norm."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    total = total_norm([p.grad for p in params])
    if total.device.type != "cpu" or bool(max_norm / (total + 1e-6) < 1.0):  # torch's factor, before its clamp at 1
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


class BudgetDecay:
    """``train.scheduler: linear``: the learning rates fall linearly, step by step, from their
    starting values to ``final`` times those as the run spends its budget (the Trainer says
    how much: :meth:`Trainer.budget_spent`). A run cut short by a time budget so ends on
    small steps, not on the largest; Li et al. (ICLR 2020, "Budgeted training") find linear
    decay to the end of the budget the best schedule at every budget they tried."""

    def __init__(self, opt: torch.optim.Optimizer, final: float) -> None:
        self.opt, self.final = opt, final
        self.base = [group["lr"] for group in opt.param_groups]
        self.spent = 0.0

    def set(self, spent: float) -> None:
        """The rates for a run that has spent this fraction of its budget (clipped to [0, 1])."""
        self.spent = min(max(spent, 0.0), 1.0)
        scale = 1.0 - (1.0 - self.final) * self.spent
        for group, lr in zip(self.opt.param_groups, self.base):
            group["lr"] = lr * scale

    def step(self) -> None:
        """At an epoch's end: nothing (the rates move with every optimizer step)."""

    def state_dict(self) -> dict:
        return {"base": list(self.base), "spent": self.spent}

    def load_state_dict(self, state: dict) -> None:
        self.base = [float(lr) for lr in state["base"]]
        self.set(float(state["spent"]))


def build_scheduler(cfg: Config, opt: torch.optim.Optimizer):
    t = cfg.train
    if t.scheduler == "linear":
        return BudgetDecay(opt, t.lr_final)
    if t.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=t.lr_decay, patience=t.lr_patience)
    if t.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t.epochs)
    if t.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, t.lr_patience), gamma=t.lr_decay)
    return None


def epoch_order(n: int, t: TrainConfig, epoch: int, first_batch: int = 0, *,
                batch_size: int | None = None) -> list[int]:
    """The shuffled sample order of ``epoch``: a function of (seed, epoch) alone, so a run
    resumed mid-epoch sees the same batches; the first ``first_batch`` batches of
    ``batch_size`` samples (default ``t.batch_size``; images when batches are made of images)
    are left out."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(t.seed * 100_003 + epoch))
    return order[first_batch * (batch_size or t.batch_size):].tolist()


def images_per_batch(t: TrainConfig) -> int:
    """Images in a global batch made of images with up to ``t.captions_per_image`` captions
    each: about ``t.batch_size`` captions in all."""
    return max(1, t.batch_size // t.captions_per_image)


def _trainer_state(ckpt: dict, source: str) -> dict:
    """The checkpoint's training position, checked: a checkpoint saved for inference only (or
    by another tool) cannot be resumed, and says so."""
    tr = ckpt.get("trainer")
    needed = ("epoch", "step", "best_score", "bad_epochs", "history", "rng")
    missing = [k for k in needed if not isinstance(tr, dict) or k not in tr]
    if missing or "optimizer" not in ckpt or "loss" not in ckpt:
        raise CheckpointError(f"{source}: cannot resume from this checkpoint: it has no training state "
                              f"({', '.join(missing) or 'optimizer/loss'} missing: best.pt and exports hold weights only); "
                              "resume from the run's last.pt, or start a new run")
    return {"batch": 0, **tr}  # epoch-end checkpoints of earlier versions have no batch position


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


class _Log:
    """Writes progress lines (through tqdm) and metrics as JSON lines (``write``: rank 0 only)."""

    def __init__(self, path: Path, quiet: bool, write: bool = True, board: Board | None = None) -> None:
        self.path, self.quiet, self.write, self.board = path, quiet, write, board

    def say(self, msg: str) -> None:
        if not self.quiet:
            tqdm.write(msg)

    def record(self, entry: dict) -> None:
        if not self.write:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        if self.board is not None:
            self.board.record(entry)


# ----------------------------------------------------------------------------- the trainer


@dataclass
class Validation:
    """One validation pass: ``scores`` by metric name, ``captions`` by image id."""

    scores: dict[str, float]
    captions: dict[int, str]


class Trainer:
    """Training as named phases, with the run's state on the object.

    ``Trainer(cfg).run()`` is ``setup()``, ``train()``, ``cleanup()``. Position and record
    (``epoch``, ``step``, ``best``, ``bad_epochs``, ``history``) are attributes, saved into
    every checkpoint by :meth:`state` and restored from one by :meth:`restore`.

    Args:
        cfg: the whole run's configuration.
        quiet: no progress lines (the metrics file is written all the same).
    """

    def __init__(self, cfg: Config, *, quiet: bool = False) -> None:
        self.cfg, self.t, self.quiet = cfg, cfg.train, quiet
        self.metric = cfg.train.val_metric
        self.start_epoch, self.start_batch = 0, 0  # where this process starts (a resume moves it)
        self.epoch, self.step, self.best, self.bad_epochs = 0, 0, -1.0, 0
        self.history: list[dict] = []
        self.skipped = 0  # batches skipped for a non-finite loss (train.nonfinite=skip)

    def run(self) -> FitResult:
        """The whole job: :meth:`setup`, :meth:`train`, :meth:`cleanup`."""
        self.setup()
        result = self.train()
        self.cleanup()
        return result

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Everything before the first step, in an order that keeps resume exact."""
        self.setup_process()
        self.setup_records()
        ckpt = self.load_resume()
        self.setup_model()
        if ckpt is not None:
            self.restore(ckpt)
        self.setup_average(ckpt)
        n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.log.say(f"run {self.run_dir}: {len(self.train_records)} train / {len(self.val_records)} val images, "
                     f"{len(self.vocab)} words, grid {self.model.encoder.grid}, {n_params / 1e6:.2f}M trainable "
                     f"parameters, {self.device}")
        self.setup_features()
        self.setup_mirror()
        self.setup_batches()
        self.setup_layout()
        self.setup_validation()
        self.setup_step()

    def setup_process(self) -> None:
        """Seeds, ranks, device, the run folder (rank 0 writes) and the log."""
        t = self.t
        check_names(self.cfg)
        self.ddp = ddp = init_distributed(t.device)  # rank 0 of 1 unless launched by torchrun
        torch.manual_seed(t.seed)  # the same on every rank: the same initial weights
        random.seed(t.seed)
        hold_freed_memory()  # no fresh pages for the step's large tensors (captioner.device)
        use_rank_gpu = ddp.enabled and t.device != "cpu" and torch.cuda.is_available()
        self.device = torch.device("cuda", ddp.local_rank) if use_rank_gpu else resolve_device(t.device, key="train.device")
        self.run_dir = run_dir_of(self.cfg)
        if ddp.is_main:  # only rank 0 writes: config, logs, checkpoints
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
        board = Board(self.run_dir / "tensorboard") if t.tensorboard and ddp.is_main else None
        self.log = _Log(self.run_dir / "metrics.jsonl", self.quiet or not ddp.is_main, write=ddp.is_main, board=board)
        if ddp.is_main:
            for stale in remove_stale_temporaries(self.run_dir):
                self.log.say(f"removed {stale.name}: a checkpoint write that a killed run left unfinished")
        self.progress = t.progress and not self.quiet and ddp.is_main

    def setup_records(self) -> None:
        """The train and val records (unreadable images stop the run or are skipped) and the vocabulary."""
        cfg = self.cfg
        train = load_split(cfg.data, "train", progress=self.progress)
        val = load_split(cfg.data, "val")
        if self.t.val_images:
            val = val[: self.t.val_images]
        self.train_records = self._readable(train, "train")
        self.val_records = self._readable(val, "val")
        self.vocab = Vocabulary.build((c.text for r in self.train_records for c in r.captions),
                                      min_count=cfg.vocab.min_count, max_size=cfg.vocab.max_size)

    def _readable(self, records: list[ImageRecord], split: str) -> list[ImageRecord]:
        """A fast pre-check: unreadable images stop the run now, or are skipped and logged."""
        found = check_images(records, policy=self.cfg.data.bad_images, workers=self.cfg.data.num_workers,
                             progress=self.progress)
        if found.bad:
            self.log.say(f"{split}: {found.summary()}; skipped (data.bad_images=skip)")
            self.log.record({"split": split, "skipped_images": [[str(p), reason] for p, reason in found.bad]})
        return found.good

    def load_resume(self) -> dict | None:
        """The checkpoint to resume from (None: a fresh run); its vocabulary must be this data's."""
        resume = self.t.resume
        if resume == "auto":
            resume = str(self.run_dir / "last.pt") if (self.run_dir / "last.pt").is_file() else ""
        self.resume = resume
        ckpt = load_checkpoint(resume) if resume else None
        if ckpt is not None:
            saved = Vocabulary.from_dict(ckpt["vocab"])
            if saved != self.vocab:
                raise CheckpointError(
                    f"{resume}: the checkpoint's vocabulary ({len(saved)} words) differs from the one built "
                    f"from this training data ({len(self.vocab)} words); resume on the data it was trained on"
                )
        if self.ddp.is_main:
            (self.run_dir / "vocab.json").write_text(json.dumps(self.vocab.to_dict()), encoding="utf-8")
        self.fresh = ckpt is None
        return ckpt

    def setup_model(self) -> None:
        """Model (pretrained weights only on a fresh run), loss, optimizer and scheduler."""
        self.model = Captioner.from_config(self.cfg, self.vocab, load_weights=self.fresh).to(self.device)
        if self.fresh and self.t.init_from:
            self.init_weights(self.t.init_from)
        self.criterion = CaptionLoss.from_config(self.t).to(self.device)  # holds the REINFORCE baseline
        self.opt = build_optimizer(self.cfg, self.model)
        self.sched = build_scheduler(self.cfg, self.opt)

    def init_weights(self, path: str) -> None:
        """train.init_from: start from a checkpoint's model weights only (its vocabulary must
        be this data's); the optimizer, step and record start fresh."""
        ckpt = load_checkpoint(path)
        if Vocabulary.from_dict(ckpt["vocab"]) != self.vocab:
            raise CheckpointError(f"{path}: train.init_from: the checkpoint's vocabulary differs from the one "
                                  f"built from this training data; start from a checkpoint trained on it")
        state = ckpt["model"]  # the layout read-out is training's only: dropped, or kept fresh
        if self.model.layout is None:
            state = {k: v for k, v in state.items() if not k.startswith("layout.")}
        else:
            state = {**{f"layout.{k}": v for k, v in self.model.layout.state_dict().items()}, **state}
        self.model.load_model_state(state, source=path)
        self.log.say(f"model weights from {path} (train.init_from)")

    def restore(self, ckpt: dict) -> None:
        """Weights, optimizer, scheduler, position and RNG from ``ckpt``: the run goes on exactly."""
        tr = _trainer_state(ckpt, self.resume)
        self.model.load_model_state(ckpt["model"], source=self.resume)
        self.criterion.load_state_dict(ckpt["loss"])
        try:
            self.opt.load_state_dict(ckpt["optimizer"])
        except ValueError as err:  # another grouping of the parameters: a changed config
            raise CheckpointError(f"{self.resume}: its optimizer state does not fit this config's parameter groups "
                                  f"({err}); resume with the config the run was trained with (train.context_lr, "
                                  "model.encoder.fine_tune and the model's keys decide the groups)") from err
        if self.sched is not None and ckpt.get("scheduler") is not None:
            self.sched.load_state_dict(ckpt["scheduler"])
        self.start_epoch, self.start_batch, self.step = tr["epoch"], tr["batch"], tr["step"]
        self.best, self.bad_epochs, self.history = tr["best_score"], tr["bad_epochs"], list(tr["history"])
        _set_rng_state(tr["rng"])  # after building the model, whose initialisation draws from the RNG
        self.log.say(f"resumed from {self.resume} at epoch {self.start_epoch + 1}, batch {self.start_batch}, "
                     f"step {self.step}")

    def setup_average(self, ckpt: dict | None) -> None:
        """train.ema: the moving average of the weights (None: off), from the resumed
        checkpoint's average, else from the weights the run starts with."""
        self.average = WeightAverage(self.model, decay=self.t.ema) if self.t.ema else None
        if self.average is None or ckpt is None:
            return
        if ckpt.get("ema") is not None:
            self.average.load_state_dict(ckpt["ema"], source=self.resume)
        else:
            self.log.say(f"{self.resume} holds no weight average: train.ema starts from its weights")

    def setup_features(self) -> None:
        """With a frozen encoder, every image encoded once: from the on-disk cache, else now, in memory."""
        cfg = self.cfg
        self.cached = self.model.encoder.frozen and self.t.cache_features
        self.train_feats = self.val_feats = None
        if not self.cached:
            return
        folder = default_cache_dir(cfg)
        self.train_feats = open_cache(folder, self.model.encoder, self.train_records, split="train")
        val_cache = open_cache(folder, self.model.encoder, load_split(cfg.data, "val"), split="val")
        if self.train_feats is not None and val_cache is not None:
            self.val_feats = val_cache[torch.arange(len(self.val_records))]
            self.log.say(f"features from the cache {folder}")
            return
        workers = cfg.data.num_workers
        self.train_feats = encode_records(self.model, self.train_records, num_workers=workers,
                                          progress=self.progress, desc="encode train")
        self.val_feats = encode_records(self.model, self.val_records, num_workers=workers, progress=self.progress,
                                        desc="encode val")

    def setup_mirror(self) -> None:
        """train.flip: the word swaps of the mirrored views and, with cached features, every
        training image encoded once per mirrored view (in memory)."""
        self.mirror = None if self.t.flip == "none" else Mirror(self.t.flip, self.vocab, grid=self.model.encoder.grid)
        self.mirrored_feats: dict[int, torch.Tensor] = {}
        if self.mirror is None or not self.cached:
            return
        for view in self.mirror.views[1:]:
            self.mirrored_feats[view] = encode_records(self.model, self.train_records, flip=pixel_dims(view),
                                                       num_workers=self.cfg.data.num_workers,
                                                       progress=self.progress, desc=f"encode train, view {view}")
        self.log.say(f"train.flip={self.t.flip}: the training images also encoded mirrored "
                     f"({len(self.mirrored_feats)} more views, in memory)")

    def setup_batches(self) -> None:
        """What a loader sample is: a caption (cached features are looked up by its image's index,
        or train.captions_per_image=0 encodes its image anew) or an image with up to k captions
        (encoded once per epoch, its features repeated to its captions by batch.image_index)."""
        cfg, t, ddp = self.cfg, self.t, self.ddp
        self.per_image = not self.cached and t.captions_per_image > 0
        encoder = self.model.encoder  # supervised attention: where each grounded word should look
        targets = training_targets(cfg, self.train_records, grid=encoder.grid, origin=encoder.cell_origin)
        if self.per_image:
            self.dataset = ImageCaptionsDataset(self.train_records, self.vocab, max_len=cfg.vocab.max_len,
                                                captions_per_image=t.captions_per_image, seed=t.seed,
                                                transform=encoder.transform(), attention_targets=targets)
            self.collate, self.batch_size = collate_image_captions, images_per_batch(t)
            if self.batch_size % ddp.world:
                raise ConfigError(f"train.batch_size={t.batch_size} with train.captions_per_image="
                                  f"{t.captions_per_image} makes global batches of {self.batch_size} images, which "
                                  f"must be a multiple of the {ddp.world} processes")
            self.log.say(f"batches of {self.batch_size} images x up to {t.captions_per_image} captions "
                         f"({self.dataset.captions_in_epoch()} captions per epoch): each image encoded once per "
                         f"epoch")
        else:
            self.dataset = CaptionDataset(self.train_records, self.vocab, max_len=cfg.vocab.max_len,
                                          transform=None if self.cached else encoder.transform(),
                                          attention_targets=targets)
            self.collate, self.batch_size = collate_captions, t.batch_size
            self.log.say(f"batches of {self.batch_size} captions: "
                         + ("each image encoded once per run" if self.cached else
                            "each image encoded once per caption (train.captions_per_image=0)"))
        self.n_batches = math.ceil(len(self.dataset) / self.batch_size)

    def setup_layout(self) -> None:
        """train.layout_weight: every training image's objects, with their footprints on the grid
        and their layout targets (``captioner.layout``)."""
        self.layouts = None
        w = self.t.layout_weight
        if not w:
            return
        path = instances_file(self.cfg.data, "train")
        if path is None:
            raise ConfigError(f"train.layout_weight={w:g} needs a COCO instances file for the train split "
                              "(data.train.instances, or instances_*.json beside captions_*.json); 0 turns it off")
        encoder = self.model.encoder
        self.layouts = layout_targets(self.train_records, path, grid=encoder.grid, origin=encoder.cell_origin,
                                      margin=self.t.layout_margin)
        self.log.say(f"layout supervision (train.layout_weight={w:g}): {sum(len(t) for _, t in self.layouts)} "
                     f"objects in {len(self.layouts)} training images")

    def setup_validation(self) -> None:
        """The val references and the baseline: the most common training caption for every image."""
        self.refs = references(self.val_records)
        # CHAIR and relation accuracy when the val split has an instances file (None: not scored)
        self.chair = ChairScorer.for_split(self.cfg.data, "val", [r.image_id for r in self.val_records])
        if self.metric == "grounded" and self.chair is None:
            self.log.say("train.val_metric=grounded: the val split has no instances file, so nothing can tell a "
                         "false caption; best.pt is chosen by CIDEr-D alone")
        self.baseline_caption = common = " ".join(most_common_caption(self.train_records))
        self.baseline = self.score_captions({r.image_id: common for r in self.val_records})
        self.log.say(f"baseline (\"{common}\" for every image): val {self.metric} {self.baseline[self.metric]:.4f}, "
                     f"BLEU-4 {self.baseline['bleu4']:.4f}")

    def setup_step(self) -> None:
        """Mixed precision, the DDP wrapper and ``torch.compile`` of the training call."""
        t = self.t
        if t.amp == "fp16" and self.device.type != "cuda":
            raise CaptionerError("train.amp=fp16 needs a CUDA GPU; on the CPU use train.amp=bf16")
        self.amp, why = resolve_amp(t.amp, self.device)  # auto: bf16 where the device has it natively
        if t.amp == "auto":
            self.log.say(why)
        self.amp_dtype = DTYPES.get(self.amp)  # autocast (the encoder's)
        self.decoder_dtype = torch.bfloat16 if self.amp == "bf16" else None  # cast once a pass (captioner.precision)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")
        # DDP averages the gradients over the ranks; the module is what compute_loss calls
        self.train_model = wrap(self.training_module(), self.ddp, self.device)
        if t.compile:  # compile the training call only: checkpoints keep the plain module's keys
            self.train_model = torch.compile(self.train_model, dynamic=True)

    def training_module(self) -> torch.nn.Module:
        """The module whose call :meth:`compute_loss` makes (wrapped by DDP / compile): the
        model's teacher-forced pass; an objective that calls the model otherwise overrides this."""
        return self.model

    # ------------------------------------------------------------------ train

    def train(self) -> FitResult:
        """The epochs, from where the run stands to ``train.epochs`` or an earlier stop."""
        self.started = time.monotonic()
        self.epoch = self.start_epoch
        for epoch in range(self.start_epoch, self.t.epochs):
            self.epoch = epoch
            sums, stopped_at = self.train_epoch(epoch)
            if stopped_at is not None:
                self.stop_mid_epoch(epoch, stopped_at)
                break
            if self.end_epoch(epoch, sums):
                break
        return FitResult(run_dir=self.run_dir, metric=self.metric, best_score=self.best,
                         baseline_score=self.baseline[self.metric], epochs=self.epoch + 1, history=self.history)

    def loader(self, epoch: int, first: int) -> DataLoader:
        """This rank's batches of ``epoch`` from batch ``first`` on, in the (seed, epoch) order."""
        order = shard(epoch_order(len(self.dataset), self.t, epoch, first, batch_size=self.batch_size),
                      batch_size=self.batch_size, ddp=self.ddp)
        if self.per_image:
            self.dataset.set_epoch(epoch)  # before the loader copies the dataset into its workers
        return DataLoader(self.dataset, batch_size=self.batch_size // self.ddp.world, sampler=order,
                          num_workers=0 if self.cached else self.cfg.data.num_workers, collate_fn=self.collate,
                          generator=torch.Generator())  # its own generator: the global RNG is not touched

    def train_epoch(self, epoch: int) -> tuple[Counter, int | None]:
        """One epoch from its first unseen batch; -> the loss sums, and the batch where a time or
        step limit stopped it (None: the epoch ran to its end)."""
        self.model.train()
        self.criterion.train()
        first = self.start_batch if epoch == self.start_epoch else 0
        sums: Counter = Counter()
        bar = tqdm(self.loader(epoch, first), desc=f"epoch {epoch + 1}/{self.t.epochs}", disable=not self.progress,
                   leave=False, initial=first, total=self.n_batches)
        for index, batch in enumerate(bar, start=first):
            self.batch_index = index
            loss = self.train_step(batch.to(self.device))
            if loss is None:  # skipped: a non-finite loss under train.nonfinite=skip
                continue
            sums.update(n=1, loss=loss.total.item(), xent=loss.xent.item(),
                        **({} if loss.layout is None else {"layout": loss.layout.item()}))
            if self.step % self.t.log_every == 0:
                bar.set_postfix(loss=f"{sums['loss'] / sums['n']:.3f}")
                self.log_step(loss)
            not_last = self.batch_index + 1 < self.n_batches
            if self.t.checkpoint_every and self.step % self.t.checkpoint_every == 0 and not_last:
                self.save_checkpoint("last.pt", epoch, self.batch_index + 1)
            if self.out_of_budget() and not_last:
                return sums, self.batch_index + 1
        return sums, None

    def compute_loss(self, batch) -> LossOutput:
        """The training objective on one batch: teacher-forced forward, then the caption loss."""
        views = None
        if self.mirror is not None:
            batch, views = self.mirrored(batch)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            if self.cached:
                feats = self.train_features(batch.index.cpu(), views).to(self.device)
                out = self.train_model(batch.captions, raw_features=feats, dtype=self.decoder_dtype)
            else:  # image_index is None for one sample per caption
                out = self.train_model(batch.captions, images=batch.images, image_index=batch.image_index,
                                       dtype=self.decoder_dtype)
        mask = batch.mask[:, 1:]
        loss = self.criterion(out, batch.captions[:, 1:], mask, words=self.ddp.words(mask),
                              attention_targets=batch.attention_targets)
        return loss if self.layouts is None else self.with_layout(loss, out, batch)

    def with_layout(self, loss: LossOutput, out, batch: CaptionBatch) -> LossOutput:
        """``loss`` plus train.layout_weight times the layout loss of the pass's annotation
        vectors (one row per caption, or per image with ``image_index``)."""
        images = batch.index.cpu()
        if batch.image_index is not None and batch.images is not None:  # rows are images: each one's index
            images = torch.empty(batch.images.shape[0], dtype=torch.long)
            images[batch.image_index.cpu()] = batch.index.cpu()
        term = self.t.layout_weight * self.model.layout.loss(out.features, [self.layouts[i] for i in images.tolist()])
        return with_fields(loss, total=loss.total + term, layout=term.detach())

    def mirrored(self, batch: CaptionBatch) -> tuple[CaptionBatch, torch.Tensor]:
        """train.flip: a view drawn for every image of the batch (for this step: a resume draws
        the same); -> the batch with its pixels, captions and attention targets mirrored, and
        each caption's view (B,)."""
        m = self.mirror
        per_image = batch.images is not None and batch.image_index is not None
        n = batch.images.shape[0] if per_image else batch.captions.shape[0]
        views = m.draw(n, seed=self.t.seed + 7919 * self.ddp.rank, step=self.step)
        images = None if batch.images is None else m.pixels(batch.images, views)
        views = views[batch.image_index.cpu()] if per_image else views  # (B,): each caption's image's view
        targets = None if batch.attention_targets is None else m.targets(batch.attention_targets, views)
        return with_fields(batch, captions=m.captions(batch.captions, views), images=images,
                       attention_targets=targets), views

    def train_features(self, index: torch.Tensor, views: torch.Tensor | None) -> torch.Tensor:
        """The cached raw features (B, L, C) of the images ``index`` (B,), in each one's view."""
        feats = self.train_feats[index]
        for view in ([] if views is None else views.unique().tolist()):
            if view:
                rows = views == view
                feats[rows] = self.mirrored_feats[view][index[rows]]
        return feats

    def train_step(self, batch) -> LossOutput | None:
        """One optimizer step on ``batch``; None when its loss was not finite and it was skipped."""
        if isinstance(self.sched, BudgetDecay):
            self.sched.set(self.budget_spent())
        loss = self.compute_loss(batch)
        if self.ddp.any(not bool(torch.isfinite(loss.total)), self.device):
            self.on_nonfinite(loss)
            return None
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss.total).backward()
        if self.t.grad_clip > 0:
            self.scaler.unscale_(self.opt)
            clip_grad_norm(self.model.parameters(), self.t.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.step += 1
        if self.average is not None:
            self.average.update()
        return loss

    def on_nonfinite(self, loss: LossOutput) -> None:
        """train.nonfinite: ``stop`` raises (the last good checkpoint stays); ``skip`` counts, up to a limit."""
        t = self.t
        where = f"at step {self.step + 1} (epoch {self.epoch + 1}, batch {self.batch_index + 1})"
        if t.nonfinite == "stop":
            raise TrainingError(f"the loss became {loss.total.item()} {where}; the last good checkpoint "
                                f"is kept. Lower train.lr, check the data, or set train.nonfinite=skip")
        self.skipped += 1
        self.log.say(f"skipped a batch with a non-finite loss {where} ({self.skipped} so far)")
        self.log.record({"step": self.step, "epoch": self.epoch + 1, "batch": self.batch_index + 1,
                         "skipped_nonfinite": self.skipped})
        if self.skipped > t.max_skipped:
            raise TrainingError(f"{self.skipped} batches had a non-finite loss (more than train.max_skipped="
                                f"{t.max_skipped}); stopping. The last good checkpoint is kept.")

    def log_step(self, loss: LossOutput) -> None:
        self.log.record({"step": self.step, "epoch": self.epoch + 1, "loss": loss.total.item(),
                         "xent": loss.xent.item(), "dsr": loss.dsr.item(), "reinforce": loss.reinforce.item(),
                         "entropy": loss.entropy.item(), "baseline": self.criterion.baseline.value.item(),
                         "lr": self.opt.param_groups[0]["lr"],
                         **({} if loss.layout is None else {"layout": loss.layout.item()})})

    def out_of_budget(self) -> bool:
        """train.max_minutes or train.max_steps is spent (the same answer on every rank)."""
        t = self.t
        out_of_time = bool(t.max_minutes) and self.ddp.any(time.monotonic() - self.started > 60 * t.max_minutes,
                                                           self.device)
        return out_of_time or bool(t.max_steps and self.step >= t.max_steps)

    def budget_spent(self) -> float:
        """The fraction of the run's budget spent before this step: the largest of the shares of
        train.epochs, train.max_steps and train.max_minutes gone (the same on every rank). The
        time budget, like the limit itself, counts from this process's start of training."""
        t = self.t
        spent = (self.epoch * self.n_batches + self.batch_index) / (t.epochs * self.n_batches)
        if t.max_steps:
            spent = max(spent, self.step / t.max_steps)
        if t.max_minutes:
            spent = max(spent, self.ddp.max((time.monotonic() - self.started) / (60 * t.max_minutes), self.device))
        return spent

    # ------------------------------------------------------------------ validate, stop

    def validate(self) -> Validation:
        """Greedy decoding of the val images (no teacher forcing), scored; with train.ema, by
        the averaged weights."""
        with averaged(self.average):
            decoded = decode_records(self.model, self.val_records, max_len=self.cfg.decode.max_len,
                                     features=self.val_feats, num_workers=self.cfg.data.num_workers,
                                     progress=self.progress)
        captions = {r.image_id: " ".join(d.words) for r, d in zip(self.val_records, decoded)}
        return Validation(self.score_captions(captions), captions)

    def score_captions(self, captions: dict[int, str]) -> dict[str, float]:
        """Scores of val captions (image id -> caption) against the references, by metric name;
        with an instances file also ``chair_s``, ``chair_i``, ``relation_accuracy`` and
        ``wrong_s`` (each when there was something to count). ``grounded``: CIDEr-D times the
        share of captions with nothing false (1 - ``wrong_s``: no object that is not there, no
        stated relation that does not hold); CIDEr-D alone without an instances file."""
        scores = dict(caption_metrics(captions, self.refs, use_java=False, spice=False).scores)
        scores["grounded"] = scores["cider"]
        if self.chair is not None:
            report = self.chair(captions)
            hallucination = {"chair_s": report.chair_s, "chair_i": report.chair_i,
                             "relation_accuracy": report.relation_accuracy, "wrong_s": report.wrong_s}
            scores.update({k: v for k, v in hallucination.items() if math.isfinite(v)})
            scores["grounded"] = scores["cider"] * (1 - scores.get("wrong_s", 0.0))
        return scores

    def end_epoch(self, epoch: int, sums: Counter) -> bool:
        """Validate, step the scheduler, log, checkpoint; -> whether the run stops here."""
        val = self.validate()
        value = val.scores[self.metric]
        if isinstance(self.sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.sched.step(value)
        elif self.sched is not None:
            self.sched.step()
        improved = value > self.best
        self.best, self.bad_epochs = (value, 0) if improved else (self.best, self.bad_epochs + 1)
        entry = self.epoch_entry(epoch, sums, val)
        self.history.append(entry)
        self.log.record(entry)
        self.board_figures()
        chair = f"  CHAIR_s {val.scores['chair_s']:.3f}" if "chair_s" in val.scores else ""
        self.log.say(f"epoch {epoch + 1}: loss {entry['train_loss']:.3f}  val {self.metric} {value:.4f}  "
                     f"BLEU-4 {val.scores['bleu4']:.4f}{chair}{' (best)' if improved else ''}  "
                     f"e.g. \"{entry['example']}\"")
        self.save_checkpoint("last.pt", epoch + 1, 0)
        if improved:
            self.save_checkpoint("best.pt", epoch + 1, 0)
        if self.t.max_steps and self.step >= self.t.max_steps:
            return True
        if self.t.patience and self.bad_epochs >= self.t.patience:
            self.log.say(f"stopping early: no better val {self.metric} for {self.bad_epochs} epochs")
            return True
        return False

    def board_figures(self, images: int = 3) -> None:
        """With TensorBoard: the attention figures of the first few val images (greedy captions)."""
        if self.log.board is None:
            return
        from captioner.visualize import result_figure

        for record in self.val_records[:images]:
            with averaged(self.average):
                result = self.model.caption(record.path, beam_size=1)
            self.log.board.figure(f"attention/{record.path.name}", result_figure(record.path, result), self.step)

    def epoch_entry(self, epoch: int, sums: Counter, val: Validation) -> dict:
        """The epoch's line of metrics.jsonl."""
        n = max(sums["n"], 1)
        return {"epoch": epoch + 1, "step": self.step, "train_loss": sums["loss"] / n, "train_xent": sums["xent"] / n,
                **({"train_layout": sums["layout"] / n} if "layout" in sums else {}),
                **{f"val_{k}": v for k, v in val.scores.items()},
                **{f"baseline_{k}": v for k, v in self.baseline.items()},
                "lr": self.opt.param_groups[0]["lr"], "minutes": (time.monotonic() - self.started) / 60,
                "example": next(iter(val.captions.values()), "")}

    def stop_mid_epoch(self, epoch: int, stopped_at: int) -> None:
        """Out of time (or steps) mid-epoch: last.pt resumes exactly here; the validation only
        reports and keeps best.pt, without stepping the scheduler or early stopping."""
        self.save_checkpoint("last.pt", epoch, stopped_at)  # first: a kill while validating loses no training
        value = self.validate().scores[self.metric]
        if value > self.best:
            self.best = value
            self.save_checkpoint("best.pt", epoch, stopped_at)
            # last.pt again, with the new best score (a resume would forget it and let a worse model
            # replace best.pt); validation draws nothing from the global RNGs, so the rest is as saved
            self.save_checkpoint("last.pt", epoch, stopped_at)
        self.log.say(f"stopping in epoch {epoch + 1} at step {self.step} (train.max_minutes={self.t.max_minutes}, "
                     f"train.max_steps={self.t.max_steps}); val {self.metric} {value:.4f}")

    # ------------------------------------------------------------------ checkpoint, cleanup

    def state(self, epoch: int, batch: int) -> dict:
        """Everything a resume needs: at ``batch`` batches into epoch ``epoch`` (0-based)."""
        return {
            "config": portable_config(self.cfg), "vocab": self.vocab.to_dict(), "model": self.model.state_dict(),
            "loss": self.criterion.state_dict(), "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict() if self.sched is not None else None,
            "ema": self.average.state_dict() if self.average is not None else None,
            "trainer": {"epoch": epoch, "batch": batch, "step": self.step, "best_score": self.best,
                        "bad_epochs": self.bad_epochs, "history": self.history, "rng": _rng_state()},
        }

    def save_checkpoint(self, name: str, epoch: int, batch: int) -> None:
        """Write :meth:`state` to the run folder as ``name`` (rank 0 only; atomically). ``best.pt``
        is for inference: config, vocabulary, weights and where it was taken (no optimizer
        state, a third of the size at the paper's dims); with train.ema its weights are the
        average that was validated. ``last.pt`` carries everything: the raw weights, and the
        average for a resume."""
        if not self.ddp.is_main:
            return
        if name != "best.pt":
            save_checkpoint(self.run_dir / name, self.state(epoch, batch))
            return
        with averaged(self.average):  # written inside: state_dict's tensors share the parameters' storage
            state = self.state(epoch, batch)
            trainer = state["trainer"]
            state = {**slim(state), "trainer": {k: trainer[k] for k in ("epoch", "batch", "step", "best_score")}}
            save_checkpoint(self.run_dir / name, state)

    def cleanup(self) -> None:
        """Every rank must hold the same weights: say how far apart they are; end the process group."""
        if self.ddp.enabled:
            diff = max_parameter_difference(self.model, self.ddp)
            self.log.record({"ddp_world_size": self.ddp.world, "ddp_max_parameter_difference": diff})
            self.log.say(f"{self.ddp.world} processes; largest parameter difference between ranks: {diff:.3g}")
            finish(self.ddp)
        self.log.say(f"done: best val {self.metric} {self.best:.4f} (baseline {self.baseline[self.metric]:.4f}); "
                     f"checkpoint {self.run_dir / 'best.pt'}")
        if self.log.board is not None:
            self.log.board.close()


# train.objective -> the Trainer class that trains with it. A new objective subclasses Trainer
# in its own module, above this one, and registers there (captioner.scst: "scst").
TRAINERS: Registry[Trainer] = Registry("train.objective")
TRAINERS.register("xent")(Trainer)


def fit(cfg: Config, *, quiet: bool = False) -> FitResult:
    """Train a captioner as ``cfg`` says; returns where the run is and how it scored.

    ``train.objective`` picks the Trainer class from :data:`TRAINERS`."""
    name = cfg.train.objective
    if name not in TRAINERS:
        raise ConfigError(f"train.objective={name!r}: no Trainer is registered under that name; import its module "
                          f"first (`import captioner.scst` registers scst; the cli does)")
    return TRAINERS.get(name)(cfg, quiet=quiet).run()
