"""Self-critical sequence training (Rennie et al., CVPR 2017): REINFORCE on the caption itself.

After cross-entropy training the captioner is fine-tuned as a policy. For every image it
samples k captions w^s from its own distribution (dropout on, as in training), scores each
with a reward r (CIDEr-D against the image's references, the document frequencies of the
training references computed once: captioner/cider.py) and minimises

    L = -(1/N) sum_s (r(w^s) - b_s) sum_t log p(w^s_t | w^s_<t, I)        (Rennie et al., eq. 8-9)

over the sampled tokens (the words and ``<end>``; N is their number, so the loss reads per
word like the cross-entropy). The baseline b is "self-critical": the reward of the model's
own greedy caption, decoded in eval mode as at test time (``scst_baseline: greedy``); or
the mean reward of the image's other k - 1 samples (``mean``, Luo 2020, "A better variant
of self-critical sequence training"), which needs no greedy pass. Captions better than the
baseline are made more likely, worse ones less.

With hard attention the locations are sampled too, and the caption's reward is the return
of both choices: the attention's log-probabilities get the same advantage (weighted by
``train.reinforce_weight``), plus the entropy bonus (``train.entropy_weight``), as in the
cross-entropy loss's REINFORCE term (captioner/losses.py).

:class:`SelfCriticalTrainer` is the :class:`~captioner.train.Trainer` with this objective:
a batch is ``max(1, batch_size // k)`` images, sampled through :class:`SamplingPolicy` (the
module DDP wraps, so the gradients are averaged over the ranks), and the reward and its
baseline are logged (``reward``, ``baseline`` per step; ``train_reward`` per epoch).

The mixed objective (``train.scst_xent_weight`` gamma > 0; Paulus et al. 2018, "A deep
reinforced model for abstractive summarization") adds gamma times the cross-entropy of the
batch images' reference captions, teacher-forced on the same annotation vectors: the reward
alone drifts to whatever CIDEr-D pays for (longer lists of objects), the references' term
holds the policy near the captions people wrote.

Letters: B images, k samples per image, N = B * k captions, T steps, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from captioner.cider import CiderD
from captioner.data.dataset import ImageCaptionsDataset, collate_image_captions
from captioner.decoder import Decoder, DecoderOutput
from captioner.errors import ConfigError
from captioner.losses import LossOutput
from captioner.metrics import ptb_like_tokenize
from captioner.model import Captioner
from captioner.train import TRAINERS, Trainer
from captioner.vocab import SPECIALS, Vocabulary

# ----------------------------------------------------------------------------- rewards


def parse_reward(spec: str) -> dict[str, float]:
    """``"cider+0.5*bleu4"`` -> {"cider": 1.0, "bleu4": 0.5}.

    Raises:
        ConfigError: an unknown name or a weight that is not a number.
    """
    weights: dict[str, float] = {}
    for term in spec.split("+"):
        weight, _, name = term.strip().rpartition("*")
        name = name.strip()
        if name not in ("cider", "bleu4"):
            raise ConfigError(f"train.scst_reward: unknown reward {name!r} in {spec!r}; valid: cider, bleu4")
        try:
            weights[name] = weights.get(name, 0.0) + (float(weight) if weight.strip() else 1.0)
        except ValueError:
            raise ConfigError(f"train.scst_reward: weight {weight!r} in {spec!r} is not a number") from None
    return weights


def sentence_bleu4(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]]) -> np.ndarray:
    """BLEU-4 of each hypothesis against its references: pycocoevalcap's per-sentence scores
    (closest reference length, its smoothing)."""
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    scorer = BleuScorer(n=4)
    for hyp, refs in zip(hypotheses, references):
        scorer += (" ".join(hyp), [" ".join(r) for r in refs])
    _, per_sentence = scorer.compute_score(option="closest", verbose=0)
    return np.asarray(per_sentence[3], dtype=np.float64)


class CaptionReward:
    """The reward of sampled captions: a weighted sum of CIDEr-D and BLEU-4 against the
    references of their images, tokenized as the evaluation tokenizes them (without Java).

    Args:
        references: for each image of the corpus, its reference captions (raw text).
        vocab: turns sampled ids back into words.
        weights: metric name ("cider", "bleu4") -> weight (see :func:`parse_reward`).
    """

    def __init__(self, references: Sequence[Sequence[str]], vocab: Vocabulary, *, weights: dict[str, float]) -> None:
        self.weights, self.vocab = weights, vocab
        self.refs = [[ptb_like_tokenize(c) for c in refs] for refs in references]
        self.cider = CiderD(self.refs) if "cider" in weights else None  # df of the corpus, once
        # each word's tokens as the evaluation sees them; <unk> stays itself and matches nothing
        self.tokens_of_word = [[w] if w in SPECIALS else ptb_like_tokenize(w) for w in vocab.itos]

    def tokens(self, ids: Tensor) -> list[list[str]]:
        """(N, T) sampled ids -> N token lists, up to ``<end>``."""
        return [[tok for w in self.vocab.decode(row) for tok in self.tokens_of_word[self.vocab.stoi[w]]]
                for row in ids.tolist()]

    def __call__(self, ids: Tensor, images: np.ndarray) -> np.ndarray:
        """(N, T) captions of the corpus images ``images`` (N,) -> (N,) rewards."""
        hyps = self.tokens(ids)
        total = np.zeros(len(hyps))
        if self.cider is not None:
            total += self.weights["cider"] * self.cider.score(hyps, images)
        if "bleu4" in self.weights:
            total += self.weights["bleu4"] * sentence_bleu4(hyps, [self.refs[i] for i in images])
        return total


def baseline_of(rewards: Tensor, *, kind: str, greedy: Tensor | None = None) -> Tensor:
    """The baseline of each sample: rewards (B, k) -> (B, k).

    ``greedy``: the reward of the image's greedy caption, ``greedy`` (B,) (Rennie et al.).
    ``mean``: the mean reward of the image's other k - 1 samples (Luo 2020), so a sample's
    own reward never enters its baseline (the estimate stays unbiased).
    """
    if kind == "greedy":
        if greedy is None:
            raise ValueError("the greedy baseline needs the greedy captions' rewards")
        return greedy.unsqueeze(1).expand_as(rewards)
    if kind == "mean":
        k = rewards.shape[1]
        if k < 2:
            raise ValueError("the mean-of-others baseline needs at least 2 samples per image")
        return (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)
    raise ValueError(f"unknown SCST baseline {kind!r}; valid: greedy, mean")


# ----------------------------------------------------------------------------- sampling with gradients


@dataclass
class Rollout:
    """Sampled captions with what the loss needs; rows image-major (image i: rows i*k..i*k+k-1).

    Attributes:
        tokens: (N, T) word ids: the words, ``<end>``, then ``<pad>``.
        mask: (N, T) True on the sampled tokens (the words and ``<end>``).
        log_probs: (N, T) log p of each sampled token (0 off the mask), differentiable.
        att_log_probs, entropies: (N, T) the attention's location log-probability and
            entropy from a stochastic attention (0 off the mask), else None.
        forced: the teacher-forced pass over reference captions of the same images (the
            mixed objective's), else None.
    """

    tokens: Tensor
    mask: Tensor
    log_probs: Tensor
    att_log_probs: Tensor | None = None
    entropies: Tensor | None = None
    forced: DecoderOutput | None = None


def sample_rollout(decoder: Decoder, features: Tensor, *, max_len: int, start_id: int, end_id: int,
                   pad_id: int = 0, generator: torch.Generator | None = None) -> Rollout:
    """One caption per row of ``features`` (N, L, C), sampled word by word WITH gradients.

    The policy is softmax over the words that may be emitted (``<pad>`` and ``<start>``
    never; after ``max_len`` words only ``<end>``, with probability 1); the log-probability
    of each sampled token is kept for REINFORCE. Unlike :func:`captioner.decoding.sample`
    (no gradients) this is the training-time pass.
    """
    N, device = features.shape[0], features.device
    projected = decoder.precompute(features)  # once per image
    state = decoder.init_state(features)
    prev = torch.full((N,), start_id, dtype=torch.long, device=device)
    alive = torch.ones(N, dtype=torch.bool, device=device)
    banned = torch.zeros(decoder.vocab_size, dtype=torch.bool, device=device)
    banned[[pad_id, start_id]] = True
    only_end = torch.ones_like(banned)
    only_end[end_id] = False
    tokens, masks, log_probs, att_log_probs, entropies = [], [], [], [], []
    for t in range(max_len + 1):
        out = decoder.step(prev, state, features, projected)
        logp = torch.log_softmax(out.logits.float().masked_fill(only_end if t == max_len else banned, float("-inf")),
                                 dim=-1)  # (N, V)
        drawn = torch.multinomial(logp.detach().exp(), 1, generator=generator)  # (N, 1)
        chosen = logp.gather(1, drawn).squeeze(1)  # (N,) finite: drawn with probability > 0
        word = torch.where(alive, drawn.squeeze(1), pad_id)
        masks.append(alive)
        tokens.append(word)
        log_probs.append(torch.where(alive, chosen, 0.0))
        if out.attention.log_prob is not None:
            att_log_probs.append(torch.where(alive, out.attention.log_prob.float(), 0.0))
            entropies.append(torch.where(alive, out.attention.entropy.float(), 0.0))
        alive = alive & (word != end_id)
        state, prev = out.state, word
        if not bool(alive.any()):
            break
    stack = lambda xs: torch.stack(xs, 1) if xs else None  # noqa: E731
    return Rollout(stack(tokens), stack(masks), stack(log_probs), stack(att_log_probs), stack(entropies))


class SamplingPolicy(nn.Module):
    """The captioner as a policy: images -> ``samples`` captions each, with gradients. The
    module DDP wraps for SCST (its parameters are the model's).

    Args:
        model: the captioner. samples: k per image. max_len: words per caption at most.
    """

    def __init__(self, model: Captioner, *, samples: int, max_len: int) -> None:
        super().__init__()
        self.model, self.samples, self.max_len = model, samples, max_len

    def forward(self, *, raw_features: Tensor | None = None, images: Tensor | None = None,
                captions: Tensor | None = None) -> Rollout:
        """Cached raw features (B, L, C) or pixels (B, 3, S, S) -> a rollout of B * k captions;
        with ``captions`` (B, T), one reference caption per image, also their teacher-forced
        pass on the same annotation vectors (``Rollout.forced``)."""
        m = self.model
        feats = m.features(raw_features) if raw_features is not None else m.encode(images)  # (B, L, C)
        forced = m.teacher_forced(feats, captions) if captions is not None else None
        v = m.vocab
        rollout = sample_rollout(m.decoder, feats.repeat_interleave(self.samples, dim=0),  # (B*k, L, C), image-major
                                 max_len=self.max_len, start_id=v.start_id, end_id=v.end_id, pad_id=v.pad_id)
        rollout.forced = forced
        return rollout


# ----------------------------------------------------------------------------- the loss


@dataclass
class ScstOutput(LossOutput):
    """:class:`LossOutput` of SCST. ``xent`` is the sampled tokens' mean negative
    log-probability; ``reinforce``/``entropy`` are the hard attention's terms (0 without).

    Attributes:
        reward: mean reward of the samples. baseline: mean of their baselines.
        reference_xent: the mixed objective's cross-entropy of the reference captions
            (nats per word; unweighted, detached), else None.
    """

    reward: Tensor
    baseline: Tensor
    reference_xent: Tensor | None = None


def self_critical_loss(rollout: Rollout, rewards: Tensor, baselines: Tensor, *, words: Tensor | None = None,
                       attention_weight: float = 1.0, entropy_weight: float = 0.0) -> ScstOutput:
    """-(r - b) * sum_t log p(w_t) summed over the samples, per sampled token.

    Args:
        rollout: N sampled captions. rewards, baselines: (N,) (or (B, k), flattened).
        words: what to divide by (default the rollout's sampled tokens; data-parallel training
            passes global tokens / processes, as the cross-entropy loss does).
        attention_weight, entropy_weight: the hard attention's REINFORCE and entropy weights.
    """
    mask = rollout.mask.float()
    words = mask.sum().clamp(min=1) if words is None else words
    advantage = (rewards - baselines).reshape(-1).detach().float()  # (N,)
    caption_log_p = rollout.log_probs.sum(dim=1)  # (N,) log p(w^s), masked in the rollout
    total = -(advantage * caption_log_p).sum() / words
    zero = total.new_zeros(())
    reinforce = entropy = zero
    if rollout.att_log_probs is not None:  # hard attention: the same return for the locations
        reinforce = -attention_weight * (advantage * rollout.att_log_probs.sum(dim=1)).sum() / words
        entropy = (rollout.entropies * mask).sum() / words
        total = total + reinforce - entropy_weight * entropy
    return ScstOutput(total=total, xent=(-caption_log_p.sum() / mask.sum().clamp(min=1)).detach(), dsr=zero,
                      reinforce=reinforce.detach(), entropy=entropy.detach(), nll=-caption_log_p.detach(),
                      reward=rewards.float().mean().detach(), baseline=baselines.float().mean().detach())


# ----------------------------------------------------------------------------- the trainer


@TRAINERS.register("scst")
class SelfCriticalTrainer(Trainer):
    """The :class:`~captioner.train.Trainer` with the SCST objective (``train.objective: scst``).

    Overrides: the model setup (the reward, the policy), the batches (images, not captions),
    the module DDP wraps (the policy), :meth:`compute_loss` and the logging; validation,
    checkpoints, resume and early stopping are the Trainer's.
    """

    def setup_model(self) -> None:
        """The Trainer's model (from ``train.init_from``), the reward over the training references
        (CIDEr-D's document frequencies computed here, once) and the sampling policy."""
        super().setup_model()
        t = self.t
        if self.fresh and not t.init_from:
            self.log.say("train.objective=scst without train.init_from: SCST from random weights learns slowly; "
                         "start from a cross-entropy checkpoint")
        with_refs = [i for i, r in enumerate(self.train_records) if r.captions]
        self.corpus_index = np.full(len(self.train_records), -1, dtype=np.int64)  # record -> reward corpus
        self.corpus_index[with_refs] = np.arange(len(with_refs))
        self.reward = CaptionReward([[c.text for c in self.train_records[i].captions] for i in with_refs],
                                    self.vocab, weights=parse_reward(t.scst_reward))
        self.policy = SamplingPolicy(self.model, samples=t.scst_samples, max_len=self.cfg.decode.max_len)
        self.reward_sums: Counter = Counter()

    def setup_batches(self) -> None:
        """A sample is an image (cached features by its index, or its pixels): k captions are
        sampled from each; a batch holds ``max(1, batch_size // k)`` images."""
        t, ddp = self.t, self.ddp
        self.per_image = True
        self.dataset = ImageCaptionsDataset(self.train_records, self.vocab, max_len=self.cfg.vocab.max_len,
                                            captions_per_image=1, seed=t.seed,
                                            transform=None if self.cached else self.model.encoder.transform())
        self.collate, self.batch_size = collate_image_captions, max(1, t.batch_size // t.scst_samples)
        if self.batch_size % ddp.world:
            raise ConfigError(f"train.batch_size={t.batch_size} with train.scst_samples={t.scst_samples} makes "
                              f"global batches of {self.batch_size} images, which must be a multiple of the "
                              f"{ddp.world} processes")
        self.n_batches = math.ceil(len(self.dataset) / self.batch_size)
        self.log.say(f"SCST: batches of {self.batch_size} images x {t.scst_samples} sampled captions, reward "
                     f"{t.scst_reward}, baseline {t.scst_baseline}")

    def training_module(self) -> nn.Module:
        return self.policy

    def compute_loss(self, batch) -> ScstOutput:
        """Sample k captions per image, reward them, subtract the baseline: the SCST loss."""
        t, k = self.t, self.t.scst_samples
        inputs = ({"raw_features": self.train_feats[batch.index.cpu()].to(self.device)} if self.cached
                  else {"images": batch.images})
        images = self.corpus_index[batch.index.cpu().numpy()]  # (B,)
        mixed = t.scst_xent_weight > 0
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            rollout = self.train_model(**inputs, captions=batch.captions if mixed else None)
        rewards = self._rewards(rollout.tokens, np.repeat(images, k)).view(-1, k)  # (B, k)
        greedy = self._rewards(self.greedy_tokens(inputs), images) if t.scst_baseline == "greedy" else None
        baselines = baseline_of(rewards, kind=t.scst_baseline, greedy=greedy)  # (B, k)
        loss = self_critical_loss(rollout, rewards, baselines, words=self.ddp.words(rollout.mask),
                                  attention_weight=t.reinforce_weight, entropy_weight=t.entropy_weight)
        if mixed:  # + gamma * the references' cross-entropy (its dsr, supervision, ... as in xent training)
            mask = batch.mask[:, 1:]
            ref = self.criterion(rollout.forced, batch.captions[:, 1:], mask, words=self.ddp.words(mask),
                                 attention_targets=batch.attention_targets)
            loss = dataclasses.replace(loss, total=loss.total + t.scst_xent_weight * ref.total, reference_xent=ref.xent)
        self.reward_sums.update(n=1, reward=loss.reward.item(), baseline=loss.baseline.item())
        return loss

    def _rewards(self, tokens: Tensor, images: np.ndarray) -> Tensor:
        return torch.as_tensor(self.reward(tokens, images), dtype=torch.float32, device=self.device)

    @torch.no_grad()
    def greedy_tokens(self, inputs: dict) -> Tensor:
        """The greedy captions (B, T), decoded in eval mode as at test time: the self-critical baseline."""
        self.model.eval()
        decoded = self.model.generate(max_len=self.cfg.decode.max_len, **inputs)
        self.model.train()
        return decoded.tokens

    def log_step(self, loss: ScstOutput) -> None:
        self.log.record({"step": self.step, "epoch": self.epoch + 1, "loss": loss.total.item(),
                         "reward": loss.reward.item(), "baseline": loss.baseline.item(),
                         "sample_nll": loss.xent.item(), "reinforce": loss.reinforce.item(),
                         "entropy": loss.entropy.item(), "lr": self.opt.param_groups[0]["lr"],
                         **({"reference_xent": loss.reference_xent.item()} if loss.reference_xent is not None else {})})

    def epoch_entry(self, epoch: int, sums: Counter, val) -> dict:
        """The Trainer's epoch line, with the epoch's mean reward and baseline."""
        n = max(self.reward_sums["n"], 1)
        entry = {**super().epoch_entry(epoch, sums, val), "train_reward": self.reward_sums["reward"] / n,
                 "train_baseline_reward": self.reward_sums["baseline"] / n}
        self.reward_sums = Counter()
        return entry
