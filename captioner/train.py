"""The training loop: fit, validate by real decoding, checkpoint, resume, stop early.

``fit(cfg)`` is the whole job behind ``captioner train``. With a frozen encoder (the
paper's setting) each image is encoded once, before the first epoch, and the epochs run on
the stored features. When pixels go through the encoder in the training step (a fine-tuned
encoder, or ``train.cache_features: false``) a batch is made of images, each with up to
``train.captions_per_image`` of its captions, so each image is encoded once per epoch, not
once per caption.

Validation decodes greedily (no teacher forcing) with the evaluation's own code and scores
BLEU-1..4, ROUGE-L and CIDEr-D (pure Python, no Java); ``train.val_metric`` (CIDEr-D by
default) picks the best checkpoint, ``best.pt``, and drives early stopping; the latest is
``last.pt``; metrics go to ``metrics.jsonl``, one JSON object a line.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from captioner.checkpoint import load_checkpoint, remove_stale_temporaries, save_checkpoint
from captioner.config import Config, TrainConfig, config_to_dict, save_config
from captioner.data import load_split
from captioner.data.cache import default_cache_dir, open_cache
from captioner.data.dataset import CaptionDataset, ImageCaptionsDataset, collate_captions, collate_image_captions
from captioner.data.images import check_images
from captioner.data.records import ImageRecord
from captioner.errors import CaptionerError, CheckpointError, ConfigError
from captioner.losses import CaptionLoss
from captioner.distributed import finish, init_distributed, max_parameter_difference, shard, wrap
from captioner.evaluate import decode_records, encode_records, references
from captioner.metrics import caption_metrics
from captioner.model import Captioner, check_names
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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CaptionerError(f"train.device: unknown device {name!r} (use auto, cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CaptionerError(f"train.device={name!r} but no CUDA GPU is available; use train.device=cpu")
    return device


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.train.out_dir.format(name=cfg.name))


# ----------------------------------------------------------------------------- helpers


def most_common_caption(records: Sequence[ImageRecord]) -> list[str]:
    """The baseline caption: the most frequent training caption (after tokenization)."""
    counts = Counter(" ".join(tokenize(c.text)) for r in records for c in r.captions)
    return counts.most_common(1)[0][0].split()


def _optimizer(cfg: Config, model: Captioner) -> torch.optim.Optimizer:
    t = cfg.train
    groups = [{"params": [p for n, p in model.named_parameters() if not n.startswith("encoder.") and p.requires_grad],
               "lr": t.lr}]
    encoder_params = [p for p in model.encoder.parameters() if p.requires_grad]
    if encoder_params:
        groups.append({"params": encoder_params, "lr": t.encoder_lr})
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


def _scheduler(cfg: Config, opt: torch.optim.Optimizer):
    t = cfg.train
    if t.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=t.lr_decay, patience=t.lr_patience)
    if t.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t.epochs)
    if t.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, t.lr_patience), gamma=t.lr_decay)
    return None


def epoch_order(n: int, t: TrainConfig, epoch: int, first_batch: int = 0, *, batch_size: int | None = None) -> list[int]:
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
                              f"({', '.join(missing) or 'optimizer/loss'} missing); start a new run instead")
    return {"batch": 0, **tr}  # epoch-end checkpoints of earlier versions have no batch position


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


class _Log:
    """Writes progress lines (through tqdm) and metrics as JSON lines (``write``: rank 0 only)."""

    def __init__(self, path: Path, quiet: bool, write: bool = True) -> None:
        self.path, self.quiet, self.write = path, quiet, write

    def say(self, msg: str) -> None:
        if not self.quiet:
            tqdm.write(msg)

    def record(self, entry: dict) -> None:
        if not self.write:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


# ----------------------------------------------------------------------------- fit


def fit(cfg: Config, *, quiet: bool = False) -> FitResult:
    """Train a captioner as ``cfg`` says; returns where the run is and how it scored."""
    t = cfg.train
    check_names(cfg)
    ddp = init_distributed(t.device)  # rank 0 of 1 unless launched by torchrun
    torch.manual_seed(t.seed)  # the same on every rank: the same initial weights
    random.seed(t.seed)
    device = torch.device("cuda", ddp.local_rank) if ddp.enabled and t.device != "cpu" and \
        torch.cuda.is_available() else resolve_device(t.device)
    run_dir = run_dir_of(cfg)
    if ddp.is_main:  # only rank 0 writes: config, logs, checkpoints
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    log = _Log(run_dir / "metrics.jsonl", quiet or not ddp.is_main, write=ddp.is_main)
    if ddp.is_main:
        for stale in remove_stale_temporaries(run_dir):
            log.say(f"removed {stale.name}: a checkpoint write that a killed run left unfinished")
    progress = t.progress and not quiet and ddp.is_main

    train_records = load_split(cfg.data, "train", progress=progress)
    val_records = load_split(cfg.data, "val")
    if t.val_images:
        val_records = val_records[: t.val_images]
    for name in ("train", "val"):  # a fast pre-check: unreadable images stop the run now, or are skipped
        found = check_images(train_records if name == "train" else val_records, policy=cfg.data.bad_images,
                             workers=cfg.data.num_workers, progress=progress)
        if found.bad:
            log.say(f"{name}: {found.summary()}; skipped (data.bad_images=skip)")
            log.record({"split": name, "skipped_images": [[str(p), reason] for p, reason in found.bad]})
        if name == "train":
            train_records = found.good
        else:
            val_records = found.good
    vocab = Vocabulary.build((c.text for r in train_records for c in r.captions), min_count=cfg.vocab.min_count,
                             max_size=cfg.vocab.max_size)

    resume = t.resume
    if resume == "auto":
        resume = str(run_dir / "last.pt") if (run_dir / "last.pt").is_file() else ""
    ckpt = load_checkpoint(resume) if resume else None
    if ckpt is not None:
        saved = Vocabulary.from_dict(ckpt["vocab"])
        if saved != vocab:
            raise CheckpointError(
                f"{resume}: the checkpoint's vocabulary ({len(saved)} words) differs from the one built "
                f"from this training data ({len(vocab)} words); resume on the data it was trained on"
            )
    if ddp.is_main:
        (run_dir / "vocab.json").write_text(json.dumps(vocab.to_dict()), encoding="utf-8")

    model = Captioner.from_config(cfg, vocab, load_weights=ckpt is None).to(device)
    criterion = CaptionLoss.from_config(t).to(device)  # holds the REINFORCE baseline
    opt = _optimizer(cfg, model)
    sched = _scheduler(cfg, opt)
    start_epoch, start_batch, step, best, bad_epochs, history = 0, 0, 0, -1.0, 0, []
    if ckpt is not None:
        tr = _trainer_state(ckpt, resume)
        model.load_model_state(ckpt["model"], source=resume)
        criterion.load_state_dict(ckpt["loss"])
        opt.load_state_dict(ckpt["optimizer"])
        if sched is not None and ckpt.get("scheduler") is not None:
            sched.load_state_dict(ckpt["scheduler"])
        start_epoch, start_batch, step = tr["epoch"], tr["batch"], tr["step"]
        best, bad_epochs, history = tr["best_score"], tr["bad_epochs"], list(tr["history"])
        _set_rng_state(tr["rng"])  # after building the model, whose initialisation draws from the RNG
        log.say(f"resumed from {resume} at epoch {start_epoch + 1}, batch {start_batch}, step {step}")

    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.say(f"run {run_dir}: {len(train_records)} train / {len(val_records)} val images, "
            f"{len(vocab)} words, grid {model.encoder.grid}, {n_params / 1e6:.2f}M trainable parameters, {device}")

    cached = model.encoder.frozen and t.cache_features
    train_feats = val_feats = None
    if cached:  # encode each image once: from the on-disk cache if there is one, else now, in memory
        folder = default_cache_dir(cfg)
        train_feats = open_cache(folder, model.encoder, train_records, split="train")
        val_cache = open_cache(folder, model.encoder, load_split(cfg.data, "val"), split="val")
        if train_feats is not None and val_cache is not None:
            val_feats = val_cache[torch.arange(len(val_records))]
            log.say(f"features from the cache {folder}")
        else:
            train_feats = encode_records(model, train_records, num_workers=cfg.data.num_workers,
                                         progress=progress, desc="encode train")
            val_feats = encode_records(model, val_records, num_workers=cfg.data.num_workers, progress=progress,
                                       desc="encode val")
    # What a loader sample is: a caption (cached features are looked up by its image's index,
    # or train.captions_per_image=0 encodes its image anew) or an image with up to k captions
    # (encoded once per epoch, its features repeated to its captions by batch.image_index).
    per_image = not cached and t.captions_per_image > 0
    if per_image:
        dataset = ImageCaptionsDataset(train_records, vocab, max_len=cfg.vocab.max_len,
                                       captions_per_image=t.captions_per_image, seed=t.seed,
                                       transform=model.encoder.transform())
        collate, batch_size = collate_image_captions, images_per_batch(t)
        if batch_size % ddp.world:
            raise ConfigError(f"train.batch_size={t.batch_size} with train.captions_per_image={t.captions_per_image} "
                              f"makes global batches of {batch_size} images, which must be a multiple of the "
                              f"{ddp.world} processes")
        log.say(f"batches of {batch_size} images x up to {t.captions_per_image} captions "
                f"({dataset.captions_in_epoch()} captions per epoch): each image encoded once per epoch")
    else:
        dataset = CaptionDataset(train_records, vocab, max_len=cfg.vocab.max_len,
                                 transform=None if cached else model.encoder.transform())
        collate, batch_size = collate_captions, t.batch_size
        log.say(f"batches of {batch_size} captions: "
                + ("each image encoded once per run" if cached else
                   "each image encoded once per caption (train.captions_per_image=0)"))

    refs = references(val_records)
    metric = t.val_metric

    def score(captions: dict[int, str]) -> dict[str, float]:
        return caption_metrics(captions, refs, use_java=False, spice=False).scores

    common = " ".join(most_common_caption(train_records))
    baseline = score({r.image_id: common for r in val_records})
    log.say(f"baseline (\"{common}\" for every image): val {metric} {baseline[metric]:.4f}, "
            f"BLEU-4 {baseline['bleu4']:.4f}")

    def state(epoch: int, batch: int) -> dict:
        """Everything a resume needs: at ``batch`` batches into epoch ``epoch`` (0-based)."""
        return {
            "config": config_to_dict(cfg), "vocab": vocab.to_dict(), "model": model.state_dict(),
            "loss": criterion.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict() if sched is not None else None,
            "trainer": {"epoch": epoch, "batch": batch, "step": step, "best_score": best, "bad_epochs": bad_epochs,
                        "history": history, "rng": _rng_state()},
        }

    def validate() -> tuple[dict[str, float], dict[int, str]]:
        decoded = decode_records(model, val_records, max_len=cfg.decode.max_len, features=val_feats,
                                 num_workers=cfg.data.num_workers, progress=progress)
        hyps = {r.image_id: " ".join(d.words) for r, d in zip(val_records, decoded)}
        return score(hyps), hyps

    def save(name: str, st: dict) -> None:
        if ddp.is_main:
            save_checkpoint(run_dir / name, st)

    if t.amp == "fp16" and device.type != "cuda":
        raise CaptionerError("train.amp=fp16 needs a CUDA GPU; on the CPU use train.amp=bf16")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=t.amp == "fp16")
    train_model = wrap(model, ddp, device)  # DDP averages the gradients over the ranks
    if t.compile:  # compile the training call only: checkpoints keep the plain module's keys
        train_model = torch.compile(train_model, dynamic=True)
    started = time.monotonic()
    n_batches = math.ceil(len(dataset) / batch_size)
    skipped = 0  # batches skipped for a non-finite loss (train.nonfinite=skip)
    epoch = start_epoch
    for epoch in range(start_epoch, t.epochs):
        model.train()
        criterion.train()
        first = start_batch if epoch == start_epoch else 0
        order = shard(epoch_order(len(dataset), t, epoch, first, batch_size=batch_size), batch_size=batch_size,
                      ddp=ddp)
        if per_image:
            dataset.set_epoch(epoch)  # before the loader copies the dataset into its workers
        loader = DataLoader(dataset, batch_size=batch_size // ddp.world, sampler=order,
                            num_workers=0 if cached else cfg.data.num_workers, collate_fn=collate,
                            generator=torch.Generator())  # its own generator: the global RNG is not touched
        sums: Counter = Counter()
        stopped_at = None  # the batch where train.max_minutes ran out
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{t.epochs}", disable=not progress, leave=False,
                   initial=first, total=n_batches)
        for i, batch in enumerate(bar, start=first):
            batch = batch.to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                if cached:
                    out = train_model(batch.captions, raw_features=train_feats[batch.index.cpu()].to(device))
                else:  # image_index is None for one sample per caption
                    out = train_model(batch.captions, images=batch.images, image_index=batch.image_index)
            loss = criterion(out, batch.captions[:, 1:], batch.mask[:, 1:], words=ddp.words(batch.mask[:, 1:]))
            if ddp.any(not bool(torch.isfinite(loss.total)), device):
                where = f"at step {step + 1} (epoch {epoch + 1}, batch {i + 1})"
                if t.nonfinite == "stop":
                    raise TrainingError(f"the loss became {loss.total.item()} {where}; the last good checkpoint "
                                        f"is kept. Lower train.lr, check the data, or set train.nonfinite=skip")
                skipped += 1
                log.say(f"skipped a batch with a non-finite loss {where} ({skipped} so far)")
                log.record({"step": step, "epoch": epoch + 1, "batch": i + 1, "skipped_nonfinite": skipped})
                if skipped > t.max_skipped:
                    raise TrainingError(f"{skipped} batches had a non-finite loss (more than train.max_skipped="
                                        f"{t.max_skipped}); stopping. The last good checkpoint is kept.")
                continue
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss.total).backward()
            if t.grad_clip > 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            scaler.step(opt)
            scaler.update()
            step += 1
            sums.update(n=1, loss=loss.total.item(), xent=loss.xent.item())
            if step % t.log_every == 0:
                bar.set_postfix(loss=f"{sums['loss'] / sums['n']:.3f}")
                log.record({"step": step, "epoch": epoch + 1, "loss": loss.total.item(), "xent": loss.xent.item(),
                            "dsr": loss.dsr.item(), "reinforce": loss.reinforce.item(),
                            "entropy": loss.entropy.item(), "baseline": criterion.baseline.value.item(),
                            "lr": opt.param_groups[0]["lr"]})
            if t.checkpoint_every and step % t.checkpoint_every == 0 and i + 1 < n_batches:
                save("last.pt", state(epoch, i + 1))
            out_of_time = bool(t.max_minutes) and ddp.any(time.monotonic() - started > 60 * t.max_minutes, device)
            if (out_of_time or (t.max_steps and step >= t.max_steps)) and i + 1 < n_batches:
                stopped_at = i + 1
                break

        if stopped_at is not None:
            # Out of time (or steps) mid-epoch: last.pt resumes exactly here; the validation below only
            # reports and keeps best.pt, without stepping the scheduler or early stopping.
            save("last.pt", state(epoch, stopped_at))
            scores, hyps = validate()
            if scores[metric] > best:
                best = scores[metric]
                save("best.pt", state(epoch, stopped_at))
            log.say(f"stopping in epoch {epoch + 1} at step {step} (train.max_minutes={t.max_minutes}, "
                    f"train.max_steps={t.max_steps}); val {metric} {scores[metric]:.4f}")
            break

        scores, hyps = validate()
        value = scores[metric]
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step(value)
        elif sched is not None:
            sched.step()
        improved = value > best
        best, bad_epochs = (value, 0) if improved else (best, bad_epochs + 1)
        n = max(sums["n"], 1)
        entry = {"epoch": epoch + 1, "step": step, "train_loss": sums["loss"] / n, "train_xent": sums["xent"] / n,
                 **{f"val_{k}": v for k, v in scores.items()}, **{f"baseline_{k}": v for k, v in baseline.items()},
                 "lr": opt.param_groups[0]["lr"], "minutes": (time.monotonic() - started) / 60,
                 "example": next(iter(hyps.values()), "")}
        history.append(entry)
        log.record(entry)
        log.say(f"epoch {epoch + 1}: loss {entry['train_loss']:.3f}  val {metric} {value:.4f}  "
                f"BLEU-4 {scores['bleu4']:.4f}{' (best)' if improved else ''}  e.g. \"{entry['example']}\"")
        save("last.pt", state(epoch + 1, 0))
        if improved:
            save("best.pt", state(epoch + 1, 0))
        if t.max_steps and step >= t.max_steps:
            break
        if t.patience and bad_epochs >= t.patience:
            log.say(f"stopping early: no better val {metric} for {bad_epochs} epochs")
            break

    if ddp.enabled:  # every rank must hold the same weights; say how far apart they are
        diff = max_parameter_difference(model, ddp)
        log.record({"ddp_world_size": ddp.world, "ddp_max_parameter_difference": diff})
        log.say(f"{ddp.world} processes; largest parameter difference between ranks: {diff:.3g}")
        finish(ddp)
    log.say(f"done: best val {metric} {best:.4f} (baseline {baseline[metric]:.4f}); checkpoint {run_dir / 'best.pt'}")
    return FitResult(run_dir=run_dir, metric=metric, best_score=best, baseline_score=baseline[metric],
                     epochs=epoch + 1, history=history)
