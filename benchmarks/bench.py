"""Throughput benchmark: training, beam search, encoder, and one end-to-end epoch.

    python benchmarks/bench.py                      # full run, a few minutes on 2 CPU cores
    python benchmarks/bench.py --quick              # tiny sizes, seconds (tests, CI)
    python benchmarks/bench.py --only train,beam --repeat 5 --out results.json
    python benchmarks/bench.py --profile            # also: top ops of one training step

Every case is timed as the median of ``--repeat`` runs after ``--warmup`` runs. Next to the
time it reports the matmul FLOPs of the work that is actually needed (counted analytically,
see :func:`decoder_flops`; checked against ``torch.utils.flop_counter`` in
``tests/test_bench.py``) and the achieved FLOP/s as a share of this machine's float32
matmul peak (best of several large square ``torch.mm``), measured right before each
section. The share is the number to compare across machines and across changes: it does not
move when the machine is faster, only when the code wastes less. The memory read bandwidth
(a sum over 256 MiB) is measured with the peaks: the time loops' per-step products and the
attention's reads of the features are bound by it more than by the matmul peak.

Sizes (full run) are those of the popular ports: C = 2048 channels on a 14 x 14 grid (L =
196), attention, embedding and LSTM dims 512, a 10,000-word vocabulary, batch 32, captions
of 6-20 words drawn around 11.5 (COCO-like) and cut at 20 (``vocab.max_len``); beam
search on 16 images, ``max_len`` 20.

Letters: B batch, K beams, T steps, L locations, C channels, A attention dim, E embedding,
H hidden, V vocabulary.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch

from captioner import kernels, native
from captioner.config import (
    AttentionConfig,
    DecoderConfig,
    ModelConfig,
    TrainConfig,
    load_config,
)
from captioner.decoder import Decoder
from captioner.decoding import beam_search
from captioner.device import cpu_bf16_support, hold_freed_memory, release_freed_memory
from captioner.encoder import Encoder
from captioner.losses import CaptionLoss
from captioner.precision import cast_parameters
from captioner.train import clip_grad_norm
from captioner.vocab import Vocabulary

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("train", "beam", "encoder", "epoch")
PAD, START, END = Vocabulary.pad_id, Vocabulary.start_id, Vocabulary.end_id


# ----------------------------------------------------------------------------- FLOP counting


@dataclass(frozen=True)
class DecoderDims:
    """The decoder's sizes: C feature channels, L locations, A attention dim, E embedding,
    H hidden, V vocabulary; ``beta_gate`` and ``deep_output`` as in :class:`Decoder`."""

    C: int
    L: int
    A: int
    E: int
    H: int
    V: int
    beta_gate: bool = True
    deep_output: bool = True


# Parts whose input never needs a gradient in training: the keys W_a a_i and the initial
# state read the (frozen or cached) features, and the context sum_i alpha_i a_i needs the
# gradient of alpha only. Their backward is the weight (or alpha) gradient alone: x1.
_BACKWARD_ONCE = ("attention_keys", "init_state", "attention_context")


def decoder_flops(d: DecoderDims, *, tokens: int, images: int, backward: bool = False) -> dict[str, int]:
    """Matmul FLOPs (2 per multiply-add) of the attention decoder, by part.

    Counts what :class:`captioner.decoder.Decoder` with additive-score ``soft`` or ``hard``
    attention multiplies (both do the same matmuls; hard picks its location by elementwise
    work). Elementwise work (tanh, softmax, the LSTM nonlinearities, the loss) is not counted.

    Args:
        d: the sizes.
        tokens: decoder steps summed over captions (teacher forcing: B * T; beam search:
            hypotheses x steps).
        images: rows the per-image work runs on (keys W_a a_i, h_0 and c_0).
        backward: add training's backward pass: twice the forward for a matmul whose input
            needs a gradient, once (the weight gradient) for the parts in ``_BACKWARD_ONCE``.

    Returns:
        ``{part: flops}`` with per-token parts (lstm_gates, attention_query,
        attention_scores, attention_context, beta_gate, deep_output, vocab_projection) and
        per-image parts (attention_keys, init_state).
    """
    per_token = {
        "lstm_gates": 2 * 4 * d.H * (d.E + d.C + d.H),  # W_e E y, W_z z, W_h h -> 4H gates
        "attention_query": 2 * d.H * d.A,  # W_h h_{t-1}
        "attention_scores": 2 * d.L * d.A,  # w^T tanh(...) over the L locations
        "attention_context": 2 * d.L * d.C,  # sum_i alpha_i a_i (one bmm)
        "beta_gate": 2 * d.H if d.beta_gate else 0,  # f_beta(h_{t-1})
        "deep_output": 2 * d.E * (d.H + d.C) if d.deep_output else 0,  # L_h h_t, L_z z_t
        "vocab_projection": 2 * (d.E if d.deep_output else d.H) * d.V,  # L_o (...)
    }
    per_image = {
        "attention_keys": 2 * d.L * d.C * d.A,  # W_a a_i, once per image (precompute)
        "init_state": 2 * 2 * d.C * d.H,  # f_init,h and f_init,c on the mean annotation
    }
    flops = {k: v * tokens for k, v in per_token.items()} | {k: v * images for k, v in per_image.items()}
    if backward:
        flops = {k: v * (2 if k in _BACKWARD_ONCE else 3) for k, v in flops.items()}
    return flops


def counted_flops(fn: Callable[[], object]) -> int:
    """The matmul/conv FLOPs ``torch.utils.flop_counter`` sees while ``fn`` runs (with MKL's
    packed linear, which decoding uses: ``captioner.kernels.PackedLinears``)."""
    from torch.utils.flop_counter import FlopCounterMode

    _count_packed_linear()
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@functools.cache
def _count_packed_linear() -> None:
    """Teaches the flop counter ``torch.ops.mkl._mkl_linear``: x (..., in) times the original
    weight (out, in), 2 FLOPs a multiply-add, as for ``F.linear``."""
    if not kernels.packing_available():
        return
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.mkl._mkl_linear)
    def _flops(x_shape, packed_shape, weight_shape, *args, **kwargs) -> int:
        return 2 * math.prod(x_shape[:-1]) * weight_shape[0] * weight_shape[1]


# ----------------------------------------------------------------------------- timing and memory


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Wall seconds of each timed run and the process CPU seconds of each (all threads; with
    one thread on a busy machine the CPU time is the steadier number)."""

    wall: list[float]
    cpu: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def median_cpu(self) -> float:
        return statistics.median(self.cpu)


def measure(fn: Callable[[], object], *, warmup: int, repeat: int, device: torch.device) -> Timing:
    """Time ``repeat`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    timing = Timing([], [])
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        timing.wall.append(time.perf_counter() - start)
        timing.cpu.append(time.process_time() - start_cpu)
    return timing


def reset_peak_memory(device: torch.device) -> None:
    """Restart the peak counters: the process's peak RSS (Linux: /proc/self/clear_refs, which
    also resets ru_maxrss; the memory the last case freed goes back to the system first, see
    ``held_memory``) and, on a GPU, torch's peak allocation."""
    release_freed_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # elsewhere the RSS peak is the process's peak so far
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def current_rss_mib() -> float:
    """The process's resident memory now (Linux), 0 where unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def peak_memory_mib(device: torch.device) -> float:
    """Peak since the last reset: torch.cuda.max_memory_allocated on a GPU, else peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """Sizes of one benchmark run (the defaults are the full run)."""

    dims: DecoderDims = DecoderDims(C=2048, L=196, A=512, E=512, H=512, V=10_000)
    grid: tuple[int, int] = (14, 14)
    batch: int = 32
    words_mean: float = 11.5  # COCO-like caption lengths, in words
    words_std: float = 2.5
    words_min: int = 6
    max_len: int = 20  # words per caption (vocab.max_len) and per decoded caption (decode.max_len)
    beam_batch: int = 16
    beam_sizes: tuple[int, ...] = (1, 3, 5)
    encoder_batch: int = 4
    shapes_size: int = 128  # the shapes encoder's input side
    vgg_size: int = 224  # the paper's encoder's input side
    epoch_images: int = 160  # train images; 200 in the set (80/10/10 split), five captions each
    epoch_overrides: tuple[str, ...] = ()
    peak_n: int = 2048
    peak_runs: int = 5
    bandwidth_mib: int = 256  # the memory read: far past the cache a 2-core share of a server CPU gets


QUICK = Settings(
    dims=DecoderDims(C=64, L=16, A=32, E=32, H=32, V=200), grid=(4, 4), batch=4, words_mean=5.0, words_std=1.5,
    words_min=2, max_len=8, beam_batch=2, encoder_batch=2, shapes_size=64, vgg_size=32, epoch_images=20,
    epoch_overrides=("model.attention.dim=16", "model.decoder.embed_dim=16", "model.decoder.hidden_dim=32",
                     "train.batch_size=16", "decode.max_len=8"),
    peak_n=512, peak_runs=3, bandwidth_mib=16,
)


def caption_batch(s: Settings, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random captions with COCO-like lengths: -> captions (B, T+1) ``<start> w.. <end> <pad>..``,
    words (B,), mask (B, T+1) True on real tokens, the longest caption first (as
    ``collate_captions`` builds a batch: then the decoder's loop needs no sort of the features)."""
    words = (torch.randn(s.batch, generator=generator) * s.words_std + s.words_mean).round().long()
    words = words.clamp(s.words_min, s.max_len).sort(descending=True).values  # (B,)
    T = int(words.max()) + 1  # steps: every word and <end>
    captions = torch.randint(4, s.dims.V, (s.batch, T + 1), generator=generator)  # (B, T+1), ids past the specials
    pos = torch.arange(T + 1).unsqueeze(0)  # (1, T+1)
    captions[:, 0] = START
    captions = torch.where(pos == words.unsqueeze(1) + 1, END, captions)
    captions = torch.where(pos > words.unsqueeze(1) + 1, PAD, captions)
    return captions, words, pos <= words.unsqueeze(1) + 1


def random_features(n: int, s: Settings, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """(n, L, C) non-negative features, like a CNN's after its ReLU."""
    return torch.randn(n, s.dims.L, s.dims.C, generator=generator).relu_().to(device)


def make_decoder(s: Settings, attention: str, *, dropout: float = 0.5) -> Decoder:
    d = s.dims
    cfg = ModelConfig(attention=AttentionConfig(name=attention, dim=d.A),
                      decoder=DecoderConfig(embed_dim=d.E, hidden_dim=d.H, dropout=dropout,
                                            beta_gate=d.beta_gate, deep_output=d.deep_output))
    return Decoder.from_config(cfg, vocab_size=d.V, feature_dim=d.C, grid=s.grid)


# ----------------------------------------------------------------------------- results


@dataclass
class Row:
    """One measured case. ``gflop_needed``: the work the task needs (real tokens, one
    encoding per image); ``gflop_executed``: the matmuls the code actually ran (padding,
    per-beam copies of per-image work, re-encoding)."""

    section: str
    case: str
    unit: str
    throughput: float
    median_s: float
    times_s: list[float]
    median_cpu_s: float
    gflop_needed: float
    gflop_executed: float
    gflops: float = 0.0  # needed FLOPs / median time
    share_of_peak: float = 0.0  # needed FLOPs / median time / peak
    share_of_peak_executed: float = 0.0  # executed FLOPs / median time / peak
    share_of_peak_cpu: float = 0.0  # the same in CPU time: needed FLOPs / median CPU s / the peak's FLOPs per CPU s
    share_of_peak_best: float = 0.0  # needed FLOPs / fastest run / peak (best against best: the noise floor)
    peak_gflops: float = 0.0  # the matmul peak measured just before this section
    peak_mem_mib: float = 0.0
    details: dict = field(default_factory=dict)

    def finish(self, peak: dict) -> Row:
        self.peak_gflops = peak["gflops"]
        self.gflops = self.gflop_needed / self.median_s
        self.share_of_peak = self.gflops / peak["gflops"]
        self.share_of_peak_executed = self.gflop_executed / self.median_s / peak["gflops"]
        self.share_of_peak_cpu = self.gflop_needed / max(self.median_cpu_s, 1e-9) / peak["gflops_cpu"]
        self.share_of_peak_best = self.gflop_needed / min(self.times_s) / peak["gflops"]
        return self


def machine_info(device: torch.device) -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "unknown"
    info = {
        "cpu": cpu,
        "cpu_bf16": cpu_bf16_support(),
        "score_kernel": "C (captioner.native)" if native.library() is not None else "PyTorch ops",
        "held_memory": hold_freed_memory(),  # as captioner.train.fit: freed blocks stay in the process
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "python": platform.python_version(),
        "device": str(device),
        "rss_after_imports_mib": round(current_rss_mib()),  # the floor under every peak RSS below
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def matmul_peak(s: Settings, device: torch.device, dtype: torch.dtype = torch.float32) -> dict:
    """Matmul peak in ``dtype`` (float32, or bfloat16 for the bf16 cases): the best of
    ``peak_runs`` square n x n ``torch.mm`` after one warm-up, with the threads torch uses."""
    n = s.peak_n if device.type == "cpu" else max(s.peak_n, 8192)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    timing = measure(lambda: torch.mm(a, b, out=out), warmup=1, repeat=s.peak_runs, device=device)
    return {"n": n, "gflops": 2 * n**3 / min(timing.wall) / 1e9, "times_s": timing.wall,
            "gflops_cpu": 2 * n**3 / max(min(timing.cpu), 1e-9) / 1e9, "cpu_times_s": timing.cpu,
            "dtype": str(dtype).removeprefix("torch."),
            "tf32": dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32}


def memory_bandwidth(s: Settings, device: torch.device) -> dict:
    """Memory read bandwidth: the best of ``peak_runs`` sums over a float32 tensor of
    ``bandwidth_mib`` MiB, with the threads torch uses. The roofline's other side: a time
    loop's per-step products read their whole weight for a few rows (W_z, 16 MiB, for 32 rows:
    0.8 ms of arithmetic at a 340 GFLOP/s peak, 0.7 ms of reading at 24 GB/s), and the
    attention reads the features and keys at every step, so the loop runs near this rate
    rather than near the matmul peak."""
    n = s.bandwidth_mib * 2**20 // 4
    x = torch.ones(n, device=device)
    timing = measure(lambda: x.sum(), warmup=1, repeat=s.peak_runs, device=device)
    return {"mib": s.bandwidth_mib, "gbs": 4 * n / min(timing.wall) / 1e9, "times_s": timing.wall}


AMPS = ("bf16", "bf16-autocast")  # train.amp=bf16's path, and plain autocast (what it replaced) to compare


def autocast(device: torch.device, amp: str | None):
    """bf16 autocast around the forward pass (``amp="bf16-autocast"``), or nothing."""
    if amp == "bf16-autocast":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def in_precision(decoder: Decoder, features: torch.Tensor, amp: str | None):
    """What a pass runs in: ``amp="bf16"`` as ``train.amp=bf16`` does it (the decoder's weights
    and the features cast to bf16 once, ``captioner.precision``); else as given. Returns the
    context to run the pass in and the features to give it."""
    if amp == "bf16":
        return cast_parameters(decoder, torch.bfloat16), features.to(torch.bfloat16)
    return autocast(features.device, amp), features


# ----------------------------------------------------------------------------- sections


def train_step_fn(decoder: Decoder, criterion: CaptionLoss, opt: torch.optim.Optimizer, features: torch.Tensor,
                  captions: torch.Tensor, mask: torch.Tensor, grad_clip: float, amp: str | None = None,
                  image_index: torch.Tensor | None = None) -> Callable[[], None]:
    """One step exactly as ``captioner.train.fit`` takes it (cached features, no encoder;
    ``amp``: see :func:`in_precision`; ``image_index``: captions sharing images, as in image batches)."""

    lengths = mask[:, 1:].sum(1)  # as Captioner.forward: no step past a caption's <end>
    if amp == "bf16":  # the features stored once in bf16 (a bf16 feature cache), not cast every step
        features = features.to(torch.bfloat16)

    def step() -> None:
        precision, feats = in_precision(decoder, features, amp)
        with precision:
            out = decoder(feats, captions, lengths=lengths, image_index=image_index)
        loss = criterion(out, captions[:, 1:], mask[:, 1:])
        if not torch.isfinite(loss.total):
            raise RuntimeError(f"non-finite loss {loss.total.item()}")
        opt.zero_grad(set_to_none=True)
        loss.total.backward()
        if grad_clip > 0:
            clip_grad_norm(decoder.parameters(), grad_clip)
        opt.step()
        loss.total.item(), loss.xent.item()  # fit reads these every step

    return step


def setup_training(s: Settings, attention: str, device: torch.device, seed: int = 0, amp: str | None = None,
                   per_image: int = 1):
    """A training step; ``per_image`` > 1: the batch's captions come ``per_image`` to an image."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    captions, words, mask = caption_batch(s, g)
    images = -(-s.batch // per_image)
    features = random_features(images, s, device, g)
    index = torch.arange(s.batch, device=device) // per_image if per_image > 1 else None
    tcfg = TrainConfig()
    decoder = make_decoder(s, attention).to(device).train()
    criterion = CaptionLoss.from_config(tcfg).to(device).train()
    opt = torch.optim.Adam(decoder.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay,
                           fused=device.type in ("cpu", "cuda"))  # as the Trainer's build_optimizer
    step = train_step_fn(decoder, criterion, opt, features, captions.to(device), mask.to(device), tcfg.grad_clip,
                         amp=amp, image_index=index)
    return step, captions, words, images


def bench_train(s: Settings, args, device: torch.device, peak: dict) -> list[Row]:
    """soft and hard in float32; soft in bf16 (train.amp=bf16's path, and plain autocast)
    against the bf16 matmul peak; soft with 5 captions an image (image batches: the keys
    projected once per image). Throughput counts captions ("images/s" of the ports' loop,
    one image per caption)."""
    rows = []
    cases = (("soft", None, 1), ("hard", None, 1), *(("soft", a, 1) for a in AMPS), ("soft", None, 5))
    for attention, amp, per_image in cases:
        reset_peak_memory(device)
        step, captions, words, images = setup_training(s, attention, device, amp=amp, per_image=per_image)
        timing = measure(step, warmup=args.warmup, repeat=args.repeat, device=device)
        B, T = captions.shape[0], captions.shape[1] - 1
        needed_tokens = int((words + 1).sum())  # every word and <end>
        needed = decoder_flops(s.dims, tokens=needed_tokens, images=images, backward=True)
        executed = decoder_flops(s.dims, tokens=needed_tokens, images=images, backward=True)  # no step past <end>
        med = timing.median
        case = attention + (f" {amp}" if amp else "") + (f", {per_image} captions an image" if per_image > 1 else "")
        rows.append(Row(
            "train", case, "images/s", B / med, med, timing.wall, timing.median_cpu,
            sum(needed.values()) / 1e9, sum(executed.values()) / 1e9, peak_mem_mib=peak_memory_mib(device),
            details={"batch": B, "images": images, "steps": T, "tokens_needed": needed_tokens,
                     "tokens_executed": needed_tokens, "tokens_per_s": needed_tokens / med, "amp": amp or "none",
                     "gflop_needed_by_part": {k: round(v / 1e9, 3) for k, v in needed.items()}},
        ).finish(peak["bf16"] if amp else peak))
        del step
    return rows


def rig_no_early_end(decoder: Decoder) -> None:
    """Random weights give random caption lengths; to make the work fixed and explicit we
    push ``<end>``'s output bias down so no hypothesis ends early: every caption runs the
    full ``max_len`` words plus the forced ``<end>``, the worst case the loop allows."""
    with torch.no_grad():
        decoder.out.bias[END] = -1e4


def _keep_last(box: list, fn: Callable) -> None:
    """Call ``fn`` and keep its result in ``box`` (one item)."""
    box[:] = [fn()]


def beam_tokens(images: int, beam_size: int, steps: int) -> int:
    """The decoder rows a beam search of ``steps`` steps runs: one per image at the first step
    (its K beams are the same hypothesis), K per image at each later one."""
    return images * (1 + beam_size * (steps - 1))


def bench_beam(s: Settings, args, device: torch.device, peak: dict) -> list[Row]:
    rows = []
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    decoder = make_decoder(s, "soft").to(device).eval()
    rig_no_early_end(decoder)
    features = random_features(s.beam_batch, s, device, g)
    B = s.beam_batch
    for K, amp in [(k, None) for k in s.beam_sizes] + [(max(s.beam_sizes), a) for a in AMPS]:
        reset_peak_memory(device)
        def run(K=K, amp=amp):
            precision, feats = in_precision(decoder, features, amp)
            with precision:
                return beam_search(decoder, feats, beam_size=K, max_len=s.max_len, start_id=START, end_id=END,
                                   pad_id=PAD)

        last: list = []
        timing = measure(partial(_keep_last, last, run), warmup=args.warmup, repeat=args.repeat, device=device)
        out = last[0]
        steps = out.tokens.shape[-1]
        ended_early = int((out.lengths < s.max_len).sum())
        tokens = beam_tokens(B, K, steps)
        needed = decoder_flops(s.dims, tokens=tokens, images=B)  # keys and h_0, c_0 once per image
        executed = decoder_flops(s.dims, tokens=tokens, images=B)  # the K beams share each image's keys
        med = timing.median
        rows.append(Row(
            "beam", f"k={K}" + (f" {amp}" if amp else ""), "captions/s", B / med, med, timing.wall, timing.median_cpu,
            sum(needed.values()) / 1e9, sum(executed.values()) / 1e9, peak_mem_mib=peak_memory_mib(device),
            details={"images": B, "beam_size": K, "steps": steps, "max_len": s.max_len, "amp": amp or "none",
                     "hypothesis_steps": tokens, "tokens_per_s": tokens / med, "ended_early": ended_early,
                     "gflop_needed_by_part": {k: round(v / 1e9, 3) for k, v in needed.items()}},
        ).finish(peak["bf16"] if amp else peak))
    return rows


def encoder_cases(s: Settings) -> list[tuple[str, object]]:
    """(name, EncoderConfig): the shapes config's and the paper's encoder, random weights."""
    shapes = load_config(REPO / "configs" / "shapes_soft.yaml",
                         [f"model.encoder.image_size={s.shapes_size}"]).model.encoder
    paper = load_config(REPO / "configs" / "coco_soft_vgg19.yaml",
                        ["model.encoder.weights=null", f"model.encoder.image_size={s.vgg_size}"]).model.encoder
    return [(f"{shapes.backbone} {shapes.layer} {shapes.image_size}px", shapes),
            (f"{paper.backbone} conv5_4 {paper.image_size}px", paper)]


def bench_encoder(s: Settings, args, device: torch.device, peak: dict) -> list[Row]:
    rows = []
    for name, cfg in encoder_cases(s):
        reset_peak_memory(device)
        encoder = Encoder.from_config(cfg, load_weights=False).to(device).eval()
        images = torch.randn(s.encoder_batch, 3, cfg.image_size, cfg.image_size,
                             generator=torch.Generator().manual_seed(0)).to(device)
        with torch.no_grad():
            per_image = counted_flops(partial(encoder, images[:1]))
            timing = measure(partial(encoder, images), warmup=args.warmup, repeat=args.repeat, device=device)
        med = timing.median
        flops = per_image * s.encoder_batch / 1e9
        rows.append(Row(
            "encoder", name, "images/s", s.encoder_batch / med, med, timing.wall, timing.median_cpu, flops, flops,
            peak_mem_mib=peak_memory_mib(device),
            details={"batch": s.encoder_batch, "grid": list(encoder.grid), "channels": encoder.feature_dim,
                     "gflop_per_image": per_image / 1e9},
        ).finish(peak))
        del encoder
    return rows


def bench_epoch(s: Settings, args, device: torch.device, peak: dict) -> list[Row]:
    """One epoch of ``captioner.train.fit`` on a small shapes set, with and without the cache.

    The time is the whole ``fit`` call (build, encode, the epoch, a small validation, the
    checkpoint). Cases: ``cache`` (every image encoded once per run, up front), ``no cache``
    (batches of images with their captions: each image encoded once per epoch, what a
    fine-tuned encoder does), ``per caption`` (``train.captions_per_image=0``: one
    encoding per caption, five per image, the popular ports' way) and ``cache, no context``
    (the first without the grid context layer and its layout term: what they cost)."""
    from captioner.data import load_split
    from captioner.data.shapes import generate_shapes
    from captioner.train import fit
    from captioner.vocab import tokenize

    tmp = Path(tempfile.mkdtemp(prefix="captioner-bench-"))
    rows = []
    try:
        root = tmp / "shapes"
        n = round(s.epoch_images / 0.8)  # 80% of the set is the train split
        generate_shapes(root, n=n, seed=0, image_size=s.shapes_size)  # outside the timing

        def config(case: str, run: str):
            return load_config(REPO / "configs" / "shapes_soft.yaml", [
                f"data.root={root}", f"data.shapes.n={n}", f"data.shapes.image_size={s.shapes_size}",
                f"model.encoder.image_size={s.shapes_size}", "data.num_workers=0",
                "train.epochs=1", "train.progress=false", "train.val_images=8", "train.max_minutes=0",
                f"train.cache_features={str(case.startswith('cache')).lower()}", f"train.device={device}",
                f"train.captions_per_image={0 if case == 'per caption' else 5}",
                f"train.out_dir={tmp / run}", *s.epoch_overrides,
                *(["model.encoder.context_layers=0", "train.layout_weight=0"] if case.endswith("no context") else [])])

        cfg = config("cache", "probe")
        train_records = load_split(cfg.data, "train")
        val_records = load_split(cfg.data, "val")[: cfg.train.val_images]
        vocab = Vocabulary.build((c.text for r in train_records for c in r.captions),
                                 min_count=cfg.vocab.min_count, max_size=cfg.vocab.max_size)
        captions = [c for r in train_records for c in r.captions]
        tokens = sum(min(len(tokenize(c.text)), cfg.vocab.max_len) + 1 for c in captions)
        enc_cfg = cfg.model.encoder
        encoder = Encoder.from_config(enc_cfg, load_weights=False).eval()
        with torch.no_grad():
            enc_flops = counted_flops(partial(encoder, torch.zeros(1, 3, enc_cfg.image_size, enc_cfg.image_size)))
        d = cfg.model
        dims = DecoderDims(C=encoder.feature_dim, L=encoder.num_locations, A=d.attention.dim,
                           E=d.decoder.embed_dim, H=d.decoder.hidden_dim, V=len(vocab),
                           beta_gate=d.decoder.beta_gate, deep_output=d.decoder.deep_output)
        del encoder
        decoder_gflop = sum(decoder_flops(dims, tokens=tokens, images=len(captions), backward=True).values()) / 1e9
        images_once = len(train_records) + len(val_records)

        if args.warmup:  # imports, allocator and first-call costs, untimed
            fit(config("cache", "warmup"), quiet=True)
        for case in ("cache", "no cache", "per caption", "cache, no context"):
            reset_peak_memory(device)
            fits: list = []
            timing = measure(partial(_fit_into, fits, fit, config, case), warmup=0, repeat=args.epoch_repeat,
                             device=device)
            med = timing.median
            encodes = len(captions) + len(val_records) if case == "per caption" else images_once
            needed = enc_flops * images_once / 1e9 + decoder_gflop
            executed = enc_flops * encodes / 1e9 + decoder_gflop
            rows.append(Row(
                "epoch", case, "captions/s", len(captions) / med, med, timing.wall,
                timing.median_cpu, needed, executed, peak_mem_mib=peak_memory_mib(device),
                details={"train_images": len(train_records), "train_captions": len(captions),
                         "val_images": len(val_records), "images_encoded": encodes,
                         "epoch_loop_and_validation_s": statistics.median(f.history[-1]["minutes"] * 60 for f in fits),
                         "encoder_gflop_per_image": enc_flops / 1e9, "decoder_train_gflop": decoder_gflop,
                         "encoder": f"{enc_cfg.backbone} {enc_cfg.layer} {enc_cfg.image_size}px",
                         "note": "time of the whole fit() call; FLOPs exclude the small validation decode"},
            ).finish(peak))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def _fit_into(fits: list, fit: Callable, config: Callable, case: str) -> None:
    """One timed epoch: a fit() in its own run folder, its result kept."""
    fits.append(fit(config(case, f"run{len(fits)}_{case.replace(' ', '_')}"), quiet=True))


BENCHES = {"train": bench_train, "beam": bench_beam, "encoder": bench_encoder, "epoch": bench_epoch}


# ----------------------------------------------------------------------------- profile


def profile_train_step(s: Settings, device: torch.device, rows: int = 15) -> str:
    """torch.profiler table of one soft-attention training step (after one warm-up step)."""
    from torch.profiler import ProfilerActivity, profile

    step, *_ = setup_training(s, "soft", device)
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


# ----------------------------------------------------------------------------- report


def format_table(results: dict) -> str:
    m, p = results["machine"], results["peak"]
    gpu = f" ({m['gpu']})" if "gpu" in m else ""
    peaks = ", ".join(f"{k} {v['gflops']:.1f}" for k, v in results["section_peaks"].items())
    peaks16 = ", ".join(f"{k} {v['bf16']['gflops']:.1f}" for k, v in results["section_peaks"].items() if "bf16" in v)
    reads = ", ".join(f"{k} {v['read']['gbs']:.1f}" for k, v in results["section_peaks"].items() if "read" in v)
    read_mib = results["settings"]["bandwidth_mib"]
    lines = [
        (f"machine: {m['cpu']}, {m['cpus_usable']}/{m['cpu_count']} cores usable, load {m['load_average']}, "
         f"torch {m['torch']}, {m['threads']} threads, device {m['device']}{gpu}; "
         f"RSS after imports {m['rss_after_imports_mib']} MiB; kernels (additive score; bf16 context and loss): "
         f"{m['score_kernel']}; freed memory {'held (glibc mallopt)' if m.get('held_memory') else 'given back'}"),
        f"float32 matmul peak (best of {len(p['times_s'])} mm {p['n']}x{p['n']}, GFLOP/s) before each section: {peaks}",
        (f"bfloat16 matmul peak (CPU bf16: {m['cpu_bf16']}; the bf16 rows' share is of this peak), GFLOP/s: "
         f"{peaks16}"),
        (f"memory read bandwidth (best of {results['settings']['peak_runs']} sums over {read_mib} MiB, the loops' "
         f"other bound), GB/s: {reads}"),
        (f"settings: {'quick' if results['quick'] else 'full'}, median of {results['repeat']} after "
         f"{results['warmup']} warm-up (epoch: {results['epoch_repeat']})"),
        "",
    ]
    head = (f"{'section':<8} {'case':<22} {'throughput':>20} {'median s':>9} {'cpu s':>7} {'GFLOP need':>10} "
            f"{'GFLOP exec':>10} {'% peak':>7} {'% p.exec':>8} {'% p.cpu':>7} {'% best':>7} {'peak MiB':>9}")
    lines += [head, "-" * len(head)]
    for section in SECTIONS:
        for r in results["sections"].get(section, []):
            lines.append(
                f"{r['section']:<8} {r['case']:<22} {r['throughput']:>9.2f} {r['unit']:<10} "
                f"{r['median_s']:>9.3f} {r['median_cpu_s']:>7.2f} {r['gflop_needed']:>10.2f} {r['gflop_executed']:>10.2f} "
                f"{100 * r['share_of_peak']:>6.1f}% {100 * r['share_of_peak_executed']:>7.1f}% "
                f"{100 * r['share_of_peak_cpu']:>6.1f}% {100 * r['share_of_peak_best']:>6.1f}% "
                f"{r['peak_mem_mib']:>9.0f}")
    for section, message in results.get("errors", {}).items():
        lines.append(f"{section:<8} FAILED: {message}")
    targets = results.get("targets", {})
    if targets:
        lines.append("")
        for name, t in targets.items():
            if "speedup" in t:
                lines.append(f"target {name}: {t['speedup']:.2f}x float32's images/s (target >= {t['target']:.1f}x on a "
                             f"CPU with native bf16; this one: {results['machine']['cpu_bf16']}): "
                             f"{'met' if t['met'] else 'NOT met'}")
                continue
            lines.append(f"target {name}: {100 * t['share']:.1f}% of peak (target >= {100 * t['target']:.0f}%): "
                         f"{'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines)


def targets(sections: dict) -> dict:
    """The targets: on the needed FLOPs (float32), training >= 60% of peak and beam (k=5) >= 50%;
    bf16 training (train.amp=bf16's path) >= 1.7x float32's images/s (on a CPU with native bf16)."""
    out = {}
    train = {r["case"]: r for r in sections.get("train", [])}
    for case, r in train.items():
        if case in ("soft", "hard"):
            out[f"train {case}"] = {"share": r["share_of_peak"], "target": 0.6}
    for r in sections.get("beam", []):
        if r["case"] == "k=5":
            out["beam k=5"] = {"share": r["share_of_peak"], "target": 0.5}
    out = {k: {**v, "met": v["share"] >= v["target"]} for k, v in out.items()}
    if "soft" in train and "soft bf16" in train:
        speedup = train["soft bf16"]["throughput"] / train["soft"]["throughput"]
        out["train soft bf16"] = {"speedup": speedup, "target": 1.7, "met": speedup >= 1.7}
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds), for tests and CI")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--repeat", type=int, default=None, help="timed runs per case; the median is reported (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing (default 1)")
    p.add_argument("--epoch-repeat", type=int, default=1,
                   help="timed fit() calls per epoch case (default 1: each is a whole training run)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch.set_num_threads (0: torch's default; --quick: 1)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--profile", action="store_true", help="also print torch.profiler's top ops of one training step")
    args = p.parse_args(argv)
    args.sections = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown or not args.sections:
        p.error(f"--only: unknown or no section(s) {', '.join(unknown)}; valid: {', '.join(SECTIONS)}")
    if args.repeat is None:
        args.repeat = 3
    if args.repeat < 1 or args.epoch_repeat < 1 or args.warmup < 0:
        p.error("--repeat and --epoch-repeat must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads or args.quick:  # quick: one thread, robust to a busy machine (timings are not the point)
        torch.set_num_threads(args.threads or 1)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA GPU is available")
    device = torch.device(args.device)
    s = QUICK if args.quick else Settings()
    started = time.perf_counter()
    results = {"machine": machine_info(device), "quick": args.quick, "repeat": args.repeat, "warmup": args.warmup,
               "epoch_repeat": args.epoch_repeat,
               "settings": asdict(s), "peak": {}, "section_peaks": {}, "sections": {}, "errors": {}}
    print(f"running {', '.join(args.sections)} on {device} with {torch.get_num_threads()} threads ...", file=sys.stderr)
    for section in SECTIONS:
        if section in args.sections:
            # measured right before each section, so a share of peak compares like with like when
            # other jobs share the machine (on a quiet machine all peaks agree)
            peak = matmul_peak(s, device)
            peak["bf16"] = matmul_peak(s, device, torch.bfloat16)
            peak["read"] = memory_bandwidth(s, device)
            results["section_peaks"][section] = peak
            t0 = time.perf_counter()
            try:
                results["sections"][section] = [asdict(r) for r in BENCHES[section](s, args, device, peak)]
            except Exception as err:  # noqa: BLE001 - one broken section must not lose the others' numbers
                results["errors"][section] = f"{type(err).__name__}: {err}"
                print(f"  {section}: FAILED: {results['errors'][section]}", file=sys.stderr)
                continue
            print(f"  {section}: {time.perf_counter() - t0:.1f} s (peak {peak['gflops']:.1f} GFLOP/s)", file=sys.stderr)
    results["peak"] = max(results["section_peaks"].values(), key=lambda p: p["gflops"])  # the best seen
    results["targets"] = targets(results["sections"])
    results["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    results["wall_s"] = time.perf_counter() - started
    print(format_table(results))
    if args.profile:
        print("\none soft-attention training step, top ops:\n" + profile_train_step(s, device))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return results


if __name__ == "__main__":
    sys.exit(1 if main()["errors"] else 0)
