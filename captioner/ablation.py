"""The attention ablation on the shapes set: one command, one table.

    python -m captioner.ablation --epochs 4 --beam 3

trains ``configs/shapes_{soft,hard,local,none}.yaml`` with the same budget and seed (a run
already in the output folder is resumed or reused), evaluates each best checkpoint on the
test split with beam search, and writes ``ablation.md`` and ``ablation.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from captioner.config import load_config
from captioner.errors import CaptionerError

VARIANTS = ("soft", "hard", "local", "none")


@dataclass
class Row:
    """One variant's results (test split, beam search; val scores are greedy, best epoch)."""

    attention: str
    bleu4: float
    meteor: float | None
    cider: float
    correctness: float | None
    uniform: float | None
    val_bleu4: float
    val_cider: float
    epochs: int


def run_variant(name: str, *, config_dir: Path, out_root: Path, epochs: int, beam: int,
                overrides: list[str], use_java: bool | None) -> Row:
    from captioner.evaluate import evaluate
    from captioner.model import Captioner
    from captioner.train import fit

    cfg = load_config(config_dir / f"shapes_{name}.yaml", [
        f"train.epochs={epochs}", "train.patience=0", "train.max_minutes=0", "train.resume=auto",
        f"train.out_dir={out_root / name}", *overrides])
    result = fit(cfg, quiet=True)
    best = max(result.history, key=lambda h: h[f"val_{result.metric}"])
    model = Captioner.from_checkpoint(result.run_dir / "best.pt")
    ev = evaluate(model, cfg.data, split="test", beam_size=beam, out_dir=result.run_dir / "eval", use_java=use_java,
                  spice=False, max_len=cfg.decode.max_len)
    c = ev.correctness
    return Row(attention=name, bleu4=ev.metrics.scores["bleu4"], meteor=ev.metrics.scores.get("meteor"),
               cider=ev.metrics.scores["cider"], correctness=c.score if c else None, uniform=c.uniform if c else None,
               val_bleu4=best["val_bleu4"], val_cider=best["val_cider"], epochs=len(result.history))


def markdown(rows: list[Row], *, epochs: int, beam: int) -> str:
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}"

    lines = [f"Shapes set, {epochs} epochs each, same seed; test split, beam {beam} (val: greedy, best epoch).", "",
             "| attention | BLEU-4 | METEOR | CIDEr-D | attention correctness | uniform | val BLEU-4 | val CIDEr-D |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r.attention} | {pct(r.bleu4)} | {pct(r.meteor)} | {pct(r.cider)} | {pct(r.correctness)} "
                     f"| {pct(r.uniform)} | {pct(r.val_bleu4)} | {pct(r.val_cider)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m captioner.ablation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
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
