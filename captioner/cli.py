"""The ``captioner`` command.

    captioner data shapes --out DIR --n N --seed S     generate the built-in shapes set
    captioner train CONFIG [key=value ...]              train (e.g. configs/shapes_soft.yaml)
    captioner caption IMAGE... --checkpoint CKPT       print one caption per image
    captioner evaluate CKPT --split test --beam 5      COCO caption metrics + attention correctness
    captioner visualize IMAGE... --checkpoint CKPT --out DIR   per-word attention heatmaps (PNG)
    captioner report CKPT --images IMAGE... --out DIR  an HTML page: n-best captions, hover a word
    captioner demo                                      data, training, evaluation, heatmaps, report

A mistake in the user's input (a file, a key, a value) prints one line, ``error: ...``,
and exits with code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from captioner.errors import CaptionerError

EXAMPLES = """examples:
  captioner train configs/shapes_soft.yaml
  captioner train configs/shapes_soft.yaml train.epochs=5 train.lr=1e-3
  captioner caption photo.jpg --checkpoint runs/shapes_soft/best.pt
  captioner evaluate runs/shapes_soft/best.pt --split test --beam 5
  captioner data shapes --out data/shapes --n 3000 --seed 0
  captioner visualize photo.jpg --checkpoint runs/shapes_soft/best.pt --out attention --beam 3
  captioner report runs/shapes_soft/best.pt --images data/shapes/test --max-images 8 --out report
  captioner demo
"""


def _cmd_shapes(args: argparse.Namespace) -> int:
    from captioner.data.shapes import generate_shapes

    if args.n < 3:
        raise CaptionerError(f"--n must be at least 3 (one image per split); got {args.n}")
    summary = generate_shapes(args.out, n=args.n, seed=args.seed, image_size=args.image_size,
                              workers=args.workers, progress=True)
    splits = ", ".join(f"{k} {v}" for k, v in summary["splits"].items())
    print(f"wrote {summary['n']} images ({splits}) to {args.out} in {summary['seconds']:.1f} s")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import captioner.scst  # noqa: F401  registers train.objective=scst
    from captioner.config import load_config
    from captioner.train import fit

    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"train.resume={args.resume}")
    cfg = load_config(args.config, overrides)
    result = fit(cfg, quiet=args.quiet)
    print(f"best val {result.metric} {result.best_score:.4f} (most-common-caption baseline "
          f"{result.baseline_score:.4f}); run folder {result.run_dir}")
    return 0


def _cmd_caption(args: argparse.Namespace) -> int:
    from captioner.model import Captioner

    model = Captioner.from_checkpoint(args.checkpoint, device=args.device)
    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        raise CaptionerError(f"image not found: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if args.beam is not None and args.beam < 1:
        raise CaptionerError(f"--beam must be >= 1; got {args.beam}")
    results = model.caption(list(args.images), max_len=args.max_len, beam_size=args.beam)
    for path, res in zip(args.images, results):
        print(f"{path}\t{res.text}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from captioner.config import replace
    from captioner.evaluate import evaluate
    from captioner.model import Captioner

    if args.beam < 1:
        raise CaptionerError(f"--beam must be >= 1; got {args.beam}")
    model = Captioner.from_checkpoint(args.checkpoint, device=args.device)
    data = model.config.data
    if args.data_root:
        data = replace(data, root=args.data_root)
    out_dir = Path(args.out) if args.out else Path(args.checkpoint).parent / "eval"
    result = evaluate(model, data, split=args.split, beam_size=args.beam, length_penalty=args.length_penalty,
                      max_len=args.max_len or model.config.decode.max_len, max_images=args.max_images,
                      out_dir=out_dir, use_java=False if args.no_java else None, spice=not args.no_spice,
                      progress=True)
    print(f"{args.split} split, {len(result.captions)} images, beam {args.beam}")
    print(result.table())
    print("wrote " + ", ".join(str(f) for f in result.files))
    return 0


def _image_files(paths: list[str], limit: int = 0) -> list[Path]:
    """Image files from files and folders (a folder's images in name order); the first ``limit`` (0: all)."""
    suffixes = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
    files: list[Path] = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in suffixes)
        elif path.is_file():
            files.append(path)
        else:
            raise CaptionerError(f"image not found: {path}")
    if not files:
        raise CaptionerError(f"no images in {', '.join(paths)}")
    return files[:limit] if limit else files


def _cmd_visualize(args: argparse.Namespace) -> int:
    from captioner.model import Captioner
    from captioner.visualize import visualize_images

    images = _image_files(args.images)
    if args.beam is not None and args.beam < 1:
        raise CaptionerError(f"--beam must be >= 1; got {args.beam}")
    model = Captioner.from_checkpoint(args.checkpoint, device=args.device)
    done = visualize_images(model, images, args.out, beam_size=args.beam, caption=args.caption,
                            max_len=args.max_len, smooth=args.smooth, progress=True)
    for item in done:
        print(f"{item.image}\t{item.result.text}\t{item.figure}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from captioner.model import Captioner
    from captioner.report import write_report

    images = _image_files(args.images, args.max_images)
    model = Captioner.from_checkpoint(args.checkpoint, device=args.device)
    path = write_report(model, images, args.out, beam_size=args.beam, n_best=args.n_best, max_len=args.max_len,
                        metrics=args.metrics, checkpoint=args.checkpoint, smooth=args.smooth, progress=True)
    print(f"wrote {path} ({len(images)} images, beam {args.beam}); open it in a browser")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from captioner.demo import run_demo

    result = run_demo(out=args.out, tiny=args.tiny, fresh=args.fresh, minutes=args.minutes,
                      eval_images=args.eval_images, images=args.images, beam_size=args.beam,
                      overrides=args.overrides)
    print(result.summary())
    return 0


def _cmd_features(args: argparse.Namespace) -> int:
    from captioner.config import load_config
    from captioner.data.cache import extract_for_config

    cfg = load_config(args.config, list(args.overrides))
    folder = extract_for_config(cfg, args.splits, progress=True)
    print(f"features of {', '.join(args.splits)} written to {folder}; training with this config uses them")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="captioner", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Show, Attend and Tell: image captioning with visual attention.", epilog=EXAMPLES)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = sub.add_parser("data", help="make or prepare data sets")
    data_sub = data.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    shapes = data_sub.add_parser("shapes", help="generate the built-in shapes captioning set (COCO layout)",
                                 description="Generate images of 1-4 coloured shapes with 5 captions each, "
                                             "COCO captions/instances json and word-to-object grounding.")
    shapes.add_argument("--out", required=True, help="output folder")
    shapes.add_argument("--n", type=int, default=3000, help="number of images over all splits (default 3000)")
    shapes.add_argument("--seed", type=int, default=0, help="random seed (the set is deterministic for a seed)")
    shapes.add_argument("--image-size", type=int, default=128, help="image side in pixels (default 128)")
    shapes.add_argument("--workers", type=int, default=0, help="worker processes (default 0: in-process)")
    shapes.set_defaults(func=_cmd_shapes)

    train = sub.add_parser("train", help="train a captioner from a YAML config",
                           description="Train a captioner. CONFIG is a YAML file (configs/*.yaml); key=value "
                                       "arguments override it, e.g. train.epochs=5 model.attention.name=soft. "
                                       "The run folder (train.out_dir) gets config.yaml, vocab.json, "
                                       "metrics.jsonl, last.pt and best.pt.")
    train.add_argument("config", help="YAML config file")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    train.add_argument("--resume", metavar="CKPT", help="resume from a checkpoint ('auto': the run's last.pt)")
    train.add_argument("--quiet", action="store_true", help="no progress output")
    train.set_defaults(func=_cmd_train)

    cap = sub.add_parser("caption", help="caption images with a trained checkpoint",
                         description="Print 'IMAGE<TAB>caption' for each image.")
    cap.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    cap.add_argument("--checkpoint", "-c", required=True, help="a checkpoint written by captioner train")
    cap.add_argument("--max-len", type=int, default=None, help="maximum words (default: the config's decode.max_len)")
    cap.add_argument("--beam", type=int, default=None, help="beam size (default: the config's decode.beam_size; 1 is greedy)")
    cap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    cap.set_defaults(func=_cmd_caption)

    ev = sub.add_parser("evaluate", help="score a checkpoint on a split with the COCO caption metrics",
                        description="Decode a split with beam search and print BLEU-1..4, METEOR, ROUGE-L, "
                                    "CIDEr-D (and SPICE when it can run), computed as the COCO caption "
                                    "evaluation does, plus attention correctness when the split has instance "
                                    "annotations. Writes the captions in the COCO results format and the "
                                    "metrics as JSON.")
    ev.add_argument("checkpoint", help="a checkpoint written by captioner train")
    ev.add_argument("--split", default="test", choices=("train", "val", "test"), help="default: test")
    ev.add_argument("--beam", type=int, default=5, help="beam size (default 5; 1 is greedy)")
    ev.add_argument("--length-penalty", type=float, default=0.0, help="rank beams by log p / (words + 1) ** this")
    ev.add_argument("--max-len", type=int, default=None, help="maximum words (default: the config's decode.max_len)")
    ev.add_argument("--max-images", type=int, default=0, help="evaluate the first N images only (default: all)")
    ev.add_argument("--data-root", default=None, help="where the data set is, if not where it was for training")
    ev.add_argument("--out", default=None, help="output folder (default: eval/ beside the checkpoint)")
    ev.add_argument("--no-java", action="store_true", help="skip METEOR, SPICE and the PTB tokenizer")
    ev.add_argument("--no-spice", action="store_true", help="skip SPICE")
    ev.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ev.set_defaults(func=_cmd_evaluate)

    feats = sub.add_parser("features", help="cache a frozen encoder's features on disk")
    feats_sub = feats.add_subparsers(dest="action", metavar="ACTION", required=True)
    ext = feats_sub.add_parser("extract", help="encode every image of the splits once",
                               description="Run the config's frozen encoder once over each split and store the "
                                           "annotation vectors (float16, memory-mapped shards, with a manifest) in "
                                           "data.feature_cache or <data.root>/features/...; training with the "
                                           "same config then reads them instead of encoding images.")
    ext.add_argument("config", help="YAML config file")
    ext.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    ext.add_argument("--splits", nargs="+", default=["train", "val"], choices=("train", "val", "test"),
                     help="splits to encode (default: train val)")
    ext.set_defaults(func=_cmd_features)

    vis = sub.add_parser("visualize", help="draw where the model looked, word by word (PNG per image)",
                         description="Caption each image (or read --caption with teacher forcing) and write "
                                     "OUT/<image name>.png: the image, then one panel per word with its attention "
                                     "map over the whole original image and the gate value beta.")
    vis.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    vis.add_argument("--checkpoint", "-c", required=True, help="a checkpoint written by captioner train")
    vis.add_argument("--out", required=True, help="output folder for the PNGs")
    vis.add_argument("--beam", type=int, default=None, help="beam size (default: the config's decode.beam_size; 1 is greedy)")
    vis.add_argument("--caption", default=None, help='draw the attention for this caption instead (e.g. "a red circle")')
    vis.add_argument("--max-len", type=int, default=None, help="maximum words (default: the config's decode.max_len)")
    vis.add_argument("--smooth", type=float, default=0.0, help="Gaussian smoothing of the maps in grid cells (default 0)")
    vis.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    vis.set_defaults(func=_cmd_visualize)

    rep = sub.add_parser("report", help="write a self-contained HTML report: n-best captions, hover a word",
                         description="Beam-search each image and write OUT/report.html, one static file (images "
                                     "and maps inline; no server, no network): per image the n-best captions with "
                                     "their log-probabilities; hover or click a word to see its attention map.")
    rep.add_argument("checkpoint", help="a checkpoint written by captioner train")
    rep.add_argument("--images", nargs="+", required=True, metavar="IMAGE", help="image files or folders")
    rep.add_argument("--out", required=True, help="output folder (gets report.html)")
    rep.add_argument("--beam", type=int, default=3, help="beam size (default 3)")
    rep.add_argument("--n-best", type=int, default=None, help="captions per image (default: the beam size)")
    rep.add_argument("--max-len", type=int, default=None, help="maximum words (default: the config's decode.max_len)")
    rep.add_argument("--max-images", type=int, default=0, help="the first N images only (default: all)")
    rep.add_argument("--metrics", default=None, help="a metrics_<split>.json from captioner evaluate to show on top")
    rep.add_argument("--smooth", type=float, default=0.0, help="initial smoothing in grid cells (a slider on the page)")
    rep.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    rep.set_defaults(func=_cmd_report)

    demo = sub.add_parser("demo", help="the whole pipeline on the shapes set in about 10 minutes",
                          description="Generate the shapes set if absent (data/shapes), train soft attention "
                                      "(configs/shapes_soft.yaml, a time budget), evaluate on the test split, "
                                      "draw heatmaps of held-out images and write an HTML report. Re-running "
                                      "reuses the data and a finished run of the same config.")
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for train")
    demo.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    demo.add_argument("--minutes", type=float, default=7.0, help="training time budget (default 7)")
    demo.add_argument("--eval-images", type=int, default=200, help="evaluate on the first N test images (default 200)")
    demo.add_argument("--images", type=int, default=6, help="held-out images to draw and report (default 6)")
    demo.add_argument("--beam", type=int, default=3, help="beam size (default 3)")
    demo.add_argument("--fresh", action="store_true", help="delete the demo's run folder and train again")
    demo.add_argument("--tiny", action="store_true", help="a tiny set and model, in seconds: a smoke test")
    demo.set_defaults(func=_cmd_demo)
    return parser


def _one_line(err: BaseException) -> str:
    """A DataLoader worker wraps errors with the worker's traceback: keep the message only."""
    text = str(err)
    if "Original Traceback" in text:
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CaptionerError as err:
        if args.debug:
            traceback.print_exc()
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
