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
    """float32 keys (B, L, A), query (B, K, A), w (A,); A = 37 leaves a remainder after any vector width
    (the portable loops), A = 48 none (the AVX-512 score, where the CPU has it)."""
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
@pytest.mark.parametrize("A", [37, 48])
@pytest.mark.parametrize("K", [1, 4])
def test_the_c_score_matches_the_ops_and_the_double_precision_plain_expression(K, A, monkeypatch):
    keys, query, w = inputs(K=K, A=A)
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
@pytest.mark.parametrize("A", [70, 64])
def test_decoding_without_gradients_reads_the_same_scores(A):
    keys, query, w = (t.detach() for t in inputs(B=2, K=5, L=9, A=A))
    with torch.no_grad():
        got = kernels.tanh_score(keys, query, w)
    expected = kernels.tanh_score_plain(keys.double(), query.double(), w.double())
    torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=0)


@needs_cc
@pytest.mark.parametrize("A", [8, 32])  # the portable loop, the AVX-512 one (where the CPU has it)
def test_the_c_tanh_is_within_half_a_micro_of_double_precision_over_its_whole_range(A):
    """The score with A equal keys and w = 1/A (exact for these A) is tanh(key) itself: against
    float64's tanh over [-40, 40] (past +-9 tanh is +-1 in float32)."""
    x = torch.linspace(-40, 40, 40001)
    keys = x.view(1, -1, 1).expand(1, x.numel(), A).contiguous()
    got = native.score_forward(keys, torch.zeros(1, 1, A), torch.full((A,), 1.0 / A)).view(-1)
    assert (got.double() - torch.tanh(x.double())).abs().max() < 5e-7


@needs_cc
@pytest.mark.parametrize("A", [37, 48])
def test_saturated_inputs_stay_finite_and_exact(A):
    keys, query, w = (t.detach() for t in inputs(A=A, scale=1e4))  # |x| up to ~4e4: tanh is +-1
    got = kernels.tanh_score(keys, query, w)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, torch.tanh(keys.unsqueeze(1) + query.unsqueeze(2)) @ w, atol=1e-4, rtol=0)


@needs_cc
@pytest.mark.parametrize("A", [21, 32])
def test_keys_summed_over_a_shrinking_loop_match_the_ops(A, monkeypatch):
    """The keys read at every step of a teacher-forced loop, the C backward adding into the
    pass's buffer, against the same loop on the PyTorch ops."""
    keys0, _, w0 = inputs(B=4, L=6, A=A, seed=2)
    queries0 = [torch.randn(n, 1, A, generator=torch.Generator().manual_seed(n)) for n in (4, 4, 3, 1)]

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
@pytest.mark.parametrize("dim", [24, 32])
def test_a_decoder_trains_the_same_with_the_c_kernel(dim, monkeypatch):
    cfg = load_config(None, [f"model.attention.dim={dim}", "model.decoder.embed_dim=16", "model.decoder.hidden_dim=20",
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
@pytest.mark.parametrize("A", [37, 48])
def test_equal_inputs_anywhere_in_memory_give_equal_bits(A):
    """No loop peeled to an aligned address: the sums' order depends on A alone."""
    keys, query, w = (t.detach() for t in inputs(B=2, L=5, A=A))
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


def bf16_features(B=3, L=7, C=37, seed=0):
    """bf16 features (B, L, C), ReLU-like (non-negative, some zeros) as a CNN's; C = 37 leaves a remainder."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, C, generator=g).relu_().to(torch.bfloat16)


@needs_cc
@pytest.mark.parametrize("alpha_dtype", [torch.float32, torch.bfloat16])
def test_the_bf16_context_is_the_double_precision_sum_in_value_and_map_gradient(alpha_dtype):
    feats = bf16_features()
    g = torch.Generator().manual_seed(1)
    alpha = torch.softmax(torch.randn(3, 7, generator=g), -1).to(alpha_dtype).requires_grad_()
    upstream = torch.randn(3, 37, generator=g).to(torch.bfloat16)
    out = kernels.Context.apply(alpha, feats)
    (grad,) = torch.autograd.grad(out, alpha, upstream)
    assert out.dtype == torch.bfloat16 and grad.dtype == alpha_dtype
    exact = torch.bmm(alpha.detach().double().unsqueeze(1), feats.double()).squeeze(1)
    # summed in float32, rounded once to bf16: the exact sum's own bf16 rounding, at most one bf16 step off
    torch.testing.assert_close(out.double(), exact, rtol=2 ** -8, atol=0)
    exact_grad = torch.bmm(feats.double(), upstream.double().unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(grad.double(), exact_grad, rtol=2 ** -8 if alpha_dtype == torch.bfloat16 else 1e-6,
                               atol=1e-6)


@needs_cc
def test_the_bf16_context_reads_every_location_and_channel():
    """One non-zero feature at a time, at every (image, location, channel): it moves exactly its
    own image's entry of that channel, by its own location's weight (powers of two: exact)."""
    B, L, C = 2, 5, 19
    alpha = (2.0 ** -torch.arange(1, L + 1, dtype=torch.float32)).expand(B, L).contiguous().requires_grad_()
    for b in range(B):
        for loc in range(L):
            for c in range(C):
                feats = torch.zeros(B, L, C, dtype=torch.bfloat16)
                feats[b, loc, c] = 4.0
                out = kernels.Context.apply(alpha, feats)
                expected = torch.zeros(B, C)
                expected[b, c] = 4.0 * 2.0 ** -(loc + 1)
                assert torch.equal(out.float(), expected), (b, loc, c)
                (grad,) = torch.autograd.grad(out, alpha, torch.ones(B, C, dtype=torch.bfloat16))
                expected_grad = torch.zeros(B, L)
                expected_grad[b, loc] = 4.0
                assert torch.equal(grad, expected_grad), (b, loc, c)


@needs_cc
def test_the_c_context_is_taken_for_bf16_features_with_one_map_and_for_k_maps_without_gradients(monkeypatch):
    calls = []
    real = native.context_forward
    monkeypatch.setattr(native, "context_forward", lambda *a: calls.append(1) or real(*a))
    feats, alpha = bf16_features(), torch.softmax(torch.randn(3, 7), -1)
    maps = torch.softmax(torch.randn(3, 2, 7), -1)
    cases = {"bf16": (alpha, feats, True), "float32": (alpha, feats.float(), True),
             "two maps an image": (maps, feats, True), "two maps, float32": (maps, feats.float(), True),
             "two maps, maps that want a gradient": (maps.clone().requires_grad_(), feats.float(), True),
             "two maps, features that want a gradient": (maps, feats.float().requires_grad_(), True),
             "features that want a gradient": (alpha, feats.clone().requires_grad_(), True),
             "not contiguous": (alpha, feats.transpose(1, 2).contiguous().transpose(1, 2), True),
             "fused: false": (alpha, feats, False), "two maps, fused: false": (maps, feats, False)}
    taken = {}
    for name, (a, f, fused) in cases.items():
        calls.clear()
        out = kernels.context(a, f, fused)
        taken[name] = bool(calls)
        torch.testing.assert_close(out.float(), kernels.context_plain(a, f).float(), rtol=2 ** -7, atol=1e-6)
    assert taken == {"bf16": True, "float32": False, "two maps an image": True, "two maps, float32": True,
                     "two maps, maps that want a gradient": False, "two maps, features that want a gradient": False,
                     "features that want a gradient": False, "not contiguous": False, "fused: false": False,
                     "two maps, fused: false": False}
    with torch.no_grad():  # no gradient wanted at all: the C pass, whatever requires_grad says
        calls.clear()
        kernels.context(maps.clone().requires_grad_(), feats.float().requires_grad_())
        assert calls


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K,L", [(1, 9), (2, 8), (3, 11), (5, 3), (5, 13)])
def test_the_c_context_of_k_maps_an_image_matches_the_bmm(dtype, K, L):
    """K maps per image (a beam): four locations a pass where L allows, the rest one by one
    (L = 3: none in fours; 13: three fours and one); rows indexing the images."""
    torch.manual_seed(K * 100 + L)
    feats = torch.randn(4, L, 37).to(dtype)
    maps = torch.softmax(torch.randn(3, K, L) * 3, -1)
    rows = torch.tensor([2, 0, 2])
    got = native.context_forward(maps.contiguous(), feats, rows)
    assert got.shape == (3, K, 37) and got.dtype == torch.float32
    want = torch.einsum("bkl,blc->bkc", maps.double(), feats.double()[rows])
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    if K == 1:  # one map: the (B, L) layout gives the same values
        assert torch.equal(native.context_forward(maps[:, 0].contiguous(), feats, rows), got[:, 0])


@needs_cc
def test_fused_false_in_the_config_keeps_the_attention_on_the_plain_context(monkeypatch):
    from captioner.attention import build_attention
    from captioner.config import AttentionConfig

    calls = []
    monkeypatch.setattr(kernels.Context, "apply", lambda *a: calls.append(1) or kernels.context_plain(*a))
    feats = bf16_features()
    for fused in (True, False):
        calls.clear()
        att = build_attention(AttentionConfig(fused=fused), feature_dim=37, hidden_dim=8, grid=(7, 1)).to(torch.bfloat16)
        with torch.no_grad():
            att(feats, att.precompute(feats), torch.randn(3, 8, dtype=torch.bfloat16))
        assert bool(calls) is fused


@needs_cc
def test_a_bf16_decoder_trains_the_same_with_the_c_context(monkeypatch):
    from captioner.precision import cast_parameters

    cfg = load_config(None, ["model.attention.dim=24", "model.decoder.embed_dim=16", "model.decoder.hidden_dim=20",
                             "model.decoder.dropout=0.0"]).model
    feats = bf16_features(B=3, L=9, C=40)
    captions = torch.randint(3, 30, (3, 6), generator=torch.Generator().manual_seed(1))
    calls = []
    real = native.context_forward
    monkeypatch.setattr(native, "context_forward", lambda *a: calls.append(1) or real(*a))

    def run():
        torch.manual_seed(0)
        dec = Decoder.from_config(cfg, vocab_size=30, feature_dim=40, grid=(3, 3)).train()
        with cast_parameters(dec, torch.bfloat16):
            out = dec(feats, captions, lengths=torch.tensor([5, 3, 4]))
        out.logits.float().pow(2).mean().backward()
        return out.logits.detach().float(), {n: p.grad for n, p in dec.named_parameters()}

    logits, grads = run()
    assert len(calls) == 5  # one per step of the longest caption
    monkeypatch.setattr(native, "context_usable", lambda features, *dtypes: False)
    logits_plain, grads_plain = run()
    assert len(calls) == 5
    torch.testing.assert_close(logits, logits_plain, atol=0.05, rtol=0.02)  # bf16's rounding, in another order
    for name, g in grads.items():
        cos = torch.nn.functional.cosine_similarity(g.flatten().double(), grads_plain[name].flatten().double(), dim=0)
        assert cos > 0.99, (name, cos.item())


def bf16_logits(N=5, V=37, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, V, generator=g) * scale).to(torch.bfloat16)
    return logits, torch.randint(0, V, (N,), generator=g)


@needs_cc
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("V", [37, 10000])
def test_the_c_cross_entropy_is_the_double_precision_one_in_value_and_gradient(V, dtype):
    logits, target = bf16_logits(N=6, V=V)
    logits = logits.to(dtype).requires_grad_()
    upstream = torch.rand(6, generator=torch.Generator().manual_seed(3))
    nll = kernels.CrossEntropy.apply(logits, target)
    (grad,) = torch.autograd.grad(nll, logits, upstream)
    assert nll.dtype == torch.float32 and grad.dtype == dtype
    x = logits.detach().double().requires_grad_()
    exact = torch.nn.functional.cross_entropy(x, target, reduction="none")
    (exact_grad,) = torch.autograd.grad(exact, x, upstream.double())
    torch.testing.assert_close(nll.double(), exact, rtol=1e-6, atol=1e-5)
    # computed in float32 (and rounded once to bf16: within one bf16 step of the exact gradient)
    torch.testing.assert_close(grad.double(), exact_grad, rtol=2 ** -8 if dtype == torch.bfloat16 else 1e-5, atol=1e-9)
    assert torch.all(grad[torch.arange(6), target] < 0)  # the target's own share, pushed up


@needs_cc
def test_cross_entropy_takes_c_for_float32_and_bf16_cpu_logits_and_matches_torch_elsewhere(monkeypatch):
    calls = []
    real = native.xent_forward
    monkeypatch.setattr(native, "xent_forward", lambda *a: calls.append(1) or real(*a))
    logits, target = bf16_logits()
    for x, taken in [(logits, True), (logits.float(), True), (logits.double(), False),
                     (logits.float().t().contiguous().t(), False)]:
        calls.clear()
        out = kernels.cross_entropy(x, target)
        assert bool(calls) is taken and out.dtype == torch.float32
        torch.testing.assert_close(out, torch.nn.functional.cross_entropy(x.float(), target, reduction="none"))
    assert torch.equal(kernels.cross_entropy(logits.double(), target),
                       torch.nn.functional.cross_entropy(logits.float(), target, reduction="none"))


@needs_cc
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_c_cross_entropy_keeps_a_nan_and_huge_logits_finite(dtype):
    logits, target = bf16_logits(N=3, scale=1e4)
    logits = logits.to(dtype)
    assert torch.isfinite(kernels.cross_entropy(logits, target)).all()
    torch.testing.assert_close(kernels.cross_entropy(logits, target),
                               torch.nn.functional.cross_entropy(logits.double(), target, reduction="none").float())
    logits[1, 4] = float("nan")
    out = kernels.cross_entropy(logits, target)
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()


@needs_cc
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_c_cross_entropy_target_outside_the_vocabulary_is_refused_with_the_range(dtype):
    logits, _ = bf16_logits(V=37)
    logits = logits.to(dtype)
    with pytest.raises(IndexError, match=r"\[0, 37\).*got 0\.\.37"):
        kernels.cross_entropy(logits, torch.tensor([0, 1, 2, 3, 37]))
    with pytest.raises(IndexError, match=r"got -1\.\.3"):
        kernels.cross_entropy(logits, torch.tensor([0, 1, -1, 3, 2]))


@needs_cc
def test_a_nan_gradient_stays_nan_when_rounded_to_bf16():
    """A NaN whose low bits would carry over when rounded (payload 0x7fffffff) stays a NaN, not -0 or inf."""
    logits, target = bf16_logits(N=2)
    logits.requires_grad_()
    upstream = torch.tensor([1.0, 0.0])
    upstream.view(torch.int32)[1] = 0x7FFFFFFF
    (grad,) = torch.autograd.grad(kernels.CrossEntropy.apply(logits, target), logits, upstream)
    assert torch.isfinite(grad[0]).all() and torch.isnan(grad[1]).all()


# -- the context through a row index (kernels.FeatureRows)


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_context_reads_each_rows_image_through_the_index(dtype):
    g = torch.Generator().manual_seed(3)
    table = torch.randn(4, 9, 37, generator=g).relu().to(dtype)  # U = 4 images, L = 9, C = 37 (odd: the tails)
    rows = torch.tensor([2, 0, 2, 3, 1, 2])  # B = 6 rows, one image read three times
    alpha = torch.softmax(torch.randn(6, 9, generator=g), -1)
    grad = torch.randn(6, 37, generator=g)
    copied = table.index_select(0, rows).float()
    expected = torch.bmm(alpha.unsqueeze(1), copied).squeeze(1)
    torch.testing.assert_close(native.context_forward(alpha, table, rows), expected, rtol=1e-5, atol=1e-5)
    expected_grad = torch.bmm(grad.unsqueeze(1), copied.transpose(1, 2)).squeeze(1)
    torch.testing.assert_close(native.context_backward(grad, table, rows), expected_grad, rtol=1e-5, atol=1e-5)
    if dtype == torch.float32:  # no index: row b reads image b
        torch.testing.assert_close(native.context_forward(alpha[:4], table), torch.bmm(alpha[:4].unsqueeze(1), table)
                                   .squeeze(1), rtol=1e-5, atol=1e-5)


@needs_cc
@pytest.mark.parametrize("image_index", [None, [0, 1, 0, 2, 1]])
def test_a_teacher_forced_pass_reads_shared_frozen_features_in_place_with_the_same_result(monkeypatch, image_index):
    """Several captions to an image: the pass hands the attention a FeatureRows, not a copy of
    the repeated features, with the same logits and gradients as the copy. One caption an image:
    the sorted copy and the bmm, as before."""
    cfg = load_config(None, ["model.attention.dim=24", "model.decoder.embed_dim=16", "model.decoder.hidden_dim=20",
                             "model.decoder.dropout=0.0"]).model
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(3 if image_index else 5, 9, 40, generator=g).relu()
    captions = torch.randint(3, 30, (5, 7), generator=g)
    index = torch.tensor(image_index) if image_index else None
    calls = []
    real = native.context_forward
    monkeypatch.setattr(native, "context_forward", lambda a, f, rows=None: calls.append(rows is not None) or real(a, f, rows))

    def run():
        torch.manual_seed(0)
        dec = Decoder.from_config(cfg, vocab_size=30, feature_dim=40, grid=(3, 3)).train()
        out = dec(feats, captions, lengths=torch.tensor([6, 3, 4, 6, 2]), image_index=index)
        out.logits.pow(2).mean().backward()
        return out.logits.detach(), {n: p.grad for n, p in dec.named_parameters()}

    logits, grads = run()
    assert calls == ([True] * 6 if image_index else [])  # every step of the longest caption, through the index
    monkeypatch.setattr(kernels, "reads_feature_rows", lambda *a: False)
    logits_copy, grads_copy = run()
    assert len(calls) == (6 if image_index else 0)  # the copy: the plain bmm
    torch.testing.assert_close(logits, logits_copy, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_copy[name], rtol=1e-4, atol=1e-6, msg=name)


@needs_cc
def test_feature_rows_stand_for_the_copy_and_refuse_what_they_cannot_do():
    table = torch.randn(3, 4, 5)
    rows = kernels.FeatureRows(table, torch.tensor([2, 2, 0, 1]))
    assert rows.shape == (4, 4, 5) and rows.dtype == table.dtype and not rows.requires_grad
    assert rows[:2].rows.tolist() == [2, 2] and rows[:2].shape == (2, 4, 5)
    with pytest.raises(TypeError, match="slice"):
        rows[0]
    with pytest.raises(ValueError, match="one map per row"):
        kernels.context(torch.rand(4, 2, 4), rows)
    reader = type("Reader", (), {"reads_feature_rows": True})()
    assert kernels.reads_feature_rows(table, reader, True)
    assert not kernels.reads_feature_rows(table, reader, False)  # model.attention.fused: false
    assert not kernels.reads_feature_rows(table, object(), True)  # an attention that reads features otherwise
    wanting = table.clone().requires_grad_()  # a fine-tuned encoder's features: the copy and the bmm
    assert not kernels.reads_feature_rows(wanting, reader, True)
    assert not kernels.reads_feature_rows(table.double(), reader, True)


@needs_cc
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (16, 16), (17, 33), (399, 40), (5, 300), (48, 3)])
def test_the_c_transpose_of_a_2_byte_matrix_is_the_transpose_bit_for_bit(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=g) * 100).to(dtype)
    x.view(-1)[::7] = float("nan")  # special values move like any other
    x.view(-1)[3::11] = float("-inf")
    assert native.transpose_usable(x)
    out = native.transposed(x)
    assert out.shape == (shape[1], shape[0]) and out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out.view(torch.int16), x.t().contiguous().view(torch.int16))


def test_the_c_transpose_takes_only_2_byte_contiguous_matrices_on_the_cpu():
    x = torch.randn(6, 4).to(torch.bfloat16)
    assert native.transpose_usable(x) == (native.library() is not None)
    assert not native.transpose_usable(x.float())  # MKL reads float32 transposed at full speed
    assert not native.transpose_usable(x.t())  # not contiguous
    assert not native.transpose_usable(x.view(2, 3, 4))


@needs_cc
@pytest.mark.parametrize("H", [7, 32])  # a remainder after any vector width, and none
def test_the_c_lstm_cell_is_the_double_precision_cell(H):
    from captioner.decoder import _lstm

    g = torch.Generator().manual_seed(H)
    parts = tuple(torch.randn(5, 4 * H, generator=g) * 3 for _ in range(3))
    c = torch.randn(5, H, generator=g) * 2
    h, c_next = native.lstm_cell(parts, c)
    h64, c64 = _lstm(parts[0].double() + parts[1].double() + parts[2].double(), c.double())
    assert h.dtype == c_next.dtype == torch.float32 and h.shape == c_next.shape == (5, H)
    torch.testing.assert_close(h.double(), h64, atol=1e-6, rtol=0)
    torch.testing.assert_close(c_next.double(), c64, atol=1e-6, rtol=0)
    assert torch.equal(parts[0], torch.randn(5, 4 * H, generator=torch.Generator().manual_seed(H)) * 3)  # inputs kept


@needs_cc
def test_the_training_cell_takes_only_parts_it_can_read():
    """lstm_train_usable: three (B, 4H) parts of one dtype (float32 or bf16), each row contiguous
    (rows may be strided), and c (B, H) float32 contiguous."""
    parts = tuple(torch.randn(3, 16) for _ in range(3))
    c = torch.zeros(3, 4)
    assert native.lstm_train_usable(parts, c)
    assert native.lstm_train_usable((torch.randn(3, 2, 16)[:, 1], *parts[1:]), c)  # a step's column
    assert native.lstm_train_usable(tuple(p.bfloat16() for p in parts), c)
    assert not native.lstm_train_usable((torch.randn(16, 3).t(), *parts[1:]), c)  # columns strided
    assert not native.lstm_train_usable((parts[0].bfloat16(), *parts[1:]), c)  # mixed dtypes
    assert not native.lstm_train_usable(tuple(p.double() for p in parts), c.double())
    assert not native.lstm_train_usable(parts, c.bfloat16())
    assert not native.lstm_train_usable(parts, torch.zeros(3, 5))  # 4H != 16
    assert not native.lstm_train_usable((parts[0][:2], *parts[1:]), c)
    assert not native.lstm_train_usable(parts, torch.zeros(4, 3).t())  # c not contiguous


@needs_cc
def test_each_c_lstm_cell_runs_where_it_is_meant_to(monkeypatch):
    """Fused, without gradients, float32: the decoding cell (native.lstm_cell); fused otherwise,
    float32 or bf16 gates with float32 c (a training step, a bf16 decoding step): the training
    cell (kernels.LSTMCell), which autograd can follow; unfused: PyTorch's ops."""
    from captioner import decoder as decoder_module
    from captioner import kernels

    calls, real, real_train = [], native.lstm_cell, kernels.LSTMCell.apply
    monkeypatch.setattr(native, "lstm_cell", lambda parts, c: calls.append("decode") or real(parts, c))
    monkeypatch.setattr(kernels.LSTMCell, "apply", lambda *a: calls.append(("train", a[0].dtype)) or real_train(*a))
    g = torch.Generator().manual_seed(0)
    parts = tuple(torch.randn(3, 16, generator=g) for _ in range(3))
    c = torch.randn(3, 4, generator=g)
    expected = decoder_module._lstm(parts[0] + parts[1] + parts[2], c)
    with torch.no_grad():
        got = decoder_module._lstm_summed(parts, c, fused=True)
    assert calls == ["decode"]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    leaf = parts[0].clone().requires_grad_()
    h, _ = decoder_module._lstm_summed((leaf, parts[1], parts[2]), c, fused=True)
    h.sum().backward()
    assert leaf.grad is not None and calls == ["decode", ("train", torch.float32)]
    with torch.no_grad():
        decoder_module._lstm_summed(parts, c, fused=False)
        decoder_module._lstm_summed(tuple(p.bfloat16() for p in parts), c, fused=True)
        decoder_module._lstm_summed(tuple(p.bfloat16() for p in parts), c.bfloat16(), fused=True)  # c not float32
        decoder_module._lstm_summed(parts, c.double(), fused=True)
    assert calls == ["decode", ("train", torch.float32), ("train", torch.bfloat16)]
