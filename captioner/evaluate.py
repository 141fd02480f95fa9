"""Evaluation: decode a split, score it the standard way, measure attention correctness,
object hallucination (CHAIR) and the accuracy of stated relations (``captioner.chair``).

``evaluate`` is the job behind ``captioner evaluate``; ``decode_records`` is the one decoding
path, shared with validation during training.

Outputs, in the output folder: ``captions_<split>.json`` in the COCO results format
(``[{"image_id", "caption"}]``) and ``metrics_<split>.json``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from captioner.chair import ChairReport, chair, load_ground_truth
from captioner.config import DataConfig
from captioner.correctness import CorrectnessReport, attention_correctness, load_regions
from captioner.data import instances_file, load_split  # instances_file: re-exported here too
from captioner.data.dataset import ImageDataset, collate_images
from captioner.data.images import check_images
from captioner.data.records import ImageRecord
from captioner.metrics import MetricReport, caption_metrics
from captioner.model import Captioner
from captioner.progress import tqdm


@dataclass
class DecodedCaption:
    """One image's decoded caption: its words and the (len(words) + 1, L) attention maps
    (one per word, then ``<end>``)."""

    words: list[str]
    alphas: Tensor


@dataclass
class EvalResult:
    """What ``evaluate`` measured and where it wrote it."""

    metrics: MetricReport
    correctness: CorrectnessReport | None
    captions: dict[int, str]
    files: list[Path]
    chair: ChairReport | None = None  # object hallucination and relation accuracy (needs instances)

    def table(self) -> str:
        lines = [self.metrics.table()]
        if self.correctness is not None and self.correctness.words:
            c = self.correctness
            lines.append(f"attention correctness  {100 * c.score:5.1f}   (uniform attention {100 * c.uniform:.1f}; "
                         f"{c.words} grounded words in {c.images} images)")
        if self.chair is not None:
            lines.append(self.chair.line())
        return "\n".join(lines)


def _image_loader(model: Captioner, records: Sequence[ImageRecord], *, batch_size: int, num_workers: int) -> DataLoader:
    """Images in record order. Its own generator: iterating it never draws from the global RNG,
    so a resumed run sees the same dropout and sampling as an uninterrupted one."""
    return DataLoader(ImageDataset(records, model.encoder.transform()), batch_size=batch_size,
                      num_workers=num_workers, collate_fn=collate_images, generator=torch.Generator())


@torch.no_grad()
def encode_records(model: Captioner, records: Sequence[ImageRecord], *, batch_size: int = 64,
                   num_workers: int = 0, progress: bool = False, desc: str = "encode",
                   flip: tuple[int, ...] = ()) -> Tensor:
    """Run the (frozen) encoder once over ``records``: -> raw features (N, L, C) on the CPU;
    ``flip``: the dims of the (B, 3, S, S) pixels to flip first (train.flip's mirrored views)."""
    loader = _image_loader(model, records, batch_size=batch_size, num_workers=num_workers)
    was = model.encoder.training
    model.encoder.eval()
    out = torch.empty(len(records), model.encoder.num_locations, model.encoder.feature_dim)
    for index, images in tqdm(loader, desc=desc, disable=not progress, leave=False):
        images = images.flip(flip) if flip else images
        out[index] = model.encoder(images.to(model.device)).float().cpu()
    model.encoder.train(was)
    return out


@torch.no_grad()
def decode_records(model: Captioner, records: Sequence[ImageRecord], *, max_len: int, beam_size: int = 1,
                   length_penalty: float = 0.0, features: Tensor | None = None, batch_size: int = 64,
                   num_workers: int = 0, progress: bool = False,
                   no_repeat_ngram: int | None = None) -> list[DecodedCaption]:
    """Decode every record (greedy for beam 1), from cached raw features when given;
    ``no_repeat_ngram`` None: the model's ``decode.no_repeat_ngram``."""
    was = model.training
    model.eval()
    if features is not None:
        batches = ((None, features[k:k + batch_size]) for k in range(0, len(records), batch_size))
    else:
        loader = _image_loader(model, records, batch_size=batch_size, num_workers=num_workers)
        batches = ((images, None) for _, images in loader)
    out: list[DecodedCaption] = []
    for images, feats in tqdm(batches, desc="decode", disable=not progress, leave=False,
                              total=math.ceil(len(records) / batch_size)):
        dec = model.generate(images=None if images is None else images.to(model.device),
                             raw_features=None if feats is None else feats.to(model.device),
                             max_len=max_len, beam_size=beam_size, length_penalty=length_penalty,
                             no_repeat_ngram=no_repeat_ngram)
        for i in range(len(dec.tokens)):
            n = int(dec.lengths[i])
            out.append(DecodedCaption(model.vocab.decode(dec.tokens[i, :n].tolist()),
                                      dec.alphas[i, : min(n + 1, dec.tokens.shape[1])].float().cpu()))
    model.train(was)
    return out


def references(records: Sequence[ImageRecord]) -> dict[int, list[str]]:
    return {r.image_id: [c.text for c in r.captions] for r in records}



def evaluate(model: Captioner, data: DataConfig, *, split: str = "test", beam_size: int = 5,
             length_penalty: float = 0.0, max_len: int = 20, max_images: int = 0, out_dir: str | Path | None = None,
             use_java: bool | None = None, spice: bool = True, progress: bool = False,
             on_bad_image: Callable[[Path, str], None] | None = None, align_maps: bool = True,
             no_repeat_ngram: int | None = None) -> EvalResult:
    """Decode ``split`` with beam search and score it.

    Args:
        model: the captioner (its encoder preprocesses the images).
        data: where the split is (usually the checkpoint's own ``data`` section).
        max_images: evaluate the first N images only (0: all).
        out_dir: where to write the captions and metrics json (None: nowhere).
        use_java: None auto-detects Java for METEOR, SPICE and the PTB tokenizer.
        on_bad_image: called with (path, reason) for each unreadable image, which is then left
            out of the scores (and listed in the metrics file under ``skipped_images``); None:
            ``data.bad_images`` decides (``error`` raises, ``skip`` leaves them out silently).
        align_maps: score attention correctness with each cell's weight at the centre of its
            feature's receptive field (``model.encoder.cell_origin``), where the feature
            looked; False: at the cell's centre.
        no_repeat_ngram: no caption repeats an n-gram (0: off); None: the model's
            ``decode.no_repeat_ngram``.
    """
    if no_repeat_ngram is None:
        no_repeat_ngram = model.config.decode.no_repeat_ngram if model.config else 0
    records = load_split(data, split, progress=progress)
    if max_images:
        records = records[:max_images]
    found = check_images(records, policy="skip" if on_bad_image else data.bad_images, workers=data.num_workers,
                         progress=progress)
    for path, reason in found.bad:
        if on_bad_image is not None:
            on_bad_image(path, reason)
    records = found.good
    decoded = decode_records(model, records, max_len=max_len, beam_size=beam_size, length_penalty=length_penalty,
                             num_workers=data.num_workers, progress=progress, no_repeat_ngram=no_repeat_ngram)
    captions = {r.image_id: " ".join(d.words) for r, d in zip(records, decoded)}
    metrics = caption_metrics(captions, references(records), use_java=use_java, spice=spice)

    correctness = hallucination = None
    path = instances_file(data, split)
    if path is not None:
        hallucination = chair(captions, load_ground_truth(path, image_ids=list(captions)))
        ids = [r.image_id for r in records]
        regions = load_regions(path, image_ids=ids)
        correctness = attention_correctness({r.image_id: d.words for r, d in zip(records, decoded)},
                                            {r.image_id: d.alphas for r, d in zip(records, decoded)},
                                            model.encoder.grid, regions,
                                            origin=model.encoder.cell_origin if align_maps else (0.5, 0.5))
    files: list[Path] = []
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        results = [{"image_id": i, "caption": c} for i, c in captions.items()]
        files.append(out / f"captions_{split}.json")
        files[-1].write_text(json.dumps(results, indent=1), encoding="utf-8")
        summary = {"split": split, "images": len(records), "beam_size": beam_size, "length_penalty": length_penalty,
                   "no_repeat_ngram": no_repeat_ngram, "scores": metrics.scores, "unavailable": metrics.unavailable,
                   "tokenizer": metrics.tokenizer,
                   "attention_correctness": correctness.as_dict() if correctness is not None else None,
                   "skipped_images": [{"file": str(p), "reason": r} for p, r in found.bad],
                   "chair": hallucination.as_dict() if hallucination is not None else None}
        files.append(out / f"metrics_{split}.json")
        files[-1].write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return EvalResult(metrics, correctness, captions, files, hallucination)
