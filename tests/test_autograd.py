import pytest
import torch

from captioner.autograd import StepSum, StepWeight
from captioner.config import load_config
from captioner.decoder import Decoder
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
    step = StepWeight(w)
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
    step = StepWeight(w)
    loss = step(x).sum() + (step.weight ** 2).sum()  # a use outside the steps: plain autograd
    loss.backward()
    torch.testing.assert_close(w.grad, torch.ones(2, 3).t() @ x + 2 * w.detach())
    with torch.no_grad():
        assert not StepWeight(w).deferred
        torch.testing.assert_close(StepWeight(w)(x), x @ w.t())


def test_step_weight_under_bf16_autocast():
    w = torch.randn(4, 5, requires_grad=True)
    x = torch.randn(3, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        step = StepWeight(w)
        y = step(x)
        assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    torch.testing.assert_close(w.grad, torch.ones(3, 4).t() @ x.detach(), atol=0.05, rtol=0.02)


def test_step_sum_hands_the_buffer_to_the_tensor_once():
    t = torch.randn(4, 2, requires_grad=True)
    acc = StepSum(t, finish=lambda b: 3 * b)
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
    monkeypatch.setattr("captioner.autograd._deferring", lambda tensor: False)
    plain = grads()
    assert deferred.keys() == plain.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(deferred[name], plain[name], msg=name)
