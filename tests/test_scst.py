"""Self-critical sequence training: rewards, baselines, the sampled pass, the loss, the trainer."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from captioner.attention import ATTENTIONS
from captioner.checkpoint import load_checkpoint
from captioner.cider import CiderD
from captioner.config import load_config
from captioner.decoder import Decoder
from captioner.errors import CheckpointError, ConfigError
from captioner.metrics import ptb_like_tokenize
from captioner.scst import (
    CaptionReward,
    Rollout,
    SelfCriticalTrainer,
    baseline_of,
    parse_reward,
    sample_rollout,
    self_critical_loss,
    sentence_bleu4,
)
from captioner.train import Trainer, fit
from captioner.vocab import Vocabulary

V, C, L = 12, 6, 5


def tiny_decoder(attention: str = "soft", seed: int = 0) -> Decoder:
    cfg = load_config(None, [f"model.attention.name={attention}", "model.attention.dim=4",
                             "model.decoder.embed_dim=6", "model.decoder.hidden_dim=8",
                             "model.decoder.dropout=0.0"]).model
    torch.manual_seed(seed)
    return Decoder.from_config(cfg, vocab_size=V, feature_dim=C, grid=(1, L))


# ----------------------------------------------------------------------------- rewards and baselines


def test_parse_reward():
    assert parse_reward("cider") == {"cider": 1.0}
    assert parse_reward("cider + 0.5*bleu4") == {"cider": 1.0, "bleu4": 0.5}
    with pytest.raises(ConfigError, match="unknown reward 'meteor'"):
        parse_reward("cider+meteor")
    with pytest.raises(ConfigError, match="weight 'x' .* is not a number"):
        parse_reward("x*bleu4")


def test_config_checks_the_scst_keys():
    cfg = load_config(None, ["train.objective=scst", "train.scst_baseline=mean", "train.scst_samples=3"])
    assert (cfg.train.objective, cfg.train.scst_baseline, cfg.train.scst_samples) == ("scst", "mean", 3)
    for bad, match in [("train.objective=ppo", "objective"), ("train.scst_baseline=max", "scst_baseline"),
                       ("train.scst_reward=spice", "scst_reward")]:
        with pytest.raises(ConfigError, match=match):
            load_config(None, [bad])
    with pytest.raises(ConfigError, match=r"scst_samples.*>= 2 with scst_baseline=mean"):
        load_config(None, ["train.scst_baseline=mean", "train.scst_samples=1"])


def test_greedy_and_mean_of_others_baselines():
    rewards = torch.tensor([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]])  # (B=2, k=3)
    greedy = torch.tensor([1.5, 0.5])
    torch.testing.assert_close(baseline_of(rewards, kind="greedy", greedy=greedy),
                               torch.tensor([[1.5, 1.5, 1.5], [0.5, 0.5, 0.5]]))
    torch.testing.assert_close(baseline_of(rewards, kind="mean"),
                               torch.tensor([[4.0, 3.5, 1.5], [1.5, 1.5, 0.0]]))  # mean of the OTHER samples
    with pytest.raises(ValueError, match="at least 2 samples"):
        baseline_of(rewards[:, :1], kind="mean")
    with pytest.raises(ValueError, match="needs the greedy"):
        baseline_of(rewards, kind="greedy")


def caption_reward(weights=None):
    refs = [["A red circle left of a blue square.", "a red circle and a blue square"],
            ["a green triangle above a yellow circle", "A green triangle."],
            ["a blue square", "one blue square"]]
    words = sorted({w for caps in refs for c in caps for w in c.lower().replace(".", "").split()})
    vocab = Vocabulary(words)
    return CaptionReward(refs, vocab, weights=weights or {"cider": 1.0}), vocab, refs


def encode_batch(vocab, captions):
    ids = [vocab.encode(c) for c in captions]
    T = max(len(i) for i in ids)
    return torch.tensor([i[1:] + [vocab.pad_id] * (T - len(i)) for i in ids])  # drop <start>, pad after <end>


def test_caption_reward_is_cider_d_of_the_decoded_words():
    reward, vocab, refs = caption_reward()
    hyps = ["a red circle left of a blue square", "a blue square", "a green triangle", ""]
    images = np.array([0, 0, 1, 2])
    got = reward(encode_batch(vocab, hyps), images)
    want = CiderD([[ptb_like_tokenize(c) for c in caps] for caps in refs]).score([h.split() for h in hyps], images)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got[0] > got[1] > 0 and got[3] == 0.0  # the right caption beats a wrong one; nothing scores 0


def test_a_mixed_reward_adds_weighted_bleu4():
    mixed, vocab, refs = caption_reward({"cider": 1.0, "bleu4": 0.5})
    cider, _, _ = caption_reward()
    ids = encode_batch(vocab, ["a red circle left of a blue square", "a green triangle above a blue square"])
    images = np.array([0, 1])
    bleu = sentence_bleu4([["a", "red", "circle", "left", "of", "a", "blue", "square"],
                           ["a", "green", "triangle", "above", "a", "blue", "square"]],
                          [[ptb_like_tokenize(c) for c in refs[i]] for i in images])
    assert bleu[0] == pytest.approx(1.0) and 0 < bleu[1] < 1
    np.testing.assert_allclose(mixed(ids, images), cider(ids, images) + 0.5 * bleu, rtol=1e-12)


# ----------------------------------------------------------------------------- the sampled pass


@pytest.mark.parametrize("attention", ATTENTIONS.names())
def test_rollout_log_probs_are_the_policy_of_the_sampled_tokens(attention):
    """Shapes, the mask up to and including <end>, and log p of each sampled token equal to the
    decoder's own step distribution over the words it may emit (re-run teacher-forced in eval mode)."""
    dec = tiny_decoder(attention).eval()
    with torch.no_grad():
        dec.out.weight.mul_(5)  # peaked: most captions end early
    feats = torch.randn(6, L, C)
    torch.manual_seed(1)
    roll = sample_rollout(dec, feats, max_len=4, start_id=1, end_id=2, pad_id=0)
    N, T = roll.tokens.shape
    assert N == 6 and T <= 5 and roll.log_probs.requires_grad
    ends = (roll.tokens == 2) & roll.mask
    assert (ends.sum(1) == 1).all()  # every caption has exactly one <end>, forced at the latest after 4 words
    after = roll.mask.long().cumsum(1) > roll.mask.sum(1, keepdim=True)
    assert (roll.tokens[~roll.mask] == 0).all() and not after.any()
    assert ((roll.tokens == 0) | (roll.tokens == 1))[roll.mask].sum() == 0  # never <pad>/<start> as a word
    assert (roll.log_probs[~roll.mask] == 0).all() and (roll.log_probs[roll.mask] <= 0).all()
    if dec.attention.__class__.__name__.lower().startswith("hard"):
        return  # eval-mode hard attention takes the argmax: a re-run picks the same locations, checked below
    captions = torch.cat([torch.ones(N, 1, dtype=torch.long), roll.tokens], 1)
    with torch.no_grad():
        logits = dec(feats, captions).logits.float()  # (N, T, V)
    banned = torch.zeros(V, dtype=torch.bool)
    banned[[0, 1]] = True
    logp = torch.log_softmax(logits.masked_fill(banned, float("-inf")), -1)
    logp = logp.gather(2, roll.tokens.clamp(min=2)[..., None])
    expected = torch.where(roll.mask, logp.squeeze(2), 0.0)
    forced = roll.mask & (torch.arange(T) == 4)  # the 5th token is a forced <end>: probability 1
    expected = torch.where(forced, 0.0, expected)
    torch.testing.assert_close(roll.log_probs.detach(), expected, rtol=1e-4, atol=1e-5)


def test_hard_attention_rollout_carries_the_location_log_probs():
    dec = tiny_decoder("hard").train()
    dec.attention.mix_prob = 0.0  # always sample a location
    roll = sample_rollout(dec, torch.randn(4, L, C), max_len=3, start_id=1, end_id=2)
    assert roll.att_log_probs is not None and roll.att_log_probs.shape == roll.tokens.shape
    assert (roll.att_log_probs[roll.mask] < 0).all() and (roll.att_log_probs[~roll.mask] == 0).all()
    assert (roll.entropies[roll.mask] > 0).all()
    assert sample_rollout(tiny_decoder("soft"), torch.randn(4, L, C), max_len=3, start_id=1,
                          end_id=2).att_log_probs is None


# ----------------------------------------------------------------------------- the loss


def test_loss_value_and_that_a_better_than_baseline_sample_gets_more_likely():
    """A one-step policy over 3 captions: a step down the SCST gradient raises log p of the
    sample that beat the baseline and lowers it for the one that fell short."""
    theta = torch.zeros(3, requires_grad=True)
    tokens = torch.tensor([[0], [1]])
    logp = torch.log_softmax(theta, 0)[tokens]  # (2, 1)
    roll = Rollout(tokens=tokens, mask=torch.ones(2, 1, dtype=torch.bool), log_probs=logp)
    rewards, baselines = torch.tensor([2.0, 0.0]), torch.tensor([0.5, 0.5])
    out = self_critical_loss(roll, rewards, baselines)
    expected = -((2.0 - 0.5) * logp[0, 0] + (0.0 - 0.5) * logp[1, 0]) / 2  # per sampled token
    torch.testing.assert_close(out.total, expected)
    assert out.reward.item() == 1.0 and out.baseline.item() == 0.5
    out.total.backward()
    with torch.no_grad():
        new = torch.log_softmax(theta - 0.1 * theta.grad, 0)
    assert new[0] > np.log(1 / 3) > new[1]
    assert theta.grad[2] > 0  # the unsampled caption loses mass to the good sample


def test_equal_reward_and_baseline_give_no_gradient():
    theta = torch.zeros(4, requires_grad=True)
    logp = torch.log_softmax(theta, 0)[torch.tensor([[1], [2]])]
    roll = Rollout(tokens=torch.tensor([[1], [2]]), mask=torch.ones(2, 1, dtype=torch.bool), log_probs=logp)
    self_critical_loss(roll, torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0])).total.backward()
    assert torch.count_nonzero(theta.grad) == 0


@pytest.mark.parametrize("attention", ATTENTIONS.names())
def test_every_attention_variant_trains_under_scst(attention):
    """The loss reaches every decoder parameter; with hard attention the location REINFORCE
    term takes the same advantage (and is nonzero), in the same backward pass."""
    dec = tiny_decoder(attention).train()
    if attention == "hard":
        dec.attention.mix_prob = 0.0
    roll = sample_rollout(dec, torch.randn(8, L, C), max_len=4, start_id=1, end_id=2)
    rewards = torch.linspace(0, 1, 8)
    out = self_critical_loss(roll, rewards, torch.full((8,), 0.5), attention_weight=1.0, entropy_weight=0.01)
    out.total.backward()
    missing = [n for n, p in dec.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    # Show and Tell ("none") has no context after t = 0: the context's gate and weights get nothing
    expected = ["f_beta.weight", "f_beta.bias", "gate_context.weight", "out_context.weight"] if attention == "none" else []
    assert missing == expected
    if attention != "hard":
        assert out.reinforce.item() == 0.0


def test_hard_attention_locations_get_the_captions_advantage():
    """With sampled locations only the location REINFORCE term reaches the attention's score:
    its gradient is that of -(r - b) * sum_t log p(s_t), the word term's advantage."""
    dec = tiny_decoder("hard").train()
    dec.attention.mix_prob = 0.0
    roll = sample_rollout(dec, torch.randn(8, L, C), max_len=4, start_id=1, end_id=2)
    rewards, baselines = torch.linspace(0, 1, 8), torch.full((8,), 0.4)
    out = self_critical_loss(roll, rewards, baselines, attention_weight=1.0, entropy_weight=0.0)
    score = [p for p in dec.attention.parameters() if p.requires_grad]
    got = torch.autograd.grad(out.total, score, retain_graph=True)
    words = roll.mask.sum()
    want = torch.autograd.grad(-((rewards - baselines) * roll.att_log_probs.sum(1)).sum() / words, score)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert any(g.abs().sum() > 0 for g in got) and out.reinforce.item() != 0.0


# ----------------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def xent_checkpoint(shapes_root, tmp_path_factory):
    """A tiny cross-entropy run: the starting point of SCST."""
    from conftest import TINY_OVERRIDES

    out = tmp_path_factory.mktemp("xent")
    cfg = load_config(None, [*TINY_OVERRIDES, f"data.root={shapes_root}", f"train.out_dir={out}", "name=tiny",
                             "train.epochs=1"])
    fit(cfg, quiet=True)
    return out / "last.pt"


def test_init_from_loads_the_weights_only(tiny_config, xent_checkpoint):
    trainer = Trainer(tiny_config(f"train.init_from={xent_checkpoint}"), quiet=True)
    trainer.setup()
    saved = load_checkpoint(xent_checkpoint)["model"]
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert trainer.step == 0 and trainer.opt.state_dict()["state"] == {}  # fresh optimizer, step 0


def test_init_from_refuses_another_vocabulary(tiny_config, xent_checkpoint):
    with pytest.raises(CheckpointError, match="vocabulary differs"):
        Trainer(tiny_config(f"train.init_from={xent_checkpoint}", "vocab.max_size=5"), quiet=True).setup()


@pytest.mark.parametrize("baseline", ["greedy", "mean"])
def test_scst_run_from_a_cross_entropy_checkpoint_logs_reward_and_baseline(tiny_config, xent_checkpoint, baseline):
    cfg = tiny_config("train.objective=scst", f"train.init_from={xent_checkpoint}", f"train.scst_baseline={baseline}",
                      "train.scst_samples=4", "train.epochs=1", "train.log_every=1", "train.lr=1e-3")
    result = fit(cfg, quiet=True)
    log = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in log if "reward" in e]
    n_images = 32  # 40 shapes images, 80% train; 16 // 4 = 4 images per batch
    assert len(steps) == n_images // 4
    assert all(0 <= e["reward"] and 0 <= e["baseline"] for e in steps) and any(e["reward"] > 0 for e in steps)
    epoch = [e for e in log if "val_cider" in e][-1]
    assert epoch["train_reward"] == pytest.approx(np.mean([e["reward"] for e in steps]))
    assert load_checkpoint(result.run_dir / "last.pt")["trainer"]["step"] == len(steps)


def test_compute_loss_is_scst_on_k_samples_of_each_image(tiny_config, xent_checkpoint):
    trainer = SelfCriticalTrainer(tiny_config("train.objective=scst", f"train.init_from={xent_checkpoint}",
                                              "train.scst_samples=3", "train.batch_size=12"), quiet=True)
    trainer.setup()
    batch = next(iter(trainer.loader(0, 0)))
    assert batch.index.shape == (4,)  # 12 // 3 images
    loss = trainer.compute_loss(batch)
    assert loss.nll.shape == (12,) and loss.total.requires_grad
    assert 0 <= loss.reward.item() and loss.baseline.item() >= 0


@pytest.mark.parametrize("weight", [0.5, 2.0])
def test_mixed_objective_adds_the_references_cross_entropy(tiny_config, xent_checkpoint, weight):
    """L = L_scst + gamma * L_xent: the same samples (dropout off, the same seed) with and
    without the references' term differ by gamma times the teacher-forced cross-entropy of
    the batch's reference captions, computed here through the model's own forward."""
    def loss_with(gamma: float):
        trainer = SelfCriticalTrainer(tiny_config("train.objective=scst", f"train.init_from={xent_checkpoint}",
                                                  "train.scst_samples=3", "train.batch_size=12",
                                                  f"train.scst_xent_weight={gamma}"), quiet=True)
        trainer.setup()
        batch = next(iter(trainer.loader(0, 0)))
        torch.manual_seed(7)
        return trainer, batch, trainer.compute_loss(batch)

    def grads(trainer, total) -> torch.Tensor:
        trainer.model.zero_grad()
        total.backward()
        return torch.cat([p.grad.flatten() for p in trainer.model.decoder.parameters()])

    first, _, plain = loss_with(0.0)
    trainer, batch, mixed = loss_with(weight)
    assert plain.reference_xent is None
    out = trainer.model(batch.captions, raw_features=trainer.train_feats[batch.index])
    mask = batch.mask[:, 1:]
    ref = trainer.criterion(out, batch.captions[:, 1:], mask, words=mask.sum())
    assert mixed.reference_xent.item() == pytest.approx(ref.xent.item(), rel=1e-5)
    assert mixed.reward.item() == pytest.approx(plain.reward.item())  # the same samples
    assert mixed.total.item() == pytest.approx(plain.total.item() + weight * ref.total.item(), rel=1e-5, abs=1e-6)
    expected = grads(first, plain.total) + weight * grads(trainer, ref.total)
    torch.testing.assert_close(grads(trainer, mixed.total), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("attention", ["soft", "hard"])
def test_a_mixed_run_logs_the_references_cross_entropy(tiny_config, xent_checkpoint, attention):
    cfg = tiny_config("train.objective=scst", f"train.init_from={xent_checkpoint}", "train.scst_samples=4",
                      "train.epochs=1", "train.log_every=1", "train.scst_xent_weight=1.0",
                      f"model.attention.name={attention}")
    log = [json.loads(line) for line in (fit(cfg, quiet=True).run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in log if "reward" in e]
    assert len(steps) == 8 and all(math.isfinite(e["reference_xent"]) and e["reference_xent"] > 0 for e in steps)


def test_mixed_objective_weight_is_checked():
    assert load_config(None, ["train.scst_xent_weight=0.3"]).train.scst_xent_weight == 0.3
    with pytest.raises(ConfigError, match="scst_xent_weight.*>= 0"):
        load_config(None, ["train.scst_xent_weight=-1"])


def test_fit_names_an_objective_without_a_trainer(tiny_config, monkeypatch):
    from captioner import train

    monkeypatch.setattr(train, "TRAINERS", train.Registry("train.objective"))
    with pytest.raises(ConfigError, match="import captioner.scst"):
        train.fit(tiny_config("train.objective=scst"), quiet=True)


@pytest.mark.slow
def test_two_processes_agree_under_scst(shapes_root, tmp_path):
    """SCST under DDP: the policy is what DDP wraps, so the ranks' gradients are averaged and
    the weights stay identical although each rank samples its own images."""
    from conftest import TINY_OVERRIDES

    config = tmp_path / "tiny.yaml"
    config.write_text("name: tiny\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = [str(config), *TINY_OVERRIDES, f"data.root={shapes_root}", "train.epochs=1", "train.batch_size=16",
            "train.objective=scst", "train.scst_samples=2", "train.device=cpu", f"train.out_dir={tmp_path}/ddp"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "captioner.cli", "train", *args], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    final = [e for e in log if "ddp_world_size" in e][-1]
    assert final["ddp_world_size"] == 2 and final["ddp_max_parameter_difference"] == 0.0
    assert [e for e in log if "val_cider" in e][-1]["train_reward"] > 0  # 4 steps: below log_every, the epoch logs it
