"""Two training runs side by side, epoch by epoch, from their metrics.jsonl.

    python tools/compare_runs.py runs/fp32 runs/bf16            # a markdown table
    python tools/compare_runs.py runs/fp32 runs/bf16 --plot curves.png

Per epoch: the mean training cross-entropy (``train_xent``), validation CIDEr-D and the
minutes the run had taken, for each run, and the relative difference of the second run's
training cross-entropy from the first's. The last line gives the largest such difference:
how closely, say, a ``train.amp=bf16`` run follows the float32 one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def epochs(run: Path) -> dict[int, dict]:
    """epoch -> its end-of-epoch metrics line (the one with ``train_xent``)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        sys.exit(f"{path}: not found (a run folder holds metrics.jsonl)")
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            sys.exit(f"{path}, line {n}: not JSON ({err})")
        if "train_xent" in row:
            out[row["epoch"]] = row
    if not out:
        sys.exit(f"{path}: no end-of-epoch lines (train_xent)")
    return out


def table(a: dict[int, dict], b: dict[int, dict], names: tuple[str, str]) -> tuple[list[str], float]:
    shared = sorted(set(a) & set(b))
    lines = [f"| epoch | train xent {names[0]} | train xent {names[1]} | difference | val CIDEr-D {names[0]} | "
             f"val CIDEr-D {names[1]} | minutes {names[0]} | minutes {names[1]} |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    worst = 0.0
    for e in shared:
        x, y = a[e]["train_xent"], b[e]["train_xent"]
        diff = (y - x) / x
        worst = max(worst, abs(diff))
        cider = [f"{r[e]['val_cider']:.3f}" if "val_cider" in r[e] else "" for r in (a, b)]
        lines.append(f"| {e} | {x:.4f} | {y:.4f} | {100 * diff:+.2f}% | {cider[0]} | {cider[1]} | "
                     f"{a[e].get('minutes', float('nan')):.1f} | {b[e].get('minutes', float('nan')):.1f} |")
    return lines, worst


def plot(a: dict[int, dict], b: dict[int, dict], names: tuple[str, str], out: Path) -> None:
    import matplotlib  # noqa: PLC0415  (only with --plot)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for run, name in zip((a, b), names):
        e = sorted(run)
        ax1.plot(e, [run[i]["train_xent"] for i in e], marker="o", ms=3, label=name)
        ax2.plot(e, [run[i].get("val_cider", float("nan")) for i in e], marker="o", ms=3, label=name)
    ax1.set(xlabel="epoch", ylabel="training cross-entropy")
    ax2.set(xlabel="epoch", ylabel="validation CIDEr-D")
    ax1.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("first", type=Path)
    p.add_argument("second", type=Path)
    p.add_argument("--plot", type=Path, default=None, help="also draw both curves into this PNG")
    args = p.parse_args(argv)
    a, b = epochs(args.first), epochs(args.second)
    names = (args.first.name, args.second.name)
    lines, worst = table(a, b, names)
    print("\n".join(lines))
    print(f"\nlargest difference in training cross-entropy: {100 * worst:.2f}% over {len(lines) - 2} epochs")
    if args.plot:
        plot(a, b, names, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
