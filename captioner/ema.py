"""Weight averaging: an exponential moving average of the trained weights (train.ema).

Polyak averaging (Polyak and Juditsky, 1992) in its exponential form: after every optimizer
step each trainable parameter's shadow moves toward the parameter,

    shadow <- d_n * shadow + (1 - d_n) * param,   d_n = min(decay, (1 + n) / (10 + n)),

n the number of updates so far. The warm-up d_n keeps the first steps from being averaged
with the initial (random) weights for a long time. The average of the last ~1 / (1 - decay)
steps is a smoother model than the last step's: the trainer validates it and saves it as
best.pt, so the checkpoint a run keeps does not depend on where in its noise an epoch ended.

Only trainable parameters are averaged; buffers (a fine-tuned encoder's batch-norm
statistics) stay the live model's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn

from captioner.errors import CheckpointError

__all__ = ["WeightAverage", "averaged"]


class WeightAverage:
    """The moving average of ``model``'s trainable parameters.

    Args:
        model: the trained module (not a DDP or compile wrapper: its parameter names are the
            checkpoint's).
        decay: the decay d in (0, 1); the average spans about ``1 / (1 - d)`` steps.
    """

    def __init__(self, model: nn.Module, *, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1); got {decay}")
        self.decay = decay
        self.updates = 0
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.shadow = {name: p.detach().float().clone() for name, p in self.params.items()}

    def rate(self) -> float:
        """d_n: this update's decay, with the warm-up."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average toward the current parameters (after an optimizer step)."""
        weight = 1.0 - self.rate()
        shadows = list(self.shadow.values())
        torch._foreach_lerp_(shadows, [p.detach().float() for p in self.params.values()], weight)
        self.updates += 1

    @contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """Inside the block the model holds the averaged weights; after it, its own again."""
        saved = {name: p.detach().clone() for name, p in self.params.items()}
        for name, p in self.params.items():
            p.copy_(self.shadow[name])
        try:
            yield
        finally:
            for name, p in self.params.items():
                p.copy_(saved[name])

    def state_dict(self) -> dict:
        """Tensors and plain data: the decay, the update count and the shadow weights."""
        return {"decay": self.decay, "updates": self.updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict, *, source: str = "checkpoint") -> None:
        """Restore the average saved by :meth:`state_dict` (a resume); the parameter names
        and shapes must be this model's."""
        shadow = state["shadow"]
        if set(shadow) != set(self.shadow):
            missing, extra = sorted(set(self.shadow) - set(shadow)), sorted(set(shadow) - set(self.shadow))
            raise CheckpointError(f"{source}: its weight average (train.ema) holds other parameters than this "
                                  f"model's trainable ones (missing {missing[:3]}, unexpected {extra[:3]})")
        for name, value in shadow.items():
            if value.shape != self.shadow[name].shape:
                raise CheckpointError(f"{source}: the weight average's {name} has shape {tuple(value.shape)}, "
                                      f"the model's {tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(value)
        self.updates = int(state["updates"])


def averaged(average: WeightAverage | None) -> AbstractContextManager:
    """``average.applied()``, or a block that changes nothing when there is no average."""
    return average.applied() if average is not None else nullcontext()
