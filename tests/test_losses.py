"""The training objective's values and gradients (Section 4 of the paper), through CaptionLoss."""

import math

import pytest
import torch

from captioner.config import load_config
from captioner.decoder import Decoder, DecoderOutput
from captioner.losses import CaptionLoss, MovingAverage, masked_cross_entropy

B, T, L, C, V = 3, 4, 5, 6, 7
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)  # 9 real words
WORDS = 9


def soft_pass(seed: int = 0) -> tuple[DecoderOutput, torch.Tensor]:
    """A real soft-attention decoder's teacher-forced pass; returns (output, targets)."""
    cfg = load_config(None, ["model.attention.dim=6", "model.decoder.embed_dim=5", "model.decoder.hidden_dim=7",
                             "model.decoder.dropout=0.0"]).model
    torch.manual_seed(seed)
    dec = Decoder.from_config(cfg, vocab_size=V, feature_dim=C).eval()
    caps = torch.randint(3, V, (B, T + 1))
    return dec(torch.randn(B, L, C), caps), caps[:, 1:]


def by_hand_xent(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) summed -log softmax of the targets over real steps, one loop per word."""
    out = torch.zeros(logits.shape[0], dtype=torch.float64)
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            if mask[b, t]:
                row = logits[b, t].double()
                out[b] += torch.logsumexp(row, 0) - row[targets[b, t]]
    return out


def by_hand_dsr(alphas: torch.Tensor, mask: torch.Tensor) -> float:
    """sum over captions and locations of (1 - sum over real steps of alpha)^2 (eq. 14)."""
    total = 0.0
    for b in range(alphas.shape[0]):
        for i in range(alphas.shape[2]):
            cover = sum(float(alphas[b, t, i].detach()) for t in range(alphas.shape[1]) if mask[b, t])
            total += (1.0 - cover) ** 2
    return total


def stochastic_output(log_probs: torch.Tensor, entropies: torch.Tensor) -> DecoderOutput:
    torch.manual_seed(1)
    alphas = torch.softmax(torch.randn(B, T, L), -1)
    return DecoderOutput(logits=torch.randn(B, T, V), alphas=alphas, betas=torch.full((B, T), 0.5),
                         log_probs=log_probs, entropies=entropies)


def test_cross_entropy_is_nats_per_real_word():
    out, targets = soft_pass()
    loss = CaptionLoss(alpha_c=0.0)(out, targets, MASK)
    per_caption = by_hand_xent(out.padded_logits(), targets, MASK)
    torch.testing.assert_close(loss.nll.double(), per_caption)
    assert loss.xent.item() == pytest.approx(per_caption.sum().item() / WORDS, rel=1e-5)
    assert loss.total.item() == pytest.approx(loss.xent.item(), rel=1e-6)  # no other term
    mean, summed = masked_cross_entropy(out.padded_logits(), targets, MASK.float())
    assert mean.item() == pytest.approx(per_caption.sum().item() / WORDS, rel=1e-5)
    torch.testing.assert_close(summed.double(), per_caption)


@pytest.mark.parametrize("alpha_c", [0.0, 0.3, 2.0])
def test_doubly_stochastic_term_is_linear_in_alpha_c(alpha_c):
    out, targets = soft_pass()
    loss = CaptionLoss(alpha_c=alpha_c)(out, targets, MASK)
    expected = alpha_c * by_hand_dsr(out.alphas, MASK) / WORDS
    assert loss.dsr.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert loss.total.item() == pytest.approx(loss.xent.item() + expected, rel=1e-5)


def test_doubly_stochastic_gradient_pushes_coverage_toward_one():
    """d dsr / d alpha_ti = -2 alpha_c (1 - sum_t alpha_ti) / words on real steps, 0 on padding."""
    torch.manual_seed(2)
    alphas = torch.softmax(torch.randn(B, T, L), -1).requires_grad_()
    out = DecoderOutput(logits=torch.randn(B, T, V), alphas=alphas, betas=torch.ones(B, T))
    CaptionLoss(alpha_c=0.3)(out, torch.randint(0, V, (B, T)), MASK).total.backward()
    cover = (alphas.detach() * MASK.unsqueeze(-1)).sum(1, keepdim=True)  # (B, 1, L)
    expected = -2 * 0.3 * (1 - cover) / WORDS * MASK.unsqueeze(-1)
    torch.testing.assert_close(alphas.grad, expected.expand(B, T, L))


def test_words_divides_the_summed_loss():
    out, targets = soft_pass()
    mine = CaptionLoss(alpha_c=0.5)(out, targets, MASK)
    scaled = CaptionLoss(alpha_c=0.5)(out, targets, MASK, words=torch.tensor(3.0))
    assert scaled.total.item() == pytest.approx(mine.total.item() * WORDS / 3, rel=1e-5)
    assert scaled.dsr.item() == pytest.approx(mine.dsr.item() * WORDS / 3, rel=1e-5)


def test_entropy_bonus_lowers_the_loss_when_entropy_rises():
    log_probs = torch.full((B, T), -1.0)
    low, high = torch.full((B, T), 0.5), torch.full((B, T), 1.5)
    lam = 0.25
    loss, targets = CaptionLoss(alpha_c=0.0, entropy_weight=lam).eval(), torch.zeros(B, T, dtype=torch.long)
    a = loss(stochastic_output(log_probs, low), targets, MASK)
    b = loss(stochastic_output(log_probs, high), targets, MASK)
    assert a.entropy.item() == pytest.approx(0.5) and b.entropy.item() == pytest.approx(1.5)  # per real word
    assert b.total.item() - a.total.item() == pytest.approx(-lam * 1.0, rel=1e-5)


def test_entropy_gradient_is_minus_lambda_e_per_real_word():
    entropies = torch.rand(B, T).requires_grad_()
    lam = 0.25
    loss = CaptionLoss(alpha_c=0.0, entropy_weight=lam).eval()(
        stochastic_output(torch.full((B, T), -1.0), entropies), torch.zeros(B, T, dtype=torch.long), MASK)
    loss.total.backward()
    torch.testing.assert_close(entropies.grad, -lam * MASK.float() / WORDS)


def test_reinforce_gradient_uses_the_moving_average_baseline():
    """First batch: no baseline yet, so no REINFORCE gradient; it starts the baseline at the mean reward
    log p(y|s,a). Second batch: d loss / d log p(s_t) = -lambda_r (log p(y|s,a) - b) on real steps, per word."""
    loss_fn = CaptionLoss(alpha_c=0.0, reinforce_weight=0.5, entropy_weight=0.0).train()
    targets = torch.randint(0, V, (B, T))
    first = stochastic_output(torch.full((B, T), -1.0, requires_grad=True), torch.zeros(B, T))
    out = loss_fn(first, targets, MASK)
    out.total.backward()
    assert first.log_probs.grad.abs().max() == 0 and out.reinforce.item() == 0
    reward = -by_hand_xent(first.logits, targets, MASK)
    assert loss_fn.baseline.value.item() == pytest.approx(reward.mean().item(), rel=1e-5)
    second = stochastic_output(torch.full((B, T), -1.0, requires_grad=True), torch.zeros(B, T))
    second.logits.mul_(2)  # another likelihood, so the advantage is not zero
    out = loss_fn(second, targets, MASK)
    out.total.backward()
    advantage = -by_hand_xent(second.logits, targets, MASK) - reward.mean()  # (B,)
    expected = -0.5 * advantage.unsqueeze(1).float() * MASK / WORDS
    torch.testing.assert_close(second.log_probs.grad, expected, rtol=1e-4, atol=1e-6)
    assert out.reinforce.item() == pytest.approx(float((-0.5 * advantage * -1.0 * MASK.sum(1)).sum() / WORDS), rel=1e-4)
    assert loss_fn.baseline.value.item() == pytest.approx(
        0.9 * reward.mean().item() + 0.1 * (-by_hand_xent(second.logits, targets, MASK)).mean().item(), rel=1e-5)


def test_baseline_is_not_updated_in_eval_mode():
    loss_fn = CaptionLoss(alpha_c=0.0).eval()
    loss_fn(stochastic_output(torch.full((B, T), -1.0), torch.zeros(B, T)), torch.zeros(B, T, dtype=torch.long), MASK)
    assert not bool(loss_fn.baseline.started) and loss_fn.baseline.value.item() == 0


def test_moving_average_starts_at_the_first_mean_then_decays():
    avg = MovingAverage(decay=0.8)
    avg.update(torch.tensor([1.0, 3.0]))
    assert avg.value.item() == pytest.approx(2.0)
    avg.update(torch.tensor([6.0, 6.0]))
    assert avg.value.item() == pytest.approx(0.8 * 2.0 + 0.2 * 6.0)
    state = avg.state_dict()  # saved with the module
    restored = MovingAverage(decay=0.8)
    restored.load_state_dict(state)
    assert bool(restored.started) and restored.value.item() == pytest.approx(2.8)
    assert math.isclose(float(state["value"]), 2.8, rel_tol=1e-6)


def test_a_batch_of_one_real_word_is_that_words_loss():
    out, targets = soft_pass()
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[1, 0] = True
    loss = CaptionLoss(alpha_c=0.0)(out, targets, mask)
    assert loss.xent.item() == pytest.approx(by_hand_xent(out.padded_logits(), targets, mask).sum().item(), rel=1e-5)
    empty = CaptionLoss(alpha_c=0.0)(out, targets, torch.zeros(B, T, dtype=torch.bool))
    assert empty.total.item() == 0  # no real word: nothing to learn, and no division by zero
