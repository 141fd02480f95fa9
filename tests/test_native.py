"""The C score kernel (captioner/native.py) against the PyTorch ops and the plain expression."""

import logging
import os
import shutil

import pytest
import torch

from captioner import kernels, native
from captioner.config import load_config
from captioner.decoder import Decoder

needs_cc = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """library() compiled anew into a temporary cache (and the usual one again afterwards)."""
    monkeypatch.setenv("CAPTIONER_NATIVE_CACHE", str(tmp_path))
    native.library.cache_clear()
    yield tmp_path
    native.library.cache_clear()


@pytest.fixture
def ops_only(monkeypatch):
    """The kernels' PyTorch ops, the C kernel switched off."""
    monkeypatch.setattr(native, "usable", lambda *tensors: False)


def inputs(B=3, K=1, L=7, A=37, seed=0, scale=1.0):
    """float32 keys (B, L, A), query (B, K, A), w (A,); A = 37 leaves a remainder after any vector width."""
    g = torch.Generator().manual_seed(seed)
    keys = (torch.randn(B, L, A, generator=g) * scale).requires_grad_()
    query = (torch.randn(B, K, A, generator=g) * scale).requires_grad_()
    w = torch.randn(A, generator=g).requires_grad_()
    return keys, query, w


def score_and_grads(keys, query, w, upstream):
    out = kernels.TanhScore.apply(keys, query, w)
    return (out, *torch.autograd.grad(out, (keys, query, w), upstream))


@needs_cc
def test_it_compiles_here_and_is_taken_for_float32_cpu_tensors():
    assert native.library() is not None
    keys, query, w = inputs()
    assert native.usable(keys, query, w)
    assert not native.usable(keys.to(torch.bfloat16), query, w)
    assert not native.usable(keys.transpose(1, 2), query, w)  # not contiguous
    assert not native.usable(keys.double(), query, w)


@needs_cc
@pytest.mark.parametrize("K", [1, 4])
def test_the_c_score_matches_the_ops_and_the_double_precision_plain_expression(K, monkeypatch):
    keys, query, w = inputs(K=K)
    upstream = torch.randn(3, K, 7, generator=torch.Generator().manual_seed(5))
    got = score_and_grads(keys, query, w, upstream)
    monkeypatch.setattr(native, "usable", lambda *tensors: False)
    ops = score_and_grads(keys, query, w, upstream)
    d = [t.detach().double().requires_grad_() for t in (keys, query, w)]
    plain = kernels.tanh_score_plain(*d)
    exact = (plain, *torch.autograd.grad(plain, d, upstream.double()))
    for name, c, o, e in zip(("scores", "keys", "query", "w"), got, ops, exact):
        assert c.dtype == torch.float32, name
        torch.testing.assert_close(c.double(), e, atol=2e-5, rtol=2e-5, msg=name)
        torch.testing.assert_close(c, o, atol=2e-5, rtol=2e-5, msg=name)


@needs_cc
def test_decoding_without_gradients_reads_the_same_scores():
    keys, query, w = (t.detach() for t in inputs(B=2, K=5, L=9, A=70))
    with torch.no_grad():
        got = kernels.tanh_score(keys, query, w)
    expected = kernels.tanh_score_plain(keys.double(), query.double(), w.double())
    torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=0)


@needs_cc
def test_saturated_inputs_stay_finite_and_exact():
    keys, query, w = (t.detach() for t in inputs(scale=1e4))  # |x| up to ~4e4: tanh is +-1
    got = kernels.tanh_score(keys, query, w)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, torch.tanh(keys.unsqueeze(1) + query.unsqueeze(2)) @ w, atol=1e-4, rtol=0)


@needs_cc
def test_keys_summed_over_a_shrinking_loop_match_the_ops(monkeypatch):
    """The keys read at every step of a teacher-forced loop, the C backward adding into the
    pass's buffer, against the same loop on the PyTorch ops."""
    keys0, _, w0 = inputs(B=4, L=6, A=21, seed=2)
    queries0 = [torch.randn(n, 1, 21, generator=torch.Generator().manual_seed(n)) for n in (4, 4, 3, 1)]

    def run():
        keys, w = keys0.detach().clone().requires_grad_(), w0.detach().clone().requires_grad_()
        queries = [q.clone().requires_grad_() for q in queries0]
        summed = kernels.summed_keys(keys, w)
        loss = sum((kernels.tanh_score(kernels.SummedKeys(summed.keys[:q.shape[0]], summed.keys_sum), q, w) ** 2).sum()
                   for q in queries)
        loss.backward()
        return loss.detach(), keys.grad, w.grad, *(q.grad for q in queries)

    got = run()
    monkeypatch.setattr(native, "usable", lambda *tensors: False)
    for c, o in zip(got, run()):
        torch.testing.assert_close(c, o, atol=1e-4, rtol=1e-4)  # float32 sums in another order


@needs_cc
def test_a_decoder_trains_the_same_with_the_c_kernel(monkeypatch):
    cfg = load_config(None, ["model.attention.dim=24", "model.decoder.embed_dim=16", "model.decoder.hidden_dim=20",
                             "model.decoder.dropout=0.0"]).model
    feats = torch.randn(3, 9, 12, generator=torch.Generator().manual_seed(0))
    captions = torch.randint(3, 30, (3, 6), generator=torch.Generator().manual_seed(1))

    def run():
        torch.manual_seed(0)
        dec = Decoder.from_config(cfg, vocab_size=30, feature_dim=12, grid=(3, 3)).train()
        out = dec(feats, captions, lengths=torch.tensor([5, 3, 4]))
        out.logits.float().pow(2).mean().backward()
        return out.logits.detach(), {n: p.grad for n, p in dec.named_parameters()}

    logits, grads = run()
    monkeypatch.setattr(native, "usable", lambda *tensors: False)
    logits_ops, grads_ops = run()
    torch.testing.assert_close(logits, logits_ops, atol=1e-5, rtol=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ops[name], atol=1e-5, rtol=1e-4, msg=name)


@needs_cc
def test_it_compiles_once_into_the_cache(fresh_library):
    lib = native.library()
    assert lib is not None and native.library() is lib
    built = list(fresh_library.glob("score-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    native.library.cache_clear()
    assert native.library() is not None  # loaded from the cache, not compiled again
    assert built[0].stat().st_mtime_ns == stamp
    assert [p.name for p in fresh_library.iterdir()] == [built[0].name]  # no temporary left behind


def test_switched_off_it_is_not_used_and_the_ops_run(fresh_library, monkeypatch):
    monkeypatch.setenv("CAPTIONER_NATIVE", "0")
    assert native.library() is None
    keys, query, w = inputs()
    assert not native.usable(keys, query, w)
    torch.testing.assert_close(kernels.tanh_score(keys, query, w), kernels.tanh_score_plain(keys, query, w))
    assert list(fresh_library.iterdir()) == []


def test_a_compiler_that_fails_leaves_the_ops_and_says_why(fresh_library, monkeypatch, caplog):
    monkeypatch.setenv("CC", "false")  # exits 1
    with caplog.at_level(logging.WARNING, logger="captioner.native"):
        assert native.library() is None
    assert "C score kernel is not available" in caplog.text and "PyTorch ops run instead" in caplog.text
    keys, query, w = inputs(K=2)
    out = kernels.TanhScore.apply(keys, query, w)
    torch.testing.assert_close(out, kernels.tanh_score_plain(keys, query, w))
    out.sum().backward()
    assert keys.grad is not None and torch.isfinite(keys.grad).all()
    assert not list(fresh_library.glob("*.so"))


@needs_cc
def test_loading_it_leaves_subnormal_floats_alone():
    """Linked with -ffast-math, gcc's startup code would set flush-to-zero for the whole process."""
    assert native.library() is not None
    tiny = 5e-324  # the smallest double: a subnormal
    assert tiny * 1.0 > 0.0
    assert (torch.tensor([1e-40]) * 1.0).item() > 0.0  # a float32 subnormal, through torch


@needs_cc
def test_equal_inputs_anywhere_in_memory_give_equal_bits():
    """No loop peeled to an aligned address: the sums' order depends on A alone."""
    keys, query, w = (t.detach() for t in inputs(B=2, L=5, A=37))
    outs = []
    for offset in range(16):  # 4-byte steps through a 64-byte line
        moved = torch.empty(keys.numel() + offset)[offset:].view_as(keys)
        moved.copy_(keys)
        outs.append(native.score_forward(moved, query, w))
    assert all(torch.equal(outs[0], o) for o in outs[1:])



@needs_cc
def test_a_nan_in_the_features_still_reaches_the_logits():
    """Built with -ffast-math, the C score may turn a NaN key into a finite score (the PyTorch ops
    give NaN); h_0 (the features' mean) and the context sum read the same features, so a NaN still
    reaches the logits and the trainer's non-finite-loss check."""
    cfg = load_config(None, ["model.attention.dim=8", "model.decoder.embed_dim=8", "model.decoder.hidden_dim=8"]).model
    dec = Decoder.from_config(cfg, vocab_size=20, feature_dim=6, grid=(2, 2)).eval()
    feats = torch.randn(2, 4, 6)
    feats[1, 2, 3] = float("nan")
    with torch.no_grad():
        logits = dec(feats, torch.randint(3, 20, (2, 4))).logits
    assert torch.isnan(logits[1]).all() and torch.isfinite(logits[0]).all()
