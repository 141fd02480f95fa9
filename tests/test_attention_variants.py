"""Hard and local attention specifics, the REINFORCE terms, and the toy task that every
attention variant must learn."""

import pytest
import torch

from captioner.attention import ATTENTIONS, build_attention
from captioner.config import load_config
from captioner.decoder import Decoder
from captioner.losses import CaptionLoss, MovingAverage

B, C, H = 4, 8, 10
GRID = (4, 5)
L = GRID[0] * GRID[1]


def attention(name, *overrides):
    cfg = load_config(None, [f"model.attention.name={name}", "model.attention.dim=6", *overrides]).model.attention
    torch.manual_seed(0)
    return build_attention(cfg, feature_dim=C, hidden_dim=H, grid=GRID)


def test_hard_sample_is_one_hot_and_log_prob_matches_the_distribution():
    att = attention("hard", "model.attention.hard.mix_prob=0.0").train()
    feats, h = torch.randn(B, L, C), torch.randn(B, H)
    out = att(feats, att.precompute(feats), h)
    assert ((out.alpha == 0) | (out.alpha == 1)).all() and (out.alpha.sum(-1) == 1).all()
    loc = out.alpha.argmax(-1)
    torch.testing.assert_close(out.context, feats[torch.arange(B), loc])  # z_t = a_{s_t}
    probs = torch.softmax(att.score(att.score.precompute(feats), h), -1)
    torch.testing.assert_close(out.log_prob, probs[torch.arange(B), loc].log())
    torch.testing.assert_close(out.entropy, -(probs * probs.log()).sum(-1))


def test_hard_samples_follow_the_distribution():
    att = attention("hard", "model.attention.hard.mix_prob=0.0").train()
    feats, h = torch.randn(1, L, C).expand(4000, L, C), torch.randn(1, H).expand(4000, H)
    counts = att(feats, att.precompute(feats), h).alpha.sum(0) / 4000
    probs = torch.softmax(att.score(att.score.precompute(feats[:1]), h[:1]), -1)[0]
    assert (counts - probs).abs().max() < 0.04


@pytest.mark.parametrize("per, rate", [("caption", 0.5), ("caption", 0.2), ("batch", 0.5)])
def test_expected_context_mixing_happens_at_the_configured_rate(per, rate):
    att = attention("hard", f"model.attention.hard.mix_prob={rate}", f"model.attention.hard.mix_per={per}").train()
    torch.manual_seed(1)
    feats = torch.randn(8, L, C)
    draws = torch.stack([att.precompute(feats).sample for _ in range(2000)])  # (2000, 8): True = sampled
    expected_share = (~draws).float().mean()
    assert abs(expected_share - rate) < 0.03
    if per == "batch":
        assert (draws == draws[:, :1]).all()  # one choice for the whole batch
    else:
        assert not (draws == draws[:, :1]).all()
    # a caption that uses the expectation gets the soft context and no REINFORCE term
    projected = att.precompute(feats)
    projected.sample[:] = False
    out = att(feats, projected, torch.randn(8, H))
    assert (out.log_prob == 0).all() and torch.allclose(out.alpha.sum(-1), torch.ones(8))
    assert (out.alpha > 0).all()


@pytest.mark.parametrize("per", ["caption", "batch"])
@pytest.mark.parametrize("training", [True, False])
def test_hard_precompute_flags_own_their_memory(per, training):
    """The per-caption flags are a tensor of their own: one caption's flag can be changed
    without touching the others (an expanded view fails on write in torch >= 2.14)."""
    att = attention("hard", f"model.attention.hard.mix_per={per}").train(training)
    flags = att.precompute(torch.randn(B, L, C)).sample
    assert flags.shape == (B,) and flags.stride() == (1,)
    before = flags.clone()
    flags[0] = ~flags[0]
    assert flags[0] != before[0] and torch.equal(flags[1:], before[1:])


@pytest.mark.parametrize("mode", ["argmax", "expectation"])
def test_hard_inference_modes(mode):
    att = attention("hard", f"model.attention.hard.inference={mode}").eval()
    feats, h = torch.randn(B, L, C), torch.randn(B, H)
    out1 = att(feats, att.precompute(feats), h)
    out2 = att(feats, att.precompute(feats), h)
    torch.testing.assert_close(out1.alpha, out2.alpha)  # deterministic at test time
    probs = torch.softmax(att.score(att.score.precompute(feats), h), -1)
    if mode == "argmax":
        assert (out1.alpha.argmax(-1) == probs.argmax(-1)).all() and (out1.alpha.max(-1).values == 1).all()
    else:
        torch.testing.assert_close(out1.alpha, probs)


def test_local_window_is_centred_where_predicted():
    att = attention("local", "model.attention.local.window=1", "model.attention.score=general")
    with torch.no_grad():
        for p in att.centre.parameters():
            p.zero_()
        att.centre[2].bias.copy_(torch.logit(torch.tensor([2 / 3, 1 / 4])))  # centre (2, 1) on a 4 x 5 grid
    feats = torch.zeros(B, L, C)  # equal scores everywhere: the Gaussian alone decides
    out = att(feats, att.precompute(feats), torch.randn(B, H))
    torch.testing.assert_close(att.predict_centre(torch.randn(B, H)), torch.tensor([[2.0, 1.0]]).expand(B, 2))
    maps = out.alpha.view(B, *GRID)
    assert (maps.flatten(1).argmax(-1) == 2 * GRID[1] + 1).all()
    inside = torch.zeros(GRID, dtype=torch.bool)
    inside[1:4, 0:3] = True  # the 3 x 3 window around (2, 1)
    assert (maps[:, ~inside] == 0).all() and (maps[:, inside] > 0).all()


@pytest.mark.parametrize("sigma", [1.0, 0.7])
@pytest.mark.parametrize("renormalise", [False, True])
def test_local_p_multiplies_the_window_softmax_by_the_gaussian(renormalise, sigma):
    """Luong's eq. 10: a_t(s) = align(h_t, h_s) exp(-(s - p_t)^2 / (2 sigma^2)), the align a
    softmax over the window, NOT renormalised; ``renormalise`` is softmax(score + log G)."""
    att = attention("local", "model.attention.local.window=1", f"model.attention.local.sigma={sigma}",
                    f"model.attention.local.renormalise={str(renormalise).lower()}", "model.attention.score=general")
    with torch.no_grad():
        for p in att.centre.parameters():
            p.zero_()
        att.centre[2].bias.copy_(torch.logit(torch.tensor([2 / 3, 1 / 4])))  # centre (2, 1) on a 4 x 5 grid
    feats = torch.zeros(B, L, C)  # equal scores: the window's softmax is 1/9 everywhere in it
    out = att(feats, att.precompute(feats), torch.randn(B, H))
    torch.testing.assert_close(out.probs, out.alpha / out.alpha.sum(-1, keepdim=True))  # where it looks
    maps = out.alpha.view(B, *GRID)
    rows, cols = torch.meshgrid(torch.arange(1, 4), torch.arange(0, 3), indexing="ij")
    gauss = torch.exp(-((rows - 2.0) ** 2 + (cols - 1.0) ** 2) / (2 * sigma * sigma))  # (3, 3)
    expected = gauss / gauss.sum() if renormalise else gauss / 9
    torch.testing.assert_close(maps[:, 1:4, 0:3], expected.expand(B, 3, 3))


@pytest.mark.parametrize("window", [1, 4])
def test_local_sigma_zero_means_half_the_window(window):
    """sigma = 0 (the default) is D / 2 cells: the same maps as that width given explicitly."""
    feats, h = torch.randn(B, L, C), torch.randn(B, H)
    maps = []
    for sigma in (0.0, window / 2):
        att = attention("local", f"model.attention.local.window={window}", f"model.attention.local.sigma={sigma}")
        maps.append(att(feats, att.precompute(feats), h).alpha)
    torch.testing.assert_close(maps[0], maps[1])


def test_local_without_restriction_uses_the_whole_grid():
    att = attention("local", "model.attention.local.restrict=false", "model.attention.local.window=1")
    feats = torch.randn(B, L, C)
    out = att(feats, att.precompute(feats), torch.randn(B, H))
    assert (out.alpha > 0).all()


def test_local_centre_gets_gradients():
    att = attention("local")
    feats = torch.randn(B, L, C)
    out = att(feats, att.precompute(feats), torch.randn(B, H))
    (out.context * torch.randn(B, C)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in att.centre.parameters())


def test_moving_average_baseline():
    b = MovingAverage(0.9)
    b.update(torch.tensor([2.0, 4.0]))
    assert b.value == 3.0  # starts at the first mean
    b.update(torch.tensor([13.0]))
    assert b.value == pytest.approx(0.9 * 3 + 0.1 * 13)
    restored = MovingAverage(0.9)
    restored.load_state_dict(b.state_dict())
    assert restored.value == b.value and bool(restored.started)


def test_baseline_follows_only_the_captions_that_sampled():
    """b is the paper's moving average of log p(y | s~, a) over sampled paths; captions that
    used the expected context do not move it (``baseline_on=all``: the authors' code)."""
    from captioner.decoder import DecoderOutput

    logits = torch.zeros(2, 1, 3)
    logits[1, 0, 1] = 5.0  # caption 1 is far likelier than caption 0
    out = DecoderOutput(logits=logits, alphas=torch.full((2, 1, 4), 0.25), betas=torch.ones(2, 1),
                        log_probs=torch.tensor([[-1.0], [0.0]]), entropies=torch.ones(2, 1),
                        sampled=torch.tensor([True, False]))
    targets, mask = torch.tensor([[1], [1]]), torch.ones(2, 1, dtype=torch.bool)
    nll = -torch.log_softmax(logits[:, 0], -1)[:, 1]
    loss_fn = CaptionLoss(alpha_c=0.0).train()
    loss_fn(out, targets, mask)
    assert loss_fn.baseline.value == pytest.approx(-float(nll[0]))
    everyone = CaptionLoss(alpha_c=0.0, baseline_on="all").train()
    everyone(out, targets, mask)
    assert everyone.baseline.value == pytest.approx(-float(nll.mean()))
    nothing = CaptionLoss(alpha_c=0.0).train()
    nothing(DecoderOutput(**{**out.__dict__, "sampled": torch.tensor([False, False])}), targets, mask)
    assert not bool(nothing.baseline.started)


def _average_on_rank(rank, path, results):
    torch.distributed.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    b = MovingAverage(0.9)
    b.update(torch.tensor([1.0, 3.0]) if rank == 0 else torch.tensor([8.0]))
    results[rank] = float(b.value)
    torch.distributed.destroy_process_group()


def test_moving_average_is_the_same_on_every_process(tmp_path):
    """Data-parallel processes average their x before updating b: one baseline, not one each."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_average_on_rank, args=(str(tmp_path / "init"), results), nprocs=2)
    assert results[0] == results[1] == pytest.approx(4.0)  # (1 + 3 + 8) / 3


def test_doubly_stochastic_term_reads_the_location_probabilities():
    """With every location sampled, the one-hot weights give the DSR no gradient; the
    location probabilities do (the authors regularise them)."""
    from captioner.losses import doubly_stochastic

    dec = decoder_with("hard", "model.attention.hard.mix_prob=0.0").train()
    caps, mask = torch.randint(4, 12, (B, 6)), torch.ones(B, 5, dtype=torch.bool)
    out = dec(torch.randn(B, L, C), caps)
    assert ((out.alphas == 0) | (out.alphas == 1)).all() and not ((out.probs == 0) | (out.probs == 1)).all()
    loss = CaptionLoss(alpha_c=1.0, reinforce_weight=0.0, entropy_weight=0.0).train()(out, caps[:, 1:], mask)
    torch.testing.assert_close(loss.dsr, doubly_stochastic(out.probs.detach(), mask.float()).sum() / mask.sum())
    loss.total.backward()
    assert dec.attention.score.query.weight.grad.abs().sum() > 0


def test_leave_one_out_baseline_by_hand():
    from captioner.losses import leave_one_out

    reward = torch.tensor([1.0, 2.0, 6.0, -1.0, -3.0, -2.0])  # 2 captions x 3 paths
    torch.testing.assert_close(leave_one_out(reward, 3), torch.tensor([4.0, 3.5, 1.5, -2.5, -1.5, -2.0]))


def test_loo_estimator_runs_k_paths_per_caption_and_centres_on_the_others():
    dec = decoder_with("hard", "model.attention.hard.estimator=loo", "model.attention.hard.samples=3",
                       "model.attention.hard.mix_prob=0.0").train()
    caps, mask = torch.randint(4, 12, (B, 6)), torch.ones(B, 5, dtype=torch.bool)
    out = dec(torch.randn(B, L, C), caps)
    assert out.samples == 3 and out.alphas.shape == (3 * B, 5, L) and out.sampled.all()
    loss = CaptionLoss(alpha_c=0.0, entropy_weight=0.0).train()(out, caps[:, 1:], mask)
    reward = -loss.nll.view(B, 3)
    advantage = reward - (reward.sum(1, keepdim=True) - reward) / 2
    log_p_s = out.log_probs.detach().sum(1).view(B, 3)
    torch.testing.assert_close(loss.reinforce, -(advantage * log_p_s).sum() / (3 * mask.sum()))
    dec.eval()
    assert dec(torch.randn(B, L, C), caps).alphas.shape == (B, 5, L)  # one path at test time


def test_gumbel_estimator_is_one_hot_forward_and_differentiable_backward():
    att = attention("hard", "model.attention.hard.estimator=gumbel", "model.attention.hard.mix_prob=0.0").train()
    feats, h = torch.randn(B, L, C), torch.randn(B, H)
    out = att(feats, att.precompute(feats), h)
    loc = out.alpha.argmax(-1)
    torch.testing.assert_close(out.alpha, torch.nn.functional.one_hot(loc, L).float())  # up to rounding
    assert out.log_prob is None  # no REINFORCE term
    torch.testing.assert_close(out.context, feats[torch.arange(B), loc])
    (out.context * torch.randn(B, C)).sum().backward()
    assert att.score.query.weight.grad.abs().sum() > 0


def test_paper_configs_stop_early_on_bleu_and_shapes_hard_names_its_estimator():
    from pathlib import Path

    for path in sorted(Path("configs").glob("coco_*.yaml")) + sorted(Path("configs").glob("flickr8k_*.yaml")):
        assert load_config(path).train.val_metric == "bleu4", path
    assert load_config(Path("configs/shapes_hard.yaml")).model.attention.hard.estimator != "reinforce"


def decoder_with(name, *overrides):
    cfg = load_config(None, [f"model.attention.name={name}", "model.attention.dim=6", "model.decoder.embed_dim=7",
                             "model.decoder.hidden_dim=9", "model.decoder.dropout=0.0", *overrides]).model
    torch.manual_seed(0)
    return Decoder.from_config(cfg, vocab_size=12, feature_dim=C, grid=GRID)


@pytest.mark.parametrize("estimator", ["reinforce", "loo", "gumbel"])
@pytest.mark.parametrize("name", [n for n in ATTENTIONS.names() if n not in ("none", "mean")])
def test_gradients_reach_the_attention_of_every_variant(name, estimator):
    """Hard attention's only path to its score parameters (with no expectation mixing) is its estimator."""
    dec = decoder_with(name, "model.attention.hard.mix_prob=0.0", f"model.attention.hard.estimator={estimator}").train()
    loss_fn = CaptionLoss(alpha_c=0.0, entropy_weight=0.0).train()
    caps = torch.randint(4, 12, (B, 6))
    mask = torch.ones(B, 5, dtype=torch.bool)
    feats = torch.randn(B, L, C)
    loss_fn(dec(feats, caps), caps[:, 1:], mask)  # first batch: sets the baseline
    loss = loss_fn(dec(feats, caps), caps[:, 1:], mask)
    loss.total.backward()
    for pname, p in dec.attention.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


def test_reinforce_term_is_advantage_times_log_prob():
    from captioner.decoder import DecoderOutput

    loss_fn = CaptionLoss(alpha_c=0.0, reinforce_weight=1.0, entropy_weight=0.5).train()
    loss_fn.baseline.update(torch.tensor([-2.0]))  # b = -2
    logits = torch.zeros(2, 1, 3, requires_grad=True)  # uniform: nll = log 3 for each caption
    log_probs = torch.tensor([[-1.0], [-0.5]], requires_grad=True)
    out = DecoderOutput(logits=logits, alphas=torch.full((2, 1, 4), 0.25), betas=torch.ones(2, 1),
                        log_probs=log_probs, entropies=torch.tensor([[1.0], [3.0]]))
    res = loss_fn(out, torch.tensor([[1], [2]]), torch.ones(2, 1, dtype=torch.bool))
    advantage = -torch.log(torch.tensor(3.0)) + 2.0  # log p(y) - b
    torch.testing.assert_close(res.reinforce, -(advantage * -1.0 + advantage * -0.5) / 2)
    torch.testing.assert_close(res.entropy, torch.tensor(2.0))
    res.total.backward()
    torch.testing.assert_close(log_probs.grad, torch.full((2, 1), -float(advantage) / 2))
    assert loss_fn.baseline.value == pytest.approx(0.9 * -2.0 + 0.1 * -float(torch.log(torch.tensor(3.0))))


# ----------------------------------------------------------------------------- the toy task

K = 5  # classes


def toy_batch(n, generator):
    """One marked cell per example holds the class (one-hot) and its own row/column (one-hot);
    every other cell holds a random distractor class without the marker. The caption is the
    class word: solvable only by looking at the marked cell, which moves from example to
    example (the mean annotation, all that ``none`` sees, mixes in the distractors)."""
    feats = 0.1 * torch.randn(n, L, C + K + GRID[0] + GRID[1], generator=generator)
    cell = torch.randint(0, L, (n,), generator=generator)
    label = torch.randint(0, K, (n,), generator=generator)
    idx = torch.arange(n)
    distractors = torch.randint(0, K, (n, L), generator=generator)
    feats.scatter_add_(2, (C + distractors).unsqueeze(-1), torch.full((n, L, 1), 3.0))
    feats[idx, cell, C + distractors[idx, cell]] -= 3.0
    feats[idx, cell, :C] += 2.0  # the marker
    feats[idx, cell, C + label] += 3.0
    feats[idx, cell, C + K + cell // GRID[1]] += 3.0
    feats[idx, cell, C + K + GRID[0] + cell % GRID[1]] += 3.0
    captions = torch.stack([torch.ones(n, dtype=torch.long), 4 + label, torch.full((n,), 2)], 1)  # <start> w <end>
    return feats, captions, label


def train_on_toy_task(name: str) -> float:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    cfg = load_config(None, [f"model.attention.name={name}", "model.attention.dim=16", "model.decoder.embed_dim=16",
                             "model.decoder.hidden_dim=32", "model.decoder.dropout=0.0",
                             "model.decoder.deep_output=false", "model.attention.local.window=2"]).model
    dec = Decoder.from_config(cfg, vocab_size=4 + K, feature_dim=C + K + GRID[0] + GRID[1], grid=GRID)
    loss_fn = CaptionLoss(alpha_c=0.0, entropy_weight=0.001)
    opt = torch.optim.Adam(dec.parameters(), lr=1e-2)
    for _ in range(300):
        feats, caps, _ = toy_batch(64, gen)
        loss = loss_fn(dec(feats, caps), caps[:, 1:], torch.ones(64, 2, dtype=torch.bool))
        opt.zero_grad()
        loss.total.backward()
        opt.step()
    dec.eval()
    feats, caps, label = toy_batch(500, torch.Generator().manual_seed(123))
    with torch.no_grad():
        predicted = dec(feats, caps).logits[:, 0, 4:].argmax(-1)
    return (predicted == label).float().mean().item()


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ATTENTIONS.names() if n not in ("none", "mean")])
def test_toy_task_is_learned_by_every_attention(name):
    accuracy = train_on_toy_task(name)
    assert accuracy > 0.8, f"{name}: accuracy {accuracy:.2f} (chance {1 / K:.2f})"


@pytest.mark.slow
def test_toy_task_needs_attention():
    accuracy = train_on_toy_task("none")
    assert accuracy < 0.5, f"none: accuracy {accuracy:.2f}: the toy task does not need attention"


# ----------------------------------------------------------------------------- hard attention details


@pytest.mark.parametrize("tau", [0.5, 20.0])
def test_straight_through_gumbel_has_the_relaxed_samples_gradient(tau):
    """Forward: one-hot at the argmax of (log p + g) / tau; backward: the gradient of the
    relaxed sample softmax((log p + g) / tau), g ~ Gumbel(0, 1) = -log(-log u), u ~ U(0, 1),
    computed here over the valid locations only (p = 0 takes no part, at any temperature)."""
    from captioner.attention import masked_softmax, straight_through_gumbel

    torch.manual_seed(0)
    theta = torch.randn(B, L, requires_grad=True)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[:, 3] = False
    mask[1, 10:] = False
    weights = torch.randn(B, L)
    torch.manual_seed(5)
    hard = straight_through_gumbel(masked_softmax(theta, mask), tau)
    (hard * weights).sum().backward()
    grad, theta.grad = theta.grad.clone(), None

    torch.manual_seed(5)
    g = -torch.log(-torch.log(torch.rand(B, L)))
    log_p = torch.log_softmax(theta.masked_fill(~mask, float("-inf")), -1)
    relaxed = torch.softmax((log_p + g) / tau, -1)
    (relaxed * weights).sum().backward()
    torch.testing.assert_close(hard.detach(), torch.nn.functional.one_hot(relaxed.argmax(-1), L).float())
    assert (relaxed[~mask] == 0).all()
    torch.testing.assert_close(grad, theta.grad)


def test_straight_through_gumbel_samples_follow_the_distribution():
    """argmax(log p + g) is a sample of p (the Gumbel-max trick); p = 0 is never drawn."""
    from captioner.attention import straight_through_gumbel

    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    counts = straight_through_gumbel(probs.expand(8000, 5)).sum(0) / 8000
    assert (counts - probs).abs().max() < 0.025 and counts[-1] == 0


@pytest.mark.parametrize("samples", [1, 3])
def test_hard_attention_trains_on_a_single_caption(samples):
    """A batch of one caption (k = samples paths of it, leave-one-out): one flag per row,
    shared by the k paths."""
    loo = ["model.attention.hard.estimator=loo", f"model.attention.hard.samples={samples}"] if samples > 1 else []
    att = attention("hard", *loo).train()
    feats = torch.randn(samples, L, C)
    for _ in range(20):
        projected = att.precompute(feats)
        assert projected.sample.shape == (samples,) and (projected.sample == projected.sample[0]).all()
        out = att(feats, projected, torch.randn(samples, H))
        assert out.alpha.shape == (samples, L)


def test_hard_flags_apply_to_every_query_of_their_image():
    """K queries per image in training: an image that samples gives each of its K queries a
    one-hot location; one that uses the expectation gives each the distribution itself."""
    att = attention("hard", "model.attention.hard.mix_prob=0.5").train()
    feats, h = torch.randn(2, L, C), torch.randn(2, 3, H)
    projected = att.precompute(feats)
    projected.sample[:] = torch.tensor([True, False])
    out = att(feats, projected, h)
    assert out.alpha.shape == (2, 3, L) and out.sampled.tolist() == [[True] * 3, [False] * 3]
    assert (out.alpha[0].max(-1).values == 1).all() and (out.alpha[0].sum(-1) == 1).all()
    torch.testing.assert_close(out.alpha[1], out.probs[1])
    assert (out.log_prob[1] == 0).all() and (out.log_prob[0] < 0).all()
