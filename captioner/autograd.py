"""Gradients of tensors used at every step of the decoder's time loop, summed once.

Plain autograd treats each step's use of a weight (or of the projected keys) on its own: it
computes that step's share of the gradient and adds it into the running sum, a full pass
over the tensor at every step. For the attention LSTM that is 17 passes over a 2048 x 2048
weight per batch, each weight share a skinny matmul (32 rows) at two thirds of a CPU's
matmul peak. Here a step keeps what its share needs, and the sum is made once, when the
backward reaches the tensor itself:

- :class:`StepWeight` for ``x_t @ W^T`` at every step: the step keeps (x_t, g_t); the
  weight's gradient is ``cat(g)^T @ cat(x)``, one matmul at full size.
- :class:`StepSum` for a tensor whose per-step gradient a step adds into one buffer itself
  (the fused attention score adds its share of the keys' gradient in place).

Both hang on :class:`_Collect`, an identity whose backward runs after every step's (autograd
runs a node once all its uses are done) and hands the summed gradient on. Used only where
a gradient is wanted and outside ``torch.compile``; otherwise the plain ops run.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _Collect(torch.autograd.Function):
    """Identity; its backward returns ``bank.gradient(incoming)``."""

    @staticmethod
    def forward(ctx, tensor: Tensor, bank) -> Tensor:
        ctx.bank = bank
        ctx.set_materialize_grads(False)  # steps that deferred their share send no gradient here
        return tensor.view_as(tensor)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor | None) -> tuple[Tensor | None, None]:
        return ctx.bank.gradient(grad), None


def _deferring(tensor: Tensor) -> bool:
    return torch.is_grad_enabled() and tensor.requires_grad and not torch.compiler.is_compiling()


class StepWeight:
    """``x_t @ W^T`` at every step, with the weight's gradient made in one matmul.

    Args:
        weight: (out, in), e.g. an ``nn.Linear``'s (no bias: add it outside the loop).
    """

    def __init__(self, weight: Tensor) -> None:
        self.deferred = _deferring(weight)
        self.weight = _Collect.apply(weight, self) if self.deferred else weight
        self.inputs: list[Tensor] = []
        self.grads: list[Tensor] = []

    def __call__(self, x: Tensor) -> Tensor:
        if not self.deferred:
            return x @ self.weight.t()
        return _StepMatmul.apply(x, self.weight, self)

    def gradient(self, incoming: Tensor | None) -> Tensor | None:
        if not self.grads:
            return incoming
        dtype = self.grads[0].dtype
        g = torch.cat([t.to(dtype) for t in self.grads])  # (N, out)
        x = torch.cat([t.to(dtype) for t in self.inputs])  # (N, in)
        self.inputs.clear()
        self.grads.clear()
        total = (g.t() @ x).to(self.weight.dtype)  # (out, in), summed over all steps at once
        return total if incoming is None else total + incoming


class _StepMatmul(torch.autograd.Function):
    """x @ W^T whose backward returns the input's gradient and leaves the weight's to the bank."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bank: StepWeight) -> Tensor:
        out = x @ weight.t()  # under autocast this runs (and returns) in the autocast dtype
        ctx.save_for_backward(x, weight)
        ctx.bank, ctx.dtype = bank, out.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None]:
        x, weight = ctx.saved_tensors
        grad = grad.to(ctx.dtype)
        if ctx.needs_input_grad[1]:
            ctx.bank.inputs.append(x)
            ctx.bank.grads.append(grad)
        grad_x = (grad @ weight.to(ctx.dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


class StepSum:
    """A tensor (B, ...) whose per-step gradients the steps add into :attr:`buffer` rows
    themselves (``buffer(n)`` gives the first n rows, zeros at first); ``finish`` turns the
    sum into the tensor's gradient (e.g. a scale common to all steps).

    Args:
        tensor: what the steps read (their rows 0..n-1).
        finish: buffer -> gradient, applied once.
    """

    def __init__(self, tensor: Tensor, finish=None) -> None:
        self.deferred = _deferring(tensor)
        self.shape, self.dtype, self.device = tensor.shape, tensor.dtype, tensor.device
        self.tensor = _Collect.apply(tensor, self) if self.deferred else tensor
        self.finish = finish
        self._buffer: Tensor | None = None

    def buffer(self, rows: int) -> Tensor:
        if self._buffer is None:  # float32 at least: a sum over all steps
            dtype = torch.promote_types(self.dtype, torch.float32)
            self._buffer = torch.zeros(self.shape, dtype=dtype, device=self.device)
        return self._buffer[:rows]

    def gradient(self, incoming: Tensor | None) -> Tensor | None:
        if self._buffer is None:
            return incoming
        total, self._buffer = self._buffer, None
        if self.finish is not None:
            total = self.finish(total)
        total = total.to(self.dtype)
        return total if incoming is None else total + incoming
