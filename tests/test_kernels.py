"""Every fused kernel in captioner/kernels.py against the plain expression it replaces: value and gradient."""

import pytest
import torch

from captioner import kernels
from captioner.attention import AdditiveScore, build_attention
from captioner.config import AttentionConfig, load_config
from captioner.decoder import Decoder, _lstm
from captioner.losses import CaptionLoss


def recurrence(weight, x0, steps, rows, linear):
    """A toy time loop: h_t = tanh(x0[:n_t] W^T + h_{t-1}[:n_t] W^T), rows shrinking."""
    h, outs = x0, []
    for n in rows[:steps]:
        h = torch.tanh(linear(x0[:n]) + linear(h[:n]))
        outs.append(h.sum() * n)
    return sum(outs)


@pytest.mark.parametrize("rows", [[4, 4, 4], [5, 3, 3, 1]])
def test_step_weight_gives_the_plain_gradients(rows):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 6, dtype=torch.double, generator=g, requires_grad=True)
    x0 = torch.randn(rows[0], 6, dtype=torch.double, generator=g, requires_grad=True)
    plain = recurrence(w, x0, len(rows), rows, lambda x: x @ w.t())
    expected = torch.autograd.grad(plain, (w, x0))
    step = kernels.StepWeight(w)
    assert step.deferred
    deferred = recurrence(w, x0, len(rows), rows, step)
    torch.testing.assert_close(deferred, plain)
    got = torch.autograd.grad(deferred, (w, x0))
    for e, r in zip(expected, got):
        torch.testing.assert_close(r, e)
    assert step.inputs == [] and step.grads == []  # nothing left over for a later pass


def test_step_weight_adds_the_gradient_of_other_uses_and_runs_plain_without_grad():
    w = torch.randn(3, 3, requires_grad=True)
    x = torch.randn(2, 3)
    step = kernels.StepWeight(w)
    loss = step(x).sum() + (step.weight ** 2).sum()  # a use outside the steps: plain autograd
    loss.backward()
    torch.testing.assert_close(w.grad, torch.ones(2, 3).t() @ x + 2 * w.detach())
    with torch.no_grad():
        assert not kernels.StepWeight(w).deferred
        torch.testing.assert_close(kernels.StepWeight(w)(x), x @ w.t())


def test_step_weight_under_bf16_autocast():
    w = torch.randn(4, 5, requires_grad=True)
    x = torch.randn(3, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        step = kernels.StepWeight(w)
        y = step(x)
        assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    torch.testing.assert_close(w.grad, torch.ones(3, 4).t() @ x.detach(), atol=0.05, rtol=0.02)


def transposes_counted(monkeypatch) -> list:
    """Calls to the C transpose, counted (it runs as before)."""
    calls = []
    real = kernels.native.transposed
    monkeypatch.setattr(kernels.native, "transposed", lambda x: calls.append(tuple(x.shape)) or real(x))
    return calls


@pytest.mark.skipif(kernels.native.library() is None, reason="no C compiler")
def test_a_bf16_step_weight_makes_its_gradient_from_the_c_transpose(monkeypatch):
    calls = transposes_counted(monkeypatch)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(19, 37, generator=g).to(torch.bfloat16).requires_grad_()
    xs = [torch.randn(n, 37, generator=g).to(torch.bfloat16) for n in (5, 5, 3)]
    ups = [torch.randn(n, 19, generator=g).to(torch.bfloat16) for n in (5, 5, 3)]
    step = kernels.StepWeight(w)
    loss = sum((step(x).float() * u.float()).sum() for x, u in zip(xs, ups))
    loss.backward()
    assert calls == [(13, 19)]  # once for the three steps' gradients together
    expected = sum(u.double().t() @ x.double() for x, u in zip(xs, ups))
    torch.testing.assert_close(w.grad.double(), expected, atol=0.02, rtol=0.01)  # bf16's rounding of the result


@pytest.mark.skipif(kernels.native.library() is None, reason="no C compiler")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(7,), (3, 5)])
def test_a_bf16_linear_gives_autograds_gradients_through_the_c_transpose(bias, lead, monkeypatch):
    from captioner.precision import cast_parameters

    calls = transposes_counted(monkeypatch)
    torch.manual_seed(0)
    layer = torch.nn.Linear(37, 19, bias=bias)
    x = torch.randn(*lead, 37).to(torch.bfloat16).requires_grad_()
    up = torch.randn(*lead, 19).to(torch.bfloat16)

    def grads(fn):
        layer.zero_grad()
        x.grad = None
        with cast_parameters(layer, torch.bfloat16):
            out = fn(x)
        out.backward(up)
        return out.detach(), x.grad, layer.weight.grad, None if layer.bias is None else layer.bias.grad

    out, gx, gw, gb = grads(lambda v: kernels.linear(layer, v))
    assert calls == [(lead[0] * (lead[1] if len(lead) > 1 else 1), 19)]
    ref = grads(layer)  # autograd's own backward of the same bf16 product
    assert len(calls) == 1
    torch.testing.assert_close(out, ref[0], atol=0, rtol=0)  # the same forward
    torch.testing.assert_close(gx, ref[1], atol=0.02, rtol=0.01)
    torch.testing.assert_close(gw, ref[2], atol=0.02, rtol=0.01)
    u, xd = up.double().reshape(-1, 19), x.detach().double().reshape(-1, 37)
    torch.testing.assert_close(gw.double(), u.t() @ xd, atol=0.02, rtol=0.01)  # float64's g^T x
    if bias:
        torch.testing.assert_close(gb.double(), u.sum(0), atol=0.02, rtol=0.01)
    else:
        assert gb is None


def test_linear_is_the_layer_itself_for_float32_and_without_gradients(monkeypatch):
    calls = transposes_counted(monkeypatch)
    layer = torch.nn.Linear(5, 3)
    x = torch.randn(4, 5)
    out = kernels.linear(layer, x)
    assert type(out.grad_fn).__name__ == "AddmmBackward0"
    torch.testing.assert_close(out, layer(x))
    with torch.no_grad():
        out = kernels.linear(layer.to(torch.bfloat16), x.to(torch.bfloat16))
    assert out.grad_fn is None and calls == []


def test_step_sum_hands_the_buffer_to_the_tensor_once():
    t = torch.randn(4, 2, requires_grad=True)
    acc = kernels.StepSum(t, finish=lambda b: 3 * b)
    view = acc.tensor[:2]
    (view * 0).sum().backward(retain_graph=True)  # the steps add their shares themselves
    assert t.grad.abs().sum() == 0
    t.grad = None
    acc.buffer(2).add_(1.0)
    (view * 0).sum().backward()
    expected = torch.zeros(4, 2)
    expected[:2] = 3.0
    torch.testing.assert_close(t.grad, expected)


@pytest.mark.parametrize("attention", ["soft", "hard", "local"])
def test_decoder_gradients_match_plain_autograd(attention, monkeypatch):
    """The teacher-forced pass with its deferred sums (weights, keys) against the same pass
    with plain autograd everywhere, in double precision."""
    cfg = load_config(None, ["model.attention.dim=6", "model.decoder.embed_dim=7", "model.decoder.hidden_dim=9",
                             "model.decoder.dropout=0.0", f"model.attention.name={attention}",
                             "model.attention.hard.inference=argmax"]).model
    torch.manual_seed(0)
    dec = Decoder.from_config(cfg, vocab_size=20, feature_dim=8).double().eval()
    feats = torch.randn(3, 10, 8, dtype=torch.double)
    caps = torch.tensor([[1, 5, 6, 2, 0, 0], [1, 7, 8, 9, 10, 2], [1, 4, 2, 0, 0, 0]])
    mask = caps[:, 1:] != 0

    def grads():
        dec.zero_grad()
        out = dec(feats, caps, lengths=mask.sum(1))
        CaptionLoss(alpha_c=1.0)(out, caps[:, 1:], mask).total.backward()
        return {n: p.grad.clone() for n, p in dec.named_parameters() if p.grad is not None}

    deferred = grads()
    monkeypatch.setattr("captioner.kernels._deferring", lambda tensor: False)
    plain = grads()
    assert deferred.keys() == plain.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(deferred[name], plain[name], msg=name)


# ----------------------------------------------------------------------------- the additive tanh score


@pytest.mark.parametrize("K", [1, 3])
def test_fused_tanh_score_matches_plain_tanh_in_value_and_gradient(K):
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 5, 4, dtype=torch.double, generator=g, requires_grad=True)
    query = torch.randn(2, K, 4, dtype=torch.double, generator=g, requires_grad=True)
    w = torch.randn(4, dtype=torch.double, generator=g, requires_grad=True)
    plain = kernels.tanh_score_plain(keys, query, w)  # (2, K, 5)
    torch.testing.assert_close(plain, torch.tanh(keys.unsqueeze(1) + query.unsqueeze(2)) @ w)
    fused = kernels.TanhScore.apply(keys, query, w)
    torch.testing.assert_close(fused, plain)
    upstream = torch.randn(plain.shape, dtype=torch.double, generator=g)
    expected = torch.autograd.grad(plain, (keys, query, w), upstream)
    got = torch.autograd.grad(fused, (keys, query, w), upstream)
    for e, r in zip(expected, got):
        torch.testing.assert_close(r, e)
    assert torch.autograd.gradcheck(kernels.TanhScore.apply, (keys, query, w))
    with torch.no_grad():
        torch.testing.assert_close(kernels.tanh_score_no_grad(keys, query, w), plain.detach())


def test_fused_tanh_score_is_accurate_in_float32_far_from_zero_and_saturated():
    keys = torch.tensor([[[-30.0, -3.0, -1e-4, 0.0, 1e-4, 0.5, 3.0, 30.0]]])  # (1, 1, 8)
    w = torch.ones(8)
    fused = kernels.TanhScore.apply(keys.view(1, 8, 1), torch.zeros(1, 1, 1), w[:1])  # one channel per location
    torch.testing.assert_close(fused.view(-1), torch.tanh(keys.view(-1)), atol=2e-7, rtol=0)


def test_summed_keys_over_many_steps_give_the_plain_gradient():
    """Keys read at every step of a loop, their gradient summed in one buffer (as the decoder's
    teacher-forced pass reads them), against plain autograd over the same loop."""
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(3, 5, 4, dtype=torch.double, generator=g, requires_grad=True)
    w = torch.randn(4, dtype=torch.double, generator=g, requires_grad=True)
    queries = [torch.randn(n, 1, 4, dtype=torch.double, generator=g, requires_grad=True) for n in (3, 3, 2, 1)]

    def loop(score, keys_in):
        return sum((score(keys_in if q.shape[0] == 3 else _rows(keys_in, q.shape[0]), q, w) ** 2).sum()
                   for q in queries)

    plain = loop(kernels.tanh_score_plain, keys)
    expected = torch.autograd.grad(plain, (keys, w, *queries))
    summed = kernels.summed_keys(keys, w)
    assert isinstance(summed, kernels.SummedKeys)
    fused = loop(kernels.tanh_score, summed)
    torch.testing.assert_close(fused, plain)
    got = torch.autograd.grad(fused, (keys, w, *queries))
    for e, r in zip(expected, got):
        torch.testing.assert_close(r, e)


def _rows(keys, n):
    """The first n images' keys, plain or summed (a packed pass's shrinking batch)."""
    if isinstance(keys, kernels.SummedKeys):
        return kernels.SummedKeys(keys.keys[:n], keys.keys_sum)
    return keys[:n]


def test_summed_keys_only_where_a_gradient_is_wanted():
    keys, w = torch.randn(2, 3, 4, requires_grad=True), torch.randn(4)
    with torch.no_grad():
        assert kernels.summed_keys(keys, w) is keys
    assert not isinstance(kernels.summed_keys(keys.detach(), w), kernels.SummedKeys)


def test_gathered_rows_over_many_steps_give_the_plain_gradient():
    """A table read a few rows at a time at every step of a shrinking loop (anchor_on_word's
    cells), the rows' gradients added into one buffer, against plain index_select."""
    g = torch.Generator().manual_seed(2)
    table = torch.randn(3, 5, 4, dtype=torch.double, generator=g, requires_grad=True)
    steps = [(3, torch.tensor([0, 4, 7, 14, 14])), (2, torch.tensor([1, 9])), (1, torch.tensor([3]))]
    weights = [torch.randn(len(i), 4, dtype=torch.double, generator=g) for _, i in steps]

    def loop(wrapped):
        total = (wrapped.table if isinstance(wrapped, kernels.SummedRows) else wrapped).sum() * 0.5  # a plain use too
        for (n, index), w in zip(steps, weights):
            rows = kernels.SummedRows(wrapped.table[:n], wrapped.table_sum) \
                if isinstance(wrapped, kernels.SummedRows) else wrapped[:n]
            total = total + (kernels.gather_rows(rows, index) * w).sum()
        return total

    plain = loop(table)
    expected, = torch.autograd.grad(plain, table)
    summed = kernels.summed_rows(table)
    assert isinstance(summed, kernels.SummedRows)
    got = loop(summed)
    torch.testing.assert_close(got, plain)
    torch.testing.assert_close(torch.autograd.grad(got, table)[0], expected)
    assert expected[2, 4].sum() == pytest.approx(weights[0][3:].sum() + 0.5 * 4)  # row 14, read twice
    with torch.no_grad():
        assert kernels.summed_rows(table) is table


# ----------------------------------------------------------------------------- selected by config


def test_attention_fused_config_selects_the_kernel_or_the_plain_expression(monkeypatch):
    calls = []
    real = kernels.tanh_score
    monkeypatch.setattr(kernels, "tanh_score", lambda *a: calls.append(1) or real(*a))
    feats, h = torch.randn(2, 6, 5), torch.randn(2, 7)
    for fused in (True, False):
        torch.manual_seed(0)
        att = build_attention(AttentionConfig(name="soft", dim=4, fused=fused), feature_dim=5, hidden_dim=7)
        assert all(m.fused is fused for m in att.modules() if isinstance(m, AdditiveScore))
        calls.clear()
        att(feats, att.precompute(feats), h)
        assert bool(calls) is fused
    assert load_config(None, ["model.attention.fused=false"]).model.attention.fused is False
    assert load_config(None, []).model.attention.fused is True


@pytest.mark.parametrize("K", [1, 4])
def test_additive_score_fused_and_plain_agree_with_and_without_gradients(K):
    torch.manual_seed(0)
    fused = AdditiveScore(key_dim=5, query_dim=7, dim=6)
    plain = AdditiveScore(key_dim=5, query_dim=7, dim=6, fused=False)
    plain.load_state_dict(fused.state_dict())
    keys, query = torch.randn(3, 8, 5), torch.randn(3, K, 7)
    a, b = fused(fused.precompute(keys), query), plain(plain.precompute(keys), query)
    torch.testing.assert_close(a, b)
    a.square().sum().backward()
    b.square().sum().backward()
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(fused(fused.precompute(keys), query), b.detach())


def _decoder_loss_and_grads(*overrides: str, train: bool = False):
    """A tiny decoder's teacher-forced loss and its parameters' gradients, in double precision."""
    cfg = load_config(None, ["model.attention.dim=6", "model.decoder.embed_dim=7", "model.decoder.hidden_dim=9",
                             "model.decoder.dropout=0.0", "model.attention.hard.inference=argmax", *overrides]).model
    torch.manual_seed(0)
    dec = Decoder.from_config(cfg, vocab_size=20, feature_dim=8).double().train(train)
    feats = torch.randn(3, 10, 8, dtype=torch.double)
    caps = torch.tensor([[1, 5, 6, 2, 0, 0], [1, 7, 8, 9, 10, 2], [1, 4, 2, 0, 0, 0]])
    mask = caps[:, 1:] != 0
    loss = CaptionLoss(alpha_c=1.0)(dec(feats, caps, lengths=mask.sum(1)), caps[:, 1:], mask).total
    loss.backward()
    return dec, loss.detach(), {n: p.grad for n, p in dec.named_parameters() if p.grad is not None}


def _assert_same(fused, plain) -> dict:
    (_, loss_f, grads_f), (_, loss_p, grads_p) = fused, plain
    torch.testing.assert_close(loss_f, loss_p)
    assert grads_f.keys() == grads_p.keys() and len(grads_p) > 10
    for name in grads_p:
        torch.testing.assert_close(grads_f[name], grads_p[name], msg=name)
    return grads_p


@pytest.mark.parametrize("attention", ["soft", "hard", "local"])
def test_decoder_with_fused_kernels_matches_the_plain_model(attention):
    """The whole teacher-forced pass, model.attention.fused true against false: same loss and
    same gradients, in double precision."""
    _assert_same(_decoder_loss_and_grads(f"model.attention.name={attention}", "model.attention.fused=true"),
                 _decoder_loss_and_grads(f"model.attention.name={attention}", "model.attention.fused=false"))


@pytest.mark.parametrize("arrangement", ["xu", "luong"])
def test_decoder_step_weights_fused_and_plain_agree(arrangement):
    """model.decoder.fused: the recurrent weights' gradients summed once per pass (StepWeight)
    against the plain per-step layers: the same loss and gradients, in double precision."""
    fused = _decoder_loss_and_grads(f"model.decoder.arrangement={arrangement}", "model.decoder.fused=true", train=True)
    plain = _decoder_loss_and_grads(f"model.decoder.arrangement={arrangement}", "model.decoder.fused=false", train=True)
    assert fused[0].fused and not plain[0].fused
    assert {"gate_context.weight", "gate_hidden.weight"} <= _assert_same(fused, plain).keys()


# -- the LSTM cell

needs_cc = pytest.mark.skipif(kernels.native.library() is None, reason="no C compiler")


def _plain_cell_grads(parts, c, gh, gc):
    """decoder._lstm of the parts' sum in float64: h_t, c_t, and the gradients of the parts' sum
    and of c for the output gradients gh, gc."""
    pre = (parts[0].double() + parts[1].double() + parts[2].double()).requires_grad_()
    c64 = c.detach().double().requires_grad_()
    h, c_next = _lstm(pre, c64)
    return (h, c_next, *torch.autograd.grad((h, c_next), (pre, c64), (gh.double(), gc.double())))


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H", [7, 32])  # a remainder after any vector width, and none
def test_lstm_cell_matches_the_plain_cell_in_value_and_gradient(dtype, H):
    """kernels.LSTMCell against the plain cell in float64, its first part a step's column of a
    (B, T, 4H) tensor (rows strided, as the decoder passes it): h_t, c_t, and each part's and c's
    gradient. bf16 gates: h_t and the gates' gradient rounded once to bf16, c_t and c's
    gradient float32."""
    g = torch.Generator().manual_seed(H)
    B = 5
    steps = (torch.randn(B, 3, 4 * H, generator=g) * 3).to(dtype).requires_grad_()
    others = [(torch.randn(B, 4 * H, generator=g) * 3).to(dtype).requires_grad_() for _ in range(2)]
    parts = (steps.unbind(1)[1], *others)
    assert not parts[0].is_contiguous() and kernels.native.lstm_train_usable(parts, torch.zeros(B, H))
    c = (torch.randn(B, H, generator=g) * 2).requires_grad_()
    gh, gc = torch.randn(B, H, generator=g).to(dtype), torch.randn(B, H, generator=g)
    h, c_next = kernels.LSTMCell.apply(*parts, c)
    assert h.dtype == dtype and c_next.dtype == torch.float32 and h.shape == c_next.shape == (B, H)
    d_steps, d1, d2, dc = torch.autograd.grad((h, c_next), (steps, *others, c), (gh, gc))
    h64, c64, dpre64, dc64 = _plain_cell_grads(parts, c, gh, gc)
    rounded = {"rtol": 2 ** -8, "atol": 1e-6} if dtype == torch.bfloat16 else {"rtol": 0, "atol": 2e-6}
    torch.testing.assert_close(h.double(), h64, **rounded)
    torch.testing.assert_close(c_next.double(), c64, rtol=0, atol=2e-6)
    for d in (d_steps[:, 1], d1, d2):
        assert d.dtype == dtype
        torch.testing.assert_close(d.double(), dpre64, **rounded)
    assert not d_steps[:, [0, 2]].any()  # the other steps' columns get nothing
    torch.testing.assert_close(dc.double(), dc64, rtol=0, atol=2e-6)


@needs_cc
def test_lstm_cell_takes_a_gradient_from_h_or_c_alone():
    """A step whose c_t (or h_t) nothing reads sends no gradient for it: the cell counts it as zero."""
    g = torch.Generator().manual_seed(1)
    parts = [torch.randn(3, 16, generator=g).requires_grad_() for _ in range(3)]
    c = torch.randn(3, 4, generator=g).requires_grad_()
    gh = torch.randn(3, 4, generator=g)
    zero = torch.zeros(3, 4)
    h, c_next = kernels.LSTMCell.apply(*parts, c)
    dp, dc = torch.autograd.grad(h, (parts[0], c), gh)
    _, _, dpre64, dc64 = _plain_cell_grads(parts, c, gh, zero)
    torch.testing.assert_close(dp.double(), dpre64, rtol=0, atol=1e-6)
    torch.testing.assert_close(dc.double(), dc64, rtol=0, atol=1e-6)
    h, c_next = kernels.LSTMCell.apply(*parts, c)
    dp, dc = torch.autograd.grad(c_next, (parts[0], c), gh)
    _, _, dpre64, dc64 = _plain_cell_grads(parts, c, zero, gh)
    assert not dp[:, 12:].any()  # the output gate's gradient comes from h_t alone
    torch.testing.assert_close(dp.double(), dpre64, rtol=0, atol=1e-6)
    torch.testing.assert_close(dc.double(), dc64, rtol=0, atol=1e-6)


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lstm_cell_keeps_a_nan_gate_a_nan_forward_and_backward(dtype):
    """A diverged model's NaN gates stay NaN in h_t, c_t and the gradients, where the plain cell
    has them (the C exponential clamps its argument, which would make a NaN a number); an
    infinite gate saturates as in the plain cell. The decoding cell too."""
    g = torch.Generator().manual_seed(2)
    parts = [torch.randn(3, 16, generator=g).to(dtype) for _ in range(3)]
    c = torch.randn(3, 4, generator=g)
    parts[1][0, 1] = parts[0][1, 4 + 2] = parts[2][2, 8 + 3] = float("nan")  # i, f, g: each in one row
    parts[2][2, 12] = float("nan")  # o
    parts[1][1, 8] = float("inf")
    parts[0][0, 12 + 3] = float("-inf")
    c[1, 3] = float("nan")
    parts = [p.requires_grad_() for p in parts]
    h, c_next = kernels.LSTMCell.apply(*parts, c)
    dp = torch.autograd.grad(h.float().sum() + c_next.sum(), parts[0])[0]
    h64, c64, dpre64, _ = _plain_cell_grads(parts, c, torch.ones(3, 4), torch.ones(3, 4))
    assert h.isnan().any() and dp.isnan().any()
    assert torch.equal(h.isnan(), h64.isnan()) and torch.equal(c_next.isnan(), c64.isnan())
    assert torch.equal(dp.isnan(), dpre64.isnan())
    rounded = {"rtol": 2 ** -8, "atol": 1e-6} if dtype == torch.bfloat16 else {"rtol": 0, "atol": 2e-6}
    torch.testing.assert_close(h.double(), h64, equal_nan=True, **rounded)
    torch.testing.assert_close(dp.double(), dpre64, equal_nan=True, **rounded)
    if dtype == torch.float32:
        with torch.no_grad():
            h_decode, c_decode = kernels.native.lstm_cell([p.detach() for p in parts], c)
        torch.testing.assert_close(h_decode.double(), h64, equal_nan=True, rtol=0, atol=2e-6)
        torch.testing.assert_close(c_decode.double(), c64, equal_nan=True, rtol=0, atol=2e-6)


@needs_cc
@pytest.mark.parametrize("arrangement", ["xu", "luong"])
def test_a_float32_training_pass_runs_the_c_cell_and_matches_the_plain_cell(arrangement, monkeypatch):
    """The fused decoder's float32 teacher-forced pass runs kernels.LSTMCell at every step; with
    the plain cell instead, the same loss and gradients to float32 rounding."""
    cfg = load_config(None, ["model.attention.dim=6", "model.decoder.embed_dim=7", "model.decoder.hidden_dim=9",
                             "model.decoder.dropout=0.0", f"model.decoder.arrangement={arrangement}"]).model
    torch.manual_seed(0)
    dec = Decoder.from_config(cfg, vocab_size=20, feature_dim=8).train()
    assert dec.fused
    feats = torch.randn(3, 10, 8)
    caps = torch.tensor([[1, 5, 6, 2, 0, 0], [1, 7, 8, 9, 10, 2], [1, 4, 2, 0, 0, 0]])
    mask = caps[:, 1:] != 0
    calls = []
    real = kernels.LSTMCell.apply
    monkeypatch.setattr(kernels.LSTMCell, "apply", lambda *a: calls.append(a[3].shape[0]) or real(*a))

    def run():
        dec.zero_grad()
        loss = CaptionLoss(alpha_c=1.0)(dec(feats, caps, lengths=mask.sum(1)), caps[:, 1:], mask).total
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in dec.named_parameters() if p.grad is not None}

    loss_c, grads_c = run()
    assert calls == [3, 3, 2, 1, 1]  # every step, on the captions still going
    monkeypatch.setattr(kernels.native, "lstm_train_usable", lambda *a: False)
    loss_p, grads_p = run()
    assert len(calls) == 5
    torch.testing.assert_close(loss_c, loss_p, rtol=1e-6, atol=0)
    assert grads_c.keys() == grads_p.keys() and len(grads_p) > 10
    for name in grads_p:
        torch.testing.assert_close(grads_c[name], grads_p[name], rtol=1e-4, atol=1e-6, msg=name)


# -- dropout


@pytest.mark.parametrize(("p", "dtype"), [(0.5, torch.float32), (0.3, torch.float32), (0.3, torch.bfloat16),
                                          (0.001, torch.bfloat16)])
def test_dropout_keeps_each_element_with_probability_one_minus_p_scaled_by_its_inverse(p, dtype):
    """kernels.Dropout against its definition: kept at the rate 1 - p (within 5 sigma over 10^6
    elements, each row too), kept values x / (1 - p), the gradient the same mask, fresh draws
    each call, the same under the same seed. p = 0.001 in bf16: a uniform drawn in bf16 (steps of
    1/256) would keep 255/256, 90 sigma off."""
    x = (torch.rand(1000, 1000) + 1).to(dtype).requires_grad_()  # no zeros: a zero out is a drop
    drop = kernels.Dropout(p).train()
    torch.manual_seed(0)
    y = drop(x)
    kept = y != 0
    sigma = (p * (1 - p) / x.numel()) ** 0.5
    assert abs(kept.double().mean().item() - (1 - p)) < 5 * sigma
    assert (kept.double().mean(1) - (1 - p)).abs().max() < 7 * sigma * 1000 ** 0.5  # no row-wise mask
    scaled = (x.detach().float() * (1 / (1 - p))).to(dtype)
    torch.testing.assert_close(y[kept], scaled[kept], rtol=1e-6 if dtype == torch.float32 else 8e-3, atol=0)
    g = torch.randn(x.shape).to(dtype)
    y.backward(g)
    torch.testing.assert_close(x.grad, torch.where(kept, (g.float() * (1 / (1 - p))).to(dtype), 0),
                               rtol=1e-6 if dtype == torch.float32 else 8e-3, atol=0)
    assert not torch.equal(drop(x) != 0, kept)
    torch.manual_seed(0)
    assert torch.equal(drop(x) != 0, kept)


def test_dropout_is_nn_dropout_where_it_does_not_draw():
    """Evaluation and p = 0: the input itself; p = 1: zeros; in place: nn.Dropout's path. The
    decoder uses it with its fused kernels, nn.Dropout without."""
    x = torch.rand(50, 40) + 1
    assert torch.equal(kernels.Dropout(0.5).eval()(x), x)
    assert torch.equal(kernels.Dropout(0.0).train()(x), x)
    assert torch.equal(kernels.Dropout(1.0).train()(x), torch.zeros_like(x))
    inplace = x.clone()
    out = kernels.Dropout(0.5, inplace=True).train()(inplace)
    assert out.data_ptr() == inplace.data_ptr() and 0 < int((inplace == 0).sum()) < x.numel()
    cfg = load_config(None, ["model.decoder.dropout=0.5"]).model
    assert type(Decoder.from_config(cfg, vocab_size=20, feature_dim=8).dropout) is kernels.Dropout
    cfg = load_config(None, ["model.decoder.dropout=0.5", "model.decoder.fused=false"]).model
    assert type(Decoder.from_config(cfg, vocab_size=20, feature_dim=8).dropout) is torch.nn.Dropout


# -- packed weights in decoding

needs_mkl = pytest.mark.skipif(not kernels.packing_available(), reason="no MKL packed GEMM in this torch")


@needs_mkl
def test_packed_linears_pack_each_weight_once_for_calls_of_exactly_rows_rows(monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 80, bias=False))
    packs = []
    real_pack = torch.ops.mkl._mkl_reorder_linear_weight

    def counting_pack(w, rows):
        packs.append((tuple(w.shape), rows))
        return real_pack(w, rows)

    monkeypatch.setattr(torch.ops.mkl, "_mkl_reorder_linear_weight", counting_pack)
    x, x3, other = torch.randn(6, 64), torch.randn(2, 3, 64), torch.randn(5, 64)
    packed = kernels.PackedLinears(model, rows=6)
    with torch.no_grad():
        expected = [model(x), model(x3), model(other)]
        for _ in range(3):  # three steps: packed on the first, reused after
            with packed:
                got = [model(x), model(x3), model(other)]
            for a, b in zip(got, expected):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert packs == [((96, 64), 6), ((80, 96), 6)]  # once each; 5 rows ran the plain layer
    assert all("forward" not in layer.__dict__ for layer in model)  # the class's forward is back


@needs_mkl
def test_packed_linears_leave_gradients_and_other_dtypes_to_the_plain_layer():
    layer = torch.nn.Linear(64, 64)
    x = torch.randn(4, 64)
    packed = kernels.PackedLinears(layer, rows=4)
    with packed:
        y = layer(x)  # gradients on: the plain layer, differentiable
        y.sum().backward()
        with torch.no_grad():
            layer.to(torch.bfloat16)(x.bfloat16())  # bf16 weights (a bf16 pass): the plain layer
    assert layer.weight.grad is not None and packed.packed == {}
    with pytest.raises(RuntimeError, match="boom"), packed:
        raise RuntimeError("boom")
    assert "forward" not in layer.__dict__  # restored after an error too


@needs_mkl
def test_packed_linears_leave_narrow_layers_plain():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 1))  # a gate: 64 -> 1
    packed = kernels.PackedLinears(model, rows=3)
    assert packed.layers == [model[0]]
    with torch.no_grad(), packed:
        torch.testing.assert_close(model(torch.ones(3, 64)), model[1](model[0](torch.ones(3, 64))))
    assert list(packed.packed) == [0]


@needs_mkl
def test_packed_weights_outlive_the_block_while_the_weight_is_unchanged(monkeypatch):
    """An evaluation's searches: the next block over the same weights packs nothing; a weight
    changed in place (an optimizer step, load_state_dict), swapped for another tensor or
    given new memory is packed anew, and the products follow the weight as it is now."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 96)
    packs = []
    real_pack = torch.ops.mkl._mkl_reorder_linear_weight
    monkeypatch.setattr(torch.ops.mkl, "_mkl_reorder_linear_weight",
                        lambda w, rows: packs.append(rows) or real_pack(w, rows))
    x = torch.randn(6, 64)

    def search(rows: int = 6) -> None:  # one decoding loop: a fresh PackedLinears, a few steps
        with torch.no_grad():
            for _ in range(2):
                with kernels.PackedLinears(layer, rows):
                    got = layer(x[:rows])
                torch.testing.assert_close(got, torch.nn.functional.linear(x[:rows], layer.weight, layer.bias),
                                           rtol=1e-5, atol=1e-5)

    search(), search()
    assert packs == [6]  # two searches, one pack
    with torch.no_grad():
        layer.weight.add_(0.5)  # in place: its version moves
    search(), search()
    layer.load_state_dict({"weight": torch.randn(96, 64), "bias": torch.zeros(96)})
    search()
    layer.weight.data = torch.randn(96, 64)  # new memory, same Parameter
    search()
    layer.weight = torch.nn.Parameter(torch.randn(96, 64))  # another tensor
    search()
    with torch.no_grad():
        layer.weight.add_(1.0)  # version 1 ...
    search()
    layer.weight = torch.nn.Parameter(layer.weight.data)  # ... another tensor on the same memory, its own version 0
    with torch.no_grad():
        layer.weight.mul_(2.0)  # version 1 too, the values changed: only the tensor's identity tells
    search()
    assert packs == [6] * 7
    search(5), search(6)  # two row counts kept ...
    search(4), search(6)  # ... a third pushes out the one used longest ago (5), not 6
    search(5)
    assert packs == [6] * 7 + [5, 4, 5]


@needs_mkl
def test_packed_weights_made_under_inference_mode_are_packed_each_time():
    with torch.inference_mode():
        layer = torch.nn.Linear(64, 64)  # an inference tensor keeps no version counter
        x = torch.randn(3, 64)
        for _ in range(2):
            with kernels.PackedLinears(layer, 3):
                torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias),
                                           rtol=1e-5, atol=1e-5)
    assert layer not in kernels._PACKS
