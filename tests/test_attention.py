"""Every registered attention variant and score function, tested through the registry:
a new variant is tested for free."""

import pytest
import torch

from captioner.attention import ATTENTIONS, SCORES, AttentionOutput, build_attention
from captioner.config import AttentionConfig
from captioner.errors import ConfigError

B, L, C, H = 3, 12, 8, 10


def make(name, score="additive"):
    torch.manual_seed(0)
    return build_attention(AttentionConfig(name=name, score=score, dim=6), feature_dim=C, hidden_dim=H)


@pytest.mark.parametrize("name", ATTENTIONS.names())
def test_output_shapes_and_alpha_is_a_distribution(name):
    att = make(name)
    feats, h = torch.randn(B, L, C), torch.randn(B, H)
    out = att(feats, att.precompute(feats), h)
    assert isinstance(out, AttentionOutput)
    assert out.context.shape == (B, C) and out.alpha.shape == (B, L)
    assert (out.alpha >= 0).all()
    torch.testing.assert_close(out.alpha.sum(-1), torch.ones(B))


@pytest.mark.parametrize("name", ATTENTIONS.names())
def test_mask_zeroes_invalid_locations(name):
    att = make(name)
    feats, h = torch.randn(B, L, C), torch.randn(B, H)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[:, L // 2:] = False
    out = att(feats, att.precompute(feats), h, mask)
    assert (out.alpha[:, L // 2:] == 0).all()
    torch.testing.assert_close(out.alpha.sum(-1), torch.ones(B))


@pytest.mark.parametrize("score", SCORES.names())
def test_soft_context_is_alpha_weighted_sum_and_gradients_flow(score):
    att = make("soft", score)
    feats, h = torch.randn(B, L, C, requires_grad=True), torch.randn(B, H, requires_grad=True)
    out = att(feats, att.precompute(feats), h)
    torch.testing.assert_close(out.context, (out.alpha.unsqueeze(-1) * feats).sum(1))
    (out.context ** 2).sum().backward()
    assert h.grad.abs().sum() > 0  # the query matters
    for name, p in att.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("score", [n for n in SCORES.names() if n != "additive"])
def test_scores_prefer_the_matching_key(score):
    """With the query equal to one key, similarity scores rank that key first (additive
    scores have no built-in notion of similarity, so they are not in this test)."""
    s = SCORES.build(score, key_dim=C, query_dim=C, dim=C)
    with torch.no_grad():
        for p in s.parameters():  # identity projections
            p.copy_(torch.eye(C))
    keys = torch.nn.functional.normalize(torch.randn(1, L, C), dim=-1)
    scores = s(s.precompute(keys), keys[:, 5])
    assert scores.argmax() == 5


def test_none_attention_is_the_mean():
    att = make("none")
    feats = torch.randn(B, L, C)
    out = att(feats, att.precompute(feats), torch.randn(B, H))
    torch.testing.assert_close(out.context, feats.mean(1))


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ConfigError, match="soft"):
        make("sofft")
    with pytest.raises(ConfigError, match="additive"):
        make("soft", "cosine")
