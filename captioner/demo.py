"""``captioner demo``: the whole pipeline on the built-in shapes set, about ten minutes on a CPU.

1. data: generate the shapes set (``data/shapes``) unless it is there;
2. train: soft attention with ``configs/shapes_soft.yaml`` under a time budget, skipped
   when the run already finished with the same config (an interrupted run resumes);
3. evaluate: the first test images with beam search (COCO metrics, attention correctness,
   object hallucination CHAIR and the accuracy of stated relations);
4. visualize: a heatmap PNG per held-out image, one panel per word;
5. report: ``report.html``, hover a word to see where the model looked;

then a summary of where everything is. The output folder (``runs/demo``) holds the run
folder ``<out>/<config name>/``, ``eval/``, ``attention/`` and ``report.html``.
``--fresh`` deletes the run folder only (after checking it holds nothing but a run's
files); the data set is never deleted.

:func:`demo_config` and :func:`train_or_reuse` are also what the notebooks use to get a
trained model; ``tiny=True`` makes everything run in seconds (a smoke test: the captions
are poor).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from captioner.checkpoint import load_checkpoint
from captioner.config import Config, config_to_dict, load_config
from captioner.data import load_split
from captioner.data.shapes import ensure_shapes
from captioner.errors import CaptionerError
from captioner.evaluate import EvalResult, evaluate
from captioner.model import Captioner
from captioner.progress import tqdm
from captioner.report import write_report
from captioner.train import fit, run_dir_of
from captioner.visualize import Visualized, visualize_images

CONFIGS = Path(__file__).resolve().parent.parent / "configs"  # the repository's configs/

# A model and data set small enough to train in seconds: for smoke tests and CI, not for captions.
TINY_OVERRIDES = (
    "data.shapes.n=40", "data.shapes.image_size=32",
    "model.encoder.backbone=resnet18", "model.encoder.weights=null",  # no weights needed
    "model.encoder.layer=layer1", "model.encoder.image_size=32",
    "model.attention.dim=16", "model.decoder.embed_dim=16", "model.decoder.hidden_dim=32",
    "model.decoder.dropout=0.0",
    "train.epochs=1", "train.batch_size=32", "train.val_images=4", "decode.max_len=5",
)

DEMO_MINUTES = 7.0  # the training budget: with data, evaluation and drawing, about 10 minutes on 2 cores
_DONE = "trained.json"  # written into the run folder when training finished
_RUN_FILES = re.compile(r"(config\.yaml|vocab\.json|metrics\.jsonl|(last|best)\.pt(\..+\.tmp)?|trained\.json)")


def config_file(name: str | Path) -> Path:
    """A config by path, or by name in the repository's ``configs/`` (``shapes_soft``)."""
    path = Path(name)
    if path.is_file():
        return path
    bundled = CONFIGS / f"{path.stem}.yaml"
    if bundled.is_file():
        return bundled
    raise CaptionerError(f"config not found: {name} (nor {bundled}); pass a config file")


def demo_config(name: str | Path = "shapes_soft", *, out: str | Path = "runs/demo", data_root: str | Path | None = None,
                tiny: bool = False, minutes: float | None = DEMO_MINUTES, overrides: Sequence[str] = ()) -> Config:
    """The demo's config: ``name`` (a file, or a config in ``configs/``) with its run folder
    at ``<out>/<config name>``, resuming an interrupted run.

    Args:
        data_root: where the shapes set is (default: the config's, ``data/shapes``).
        tiny: :data:`TINY_OVERRIDES`, and the tiny set in ``<out>/shapes-tiny``: train in seconds.
        minutes: the training time budget (``train.max_minutes``; None: the config's).
        overrides: ``key=value`` strings applied last.
    """
    extra: list[str] = []
    if tiny:
        extra += [*TINY_OVERRIDES, f"data.root={Path(out) / 'shapes-tiny'}"]
    elif data_root is not None:
        extra.append(f"data.root={data_root}")
    if minutes is not None:
        extra.append(f"train.max_minutes={minutes}")
    extra += [f"train.out_dir={Path(out)}/{{name}}", "train.resume=auto"]
    return load_config(config_file(name), [*extra, *overrides])


def _identity(config: dict) -> dict:
    """What makes two runs the same: the whole config but where its files are (data.root,
    train.out_dir); the shapes set at a root is checked against its own parameters."""
    return {**config, "data": {**config["data"], "root": None}, "train": {**config["train"], "out_dir": None}}


def finished_run(run_dir: Path, cfg: Config) -> dict | None:
    """The run's ``trained.json`` if training finished with this config and best.pt is there."""
    try:
        done = json.loads((run_dir / _DONE).read_text(encoding="utf-8"))
        same = _identity(done["config"]) == _identity(config_to_dict(cfg))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return done if same and (run_dir / "best.pt").is_file() else None


def remove_run(run_dir: Path) -> None:
    """Delete a run folder, refusing when it holds anything a training run does not write."""
    if not run_dir.exists():
        return
    foreign = [p.name for p in run_dir.iterdir() if not _RUN_FILES.fullmatch(p.name)]
    if foreign:
        raise CaptionerError(f"{run_dir} holds files a run does not write ({', '.join(sorted(foreign)[:3])}); "
                             "not deleting it: remove it yourself or choose another --out")
    shutil.rmtree(run_dir)


def train_or_reuse(cfg: Config, *, quiet: bool = False) -> Path:
    """Train ``cfg`` unless its run folder holds a finished run of this exact config;
    returns its ``best.pt``. A run of another config in that folder is replaced; an
    interrupted run of this config resumes from its ``last.pt``."""
    run_dir = run_dir_of(cfg)
    if finished_run(run_dir, cfg) is not None:
        return run_dir / "best.pt"
    previous = run_dir / "last.pt"
    if previous.is_file() and _identity(load_checkpoint(previous)["config"]) != _identity(config_to_dict(cfg)):
        if not quiet:
            tqdm.write(f"{run_dir} holds a run of another config: training anew")
        remove_run(run_dir)
    result = fit(cfg, quiet=quiet)
    (run_dir / _DONE).write_text(json.dumps({
        "config": config_to_dict(cfg), "metric": result.metric, "best": result.best_score,
        "baseline": result.baseline_score, "epochs": result.epochs}, indent=1), encoding="utf-8")
    return run_dir / "best.pt"


@dataclass
class DemoResult:
    """Where the demo put everything, and what it measured."""

    data: Path
    checkpoint: Path
    trained: dict
    evaluation: EvalResult
    figures: list[Visualized]
    report: Path
    seconds: float

    def summary(self) -> str:
        """A few lines: what was made, how it scored, where it is."""
        t, scores, c = self.trained, self.evaluation.metrics.scores, self.evaluation.correctness
        names = {"bleu4": "BLEU-4", "meteor": "METEOR", "cider": "CIDEr-D"}
        test = "  ".join(f"{name} {100 * scores[key]:.1f}" for key, name in names.items() if key in scores)
        if c is not None and c.words:
            test += f"  attention correctness {100 * c.score:.1f} (uniform {100 * c.uniform:.1f})"
        epochs = f"{t['epochs']} epoch{'s' if t['epochs'] != 1 else ''}"
        lines = [f"demo done in {self.seconds / 60:.1f} min",
                 f"  data      {self.data}",
                 (f"  model     {self.checkpoint}  (val {t['metric']} {t['best']:.3f}; "
                  f"most-common-caption baseline {t['baseline']:.3f}; {epochs})"),
                 f"  test      {test}  [x100; {len(self.evaluation.captions)} images]  -> {self.evaluation.files[-1]}"]
        if self.evaluation.chair is not None:
            lines.append(f"  objects   {self.evaluation.chair.line()}")
        for k, fig in enumerate(self.figures):
            lines.append(f"  {'captions' if k == 0 else '':<9} {fig.image.name}  {fig.result.text}")
        if self.figures:
            lines.append(f"  heatmaps  {self.figures[0].figure.parent}/  ({len(self.figures)} PNGs)")
        lines.append(f"  report    {self.report}  (open it in a browser; hover a word)")
        return "\n".join(lines)


def run_demo(*, out: str | Path = "runs/demo", tiny: bool = False, fresh: bool = False, minutes: float = DEMO_MINUTES,
             eval_images: int = 200, images: int = 6, beam_size: int = 3, overrides: Sequence[str] = (),
             say=print) -> DemoResult:
    """Data, training, evaluation, heatmaps and report, reusing what exists (see the module doc).

    Args:
        out: the demo's folder.
        tiny: train a tiny model on a tiny set in seconds (a smoke test).
        fresh: delete the demo's run folder first and train again.
        minutes: training time budget.
        eval_images: evaluate on the first N test images; images: draw the first N.
        overrides: ``key=value`` config overrides.
        say: where progress lines go.
    """
    start = time.monotonic()
    out = Path(out)
    cfg = demo_config(out=out, tiny=tiny, minutes=minutes, overrides=overrides)
    run_dir = run_dir_of(cfg)
    if fresh:
        say(f"--fresh: removing {run_dir}")
        remove_run(run_dir)

    say(f"[1/5] data: the shapes set in {cfg.data.root}")
    s = cfg.data.shapes
    data = ensure_shapes(cfg.data.root, n=s.n, seed=s.seed, image_size=s.image_size, progress=True)

    reused = finished_run(run_dir, cfg) is not None
    what = "reusing the finished run in" if reused else f"{cfg.model.attention.name} attention, run folder"
    budget = f" (at most {cfg.train.max_minutes:g} min)" if cfg.train.max_minutes and not reused else ""
    say(f"[2/5] train: {what} {run_dir}{budget}")
    checkpoint = train_or_reuse(cfg)
    trained = finished_run(run_dir, cfg)
    model = Captioner.from_checkpoint(checkpoint)

    say(f"[3/5] evaluate: the first {eval_images} test images, beam {beam_size}")
    evaluation = evaluate(model, cfg.data, split="test", beam_size=beam_size, max_len=cfg.decode.max_len,
                          max_images=eval_images, out_dir=out / "eval", use_java=False if tiny else None,
                          spice=False, progress=True)

    held_out = [r.path for r in load_split(cfg.data, "test")[:images]]
    say(f"[4/5] visualize: {len(held_out)} held-out test images -> {out / 'attention'}")
    figures = visualize_images(model, held_out, out / "attention", beam_size=beam_size, progress=True)

    say(f"[5/5] report: {out / 'report.html'}")
    report = write_report(model, held_out, out, beam_size=beam_size, metrics=evaluation.files[-1],
                          title="captioner demo: where the model looks", checkpoint=str(checkpoint), progress=True)
    return DemoResult(data=data, checkpoint=checkpoint, trained=trained, evaluation=evaluation, figures=figures,
                      report=report, seconds=time.monotonic() - start)
