"""bf16 compute with float32 master weights, cast once per pass instead of at every op.

``train.amp=bf16`` on a CPU with native bf16 matmul (AMX, AVX512-BF16) should be faster than
float32, yet ``torch.autocast`` made the decoder slower: it decides the dtype op by op, so in
the time loop it converts the LSTM state, the query and every step's weights' inputs back
and forth at each word, and the fused kernels' float32 outputs with them. Here the decoder
runs in bf16 from end to end instead:

- :func:`cast_parameters`: inside the context, each floating parameter of a module reads as
  a bf16 copy made once, on entry. The copy is an autograd op, so the backward sends each
  parameter's gradient, summed over all steps in bf16 products with float32 accumulation,
  back to the float32 parameter, which the optimizer updates (the master weights).
- the features (and so the projected keys) are cast once per batch, before the loop
  (:meth:`captioner.model.Captioner.forward` with ``dtype``).
- in the loop every matmul, the score, the softmax and the context sum run in bf16; only
  the LSTM cell state c stays float32 (a running sum over up to T steps; (B, H) values, the
  decoder's ``_lstm`` keeps it so, and on a CPU :class:`captioner.kernels.LSTMCell` reads the
  bf16 gates and the float32 c without a cast), and the loss reads the logits in float32.

The encoder (convolutions and batch norm, no time loop) keeps ``torch.autocast``, which suits it.
``tests/test_precision.py`` checks the casts happen once per pass, not once per step, and
that a bf16 pass agrees with float32 within bf16's rounding.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # train.amp -> dtype


@contextmanager
def cast_parameters(module: nn.Module, dtype: torch.dtype | None) -> Iterator[nn.Module]:
    """Inside the context, ``module``'s floating parameters read as ``dtype`` copies.

    Each copy is made once, on entry (``parameter.to(dtype)``: differentiable, so the
    gradients reach the original parameters in their own dtype). On exit the parameters are
    back, in their order (the state dict and the optimizer see no change). ``dtype`` None,
    or parameters already in ``dtype``: nothing changes.

    An ``nn.Embedding`` keeps its table: a pass reads a few hundred of its rows, and casting
    all of them (and the table's gradient back) costs more than the rows it reads; the
    caller casts the rows (the decoder's ``_embedded``).

    Args:
        module: e.g. the decoder.
        dtype: the compute dtype, e.g. ``torch.bfloat16``.
    """
    swapped: list[tuple[nn.Module, dict]] = []
    try:
        if dtype is not None:
            for mod in module.modules():
                if isinstance(mod, nn.Embedding):
                    continue
                params = mod._parameters
                names = [n for n, p in params.items() if p is not None and p.is_floating_point() and p.dtype != dtype]
                if not names:
                    continue
                swapped.append((mod, dict(params)))  # the originals, in order
                for name in names:
                    copy = params[name].to(dtype)
                    del params[name]  # nn.Module looks parameters up in _parameters, then in __dict__
                    mod.__dict__[name] = copy
        yield module
    finally:
        for mod, originals in reversed(swapped):
            for name in originals:
                mod.__dict__.pop(name, None)
            mod._parameters.clear()
            mod._parameters.update(originals)
