"""bf16 compute with float32 master weights (captioner.precision, train.amp=bf16)."""

import math
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from captioner import native
from captioner.config import load_config
from captioner.decoder import Decoder
from captioner.losses import CaptionLoss
from captioner.precision import cast_parameters

B, L, C, V, H = 4, 9, 24, 50, 32
BF16 = torch.bfloat16


def make_decoder(*overrides: str) -> Decoder:
    cfg = load_config(None, [f"model.attention.dim={H}", f"model.decoder.embed_dim={H}",
                             f"model.decoder.hidden_dim={H}", "model.decoder.dropout=0.0", *overrides]).model
    torch.manual_seed(0)
    return Decoder.from_config(cfg, vocab_size=V, feature_dim=C, grid=(3, 3)).train()


def batch(T: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, L, C, generator=g)
    captions = torch.randint(3, V, (B, T), generator=g)
    lengths = torch.tensor([T - 1, T - 3, T - 1, 2])
    return feats, captions, lengths


def grads(dec: Decoder) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in dec.named_parameters() if p.grad is not None}


def test_inside_the_context_parameters_read_as_copies_and_come_back_in_order():
    dec = make_decoder()
    before = list(dec.named_parameters())
    keys = list(dec.state_dict())
    with cast_parameters(dec, BF16):
        assert dec.gate_hidden.weight.dtype == BF16 and dec.out.weight.dtype == BF16
        assert not isinstance(dec.gate_hidden.weight, torch.nn.Parameter)
        # the embedding keeps its float32 table; the rows a pass reads come out in the layers' dtype
        assert dec.embed.weight.dtype == torch.float32 and isinstance(dec.embed.weight, torch.nn.Parameter)
        assert dec._embedded(torch.tensor([[3, 4]])).dtype == BF16
        assert list(dec.parameters()) == [dec.embed.weight]  # the copies are not parameters: no optimizer can step them
    after = list(dec.named_parameters())
    assert [n for n, _ in after] == [n for n, _ in before]
    assert all(a is b for (_, a), (_, b) in zip(after, before))
    assert list(dec.state_dict()) == keys
    assert dec.gate_hidden.weight.dtype == torch.float32


def test_parameters_come_back_when_the_pass_raises():
    dec = make_decoder()
    weight = dec.out.weight
    with pytest.raises(RuntimeError, match="boom"), cast_parameters(dec, BF16):
        raise RuntimeError("boom")
    assert dec.out.weight is weight and dec.out.weight.dtype == torch.float32


def test_no_dtype_changes_nothing():
    dec = make_decoder()
    weight = dec.out.weight
    with cast_parameters(dec, None):
        assert dec.out.weight is weight


@pytest.mark.parametrize("overrides", [
    (), ("model.decoder.arrangement=luong",), ("model.attention.name=hard", "model.attention.hard.estimator=gumbel"),
    ("model.attention.name=local",), ("model.attention.fused=false",), ("model.decoder.fused=false",),
    ("model.decoder.arrangement=luong", "model.attention.normalizer=sparsemax", "model.attention.relative=true",
     "model.attention.anchor_on_word=true", "model.attention.relative_read=true"),  # the shapes config's
    ("model.decoder.arrangement=luong", "model.attention.normalizer=sparsemax", "model.decoder.output=product"),
])
def test_a_bf16_pass_agrees_with_float32_and_trains_the_float32_weights(overrides):
    feats, captions, lengths = batch()
    dec = make_decoder(*overrides)
    loss_fn = CaptionLoss(alpha_c=1.0)
    targets, mask = captions[:, 1:], (torch.arange(captions.shape[1] - 1) < lengths.unsqueeze(1)).float()
    torch.manual_seed(2)
    out32 = dec(feats, captions, lengths=lengths)
    loss32 = loss_fn(out32, targets, mask).total
    loss32.backward()
    g32 = grads(dec)
    dec.zero_grad()
    torch.manual_seed(2)
    with cast_parameters(dec, BF16):
        out16 = dec(feats.to(BF16), captions, lengths=lengths)
    # the mixture output's log-probabilities come out float32 (its log_softmax and logsumexp over the support)
    assert out16.logits.dtype == (torch.float32 if "model.decoder.output=product" in overrides else BF16)
    loss16 = loss_fn(out16, targets, mask).total
    assert loss16.dtype == torch.float32
    loss16.backward()
    g16 = grads(dec)
    assert set(g16) == set(g32)
    assert all(g.dtype == torch.float32 for g in g16.values())
    # bf16 keeps 8 bits of mantissa: ~0.4% per rounding
    assert torch.allclose(out16.logits.float(), out32.logits, atol=0.02, rtol=0.02)
    assert abs(loss16.item() - loss32.item()) < 0.01 * loss32.item()
    largest = max(g.norm() for g in g32.values())
    for name, g in g32.items():
        if g.norm() < 1e-3 * largest:  # a gradient at bf16's rounding of the others (the shapes config's
            # anchor gate: 2e-4 against 0.6): the same to within that rounding
            assert (g16[name] - g).norm() < 2e-3 * largest, name
            continue
        cos = torch.nn.functional.cosine_similarity(g16[name].flatten(), g.flatten(), dim=0)
        assert cos > 0.99, (name, cos.item())


def test_the_cell_state_stays_float32_and_h_follows_the_gates():
    dec = make_decoder()
    feats = torch.randn(B, L, C).to(BF16)
    with torch.no_grad(), cast_parameters(dec, BF16):
        state = dec.init_state(feats)
        out = dec.step(torch.full((B,), 3), state, feats, dec.precompute(feats))
    assert state.c.dtype == torch.float32 and state.h.dtype == BF16
    assert out.state.c.dtype == torch.float32 and out.state.h.dtype == BF16


class CastLog(TorchDispatchMode):
    """Records the shape of every tensor a dtype cast copies."""

    def __init__(self):
        super().__init__()
        self.shapes: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default:
            self.shapes[tuple(args[0].shape)] += 1
        return func(*args, **(kwargs or {}))


def casts_of_a_training_pass(T: int) -> Counter:
    feats, captions, lengths = batch(T)
    lengths = torch.full((B,), T - 1)
    dec = make_decoder()
    log = CastLog()
    with log:
        with cast_parameters(dec, BF16):
            out = dec(feats.to(BF16), captions, lengths=lengths)
        out.logits.float().sum().backward()
    return log.shapes


def test_no_weight_or_feature_is_cast_inside_the_time_loop():
    short, long = casts_of_a_training_pass(4), casts_of_a_training_pass(12)  # 3 and 11 steps
    grown = {shape: long[shape] - short[shape] for shape in long if shape in short and long[shape] != short[shape]}
    # all that is cast at every step (forward, and the gradient back): on a CPU, the additive
    # score's query (B, 1, A), its scores (B, 1, L) and w (A,), whose elementwise work runs in
    # float32 there (kernels.score_dtype); where the C kernels run, the map (B, L) the context
    # kernel (kernels.context) takes in float32 and the context (B, C) it gives back, each with its
    # gradient; without them, the LSTM cell's (B, H) values where the float32 cell state meets the
    # bf16 gates (the C cell, kernels.LSTMCell, reads and writes both dtypes itself): vectors of a
    # step's rows, never a weight, the features or the keys
    A = H  # make_decoder's attention dim
    expected = {(B, 1, A), (B, 1, L), (A,)} | ({(B, L), (B, C)} if native.library() else {(B, H)})
    assert set(grown) == expected, grown
    # what has T in its shape (the logits (B, T, V) for the loss, say) is cast once, and its gradient once
    assert all(n <= 2 for shape, n in (long - short).items() if shape not in short), long - short
    weights = {tuple(p.shape) for p in make_decoder().parameters()} - {(A,)}  # w: above
    assert all(short[w] == long[w] for w in weights)
    assert short[(B, L, C)] == long[(B, L, C)] == 1  # the features: once per pass


@pytest.mark.parametrize("amp, expected", [("bf16", BF16), ("none", None)])
def test_training_with_amp_bf16_runs_the_decoder_cast_once_per_batch(tiny_config, monkeypatch, amp, expected):
    import captioner.model
    from captioner.train import fit

    seen = []
    real = captioner.model.cast_parameters

    def recording(module, dtype):
        seen.append((type(module).__name__, dtype))
        return real(module, dtype)

    monkeypatch.setattr(captioner.model, "cast_parameters", recording)
    fit(tiny_config("train.epochs=1", "train.max_steps=2", f"train.amp={amp}"), quiet=True)
    assert seen == ([("Decoder", BF16)] * 2 if expected is not None else [])  # one cast per training step


@pytest.mark.parametrize("support, expected", [("AMX", BF16), ("AVX512-BF16", BF16), ("none", None)])
def test_amp_auto_is_bf16_only_where_the_cpu_has_native_bf16(tiny_config, monkeypatch, support, expected):
    import captioner.device
    import captioner.model
    from captioner.train import fit

    seen = []
    real = captioner.model.cast_parameters
    monkeypatch.setattr(captioner.model, "cast_parameters", lambda m, dtype: seen.append(dtype) or real(m, dtype))
    monkeypatch.setattr(captioner.device, "cpu_bf16_support", lambda: support)
    monkeypatch.setattr(captioner.device, "cpu_bf16_speedup", lambda: 4.0)  # as on an AMX or Zen 4 CPU
    result = fit(tiny_config("train.epochs=1", "train.max_steps=2", "train.amp=auto", "train.device=cpu"), quiet=True)
    assert seen == ([BF16] * 2 if expected is not None else [])
    assert "amp: auto" in (result.run_dir / "config.yaml").read_text()  # the config keeps what was asked


def test_cpu_bf16_speedup_is_a_measured_ratio():
    from captioner.device import cpu_bf16_speedup

    ratio = cpu_bf16_speedup(size=64, repeat=2)
    assert math.isfinite(ratio) and ratio > 0


def test_resolve_amp_names_why():
    from captioner.device import resolve_amp

    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu, cpu_bf16="AMX", bf16_speedup=4.04) == (
        "bf16", "train.amp=auto: bf16 (this CPU multiplies bf16 natively: AMX; a bf16 matmul ran 4.0x as fast as float32)")
    amp, why = resolve_amp("auto", cpu, cpu_bf16="none")
    assert amp == "none" and "no native bf16" in why
    # native but slower (an Intel Xeon with AVX512-BF16 and no AMX: half float32's rate)
    amp, why = resolve_amp("auto", cpu, cpu_bf16="AVX512-BF16", bf16_speedup=0.5)
    assert amp == "none" and "AVX512-BF16" in why and "0.50x" in why and "train.amp=bf16 forces it" in why
    assert resolve_amp("auto", cpu, cpu_bf16="AVX512-BF16", bf16_speedup=1.19)[0] == "none"
    assert resolve_amp("auto", cpu, cpu_bf16="AVX512-BF16", bf16_speedup=1.2)[0] == "bf16"
    for explicit in ("none", "bf16"):  # an explicit choice is kept, whatever the CPU
        assert resolve_amp(explicit, cpu, cpu_bf16="none")[0] == explicit
    assert resolve_amp("auto", torch.device("meta"))[0] == "none"


def test_the_mean_over_locations_in_bf16_is_the_mean():
    from captioner.decoder import mean_over_locations

    torch.manual_seed(0)
    feats = torch.randn(3, 40, 16)
    torch.testing.assert_close(mean_over_locations(feats), feats.mean(1))
    low = mean_over_locations(feats.to(BF16))
    assert low.dtype == BF16 and low.shape == (3, 16)
    torch.testing.assert_close(low.float(), feats.to(BF16).float().mean(1), atol=0.01, rtol=0.01)
