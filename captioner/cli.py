"""The ``captioner`` command.

    captioner data shapes --out DIR --n N --seed S     generate the built-in shapes set
    captioner train CONFIG [key=value ...]              train (e.g. configs/shapes_soft.yaml)
    captioner caption IMAGE... --checkpoint CKPT       print one caption per image
    captioner evaluate CKPT --split test --beam 5      COCO caption metrics + attention correctness
    captioner visualize IMAGE... --checkpoint CKPT --out DIR   per-word attention heatmaps (PNG)
    captioner report CKPT --images IMAGE... --out DIR  an HTML page: n-best captions, hover a word
    captioner demo                                      data, training, evaluation, heatmaps, report
    captioner export CKPT --out SLIM                    a checkpoint for inference only

Also ``python -m captioner ...``.

A mistake in the user's input (a file, a key, a value) prints one line, ``error: ...``,
and exits with code 2; ``--debug`` shows the traceback instead. The commands that read many
images (caption, visualize, report, evaluate) process every readable one, name each
unreadable one on stderr with its reason, and exit with code 1 at the end if there was any.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from captioner.errors import CaptionerError

EXAMPLES = """examples:
  captioner train configs/shapes_soft.yaml
  captioner train configs/shapes_soft.yaml train.epochs=5 train.lr=1e-3
  captioner caption photo.jpg --checkpoint runs/shapes_soft/best.pt
  captioner caption photos/ -c runs/shapes_soft/best.pt --out results.json
  captioner caption photos/ -c runs/shapes_soft/best.pt --beam 5 --n-best 3 --out nbest.jsonl
  captioner evaluate runs/shapes_soft/best.pt --split test --beam 5
  captioner data shapes --out data/shapes --n 3000 --seed 0
  captioner visualize photo.jpg --checkpoint runs/shapes_soft/best.pt --out attention --beam 3
  captioner report runs/shapes_soft/best.pt --images data/shapes/test --max-images 8 --out report
  captioner demo
  captioner export runs/shapes_soft/best.pt --out slim.pt
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
    if os.environ.get("RANK", "0") == "0":  # under torchrun every process returns here; rank 0 says it once
        print(f"best val {result.metric} {result.best_score:.4f} (most-common-caption baseline "
              f"{result.baseline_score:.4f}); run folder {result.run_dir}")
    return 0


class _BadInputs:
    """The inference commands' policy for unreadable inputs: every readable image is still
    processed; each unreadable one is named on stderr with its reason, as it is met; the
    command exits 1 at the end (after writing what it could) when there was any."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def __call__(self, path: str | Path, reason: str) -> None:
        self.items.append((str(path), reason))
        print(f"error: {path}: {reason}", file=sys.stderr)

    def exit_code(self, processed: int) -> int:
        """0 when every input was read, else 1 after a summary line."""
        if not self.items:
            return 0
        print(f"error: {len(self.items)} of {processed + len(self.items)} images could not be read "
              f"(named above); the other {processed} were processed", file=sys.stderr)
        return 1


def _checked_beam(beam: int | None) -> None:
    if beam is not None and beam < 1:
        raise CaptionerError(f"--beam must be >= 1; got {beam}")


def _load_model(args: argparse.Namespace):
    from captioner.device import resolve_device
    from captioner.model import Captioner

    return Captioner.from_checkpoint(args.checkpoint, device=resolve_device(args.device))


def _image_files(paths: list[str], limit: int = 0, on_missing=None) -> list[Path]:
    """Image files from files and folders (a folder's images in name order); the first ``limit``
    (0: all). A path that does not exist goes to ``on_missing(path, reason)`` when given, else raises."""
    suffixes = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
    files: list[Path] = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in suffixes)
        elif path.is_file():
            files.append(path)
        elif on_missing is not None:
            on_missing(path, "no such file or folder")
        else:
            raise CaptionerError(f"image not found: {path}")
    if not files and on_missing is None:
        raise CaptionerError(f"no images in {', '.join(paths)}")
    return files[:limit] if limit else files


def _readable(files: list[Path], bad: _BadInputs) -> list[tuple[Path, object]]:
    """(path, PIL image) of every file that loads; the others go to ``bad``."""
    from captioner.data.images import load_image

    out = []
    for path in files:
        try:
            out.append((path, load_image(path)))
        except CaptionerError as err:
            bad(path, str(err).removeprefix(f"{path}: "))
    return out


def _cmd_caption(args: argparse.Namespace) -> int:
    from captioner.results import caption_records, write_results

    _checked_beam(args.beam)
    if args.n_best is not None and args.n_best < 1:
        raise CaptionerError(f"--n-best must be >= 1; got {args.n_best}")
    fmt = args.format or ("jsonl" if args.out and args.out.endswith(".jsonl") else "coco")
    model = _load_model(args)
    bad = _BadInputs()
    files = _image_files(args.images, on_missing=bad)
    images = _readable(files, bad)
    records = caption_records(model, images, beam_size=args.beam, n_best=args.n_best, max_len=args.max_len)
    for rec in records:
        print(f"{rec['file']}\t{rec['caption']}")
    if args.out:
        write_results(records, args.out, fmt=fmt)
        print(f"wrote {len(records)} captions to {args.out} ({fmt})", file=sys.stderr)
    if not files and not bad.items:
        raise CaptionerError(f"no images in {', '.join(args.images)}")
    return bad.exit_code(len(records))


def _data_with_root(model, data_root: str | None):
    """The checkpoint's data section, at ``--data-root`` when given; a missing root says so.
    A shapes set there is taken as it was made (its ``shapes.json``): a set generated with
    another seed (``captioner data shapes --seed 7``) holds images the model never saw."""
    from captioner.config import replace
    from captioner.data.shapes import shapes_manifest

    data = model.config.data
    if data_root:
        data = replace(data, root=data_root)
        made = shapes_manifest(data_root) if data.format == "shapes" else None
        if made is not None:
            data = replace(data, shapes=replace(data.shapes, n=made["n"], seed=made["seed"],
                                                image_size=made["image_size"]))
    if data.format != "shapes" and not Path(data.root).exists():
        raise CaptionerError(f"data not found at {data.root} (the checkpoint's data.root); "
                             "pass --data-root DIR where the data set is now")
    return data


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from captioner.evaluate import evaluate

    _checked_beam(args.beam)
    if args.no_repeat_ngram is not None and args.no_repeat_ngram < 0:
        raise CaptionerError(f"--no-repeat-ngram must be >= 0 (0: off); got {args.no_repeat_ngram}")
    model = _load_model(args)
    data = _data_with_root(model, args.data_root)
    out_dir = Path(args.out) if args.out else Path(args.checkpoint).parent / "eval"
    bad = _BadInputs()
    result = evaluate(model, data, split=args.split, beam_size=args.beam, length_penalty=args.length_penalty,
                      max_len=args.max_len or model.config.decode.max_len, max_images=args.max_images,
                      out_dir=out_dir, use_java=False if args.no_java else None, spice=not args.no_spice,
                      progress=True, on_bad_image=bad, no_repeat_ngram=args.no_repeat_ngram)
    print(f"{args.split} split, {len(result.captions)} images, beam {args.beam}")
    print(result.table())
    print("wrote " + ", ".join(str(f) for f in result.files))
    return bad.exit_code(len(result.captions))


def _cmd_visualize(args: argparse.Namespace) -> int:
    from captioner.visualize import visualize_images

    _checked_beam(args.beam)
    model = _load_model(args)
    bad = _BadInputs()
    images = _image_files(args.images, on_missing=bad)
    if args.caption is not None:
        _warn_unknown_words(model, args.caption)
    done = visualize_images(model, images, args.out, beam_size=args.beam, caption=args.caption,
                            max_len=args.max_len, smooth=args.smooth, normalize=args.normalize,
                            progress=True, on_bad_image=bad)
    for item in done:
        print(f"{item.image}\t{item.result.text}\t{item.figure}")
    return bad.exit_code(len(done))


def _warn_unknown_words(model, caption: str) -> None:
    from captioner.vocab import tokenize

    unknown = sorted({w for w in tokenize(caption) if w not in model.vocab})
    if unknown:
        print(f"warning: not in the model's vocabulary, read as <unk>: {', '.join(unknown)}", file=sys.stderr)


def _cmd_report(args: argparse.Namespace) -> int:
    from captioner.report import write_report

    model = _load_model(args)
    bad = _BadInputs()
    images = _image_files(args.images, args.max_images, on_missing=bad)
    missing = len(bad.items)
    path = write_report(model, images, args.out, beam_size=args.beam, n_best=args.n_best, max_len=args.max_len,
                        metrics=args.metrics, checkpoint=args.checkpoint, smooth=args.smooth, progress=True,
                        on_bad_image=bad)
    shown = len(images) - (len(bad.items) - missing)
    print(f"wrote {path} ({shown} images, beam {args.beam}); open it in a browser")
    return bad.exit_code(shown)


def _cmd_export(args: argparse.Namespace) -> int:
    from captioner.checkpoint import export_checkpoint

    size = export_checkpoint(args.checkpoint, args.out)
    print(f"wrote {args.out} ({size / 2**20:.1f} MB: config, vocabulary and model weights only)")
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


def _add_data(sub) -> None:
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


def _add_config_arguments(cmd) -> None:
    """CONFIG and its key=value overrides (which may also follow the options: see parse_args)."""
    cmd.add_argument("config", help="YAML config file")
    cmd.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def _add_train(sub) -> None:
    train = sub.add_parser("train", help="train a captioner from a YAML config",
                           description="Train a captioner. CONFIG is a YAML file (configs/*.yaml); key=value "
                                       "arguments override it, e.g. train.epochs=5 model.attention.name=soft, "
                                       "before or after the options. The run folder (train.out_dir) gets "
                                       "config.yaml, vocab.json, metrics.jsonl, last.pt and best.pt.")
    _add_config_arguments(train)
    train.add_argument("--resume", metavar="CKPT", help="resume from a checkpoint ('auto': the run's last.pt)")
    train.add_argument("--quiet", action="store_true", help="no progress output")
    train.set_defaults(func=_cmd_train)

    feats = sub.add_parser("features", help="cache a frozen encoder's features on disk")
    feats_sub = feats.add_subparsers(dest="action", metavar="ACTION", required=True)
    ext = feats_sub.add_parser("extract", help="encode every image of the splits once",
                               description="Run the config's frozen encoder once over each split and store the "
                                           "annotation vectors (float16, memory-mapped shards, with a manifest) in "
                                           "data.feature_cache or <data.root>/features/...; training with the "
                                           "same config then reads them instead of encoding images.")
    _add_config_arguments(ext)
    ext.add_argument("--splits", nargs="+", default=["train", "val"], choices=("train", "val", "test"),
                     help="splits to encode (default: train val)")
    ext.set_defaults(func=_cmd_features)


def _add_inference_options(cmd, *, beam_default: int | None) -> None:
    """Options every command that decodes with a checkpoint shares."""
    beam_help = f"beam size (default {beam_default}; 1 is greedy)" if beam_default else \
        "beam size (default: the config's decode.beam_size; 1 is greedy)"
    cmd.add_argument("--beam", type=int, default=beam_default, help=beam_help)
    cmd.add_argument("--max-len", type=int, default=None, help="maximum words (default: the config's decode.max_len)")
    cmd.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N (default auto)")


def _add_caption(sub) -> None:
    cap = sub.add_parser("caption", help="caption images with a trained checkpoint",
                         description="Print 'IMAGE<TAB>caption' for each image (files or folders); --out also "
                                     "writes them for programs: COCO results json ([{image_id, caption}]) or JSON "
                                     "lines with the n-best captions and their log-probabilities. Unreadable "
                                     "images are named on stderr; the others are captioned; the exit code is 1 "
                                     "if any image could not be read.")
    cap.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    cap.add_argument("--checkpoint", "-c", required=True, help="a checkpoint written by captioner train")
    _add_inference_options(cap, beam_default=None)
    cap.add_argument("--out", default=None, help="write the captions to this file too (.json or .jsonl)")
    cap.add_argument("--format", choices=("coco", "jsonl"), default=None,
                     help="coco: [{image_id, caption}]; jsonl: one line per image with the n-best "
                          "(default: jsonl for a .jsonl file, else coco)")
    cap.add_argument("--n-best", type=int, default=None, help="captions per image in jsonl (default 1; <= beam)")
    cap.set_defaults(func=_cmd_caption)


def _add_evaluate(sub) -> None:
    ev = sub.add_parser("evaluate", help="score a checkpoint on a split with the COCO caption metrics",
                        description="Decode a split with beam search and print BLEU-1..4, METEOR, ROUGE-L, "
                                    "CIDEr-D (and SPICE when it can run), computed as the COCO caption "
                                    "evaluation does, plus attention correctness when the split has instance "
                                    "annotations. Writes the captions in the COCO results format and the "
                                    "metrics as JSON. Unreadable images are named, left out of the scores and "
                                    "listed in the metrics file; the exit code is then 1.")
    ev.add_argument("checkpoint", help="a checkpoint written by captioner train")
    ev.add_argument("--split", default="test", choices=("train", "val", "test"), help="default: test")
    _add_inference_options(ev, beam_default=5)
    ev.add_argument("--length-penalty", type=float, default=0.0, help="rank beams by log p / (words + 1) ** this")
    ev.add_argument("--no-repeat-ngram", type=int, default=None, metavar="N",
                    help="no caption repeats an n-gram (0: off; default: the checkpoint's decode.no_repeat_ngram)")
    ev.add_argument("--max-images", type=int, default=0, help="evaluate the first N images only (default: all)")
    ev.add_argument("--data-root", default=None, help="where the data set is, if not where it was for training")
    ev.add_argument("--out", default=None, help="output folder (default: eval/ beside the checkpoint)")
    ev.add_argument("--no-java", action="store_true", help="skip METEOR, SPICE and the PTB tokenizer")
    ev.add_argument("--no-spice", action="store_true", help="skip SPICE")
    ev.set_defaults(func=_cmd_evaluate)


def _add_visualize(sub) -> None:
    vis = sub.add_parser("visualize", help="draw where the model looked, word by word (PNG per image)",
                         description="Caption each image (or read --caption with teacher forcing) and write "
                                     "OUT/<image name>.png: the image, then one panel per word with its attention "
                                     "map over the whole original image, the gate value beta and how peaked the "
                                     "map is (its maximum over uniform attention's). Unreadable images are "
                                     "named on stderr and skipped; the exit code is then 1.")
    vis.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    vis.add_argument("--checkpoint", "-c", required=True, help="a checkpoint written by captioner train")
    vis.add_argument("--out", required=True, help="output folder for the PNGs")
    _add_inference_options(vis, beam_default=None)
    vis.add_argument("--caption", default=None, help='draw the attention for this caption instead (e.g. "a red circle")')
    vis.add_argument("--smooth", type=float, default=0.0, help="Gaussian smoothing of the maps in grid cells (default 0)")
    vis.add_argument("--normalize", choices=("word", "caption", "absolute"), default="caption",
                     help="colour scale: each map to its own maximum (word), all maps of a caption to their "
                          "common maximum (caption, the default), or weights as they are, 0..1 (absolute)")
    vis.set_defaults(func=_cmd_visualize)


def _add_report(sub) -> None:
    rep = sub.add_parser("report", help="write a self-contained HTML report: n-best captions, hover a word",
                         description="Beam-search each image and write OUT/report.html, one static file (images "
                                     "and maps inline; no server, no network): per image the n-best captions with "
                                     "their log-probabilities; hover or click a word to see its attention map. "
                                     "Unreadable images are named on stderr and left out; the exit code is then 1.")
    rep.add_argument("checkpoint", help="a checkpoint written by captioner train")
    rep.add_argument("--images", nargs="+", required=True, metavar="IMAGE", help="image files or folders")
    rep.add_argument("--out", required=True, help="output folder (gets report.html)")
    _add_inference_options(rep, beam_default=3)
    rep.add_argument("--n-best", type=int, default=None, help="captions per image (default: the beam size)")
    rep.add_argument("--max-images", type=int, default=0, help="the first N images only (default: all)")
    rep.add_argument("--metrics", default=None, help="a metrics_<split>.json from captioner evaluate to show on top")
    rep.add_argument("--smooth", type=float, default=0.0, help="initial smoothing in grid cells (a slider on the page)")
    rep.set_defaults(func=_cmd_report)


def _add_demo(sub) -> None:
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

    export = sub.add_parser("export", help="write a slim checkpoint for inference (no optimizer or trainer state)",
                            description="Copy a checkpoint's config, vocabulary and model weights into a new file, "
                                        "leaving out what only resuming needs (optimizer moments, scheduler, "
                                        "RNG states): about a third of a paper-size best.pt.")
    export.add_argument("checkpoint", help="a checkpoint written by captioner train")
    export.add_argument("--out", required=True, help="the slim checkpoint to write")
    export.set_defaults(func=_cmd_export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="captioner", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Show, Attend and Tell: image captioning with visual attention.", epilog=EXAMPLES)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_data, _add_train, _add_caption, _add_evaluate, _add_visualize, _add_report, _add_demo):
        add(sub)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse; ``key=value`` overrides may also come after the options (``train CFG --resume auto k=v``)."""
    args, extra = parser.parse_known_args(argv)
    takes_overrides = hasattr(args, "overrides")
    stray = [e for e in extra if not (takes_overrides and "=" in e and not e.startswith("-"))]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    return args


def _one_line(err: BaseException) -> str:
    """A DataLoader worker wraps errors with the worker's traceback: keep the message only."""
    text = str(err)
    if "Original Traceback" in text:
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
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
