"""Optional TensorBoard output for a training run (``train.tensorboard: true``).

Every numeric value of every ``metrics.jsonl`` line goes to TensorBoard as a scalar at the
line's optimizer step: per logged step under ``step/`` (loss, cross-entropy, doubly
stochastic term, REINFORCE terms, baseline, learning rate), per epoch under ``epoch/`` (the
validation scores, train loss). The trainer adds a few validation images' attention figures
(one panel per word) at each validation. Events go to ``<run folder>/tensorboard``; view
them with ``tensorboard --logdir runs``.

TensorBoard is an extra: ``pip install -e ".[tensorboard]"``.
"""

from __future__ import annotations

from pathlib import Path

from captioner.errors import ConfigError


class Board:
    """A SummaryWriter fed with metrics lines and figures.

    Args:
        log_dir: where the event files go.

    Raises:
        ConfigError: the ``tensorboard`` package is not installed.
    """

    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("train.tensorboard=true needs the tensorboard package: "
                              "pip install -e \".[tensorboard]\" (or pip install tensorboard)") from None
        self.writer = SummaryWriter(str(log_dir))

    def record(self, entry: dict) -> None:
        """A metrics line: its numbers as scalars at ``entry["step"]`` (lines without a step are skipped)."""
        step = entry.get("step")
        if not isinstance(step, int):
            return
        group = "epoch" if "train_loss" in entry else "step"
        for key, value in entry.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{group}/{key}", value, step)

    def figure(self, tag: str, figure, step: int) -> None:
        """A matplotlib figure (e.g. :func:`captioner.visualize.result_figure`) as an image."""
        self.writer.add_figure(tag, figure, step, close=False)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
