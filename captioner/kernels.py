"""Fused kernels: hand-written forward and backward passes that the model modules select by config.

The model modules (:mod:`captioner.attention`, :mod:`captioner.decoder`) hold the paper's
equations in plain PyTorch. Each kernel here computes the same function faster on the
CPU, and sits beside the plain expression it replaces (the ``*_plain`` functions and the
expressions quoted in the docstrings); ``tests/test_kernels.py`` checks that each pair
agrees in value and gradient. ``model.attention.fused: false`` runs the plain score.

- :func:`tanh_score` / :class:`TanhScore`: the additive score's w^T tanh(keys + query),
  with the tanh never materialised and the backward written out: on float32 CPU tensors one
  pass each way in C (:mod:`captioner.native`), else a few PyTorch ops (also the path where
  no C compiler is found, or with ``CAPTIONER_NATIVE=0``).
- :func:`context`: sum_l alpha_l a_l, the soft attention's read of the features, in C over
  bf16 features on the CPU (one pass each way, float32 accumulation); else the plain ``bmm``.
- :func:`cross_entropy`: each row's cross-entropy, in C for float32 and bf16 logits on the CPU.
- :class:`StepWeight`: ``x_t @ W^T`` at every step of a time loop, the weight's gradient
  made in one matmul instead of one per step.
- :class:`StepSum`: a tensor read at every step whose per-step gradients the steps add
  into one buffer themselves (the tanh score adds its keys' gradient there in place).
- :class:`Dropout`: ``nn.Dropout`` with its CPU mask from a uniform draw (3x faster).
- :class:`LSTMCell`: the LSTM cell of a teacher-forced step from its gates' three parts, in C
  each way (float32 or bf16 gates); the plain cell is ``captioner.decoder._lstm``.
- :func:`gather_rows`: a few rows of such a tensor at every step (``anchor_on_word``'s
  cells on the map's support), their gradient added into its buffer in place.
- :func:`linear` / :func:`weight_gradient`: a bf16 layer's weight gradient g^T x with g's
  transpose made first (in C), where oneDNN's product of a transposed g runs at half speed.

Why the step gradients: plain autograd treats each step's use of a weight (or of the
projected keys) on its own: it computes that step's share of the gradient and adds it into
the running sum, a full pass over the tensor at every step. For the attention LSTM that is
17 passes over a 2048 x 2048 weight per batch, each weight share a skinny matmul (32 rows)
at two thirds of a CPU's matmul peak. Here a step keeps what its share needs, and the sum
is made once, when the backward reaches the tensor itself. Both hang on :class:`_Collect`,
an identity whose backward runs after every step's (autograd runs a node once all its uses
are done) and hands the summed gradient on. Used only where a gradient is wanted and outside
``torch.compile``; otherwise the plain ops run.

Letters: B batch, K queries per image, L grid locations, A attention dim.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from captioner import native

# ----------------------------------------------------------------------------- step gradients


def weight_gradient(grad: Tensor, x: Tensor) -> Tensor:
    """grad (N, out), x (N, in) -> grad^T x (out, in): a linear layer's weight gradient.

    For 2-byte CPU tensors the transpose is made first, in C (:func:`captioner.native.transposed`):
    oneDNN's bf16 matmul with a transposed left operand runs at about half the speed of the same
    product laid out contiguously (6272 x 512 x 2048: 11.8 against 6.6 ms on an AMX Xeon, 2
    threads; 399 x 10,000 x 512: 5.7 against 1.6), and the transpose costs under a millisecond.
    Float32 keeps the transposed view: MKL runs it as fast as the contiguous one.
    """
    if native.transpose_usable(grad):
        return native.transposed(grad) @ x
    return grad.t() @ x


class _Linear(torch.autograd.Function):
    """F.linear whose backward makes the weight's gradient with :func:`weight_gradient`."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).contiguous()  # (N, out)
        grad_x = (g @ weight).view(x.shape) if ctx.needs_input_grad[0] else None
        grad_w = weight_gradient(g, x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
        grad_b = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def linear(layer: torch.nn.Linear, x: Tensor) -> Tensor:
    """``layer(x)``, with the bf16 (fp16) weight gradient made by :func:`weight_gradient` where
    autograd would take the slow transposed product: CPU, 2-byte weights (a bf16 pass, see
    :mod:`captioner.precision`), a gradient wanted. Otherwise ``layer(x)`` itself."""
    w = layer.weight
    if (w.dtype in (torch.bfloat16, torch.float16) and w.device.type == "cpu" and x.dtype == w.dtype
            and torch.is_grad_enabled() and w.requires_grad and not torch.compiler.is_compiling()
            and native.library() is not None):
        return _Linear.apply(x, w, layer.bias)
    return layer(x)


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
        total = weight_gradient(g, x).to(self.weight.dtype)  # (out, in), summed over all steps at once
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


# ----------------------------------------------------------------------------- the additive tanh score


def tanh_score_plain(keys: Tensor, query: Tensor, w: Tensor) -> Tensor:
    """The plain expression the tanh score kernels replace: w^T tanh(keys + query).

    keys (B, L, A), query (B, K, A), w (A,) -> scores (B, K, L).
    """
    return torch.tanh(keys.unsqueeze(1) + query.unsqueeze(2)) @ w  # (B, K, L, A) @ (A,) -> (B, K, L)


class TanhScore(torch.autograd.Function):
    """w^T tanh(keys + query) over L locations, fused, with tanh(x) = 2 sigmoid(2x) - 1.

    The same function as ``torch.tanh(keys + query) @ w``, but the CPU's sigmoid runs about
    3x faster than its tanh, the tanh is never materialised (w^T (2s - 1) = 2 w^T s - sum w),
    and the backward is written out: it is the hottest elementwise work of a training step
    (B x L x A values at every word). Absolute error ~1e-7 per element, as float32 rounding.
    With ``keys_sum`` (a :class:`StepSum`) the keys' gradient is added
    into its buffer in place, one pass per step, and scaled by 4w once at the end.

    keys (B, L, A), query (B, K, A), w (A,) -> scores (B, K, L).
    """

    @staticmethod
    def forward(ctx, keys: Tensor, query: Tensor, w: Tensor, keys_sum: StepSum | None = None) -> Tensor:
        ctx.w_dtype, ctx.keys_sum = w.dtype, keys_sum
        w_keys = w.to(keys.dtype)
        ctx.native = native.usable(keys, query, w_keys)
        if ctx.native:  # one pass in C (captioner.native); the backward recomputes s from the keys
            ctx.save_for_backward(keys, query, w_keys)
            return native.score_forward(keys, query, w_keys)
        x = torch.add(keys.unsqueeze(1), query.unsqueeze(2))  # (B, K, L, A)
        s = x.mul_(2.0).sigmoid_()  # sigmoid(2x), in place
        w = w.to(s.dtype)
        ctx.save_for_backward(s, w)
        return torch.matmul(s, 2.0 * w) - w.sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        if ctx.native:
            return TanhScore._native_backward(ctx, *ctx.saved_tensors, grad.float().contiguous())
        s, w = ctx.saved_tensors
        grad_keys = grad_query = grad_w = None
        B, K, L, A = s.shape
        grad = grad.to(s.dtype)
        if ctx.needs_input_grad[2]:  # d/dw of w^T (2s - 1) = 2 sum g s - sum g: one matrix-vector product
            grad_w = (2.0 * torch.mv(s.reshape(-1, A).t(), grad.reshape(-1)) - grad.sum()).to(ctx.w_dtype)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            d = torch.addcmul(s, s, s, value=-1.0)  # s (1 - s); d tanh(x)/dx = 4 s (1 - s)
            w4 = 4.0 * w
            if ctx.needs_input_grad[1]:  # sum over L of g d, then times 4w: one batched product
                grad_query = torch.bmm(grad.reshape(B * K, 1, L), d.reshape(B * K, L, A)).view(B, K, A) * w4
            if ctx.needs_input_grad[0]:
                if ctx.keys_sum is not None:  # sum_t g_t d_t into the pass's buffer; 4w at the end
                    buffer = ctx.keys_sum.buffer(B)
                    if K == 1:
                        buffer.addcmul_(d.squeeze(1), grad.squeeze(1).unsqueeze(-1))
                    else:
                        buffer.add_((d * grad.unsqueeze(-1)).sum(1))
                else:
                    dk = d.mul_(grad.unsqueeze(-1)).mul_(w4)  # (B, K, L, A), in place
                    grad_keys = dk.sum(dim=1) if K > 1 else dk.squeeze(1)  # (B, L, A)
        return grad_keys, grad_query, grad_w, None

    @staticmethod
    def _native_backward(ctx, keys: Tensor, query: Tensor, w: Tensor, grad: Tensor,
                         ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        """The backward in one C pass over the keys: the keys' share goes into the pass's buffer
        (or a fresh one), scaled by 4w once (here, or by the :class:`StepSum` at the end)."""
        B, L, A = keys.shape
        in_place = ctx.keys_sum is not None and ctx.needs_input_grad[0]
        keys_grad = ctx.keys_sum.buffer(B) if in_place else keys.new_zeros(B, L, A)
        query_grad, w_part = native.score_backward(keys, query, grad, keys_grad)
        w4 = 4.0 * w
        grad_keys = keys_grad.mul_(w4) if ctx.needs_input_grad[0] and not in_place else None
        grad_query = query_grad.mul_(w4) if ctx.needs_input_grad[1] else None
        grad_w = (2.0 * w_part.sum(0) - grad.sum()).to(ctx.w_dtype) if ctx.needs_input_grad[2] else None
        return grad_keys, grad_query, grad_w, None


def score_dtype(keys: Tensor) -> torch.dtype:
    """The dtype the tanh score's elementwise work runs in, for keys in ``keys.dtype``: float32
    for bf16 (or fp16) keys on a CPU, else their own. A CPU has no bf16 arithmetic for the
    add, the sigmoid and the products: each bf16 op widens to float32 and rounds back, at
    about half float32's speed here (the score's forward and backward at the bench's sizes:
    5.7 against 4.5 ms a step). So in a bf16 pass the keys are widened once per pass, the
    query (B, K, A) and the scores (B, K, L) at every step; the matmuls stay bf16. On a GPU
    the elementwise work is native and the keys stay in the pass's dtype."""
    if keys.device.type == "cpu" and keys.dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return keys.dtype


@dataclass
class SummedKeys:
    """What the additive tanh score's ``precompute`` returns in training: the projected keys
    (B, L, A), whose gradient the steps sum in place (see :class:`TanhScore`)."""

    keys: Tensor
    keys_sum: StepSum


def tanh_score_no_grad(keys: Tensor, query: Tensor, w: Tensor) -> Tensor:
    """:class:`TanhScore`'s forward for decoding, one query of each image at a time in one
    reused (B, L, A) buffer: a (B, K, L, A) temporary is tens of MB for a beam search, and
    the allocator hands blocks that large out as fresh pages from the OS at every step
    (page faults cost more than the arithmetic)."""
    B, K, _ = query.shape
    L, A = keys.shape[1:]
    w = w.to(keys.dtype)
    if native.usable(keys, query, w):  # one pass in C, nothing written but the scores
        return native.score_forward(keys, query, w)
    w2 = 2.0 * w
    scores = keys.new_empty(K, B * L)
    buffer = torch.empty_like(keys)
    for k in range(K):
        torch.add(keys, query[:, k].unsqueeze(1), out=buffer)
        torch.mv(buffer.mul_(2.0).sigmoid_().view(B * L, A), w2, out=scores[k])
    return scores.sub_(w.sum()).view(K, B, L).transpose(0, 1)  # (B, K, L)


def summed_keys(keys: Tensor, w: Tensor) -> Tensor | SummedKeys:
    """The projected keys (B, L, A) as :func:`tanh_score` wants them: wrapped in a
    :class:`SummedKeys` when a teacher-forced pass will need their gradient, else as they are.
    ``w`` is the score's output weight (A,): the summed gradient is scaled by 4w once."""
    keys_sum = StepSum(keys, finish=lambda total: total.mul_(4.0 * w))
    return SummedKeys(keys_sum.tensor, keys_sum) if keys_sum.deferred else keys


def tanh_score(keys: Tensor | SummedKeys, query: Tensor, w: Tensor) -> Tensor:
    """:func:`tanh_score_plain`, fused: :class:`TanhScore` where a gradient is wanted,
    :func:`tanh_score_no_grad` where none is (decoding).

    keys (B, L, A) or :class:`SummedKeys`, query (B, K, A), w (A,) -> scores (B, K, L).
    """
    keys_sum = None
    if isinstance(keys, SummedKeys):
        keys, keys_sum = keys.keys, keys.keys_sum
    query = query.to(keys.dtype).contiguous()
    if torch.is_grad_enabled() and (keys.requires_grad or query.requires_grad or w.requires_grad):
        return TanhScore.apply(keys, query, w, keys_sum)
    return tanh_score_no_grad(keys, query, w)


# ----------------------------------------------------------------------------- the context


def context_plain(alpha: Tensor, features: Tensor) -> Tensor:
    """sum_l alpha_l a_l as one bmm (K maps of one image read its features once):
    alpha (B, L) or (B, K, L), features (B, L, C) -> (B, C) or (B, K, C)."""
    B, L, C = features.shape
    return torch.bmm(alpha.reshape(B, -1, L).to(features.dtype), features).view(*alpha.shape[:-1], C)


class Context(torch.autograd.Function):
    """:func:`context_plain` in C (:mod:`captioner.native`): alpha (B, L), features (U, L, C),
    float32 or bf16, that want no gradient, and rows (B,): row b reads image ``rows[b]`` (None:
    image b) -> (B, C) in the features' dtype, accumulated in float32. The backward gives the
    map's gradient only."""

    @staticmethod
    def forward(ctx, alpha: Tensor, features: Tensor, rows: Tensor | None = None) -> Tensor:
        ctx.save_for_backward(features, rows)
        return native.context_forward(alpha.float().contiguous(), features, rows).to(features.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        features, rows = ctx.saved_tensors
        return native.context_backward(grad.float().contiguous(), features, rows), None, None  # autograd casts
        # it to alpha's dtype


@dataclass
class FeatureRows:
    """``table.index_select(0, rows)`` without the copy: (U, L, C) features read through a row
    index (B,), for a teacher-forced pass whose captions share images (image batches,
    ``image_index``). The loop slices it (``[:n]``: the first n rows) and the attention reads it
    only through :func:`context`, which runs in C with the index; its ``shape`` is the (B, L, C)
    it stands for. Made by the decoder where :func:`reads_feature_rows`.

    Why: the copy repeats each image's features to each of its captions at every training step
    (51 MB at the bench's sizes, 5 captions an image: the step 292 against 319 ms in float32).
    With one caption an image the decoder still sorts the features by a copy: measured there,
    the copy and the ``bmm``'s contiguous reads were as fast or faster (383 against 391 ms)."""

    table: Tensor
    rows: Tensor

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.rows.shape[0], *self.table.shape[1:]))

    @property
    def dtype(self) -> torch.dtype:
        return self.table.dtype

    @property
    def requires_grad(self) -> bool:
        return self.table.requires_grad

    def __getitem__(self, index: slice) -> FeatureRows:
        if not isinstance(index, slice):
            raise TypeError("FeatureRows takes a slice of its rows ([:n])")
        return FeatureRows(self.table, self.rows[index])


def reads_feature_rows(features: Tensor, attention: torch.nn.Module, fused: bool) -> bool:
    """Whether a teacher-forced pass can hand ``attention`` a :class:`FeatureRows` of these
    features: with ``fused``, an attention that reads the features only through :func:`context`
    (``reads_feature_rows = True`` on its class), features that want no gradient (a frozen
    encoder, the feature cache), float32 or bf16 on the CPU, and the C library."""
    return (fused and getattr(attention, "reads_feature_rows", False)
            and not (features.requires_grad and torch.is_grad_enabled())
            and native.context_usable(features, (torch.float32, torch.bfloat16)))


def context(alpha: Tensor, features: Tensor | FeatureRows, fused: bool = True) -> Tensor:
    """:func:`context_plain`; with ``fused``, in C (:mod:`captioner.native`) where it applies:
    one map per image over bf16 CPU features that want no gradient (a frozen encoder, the
    feature cache), through :class:`Context`; any :class:`FeatureRows`; and K maps per image
    (a beam's hypotheses) over float32 or bf16 CPU features where nothing wants a gradient.
    Elsewhere (one map per image over float32 features, where the ``bmm`` already runs at the
    memory's speed; a fine-tuned encoder) the ``bmm``.

    K maps: the ``bmm`` ran at 2.1-2.2 ms a step for a k = 5 search's 16 images (features
    read from memory, as in a search, where the step's weights evict them from the cache),
    the C pass at 1.5-1.6 ms (4 locations a pass over the K sums; a plain sum of the
    features takes 1.4); 1.8 against 1.4 ms at k = 3."""
    if isinstance(features, FeatureRows):
        if alpha.dim() != 2:
            raise ValueError(f"FeatureRows: one map per row, (B, L); got {tuple(alpha.shape)}")
        return Context.apply(alpha, features.table, features.rows.contiguous())
    if (fused and alpha.dim() == 2 and not (features.requires_grad and torch.is_grad_enabled())
            and native.context_usable(features)):
        return Context.apply(alpha, features)
    if (fused and alpha.dim() == 3 and not (torch.is_grad_enabled() and (features.requires_grad or alpha.requires_grad))
            and native.context_usable(features, (torch.float32, torch.bfloat16))):
        return native.context_forward(alpha.float().contiguous(), features).to(features.dtype)
    return context_plain(alpha, features)


# ----------------------------------------------------------------------------- the loss


class CrossEntropy(torch.autograd.Function):
    """Each row's cross-entropy of float32 or bf16 logits (N, V) in C (:mod:`captioner.native`),
    float32 inside: no float32 copy of bf16 logits, no (N, V) log-probabilities; the gradient is
    written in the logits' dtype directly. target (N,) -> nll (N,) float32."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor) -> Tensor:
        nll, lse = native.xent_forward(logits, target)
        ctx.save_for_backward(logits, target, lse)
        return nll

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        logits, target, lse = ctx.saved_tensors
        return native.xent_backward(logits, target, lse, grad.float().contiguous()), None


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """``F.cross_entropy(logits.float(), target, reduction="none")``: logits (N, V), target (N,)
    -> (N,) float32. For float32 or bf16 logits on a CPU, :class:`CrossEntropy` (in C: for bf16,
    the float32 copy of the logits, the log-softmax and its backward were 10 ms of a 265 ms bench
    step; for float32 at N = 399, V = 10,000, 2.7 against PyTorch's 4.0-4.3 ms forward and backward)."""
    if native.xent_usable(logits):
        target = target.contiguous()
        V = logits.shape[1]
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= V):
            raise IndexError(f"cross_entropy: target ids must lie in [0, {V}) (the logits' width); "
                             f"got {int(target.min())}..{int(target.max())}")
        return CrossEntropy.apply(logits, target.long())
    return torch.nn.functional.cross_entropy(logits.float(), target, reduction="none")


# ----------------------------------------------------------------------------- dropout


class Dropout(torch.nn.Dropout):
    """``nn.Dropout`` whose mask on the CPU comes from a uniform draw (kept where u >= p), not
    from ``bernoulli_``: PyTorch's CPU ``bernoulli_(p)`` takes ~10 ns an element (2.0 ms for
    the bench's (399, 512) deep-output rows, dropped twice a training step), the uniform draw
    and the product 0.7 ms. Each element is kept with probability 1 - p and scaled by
    1 / (1 - p), as ``nn.Dropout``; the draws come from the same generator (``torch.manual_seed``
    repeats them), but not the same stream, so a seed drops other elements than nn.Dropout's.
    The uniform is drawn in float32 whatever the input's dtype (bf16's draws would round p).
    Elsewhere (evaluation, CUDA's fused dropout, p = 0 or 1, in place) ``nn.Dropout`` itself."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or x.device.type != "cpu" or self.inplace or not 0 < self.p < 1:
            return super().forward(x)
        keep = torch.rand(x.shape, device=x.device).ge_(self.p).mul_(1 / (1 - self.p))  # 0 or 1 / (1 - p)
        return x * keep.to(x.dtype)


# ----------------------------------------------------------------------------- the LSTM cell


class LSTMCell(torch.autograd.Function):
    """The LSTM cell of a teacher-forced step from its gates' three parts, forward and backward
    in one C pass each (:func:`captioner.native.lstm_forward`): parts (B, 4H) float32 or bf16,
    c (B, H) float32 -> h_t (B, H) in the parts' dtype, c_t (B, H) float32; the plain cell is
    ``captioner.decoder._lstm(p0 + p1 + p2, c)``. The three parts share one gradient (the
    gates'). Float32 inside, so in a bf16 pass h_t is the float32 cell's rounded once."""

    @staticmethod
    def forward(ctx, p0: Tensor, p1: Tensor, p2: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        h, c_out, act = native.lstm_forward((p0, p1, p2), c)
        ctx.save_for_backward(act, c, c_out)
        ctx.dtype = h.dtype
        return h, c_out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh: Tensor, dc: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        act, c, c_out = ctx.saved_tensors
        dpre, dc_prev = native.lstm_backward(act, c, c_out, dh.to(ctx.dtype).contiguous(), dc.float().contiguous())
        return dpre, dpre, dpre, dc_prev


# ----------------------------------------------------------------------------- rows read at every step


@dataclass
class SummedRows:
    """A table (B, L, D) that a teacher-forced pass reads a few rows of at every step
    (:func:`gather_rows`), with the :class:`StepSum` their gradients are added into."""

    table: Tensor
    table_sum: StepSum


def summed_rows(table: Tensor) -> Tensor | SummedRows:
    """``table`` wrapped in a :class:`SummedRows` when a pass will need its gradient, else as it is."""
    table_sum = StepSum(table)
    return SummedRows(table_sum.tensor, table_sum) if table_sum.deferred else table


def gather_rows(table: Tensor | SummedRows, index: Tensor) -> Tensor:
    """``table.flatten(0, 1).index_select(0, index)``: rows of a (B, L, D) table by their flat
    index b * L + l, (M,) -> (M, D). Plain autograd gives every step's gradient as a zeroed
    (B * L, D) tensor with M rows filled in, then adds it into the running sum: two full
    passes a step for M rows. With a :class:`SummedRows` the step adds its M rows into the
    pass's buffer in place instead."""
    if not isinstance(table, SummedRows):
        return table.flatten(0, 1).index_select(0, index)
    return _GatherRows.apply(table.table, index, table.table_sum)


class _GatherRows(torch.autograd.Function):
    """Rows by flat index; the backward adds the rows' gradient into ``bank``'s buffer."""

    @staticmethod
    def forward(ctx, table: Tensor, index: Tensor, bank: StepSum) -> Tensor:
        ctx.save_for_backward(index)
        ctx.bank = bank
        return table.flatten(0, 1).index_select(0, index)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[None, None, None]:
        (index,) = ctx.saved_tensors
        buffer = ctx.bank.buffer(ctx.bank.shape[0])
        buffer.view(-1, buffer.shape[-1]).index_add_(0, index, grad.to(buffer.dtype))
        return None, None, None


# ----------------------------------------------------------------------------- packed weights in decoding


PACK_MIN_DIM = 64  # narrower layers (a gate's 512 -> 1) stay plain: MKL pads a packed weight to its
# panels (512 x 1 packed: 2 M floats), and at 80 rows the product ran slower packed (11 against 5 us)


def packing_available() -> bool:
    """Whether this torch has MKL's packed GEMM (``torch.ops.mkl._mkl_linear``: x86 builds with MKL)."""
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


PACKS_KEPT = 2  # row counts a layer keeps packed weights for: an evaluation's full batches and its last one

# layer -> {rows: ((the weight (weakref), its data_ptr, its version), packed weight)}
_PACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def packed_weight(layer: torch.nn.Linear, rows: int) -> Tensor:
    """``layer.weight`` packed by MKL for products of ``rows`` rows, kept with the layer while
    it lives and reused for as long as its weight is the same tensor, in the same memory, at
    the same version (every in-place change bumps it: an optimizer step, ``copy_``,
    ``load_state_dict``); else packed anew. A pack costs about one product (6.4 ms for the
    bench's 10,000 x 512 vocabulary projection, ~10 ms for a decoder's weights), once per
    search before this cache: 3% of a k = 5 search. It holds a copy of each packed weight
    (plus MKL's panel padding) for up to :data:`PACKS_KEPT` row counts. A weight that keeps no
    version counter (made under ``torch.inference_mode``) is packed each time."""
    w = layer.weight
    try:
        stamp = (w.data_ptr(), w._version)
    except RuntimeError:  # an inference tensor: no version to trust a kept pack by
        return torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
    packs = _PACKS.setdefault(layer, {})
    kept = packs.get(rows)
    if kept is not None and kept[0][0]() is w and kept[0][1:] == stamp:
        packs[rows] = packs.pop(rows)  # the most recently used last
        return kept[1]
    packed = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
    packs.pop(rows, None)
    packs[rows] = ((weakref.ref(w), *stamp), packed)
    while len(packs) > PACKS_KEPT:  # the row count used longest ago goes
        packs.pop(next(iter(packs)))
    return packed


class PackedLinears:
    """Within the block, every ``nn.Linear`` of ``module`` that is called with exactly ``rows``
    rows multiplies through MKL's packed GEMM: its weight repacked once, on its first such call,
    then reused at every step. The same function as ``F.linear`` (sums in another order:
    float32 rounding apart).

    Why: a decoding loop multiplies the same weights by a few rows (B images, or B * K beams) at
    every step, and a plain GEMM repacks the weight at each call; at 80 rows the step's products
    ran 1.3x faster packed (the vocabulary projection 3.0 -> 2.3 ms, W_z 2.6 -> 2.0), a pack
    costing about one call. Only without gradients, on float32 CPU weights, where
    :func:`packing_available`; any other call runs the layer's own ``forward``. Decoding only:
    in a teacher-forced pass the rows shrink as captions end, and the weights change every step.
    The packed weights outlive the block (:func:`packed_weight`): the next search over the same,
    unchanged weights (an evaluation's next batch) packs nothing.
    """

    def __init__(self, module: torch.nn.Module, rows: int) -> None:
        self.rows = rows
        self.layers = [m for m in module.modules() if isinstance(m, torch.nn.Linear)
                       and min(m.in_features, m.out_features) >= PACK_MIN_DIM] if packing_available() else []
        self.packed: dict[int, Tensor] = {}  # layer index -> its packed weight, kept across blocks

    def __enter__(self) -> PackedLinears:
        for i, layer in enumerate(self.layers):
            layer.forward = self._packed_forward(i, layer)  # shadows the class's forward until __exit__
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.layers:
            layer.__dict__.pop("forward", None)

    def _packed_forward(self, i: int, layer: torch.nn.Linear):
        plain, rows = layer.forward, self.rows

        def forward(x: Tensor) -> Tensor:
            w = layer.weight
            if (torch.is_grad_enabled() or x.numel() != rows * layer.in_features or x.dtype != torch.float32
                    or w.dtype != torch.float32 or w.device.type != "cpu"):
                return plain(x)
            if i not in self.packed:
                self.packed[i] = packed_weight(layer, rows)
            return torch.ops.mkl._mkl_linear(x, self.packed[i], w, layer.bias, rows)

        return forward
