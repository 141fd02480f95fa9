"""Every registered attention variant and score function, tested through the registry:
a new variant is tested for free."""

import pytest
import torch

from captioner.attention import ATTENTIONS, SCORES, AttentionOutput, build_attention
from captioner.config import AttentionConfig
from captioner.errors import ConfigError

B, L, C, H = 3, 12, 8, 10


def query_dim(score):
    return C if score == "dot" else H  # dot has no parameters: it needs H == C


def make(name, score="additive"):
    torch.manual_seed(0)
    return build_attention(AttentionConfig(name=name, score=score, dim=6), feature_dim=C, hidden_dim=query_dim(score))


def check_distributions(out, name):
    """alpha is non-negative with mass at most 1 (local: Luong's window times a Gaussian is
    not renormalised; none: attends nothing); probs is a distribution."""
    for x in (out.alpha, out.probs):
        assert x.shape == (B, L) and (x >= 0).all() and (x.sum(-1) <= 1 + 1e-5).all()
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(B))


@pytest.mark.parametrize("name", ATTENTIONS.names())
def test_output_shapes_and_alpha_is_a_distribution(name):
    att = make(name)
    feats, h = torch.randn(B, L, C), torch.randn(B, H)
    out = att(feats, att.precompute(feats), h)
    assert isinstance(out, AttentionOutput)
    assert out.context.shape == (B, C) and out.alpha.shape == (B, L)
    check_distributions(out, name)


@pytest.mark.parametrize("name", ATTENTIONS.names())
def test_mask_zeroes_invalid_locations(name):
    att = make(name)
    feats, h = torch.randn(B, L, C), torch.randn(B, H)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[:, L // 2:] = False
    out = att(feats, att.precompute(feats), h, mask)
    assert (out.alpha[:, L // 2:] == 0).all() and (out.probs[:, L // 2:] == 0).all()
    check_distributions(out, name)


@pytest.mark.parametrize("score", SCORES.names())
def test_soft_context_is_alpha_weighted_sum_and_gradients_flow(score):
    att = make("soft", score)
    feats, h = torch.randn(B, L, C, requires_grad=True), torch.randn(B, query_dim(score), requires_grad=True)
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


def test_mean_attention_is_the_mean():
    att = make("mean")
    feats = torch.randn(B, L, C)
    out = att(feats, att.precompute(feats), torch.randn(B, H))
    torch.testing.assert_close(out.context, feats.mean(1))


def test_none_attention_feeds_no_context_show_and_tell():
    """Show and Tell sees the image once, before the first word (here: h_0, c_0); no context
    after that. Its distribution is uniform (no preference), its weights zero."""
    att = make("none")
    feats = torch.randn(B, L, C)
    out = att(feats, att.precompute(feats), torch.randn(B, H))
    assert (out.context == 0).all() and (out.alpha == 0).all()
    torch.testing.assert_close(out.probs, torch.full((B, L), 1.0 / L))


def test_dot_score_refuses_a_hidden_projection():
    """dot has no parameters; with C != H a learned projection would make it 'general'."""
    with pytest.raises(ValueError, match="general"):
        SCORES.build("dot", key_dim=C, query_dim=H, dim=6)
    assert sum(p.numel() for p in SCORES.build("dot", key_dim=C, query_dim=C, dim=6).parameters()) == 0


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ConfigError, match="soft"):
        make("sofft")
    with pytest.raises(ConfigError, match="additive"):
        make("soft", "cosine")


@pytest.mark.parametrize("score", SCORES.names())
@pytest.mark.parametrize("name", ATTENTIONS.names())
def test_k_queries_per_image_equal_the_same_queries_on_copied_images(name, score):
    """Beam search asks K queries of one image at once; the answer must be what K copies of
    the image would give, and the mask (per image) must apply to every query."""
    K, grid = 3, (3, 4)
    torch.manual_seed(0)
    att = build_attention(AttentionConfig(name=name, score=score, dim=6), feature_dim=C,
                          hidden_dim=query_dim(score), grid=grid).eval()
    feats, h = torch.randn(B, L, C), torch.randn(B, K, query_dim(score))
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 5:] = False
    grouped = att(feats, att.precompute(feats), h, mask)
    copies = feats.repeat_interleave(K, 0)
    flat = att(copies, att.precompute(copies), h.flatten(0, 1), mask.repeat_interleave(K, 0))
    assert grouped.context.shape == (B, K, C) and grouped.alpha.shape == (B, K, L)
    torch.testing.assert_close(grouped.context.flatten(0, 1), flat.context)
    torch.testing.assert_close(grouped.alpha.flatten(0, 1), flat.alpha)
    torch.testing.assert_close(grouped.probs.flatten(0, 1), flat.probs)
    assert (grouped.alpha[1, :, 5:] == 0).all() and (grouped.probs[1, :, 5:] == 0).all()
    for part in ("log_prob", "entropy"):
        if getattr(flat, part) is not None:
            torch.testing.assert_close(getattr(grouped, part).flatten(), getattr(flat, part))


@pytest.mark.parametrize("K", [1, 4])
def test_additive_score_without_gradients_equals_the_training_path(K):
    """Decoding runs the tanh score one query per image at a time in a reused buffer; the
    scores must be the training path's."""
    from captioner.attention import AdditiveScore

    torch.manual_seed(0)
    score = AdditiveScore(key_dim=C, query_dim=H, dim=6)
    keys, query = torch.randn(B, L, C), torch.randn(B, K, H)
    projected = score.precompute(keys)
    trained = score(projected, query)
    with torch.no_grad():
        decoded = score(score.precompute(keys), query)
    assert decoded.shape == (B, K, L)
    torch.testing.assert_close(decoded, trained.detach())
    plain = torch.tanh(score.key(keys).unsqueeze(1) + score.query(query).unsqueeze(2)) @ score.out.weight.view(-1)
    torch.testing.assert_close(decoded, plain.detach())
