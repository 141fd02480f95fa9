"""Every registered attention variant and score function, tested through the registry:
a new variant is tested for free."""

import pytest
import torch

from captioner.attention import ATTENTIONS, NORMALIZERS, SCORES, AttentionOutput, build_attention
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


@pytest.mark.parametrize("score", [n for n in SCORES.names() if not n.startswith("additive")])
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


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_additive_score_is_the_papers_f_att(activation, fused):
    """f_att(a_i, h) = w^T act(W_a a_i + b + W_h h): one bias (on the keys), the configured
    activation, the same function with and without the fused kernel."""
    from captioner.attention import AdditiveScore

    torch.manual_seed(0)
    score = AdditiveScore(key_dim=C, query_dim=H, dim=6, activation=activation, fused=fused)
    keys, query = torch.randn(B, L, C), torch.randn(B, H)
    act = {"tanh": torch.tanh, "relu": torch.relu}[activation]
    w_a, b, w_h, w = score.key.weight, score.key.bias, score.query.weight, score.out.weight.view(-1)
    with torch.no_grad():
        expected = act(keys @ w_a.T + b + (query @ w_h.T).unsqueeze(1)) @ w  # (B, L)
        decoded = score(score.precompute(keys), query.unsqueeze(1).expand(B, 2, H))  # K = 2 equal queries
    torch.testing.assert_close(decoded, expected.unsqueeze(1).expand(B, 2, L))
    torch.testing.assert_close(score(score.precompute(keys), query).detach(), expected)  # the training path
    assert {n for n, _ in score.named_parameters()} == {"key.weight", "key.bias", "query.weight", "out.weight"}


def test_scaled_dot_score_divides_by_the_square_root_of_the_dimension():
    """(W_k k) . (W_q q) / sqrt(A) (Vaswani et al., 2017), with A = 9: the scale is 1/3."""
    from captioner.attention import ScaledDotScore

    torch.manual_seed(0)
    score = ScaledDotScore(key_dim=C, query_dim=H, dim=9)
    keys, query = torch.randn(B, L, C), torch.randn(B, H)
    with torch.no_grad():
        expected = torch.einsum("bla,ba->bl", keys @ score.key.weight.T, query @ score.query.weight.T) / 3.0
        torch.testing.assert_close(score(score.precompute(keys), query), expected)


@pytest.mark.parametrize("name", ATTENTIONS.names())
def test_state_dict_holds_the_learned_parameters_only(name):
    """The grid coordinates of local attention are rebuilt from the config, not saved: a
    checkpoint holds the learned weights, and loads into a model built for another grid."""
    att = build_attention(AttentionConfig(name=name, dim=6), feature_dim=C, hidden_dim=H, grid=(3, 4))
    assert set(att.state_dict()) == {n for n, _ in att.named_parameters()}
    other = build_attention(AttentionConfig(name=name, dim=6), feature_dim=C, hidden_dim=H, grid=(2, 2))
    other.load_state_dict(att.state_dict())  # strict


def test_mean_attention_with_a_mask_averages_the_valid_locations():
    att = make("mean")
    feats, mask = torch.randn(B, L, C), torch.ones(B, L, dtype=torch.bool)
    mask[0, 4:] = False
    mask[2, :2] = False
    out = att(feats, att.precompute(feats), torch.randn(B, H), mask)
    expected = torch.stack([feats[i][mask[i]].mean(0) for i in range(B)])
    torch.testing.assert_close(out.context, expected)
    grouped = att(feats, att.precompute(feats), torch.randn(B, 2, H), mask)  # K = 2 queries per image
    torch.testing.assert_close(grouped.context, expected.unsqueeze(1).expand(B, 2, C))


@pytest.mark.parametrize("name", ATTENTIONS.names())
def test_k_queries_per_image_without_a_mask(name):
    """As above with no mask (every location valid): K queries of one image answer as K copies."""
    K = 4
    torch.manual_seed(0)
    att = build_attention(AttentionConfig(name=name, dim=6), feature_dim=C, hidden_dim=H, grid=(3, 4)).eval()
    feats, h = torch.randn(B, L, C), torch.randn(B, K, H)
    grouped = att(feats, att.precompute(feats), h)
    copies = feats.repeat_interleave(K, 0)
    flat = att(copies, att.precompute(copies), h.flatten(0, 1))
    assert grouped.context.shape == (B, K, C) and grouped.alpha.shape == (B, K, L)
    torch.testing.assert_close(grouped.context.flatten(0, 1), flat.context)
    torch.testing.assert_close(grouped.alpha.flatten(0, 1), flat.alpha)
    torch.testing.assert_close(grouped.probs.flatten(0, 1), flat.probs)


# ----------------------------------------------------------------------------- sparsemax


def test_sparsemax_is_the_projection_onto_the_simplex():
    from captioner.attention import sparsemax

    z = torch.tensor([[1.0, 0.8, 0.1, -2.0], [0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.5, 0.2]])
    # tau = (1.0 + 0.8 - 1) / 2 = 0.4; uniform scores: uniform; one clear winner: one-hot
    torch.testing.assert_close(sparsemax(z), torch.tensor([[0.6, 0.4, 0, 0], [0.25] * 4, [1.0, 0, 0, 0]]))
    torch.manual_seed(0)
    z = torch.randn(50, 30) * 3
    p = sparsemax(z)
    torch.testing.assert_close(p.sum(-1), torch.ones(50))
    assert (p >= 0).all() and (p == 0).any()
    # the KKT conditions of min ||p - z||^2 on the simplex: z - p is tau on the support, <= tau off it
    tau = (z - p)[p > 0].view(-1)
    support = p > 0
    for row in range(50):
        t = (z[row] - p[row])[support[row]]
        torch.testing.assert_close(t, t[:1].expand_as(t))
        assert (z[row][~support[row]] <= t[0] + 1e-6).all()
    assert tau.numel() > 0
    torch.testing.assert_close(sparsemax(z.t(), dim=0), p.t())  # over any dimension


def test_sparsemax_gradient_is_centred_on_the_support():
    from captioner.attention import sparsemax

    z = torch.tensor([1.0, 0.8, 0.1, -2.0], dtype=torch.double, requires_grad=True)
    g = torch.tensor([0.3, -0.5, 2.0, 1.0], dtype=torch.double)
    (sparsemax(z) * g).sum().backward()
    torch.testing.assert_close(z.grad, torch.tensor([0.4, -0.4, 0.0, 0.0], dtype=torch.double))
    assert torch.autograd.gradcheck(sparsemax, (torch.randn(4, 7, dtype=torch.double, requires_grad=True),))


def test_soft_attention_with_sparsemax_zeroes_masked_and_distant_locations():
    att = build_attention(AttentionConfig(name="soft", dim=6, normalizer="sparsemax"), feature_dim=C, hidden_dim=H)
    torch.manual_seed(1)
    feats, hidden = torch.randn(B, L, C), torch.randn(B, H) * 5
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[:, -3:] = False
    out = att(feats, att.precompute(feats), hidden, mask)
    check_distributions(out, "soft")
    assert (out.alpha[:, -3:] == 0).all()
    assert (out.alpha[:, :-3] == 0).any()  # and some valid locations far below the best
    torch.testing.assert_close(out.context, torch.einsum("bl,blc->bc", out.alpha, feats))
    soft = build_attention(AttentionConfig(name="soft", dim=6), feature_dim=C, hidden_dim=H)
    soft.load_state_dict(att.state_dict())
    assert (soft(feats, soft.precompute(feats), hidden, mask).alpha[:, :-3] > 0).all()  # softmax never zeroes


def test_an_unknown_normalizer_is_refused_by_name():
    with pytest.raises(ConfigError, match="normalizer"):
        AttentionConfig(normalizer="entmax")


@pytest.mark.parametrize("name", ["soft", "hard", "local"])
def test_every_normalizing_variant_takes_sparsemax(name):
    torch.manual_seed(0)
    cfg = AttentionConfig(name=name, dim=6, normalizer="sparsemax")
    att = build_attention(cfg, feature_dim=C, hidden_dim=H, grid=(3, 4))
    att.train(False)
    feats, hidden = torch.randn(B, L, C), torch.randn(B, H) * 5
    out = att(feats, att.precompute(feats), hidden)
    check_distributions(out, name)
    assert (out.probs == 0).any()  # sparse: softmax gives no exact zeros on these scores
    if name == "hard":  # the argmax location is in the support
        assert (out.probs.gather(-1, out.alpha.argmax(-1, keepdim=True)) > 0).all()


def _leading_rows(projected) -> set[int]:
    """The first dimension of every tensor in what ``precompute`` returned."""
    import dataclasses

    if isinstance(projected, torch.Tensor):
        return {projected.shape[0]}
    if dataclasses.is_dataclass(projected):
        return set().union(*(_leading_rows(getattr(projected, f.name)) for f in dataclasses.fields(projected)))
    return set()  # not a tensor: e.g. the fused kernel's gradient bank


@pytest.mark.parametrize("name", ATTENTIONS.names())
def test_precompute_gives_one_row_per_image_or_per_given_row(name):
    """The decoder narrows precompute's rows as captions end and indexes them per caption:
    every tensor it returns has one row per image, or one per entry of ``rows``."""
    att = make(name)
    feats = torch.randn(B, L, C)
    assert _leading_rows(att.precompute(feats)) == {B}
    rows = torch.tensor([2, 0, 0, 1, 2])
    assert _leading_rows(att.precompute(feats, rows=rows)) == {5}
    if name == "none":  # nothing depends on the image
        assert att.precompute(feats).numel() == 0


def test_sparsemax_masks_every_query_of_an_image():
    att = build_attention(AttentionConfig(name="soft", dim=6, normalizer="sparsemax"), feature_dim=C, hidden_dim=H)
    torch.manual_seed(2)
    feats, hidden = torch.randn(B, L, C), torch.randn(B, 4, H) * 5  # K = 4 queries an image (beams)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[:, :2] = False
    out = att(feats, att.precompute(feats), hidden, mask)
    assert out.alpha.shape == (B, 4, L) and (out.alpha[..., :2] == 0).all()
    torch.testing.assert_close(out.alpha.sum(-1), torch.ones(B, 4))


# ----------------------------------------------------------------------------- hops

def make_hops(hops, normalizer="softmax"):
    torch.manual_seed(0)
    return build_attention(AttentionConfig(name="soft", dim=6, hops=hops, normalizer=normalizer),
                           feature_dim=C, hidden_dim=H)


@pytest.mark.parametrize("normalizer", ["softmax", "sparsemax"])
def test_each_hop_queries_with_the_read_before_it(normalizer):
    """Hop 2 scores the grid with its own f_att on [h; z_1]; the context is [z_1; z_2] and
    alpha is the last hop's map. Checked against the expression written out."""
    att = make_hops(2, normalizer)
    assert att.context_dim == 2 * C
    feats, h = torch.randn(B, L, C), torch.randn(B, H)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, :4] = False
    out = att(feats, att.precompute(feats), h, mask)
    normalize = NORMALIZERS[normalizer]
    first = normalize(att.score(att.score.precompute(feats), h), mask)
    z1 = (first.unsqueeze(-1) * feats).sum(1)
    hop = att.hop_scores[0]
    second = normalize(hop(hop.precompute(feats), torch.cat([h, z1], -1)), mask)
    torch.testing.assert_close(out.alpha, second)
    torch.testing.assert_close(out.context, torch.cat([z1, (second.unsqueeze(-1) * feats).sum(1)], -1))
    assert (out.alpha[0, :4] == 0).all()
    assert not torch.allclose(first, second)  # two different reads


def test_the_second_hop_follows_what_the_first_read():
    """Change the features but keep every projected key: hop 1's map stays, z_1 changes, and
    hop 2's map moves, because its query holds z_1. Hop 2's query weights on z_1 learn."""
    att = make_hops(2)
    with torch.no_grad():
        att.hop_scores[0].query.weight[:, H:] *= 20  # hop 2 listens hard to z_1
    feats, h = torch.randn(B, L, C), torch.randn(B, H)
    projected = att.precompute(feats)
    out = att(feats, projected, h)
    first = torch.softmax(att.score(projected[0], h), -1)
    again = att(feats + 2.0 * first.unsqueeze(-1), projected, h)  # more where hop 1 looked
    torch.testing.assert_close(again.context[:, :C], out.context[:, :C] + 2.0 * first.pow(2).sum(-1, keepdim=True))
    assert (again.alpha - out.alpha).abs().max() > 1e-2
    feats.requires_grad_(True)
    out = att(feats, att.precompute(feats), h)
    out.context[:, C:].pow(2).sum().backward()  # z_2 only
    assert att.hop_scores[0].query.weight.grad[:, H:].abs().sum() > 0  # the z_1 part of hop 2's query


def test_hops_are_soft_attention_only_and_at_least_one():
    with pytest.raises(ConfigError, match="hops.*soft"):
        AttentionConfig(name="hard", hops=2)
    with pytest.raises(ConfigError, match="hops"):
        AttentionConfig(hops=0)


def test_k_queries_per_image_with_hops_equal_copied_images():
    K = 3
    att = make_hops(3).eval()
    feats, h = torch.randn(B, L, C), torch.randn(B, K, H)
    grouped = att(feats, att.precompute(feats), h)
    copies = feats.repeat_interleave(K, 0)
    flat = att(copies, att.precompute(copies), h.flatten(0, 1))
    assert grouped.context.shape == (B, K, 3 * C)
    torch.testing.assert_close(grouped.context.flatten(0, 1), flat.context)
    torch.testing.assert_close(grouped.alpha.flatten(0, 1), flat.alpha)


@pytest.mark.parametrize("K", [1, 3])
def test_additive_dot_score_is_the_sum_of_its_two_terms(K):
    s = SCORES.build("additive_dot", key_dim=C, query_dim=H, dim=6)
    keys, query = torch.randn(B, L, C), torch.randn(B, K, H)
    add, dot = s.additive, s.dot
    expected = (add.out(torch.tanh(add.key(keys).unsqueeze(1) + add.query(query).unsqueeze(2))).squeeze(-1)
                + torch.einsum("bla,bka->bkl", dot.key(keys), dot.query(query)) / 6 ** 0.5)
    torch.testing.assert_close(s(s.precompute(keys), query), expected)


def test_the_dot_term_turns_with_the_query_where_the_tanh_term_cannot_without_saturating():
    """Keys along a line (a coordinate): negating the dot term's query turns its ranking
    around; the tanh term's ranking only turns if units saturate, so with small weights its
    best key stays at the same end."""
    s = SCORES.build("additive_dot", key_dim=1, query_dim=1, dim=1)
    with torch.no_grad():
        for p in s.parameters():
            p.fill_(0.1)
        s.dot.key.weight.fill_(1.0)
        s.dot.query.weight.fill_(1.0)
    keys = torch.linspace(-1, 1, 5).view(1, 5, 1)
    up, down = s(s.precompute(keys), torch.ones(1, 1)), s(s.precompute(keys), -torch.ones(1, 1))
    assert up.argmax() == 4 and down.argmax() == 0
    tanh_up = s.additive(s.additive.precompute(keys), torch.ones(1, 1))
    tanh_down = s.additive(s.additive.precompute(keys), -torch.ones(1, 1))
    assert tanh_up.argmax() == tanh_down.argmax() == 4


# ----------------------------------------------------------------------------- the anchor (relative)

def make_relative(grid=(3, 4), normalizer="softmax"):
    torch.manual_seed(0)
    return build_attention(AttentionConfig(name="soft", dim=6, relative=True, normalizer=normalizer),
                           feature_dim=C, hidden_dim=H, grid=grid)


def test_anchor_positions_are_the_cell_centres_row_major():
    att = make_relative(grid=(2, 4))
    x = torch.tensor([-0.75, -0.25, 0.25, 0.75])
    want = torch.stack([x.repeat(2), torch.tensor([-0.5, 0.5]).repeat_interleave(4)], -1)  # (8, 2): x, y
    torch.testing.assert_close(att.anchor.positions, want)


@pytest.mark.parametrize("normalizer", ["softmax", "sparsemax"])
def test_the_anchor_term_is_added_to_the_scores_as_written(normalizer):
    """scores + s c(h) . [dx, dy, |dx|, |dy|] of each cell's offset from the anchor; the next
    anchor is the gated centroid of the map, and s moves towards 1 by the gate."""
    att = make_relative(normalizer=normalizer)
    with torch.no_grad():
        att.anchor.coefficients.weight.normal_()
        att.anchor.gate.weight.normal_()
    feats, h = torch.randn(B, L, C), torch.randn(B, H)
    anchor = torch.cat([torch.rand(B, 2) * 2 - 1, torch.rand(B, 1)], -1)  # x, y, s
    out = att(feats, att.precompute(feats), h, memory=anchor)
    d = att.anchor.positions - anchor[:, None, :2]  # (B, L, 2)
    c = att.anchor.coefficients(h) * anchor[:, 2:]  # (B, 4), times s
    term = c[:, :1] * d[..., 0] + c[:, 1:2] * d[..., 1] + c[:, 2:3] * d[..., 0].abs() + c[:, 3:] * d[..., 1].abs()
    alpha = NORMALIZERS[normalizer](att.score(att.score.precompute(feats), h) + term, None)
    torch.testing.assert_close(out.alpha, alpha)
    torch.testing.assert_close(out.context, (alpha.unsqueeze(-1) * feats).sum(1))
    g = torch.sigmoid(att.anchor.gate(h))
    torch.testing.assert_close(out.memory[:, :2], g * (alpha @ att.anchor.positions) + (1 - g) * anchor[:, :2])
    torch.testing.assert_close(out.memory[:, 2:], g + (1 - g) * anchor[:, 2:])


def test_the_anchor_term_starts_silent():
    """Zero coefficients at the start: the maps are those of plain soft attention built from
    the same seed (the scores' parameters are drawn first)."""
    torch.manual_seed(0)
    plain = build_attention(AttentionConfig(name="soft", dim=6), feature_dim=C, hidden_dim=H)
    att = make_relative()
    feats, h = torch.randn(B, L, C), torch.randn(B, H)
    out = att(feats, att.precompute(feats), h, memory=torch.rand(B, 3))  # any anchor, even a set one
    torch.testing.assert_close(out.alpha, plain(feats, plain.precompute(feats), h).alpha)


def test_the_term_is_silent_until_the_gate_has_set_an_anchor():
    """s = 0 (no object looked at yet): whatever the coefficients, the map is plain soft
    attention's; s = 1: the term counts in full."""
    att = make_relative()
    with torch.no_grad():
        att.anchor.coefficients.bias.copy_(torch.tensor([3.0, -2.0, 4.0, 1.0]))
    feats, h = torch.randn(B, L, C), torch.randn(B, H)
    projected = att.precompute(feats)
    plain = torch.softmax(att.score(projected, h), -1)
    start = att(feats, projected, h, memory=att.init_memory(feats))
    torch.testing.assert_close(start.alpha, plain)
    assert att.init_memory(feats).shape == (B, 3)
    set_ = att(feats, projected, h, memory=torch.tensor([[0.2, -0.3, 1.0]]).expand(B, 3))
    assert (set_.alpha - plain).abs().max() > 0.05


def test_the_cone_right_of_the_anchor_wins():
    """With c = (1, 0, 0, -1) the term is dx - |dy|: on equal content the map goes to the
    cell right of the anchor on its row, not to one as far right but diagonal."""
    att = make_relative(grid=(5, 5), normalizer="sparsemax")
    with torch.no_grad():
        att.anchor.coefficients.bias.copy_(torch.tensor([1.0, 0.0, 0.0, -1.0]) * 50)
    feats = torch.zeros(1, 25, C)  # no content: only the term decides
    anchor = torch.cat([att.anchor.positions[12:13], torch.ones(1, 1)], -1)  # the centre cell (row 2, col 2), set
    out = att(feats, att.precompute(feats), torch.zeros(1, H), memory=anchor)
    assert out.alpha.argmax().item() == 14  # row 2, col 4: two cells right, none up or down
    assert out.alpha[0, 14] == 1  # sparsemax: everything else exactly 0, the diagonal (row 0, col 4) too


def test_the_gate_picks_the_centroid_or_keeps_the_anchor():
    att = make_relative(grid=(2, 4))
    h, anchor = torch.zeros(1, H), torch.tensor([[0.3, -0.2, 0.4]])
    alpha = torch.zeros(1, 8)
    alpha[0, 7] = 1.0  # row 1, col 3: (0.75, 0.5)
    for bias, want in ((30.0, [[0.75, 0.5, 1.0]]), (-30.0, [[0.3, -0.2, 0.4]])):
        with torch.no_grad():
            att.anchor.gate.bias.fill_(bias)
        torch.testing.assert_close(att.anchor.update(h, alpha, anchor), torch.tensor(want))


def test_the_gate_and_coefficients_learn_through_the_next_step():
    """The anchor a step sets moves the next step's map: the gate gets a gradient from it."""
    att = make_relative()
    with torch.no_grad():
        att.anchor.coefficients.bias.fill_(1.0)
    feats = torch.randn(B, L, C)
    projected = att.precompute(feats)
    h1, h2 = torch.randn(B, H), torch.randn(B, H)
    first = att(feats, projected, h1, memory=att.init_memory(feats))
    second = att(feats, projected, h2, memory=first.memory)
    (second.alpha * torch.randn(B, L)).sum().backward()
    assert att.anchor.gate.weight.grad.abs().sum() > 0
    assert att.anchor.coefficients.weight.grad.abs().sum() > 0


def test_k_queries_per_image_with_the_anchor_equal_copied_images():
    K = 3
    att = make_relative().eval()
    with torch.no_grad():
        att.anchor.coefficients.weight.normal_()
    feats, h, anchor = torch.randn(B, L, C), torch.randn(B, K, H), torch.rand(B, K, 3)
    grouped = att(feats, att.precompute(feats), h, memory=anchor)
    copies = feats.repeat_interleave(K, 0)
    flat = att(copies, att.precompute(copies), h.flatten(0, 1), memory=anchor.flatten(0, 1))
    torch.testing.assert_close(grouped.alpha.flatten(0, 1), flat.alpha)
    torch.testing.assert_close(grouped.memory.flatten(0, 1), flat.memory)


def test_relative_read_appends_where_the_map_sits_from_the_anchor():
    """The context is [sum_i alpha_i a_i; s (dx, dy, |dx|, |dy|)] of the map's centroid less
    the anchor's point: zeros before an anchor is set; K queries per image agree with copies."""
    torch.manual_seed(0)
    att = build_attention(AttentionConfig(name="soft", dim=6, relative=True, relative_read=True),
                          feature_dim=C, hidden_dim=H, grid=(3, 4))
    assert att.context_dim == C + 4 and make_relative().context_dim == C
    feats, h = torch.randn(B, L, C), torch.randn(B, H)
    projected = att.precompute(feats)
    anchor = torch.tensor([[0.5, -0.25, 0.8]]).expand(B, 3)
    out = att(feats, projected, h, memory=anchor)
    torch.testing.assert_close(out.context[:, :C], (out.alpha.unsqueeze(-1) * feats).sum(1))
    d = out.alpha @ att.anchor.positions - anchor[:, :2]  # (B, 2)
    torch.testing.assert_close(out.context[:, C:], torch.cat([d, d.abs()], -1) * 0.8)
    assert d.abs().min() > 1e-3  # the check above is not about zeros
    start = att(feats, projected, h, memory=att.init_memory(feats))
    assert torch.equal(start.context[:, C:], torch.zeros(B, 4))  # no anchor yet: nothing to read
    K = 3
    hk, ak = torch.randn(B, K, H), torch.rand(B, K, 3)
    grouped = att(feats, projected, hk, memory=ak)
    copies = feats.repeat_interleave(K, 0)
    flat = att(copies, att.precompute(copies), hk.flatten(0, 1), memory=ak.flatten(0, 1))
    torch.testing.assert_close(grouped.context.flatten(0, 1), flat.context)


def test_relative_read_sends_gradients_to_where_the_map_goes():
    """A loss on the offset channels alone reaches the scores' parameters: the decoder can
    learn to move its map onto the second object to read the direction."""
    torch.manual_seed(0)
    att = build_attention(AttentionConfig(name="soft", dim=6, relative=True, relative_read=True),
                          feature_dim=C, hidden_dim=H, grid=(3, 4))
    feats, h = torch.randn(B, L, C), torch.randn(B, H)
    out = att(feats, att.precompute(feats), h, memory=torch.tensor([[0.1, 0.2, 1.0]]).expand(B, 3))
    (out.context[:, C:] * torch.tensor([1.0, -2.0, 0.5, 3.0])).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in att.score.parameters())


def test_relative_read_needs_the_anchor():
    with pytest.raises(ConfigError, match="relative_read.*needs relative: true"):
        AttentionConfig(relative_read=True)
    with pytest.raises(ValueError, match="relative_read"):
        build_attention.__globals__["SoftAttention"](feature_dim=C, hidden_dim=H, relative_read=True)


def test_the_anchor_is_soft_attention_with_one_hop_only():
    for name in ("hard", "local", "none", "mean"):
        with pytest.raises(ConfigError, match="relative.*soft attention's; got name"):
            build_attention(AttentionConfig(name=name, relative=True), feature_dim=C, hidden_dim=H)
    with pytest.raises(ConfigError, match="relative"):
        AttentionConfig(hops=2, relative=True)
    assert make("soft").init_memory(torch.randn(B, L, C)) is None  # off: no memory to carry
