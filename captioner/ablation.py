"""The attention ablation on the shapes set: one command, one table.

    python -m captioner.ablation --epochs 4 --beam 3

trains ``configs/shapes_{soft,hard,local,none}.yaml`` with the same budget and seed (a run
already in the output folder is resumed or reused), hard attention once per estimator
(``hard_<estimator>``: the same config with ``model.attention.hard.estimator`` set), evaluates
each best checkpoint on the test split with beam search, and writes ``ablation.md`` and
``ablation.json``. Attention correctness is scored on each variant's distribution (for hard
attention the location probabilities) and, as its own column, on the argmax one-hot maps.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from captioner.attention import HardAttention
from captioner.chair import ChairScorer
from captioner.config import load_config
from captioner.errors import CaptionerError


@dataclass(frozen=True)
class Variant:
    """A row: ``configs/shapes_<stem>.yaml`` with ``overrides``. ``run`` names the training run
    it shares with another row (default: its own) and ``inference`` the hard attention's
    test-time location when it differs from the config's: an evaluation-only row."""

    stem: str
    overrides: tuple[str, ...] = ()
    run: str = ""
    inference: str = ""


def _estimator(name: str) -> tuple[str, ...]:
    return (f"model.attention.hard.estimator={name}",)


VARIANTS: dict[str, Variant] = {
    "soft": Variant("soft"),
    # hard_<estimator>: shapes_hard.yaml (argmax at test time) with that estimator;
    # hard_<estimator>_expectation: the same checkpoint fed the expected context (the authors' generate_caps.py)
    **{f"hard_{e}": Variant("hard", _estimator(e)) for e in ("reinforce", "loo", "gumbel")},
    **{f"hard_{e}_expectation": Variant("hard", _estimator(e), run=f"hard_{e}", inference="expectation")
       for e in ("reinforce", "loo", "gumbel")},
    "local": Variant("local"),
    "none": Variant("none"),
    "mean": Variant("none", ("model.attention.name=mean",)),
}
DEFAULT_VARIANTS = ("soft", "hard_reinforce", "hard_loo", "hard_gumbel", "hard_gumbel_expectation", "local", "none")


@dataclass
class Row:
    """One variant's results (test split, beam search; val scores are greedy, best epoch)."""

    attention: str
    bleu4: float
    meteor: float | None
    cider: float
    correctness: float | None
    argmax_correctness: float | None
    uniform: float | None
    chair_s: float | None
    chair_i: float | None
    relation_accuracy: float | None
    val_bleu4: float
    val_cider: float
    epochs: int


def _argmax_maps(alphas: Tensor) -> Tensor:
    """(T, L) distributions -> (T, L) one-hot maps of their argmax."""
    return torch.nn.functional.one_hot(alphas.argmax(-1), alphas.shape[-1]).to(alphas.dtype)


def score_test(model, cfg, *, beam: int, use_java: bool | None) -> dict:
    """Beam-decode the test split; caption metrics and correctness on the distribution and on its argmax."""
    from captioner.correctness import attention_correctness, load_regions
    from captioner.data import load_split
    from captioner.evaluate import decode_records, instances_file, references
    from captioner.metrics import caption_metrics

    records = load_split(cfg.data, "test")
    decoded = decode_records(model, records, max_len=cfg.decode.max_len, beam_size=beam)
    captions = {r.image_id: " ".join(d.words) for r, d in zip(records, decoded)}
    scores = caption_metrics(captions, references(records), use_java=use_java, spice=False).scores
    out = {"bleu4": scores["bleu4"], "meteor": scores.get("meteor"), "cider": scores["cider"],
           "correctness": None, "argmax_correctness": None, "uniform": None,
           "chair_s": None, "chair_i": None, "relation_accuracy": None}
    path = instances_file(cfg.data, "test")
    if path is not None:
        hallucination = ChairScorer.for_split(cfg.data, "test", [r.image_id for r in records])(captions)
        out.update(chair_s=hallucination.chair_s, chair_i=hallucination.chair_i,
                   relation_accuracy=hallucination.relation_accuracy)
        origin = model.encoder.cell_origin  # each cell's weight where its feature looked, as evaluate scores it
        regions = load_regions(path, image_ids=[r.image_id for r in records])
        words = {r.image_id: d.words for r, d in zip(records, decoded)}
        dist = attention_correctness(words, {r.image_id: d.alphas for r, d in zip(records, decoded)},
                                     model.encoder.grid, regions, origin=origin)
        top = attention_correctness(words, {r.image_id: _argmax_maps(d.alphas) for r, d in zip(records, decoded)},
                                    model.encoder.grid, regions, origin=origin)
        out.update(correctness=dist.score, argmax_correctness=top.score, uniform=dist.uniform)
    return out


def run_variant(name: str, *, config_dir: Path, out_root: Path, epochs: int, beam: int,
                overrides: list[str], use_java: bool | None) -> Row:
    """Train (or resume, or reuse) the variant's run and score it on the test split. A row
    already scored with the same epochs, beam and overrides (``<out>/<name>.row.json``) is
    reused as it is: delete that file to score again."""
    saved = out_root / f"{name}.row.json"
    key = {"epochs": epochs, "beam": beam, "overrides": list(overrides), "java": use_java is not False}
    if saved.is_file():
        data = json.loads(saved.read_text(encoding="utf-8"))
        if data.get("key") == key:
            return Row(**data["row"])
    row = _train_and_score(name, config_dir=config_dir, out_root=out_root, epochs=epochs, beam=beam,
                           overrides=overrides, use_java=use_java)
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps({"key": key, "row": asdict(row)}, indent=1), encoding="utf-8")
    return row


def _train_and_score(name: str, *, config_dir: Path, out_root: Path, epochs: int, beam: int,
                     overrides: list[str], use_java: bool | None) -> Row:
    from captioner.model import Captioner
    from captioner.train import fit

    v = VARIANTS[name]
    cfg = load_config(config_dir / f"shapes_{v.stem}.yaml", [
        *v.overrides, f"train.epochs={epochs}", "train.patience=0", "train.max_minutes=0", "train.resume=auto",
        f"train.out_dir={out_root / (v.run or name)}", *overrides])
    result = fit(cfg, quiet=True)
    best = max(result.history, key=lambda h: h[f"val_{result.metric}"])
    model = Captioner.from_checkpoint(result.run_dir / "best.pt")
    if isinstance(model.decoder.attention, HardAttention):  # the row's test-time location, not the checkpoint's
        model.decoder.attention.inference = v.inference or cfg.model.attention.hard.inference
    test = score_test(model, cfg, beam=beam, use_java=use_java)
    return Row(attention=name, **test, val_bleu4=best["val_bleu4"], val_cider=best["val_cider"],
               epochs=len(result.history))


def markdown(rows: list[Row], *, epochs: int, beam: int) -> str:
    def pct(x: float | None) -> str:
        return "n/a" if x is None or x != x else f"{100 * x:.1f}"  # None or NaN (nothing to count)

    lines = [f"Shapes set, {epochs} epochs each, same seed; test split, beam {beam} (val: greedy, best epoch).", "",
             "| attention | BLEU-4 | METEOR | CIDEr-D | CHAIR_s | CHAIR_i | relation acc. | correctness "
             "| argmax correctness | uniform | val BLEU-4 | val CIDEr-D |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r.attention} | {pct(r.bleu4)} | {pct(r.meteor)} | {pct(r.cider)} | {pct(r.chair_s)} "
                     f"| {pct(r.chair_i)} | {pct(r.relation_accuracy)} | {pct(r.correctness)} "
                     f"| {pct(r.argmax_correctness)} | {pct(r.uniform)} | {pct(r.val_bleu4)} | {pct(r.val_cider)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m captioner.ablation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--epochs", type=int, default=4, help="training epochs per variant (default 4)")
    parser.add_argument("--beam", type=int, default=3, help="beam size for the test split (default 3)")
    parser.add_argument("--out", default="runs/ablation", help="output folder (default runs/ablation)")
    parser.add_argument("--configs", default="configs", help="folder with shapes_<variant>.yaml")
    parser.add_argument("--no-java", action="store_true", help="skip METEOR and the PTB tokenizer")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every variant")
    args = parser.parse_args(argv)
    out_root = Path(args.out)
    try:
        if args.epochs < 1 or args.beam < 1:
            raise CaptionerError("--epochs and --beam must be >= 1")
        rows = []
        for name in args.variants:
            print(f"[{name}] training / evaluating in {out_root / name}", flush=True)
            rows.append(run_variant(name, config_dir=Path(args.configs), out_root=out_root, epochs=args.epochs,
                                    beam=args.beam, overrides=args.overrides,
                                    use_java=False if args.no_java else None))
            print(markdown(rows[-1:], epochs=args.epochs, beam=args.beam).splitlines()[-1], flush=True)
    except CaptionerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = markdown(rows, epochs=args.epochs, beam=args.beam)
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "ablation.md").write_text(table, encoding="utf-8")
    (out_root / "ablation.json").write_text(json.dumps([asdict(r) for r in rows], indent=1), encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
