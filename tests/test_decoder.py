import pytest
import torch

from captioner.config import load_config
from captioner.decoder import Decoder, _Packing
from captioner.losses import CaptionLoss, doubly_stochastic, masked_cross_entropy

B, L, C, V = 3, 10, 8, 20


def make_decoder(*overrides):
    cfg = load_config(None, ["model.attention.dim=6", "model.decoder.embed_dim=7", "model.decoder.hidden_dim=9",
                             "model.decoder.dropout=0.0", *overrides]).model
    torch.manual_seed(0)
    return Decoder.from_config(cfg, vocab_size=V, feature_dim=C).eval()


def test_forward_shapes():
    dec = make_decoder()
    out = dec(torch.randn(B, L, C), torch.randint(4, V, (B, 6)))
    assert out.logits.shape == (B, 5, V) and out.alphas.shape == (B, 5, L) and out.betas.shape == (B, 5)
    assert ((out.betas > 0) & (out.betas < 1)).all()  # a scalar gate per step
    assert out.log_probs is None


def test_padding_does_not_change_results():
    dec = make_decoder()
    feats = torch.randn(2, L, C)
    short = torch.tensor([[1, 5, 6, 2]])
    batch = torch.tensor([[1, 5, 6, 2, 0, 0, 0], [1, 7, 8, 9, 10, 11, 2]])
    alone = dec(feats[:1], short)
    together = dec(feats, batch)
    torch.testing.assert_close(together.logits[0, :3], alone.logits[0])
    torch.testing.assert_close(together.alphas[0, :3], alone.alphas[0])
    mask = batch[:, 1:] != 0
    loss_together, per_caption = masked_cross_entropy(together.logits, batch[:, 1:], mask.float())
    _, per_caption_alone = masked_cross_entropy(alone.logits, short[:, 1:], torch.ones(1, 3))
    torch.testing.assert_close(per_caption[0], per_caption_alone[0])


@pytest.mark.parametrize("hops", [1, 2])
def test_step_matches_teacher_forcing(hops):
    dec = make_decoder(f"model.attention.hops={hops}")
    feats, caps = torch.randn(B, L, C), torch.randint(4, V, (B, 5))
    full = dec(feats, caps)
    state, projected = dec.init_state(feats), dec.precompute(feats)
    for t in range(4):
        out = dec.step(caps[:, t], state, feats, projected)
        torch.testing.assert_close(out.logits, full.logits[:, t])
        torch.testing.assert_close(out.attention.alpha, full.alphas[:, t])
        state = out.state


@pytest.mark.parametrize("attention, hops", [("soft", 1), ("soft", 2), ("local", 1), ("hard", 1)])
def test_luong_step_matches_teacher_forcing_and_attends_on_h_t(attention, hops):
    """Luong's arrangement: the step runs first and attention reads the new h_t (the paper's
    reads h_{t-1}); the attentional state h~_t is fed back and read by the output layer."""
    dec = make_decoder("model.decoder.arrangement=luong", f"model.attention.name={attention}",
                       f"model.attention.hops={hops}")
    feats, caps = torch.randn(B, L, C), torch.randint(4, V, (B, 5))
    full = dec(feats, caps)
    queries = []
    dec.attention.register_forward_hook(lambda m, args, out: queries.append(args[2]))
    state, projected = dec.init_state(feats), dec.precompute(feats)
    assert (state.out == 0).all()  # h~_0 = 0
    for t in range(4):
        out = dec.step(caps[:, t], state, feats, projected)
        torch.testing.assert_close(queries[-1], out.state.h)  # attention on h_t, after the step
        assert not torch.allclose(queries[-1], state.h)
        torch.testing.assert_close(out.logits, full.logits[:, t])
        torch.testing.assert_close(out.attention.probs, full.probs[:, t])
        torch.testing.assert_close(out.logits, dec.out(out.state.out))  # W_s h~_t (eval: no dropout)
        state = out.state


def test_xu_step_attends_on_the_previous_hidden_state():
    dec = make_decoder()
    feats, queries = torch.randn(B, L, C), []
    dec.attention.register_forward_hook(lambda m, args, out: queries.append(args[2]))
    state = dec.init_state(feats)
    dec.step(torch.randint(4, V, (B,)), state, feats, dec.precompute(feats))
    torch.testing.assert_close(queries[-1], state.h)


@pytest.mark.parametrize("drop_h", [True, False])
def test_dropout_also_drops_h_t_before_the_output_layer(drop_h):
    """The authors drop h_t before L_h as well as the deep output's input (capgen.py)."""
    dec = make_decoder("model.decoder.dropout=0.5", f"model.decoder.dropout_hidden={str(drop_h).lower()}").train()
    seen = []
    dec.out_hidden.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    dec(torch.randn(B, L, C), torch.randint(4, V, (B, 6)))
    zeros = (seen[0] == 0).float().mean()
    assert (zeros > 0.3) if drop_h else (zeros == 0)


def test_greedy_decoding_returns_the_hard_location_probabilities():
    """Correctness and heatmaps read the distribution: for hard attention the location
    probabilities, not the one-hot argmax it attended."""
    from captioner.decoding import greedy

    dec = make_decoder("model.attention.name=hard", "model.attention.hard.inference=argmax")
    feats = torch.randn(B, L, C)
    res = greedy(dec, feats, max_len=4, start_id=1, end_id=2)
    assert ((res.alphas > 0) & (res.alphas < 1)).any()  # not one-hot
    state, projected = dec.init_state(feats), dec.precompute(feats)
    first = dec.step(torch.ones(B, dtype=torch.long), state, feats, projected).attention
    torch.testing.assert_close(res.alphas[:, 0], first.probs)
    assert (first.alpha.max(-1).values == 1).all()  # what it attended: one-hot


@pytest.mark.parametrize("flags", [[], ["model.decoder.beta_gate=false"], ["model.decoder.deep_output=false"],
                                   ["model.decoder.arrangement=luong"]])
def test_gradients_reach_every_parameter(flags):
    dec = make_decoder(*flags).train()
    caps = torch.randint(4, V, (B, 6))
    out = dec(torch.randn(B, L, C), caps)
    CaptionLoss(alpha_c=1.0)(out, caps[:, 1:], torch.ones(B, 5, dtype=torch.bool)).total.backward()
    for name, p in dec.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_initial_state_comes_from_mean_annotation():
    dec = make_decoder()
    feats = torch.randn(B, L, C)
    shuffled = feats[:, torch.randperm(L)]
    torch.testing.assert_close(dec.init_state(feats).h, dec.init_state(shuffled).h)


def test_masked_cross_entropy_by_hand():
    logits = torch.zeros(1, 2, 4)
    logits[0, 0, 1] = 10.0
    targets = torch.tensor([[1, 3]])
    mean, per_caption = masked_cross_entropy(logits, targets, torch.tensor([[1.0, 0.0]]))
    expected = -torch.log_softmax(logits[0, 0], -1)[1]
    torch.testing.assert_close(mean, expected)
    torch.testing.assert_close(per_caption, expected.unsqueeze(0))


def test_doubly_stochastic_by_hand_and_only_over_real_steps():
    alphas = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])  # (B=1, T=3, L=2)
    torch.testing.assert_close(doubly_stochastic(alphas, torch.tensor([[1.0, 1.0, 0.0]])), torch.tensor([0.0]))
    torch.testing.assert_close(doubly_stochastic(alphas, torch.tensor([[1.0, 1.0, 1.0]])), torch.tensor([1.0]))


def beams_equal_copies(dec, feats, caps, steps, K=2):
    """K rows per image (beam search: the image's features, keys and cells read once) step as K
    copies of the image would: the same logits and the same attention memory."""
    B = feats.shape[0]
    state, projected = dec.init_state(feats).index_select(torch.arange(B).repeat_interleave(K)), dec.precompute(feats)
    copies = feats.repeat_interleave(K, 0)
    flat_state, flat_projected = dec.init_state(copies), dec.precompute(copies)
    for t in range(steps):
        words = caps[:, t].repeat_interleave(K)
        grouped = dec.step(words, state, feats, projected)
        flat = dec.step(words, flat_state, copies, flat_projected)
        torch.testing.assert_close(grouped.logits, flat.logits)
        if grouped.state.memory is not None:
            torch.testing.assert_close(grouped.state.memory, flat.state.memory)
        state, flat_state = grouped.state, flat.state


def word_anchored(relative_read=False, persist=False):
    cfg = load_config(None, ["model.attention.dim=6", "model.decoder.embed_dim=7", "model.decoder.hidden_dim=9",
                             "model.decoder.dropout=0.0", "model.decoder.arrangement=luong",
                             "model.attention.relative=true", "model.attention.anchor_on_word=true",
                             f"model.attention.relative_read={relative_read}", f"model.attention.persist={persist}"]).model
    torch.manual_seed(0)
    return Decoder.from_config(cfg, vocab_size=V, feature_dim=C, grid=(2, 5)).eval()  # L = 10


@pytest.mark.parametrize("relative_read, persist", [(False, False), (True, False), (True, True)])
def test_anchor_on_word_steps_match_teacher_forcing_and_beams(relative_read, persist):
    """The anchor settled on the word read (anchor_on_word): the teacher-forced pass, its
    packed form, and one step at a time agree; K rows per image (beam search) equal copies."""
    dec = word_anchored(relative_read, persist)
    with torch.no_grad():
        dec.attention.anchor.coefficients.bias.copy_(torch.tensor([2.0, -1.0, 1.5, 0.5]))
        dec.attention.anchor.gate.bias.fill_(1.0)
        if persist:
            dec.attention.persist.weight.normal_()
    feats, caps = torch.randn(B, L, C), torch.randint(4, V, (B, 6))
    full = dec(feats, caps)
    packed = dec(feats, caps, lengths=torch.tensor([5, 3, 4]))
    mask = torch.arange(5) < torch.tensor([5, 3, 4]).unsqueeze(1)
    torch.testing.assert_close(packed.alphas[mask], full.alphas[mask])
    state, projected = dec.init_state(feats), dec.precompute(feats)
    assert state.memory.shape == (B, 3 + L) and (state.memory == 0).all()
    for t in range(5):
        out = dec.step(caps[:, t], state, feats, projected)
        torch.testing.assert_close(out.logits, full.logits[:, t])
        torch.testing.assert_close(out.attention.alpha, full.alphas[:, t])
        torch.testing.assert_close(out.state.memory[:, 3:], out.attention.alpha)  # the map waits for its word
        state = out.state
    beams_equal_copies(dec, feats, caps, steps=4)


def test_persist_starts_silent_then_draws_the_map_to_or_from_the_last_one():
    """persist: zero at the start (the maps of the same decoder without it); a large positive
    gate keeps each map on the last map's peak, a large negative one off it; its gradient
    comes from the maps."""
    plain, dec = word_anchored(), word_anchored(persist=True)
    missing = dec.load_state_dict(plain.state_dict(), strict=False)
    assert missing.missing_keys == ["attention.persist.weight", "attention.persist.bias"]
    feats, caps = 3 * torch.randn(B, L, C), torch.randint(4, V, (B, 6))
    torch.testing.assert_close(dec(feats, caps).alphas, plain(feats, caps).alphas, rtol=0, atol=0)
    for sign in (1.0, -1.0):
        with torch.no_grad():
            dec.attention.persist.bias.fill_(sign * 1e4)
        alphas = dec(feats, caps).alphas  # (B, T, L)
        peak = alphas[:, :-1].argmax(-1, keepdim=True)  # the last map's best location, each step
        on_peak = alphas[:, 1:].gather(-1, peak).squeeze(-1)
        assert torch.allclose(on_peak, torch.ones_like(on_peak)) if sign > 0 else (on_peak == 0).all()
    with torch.no_grad():
        dec.attention.persist.bias.zero_()
    out = dec(feats, caps)
    (out.alphas[:, 1:] * torch.randn(B, 4, L)).sum().backward()
    assert dec.attention.persist.weight.grad.abs().sum() > 0 and dec.attention.persist.bias.grad.abs() > 0


def test_persist_adds_the_gate_times_the_last_map_over_its_peak():
    """The term itself: k(h_t) alpha_{t-1,l} / max_l alpha_{t-1,l}, on top of the scores (softmax,
    the anchor not yet set: the anchor term is zero)."""
    from captioner.attention import SoftAttention

    att = SoftAttention(feature_dim=C, hidden_dim=9, dim=4, normalizer="softmax", relative=True, grid=(2, 5),
                        anchor_on_word=True, persist=True)
    torch.manual_seed(1)
    feats, hidden = torch.randn(B, L, C), torch.randn(B, 9)
    last = torch.softmax(2 * torch.randn(B, L), -1)
    with torch.no_grad():
        att.persist.weight.normal_()
        out = att(feats, att.precompute(feats), hidden, None, torch.cat([torch.zeros(B, 3), last], -1))
        k = att.persist(hidden)  # (B, 1)
        want = torch.softmax(att.score(att.precompute(feats), hidden) + k * last / last.amax(-1, keepdim=True), -1)
    torch.testing.assert_close(out.alpha, want)
    assert (k.abs() > 0.1).all()  # the term is there to see


def test_persist_needs_the_map_that_anchor_on_word_keeps():
    from captioner.errors import ConfigError

    with pytest.raises(ConfigError, match="persist.*needs anchor_on_word"):
        load_config(None, ["model.attention.relative=true", "model.attention.persist=true"])


def test_anchor_on_word_settles_on_the_location_that_explains_the_word():
    """Two locations share the map; the output layer at one of them alone writes the word:
    the settled anchor is that location's centre, not the map's centroid."""
    dec = word_anchored()
    anchor = dec.attention.anchor
    cells = torch.zeros(1, L, dec.hidden_dim)
    cells[0, 2], cells[0, 7] = 5.0, -5.0  # W_c a_l: tanh saturates to +1 at location 2, -1 at 7
    h = torch.zeros(1, dec.hidden_dim)
    word = torch.tensor([4])
    alpha = torch.zeros(1, L)
    alpha[0, 2] = alpha[0, 7] = 0.5
    with torch.no_grad():
        dec.out.weight[4] = 1.0  # the word's logit: the sum of h~: high at 2, low at 7
        anchor.gate.bias.fill_(30.0)  # the gate takes it
        fit = dec.word_fit(cells, h, word)
        settled = anchor.settle(h, torch.cat([torch.zeros(1, 3), alpha], -1), fit)
        centroid = anchor.update(h, alpha, torch.zeros(1, 3))  # the plain anchor: between the two
        before = anchor.settle(h, torch.zeros(1, 3 + L), fit)  # before the first step: no map, no anchor
    assert fit[0, 2] > fit[0, 0] > fit[0, 7]
    torch.testing.assert_close(settled[0, :2], anchor.positions[2], atol=1e-4, rtol=0)
    assert settled[0, 2].item() == pytest.approx(1.0)
    torch.testing.assert_close(centroid[0, :2], (anchor.positions[2] + anchor.positions[7]) / 2)
    assert (before == 0).all()


def test_anchor_on_word_gradients_reach_the_output_layer_through_the_anchor():
    dec = word_anchored()
    with torch.no_grad():
        dec.attention.anchor.coefficients.bias.fill_(1.0)
    feats, caps = torch.randn(B, L, C), torch.randint(4, V, (B, 6))
    out = dec(feats, caps)
    (out.alphas[:, 2:] * torch.randn(B, 3, L)).sum().backward()  # maps only: the logits are not in it
    assert dec.out.weight.grad.abs().sum() > 0 and dec.combine.weight.grad.abs().sum() > 0


def test_anchor_on_word_fits_only_the_maps_support_with_the_dense_values_and_gradients(monkeypatch):
    """With sparsemax maps the fused pass computes the fit where the last map is nonzero only:
    its maps, logits and every gradient are those of the plain pass (``fused: false``: the fit
    at every location), and the support path did run (on fewer rows than the grid's)."""
    from captioner import kernels

    def decoder(fused):
        cfg = load_config(None, ["model.attention.dim=6", "model.decoder.embed_dim=7", "model.decoder.hidden_dim=9",
                                 "model.decoder.dropout=0.0", "model.decoder.arrangement=luong",
                                 f"model.decoder.fused={fused}", "model.attention.normalizer=sparsemax",
                                 "model.attention.relative=true", "model.attention.anchor_on_word=true",
                                 "model.attention.relative_read=true"]).model
        torch.manual_seed(0)
        dec = Decoder.from_config(cfg, vocab_size=V, feature_dim=C, grid=(4, 6))  # L = 24
        with torch.no_grad():
            dec.attention.anchor.coefficients.bias.copy_(torch.tensor([2.0, -1.0, 1.5, 0.5]))
            dec.attention.anchor.gate.bias.fill_(1.0)
        return dec

    feats = 3 * torch.randn(4, 24, C)  # sharp maps: a few cells each
    caps = torch.randint(4, V, (4, 7))
    gathered = []
    gather_rows = kernels.gather_rows
    monkeypatch.setattr(kernels, "gather_rows", lambda table, index: gathered.append(len(index)) or
                        gather_rows(table, index))

    def run(dec):
        out = dec(feats, caps, lengths=torch.tensor([6, 4, 5, 6]), image_index=torch.tensor([0, 1, 2, 3]))
        (out.logits.logsumexp(-1).sum() + (out.alphas * torch.linspace(0, 1, 24)).sum()).backward()
        return out, {n: p.grad for n, p in dec.named_parameters() if p.grad is not None}

    dec = decoder(True)
    fused_out, fused = run(dec)
    assert gathered and max(gathered) < 4 * 24 / 2  # the support path ran, on fewer rows than the grid
    gathered.clear()
    with torch.no_grad():  # decoding, one step at a time, takes the support path too: the same maps
        state, projected = dec.init_state(feats), dec.precompute(feats)
        for t in range(4):
            out = dec.step(caps[:, t], state, feats, projected)
            torch.testing.assert_close(out.attention.alpha, fused_out.alphas[:, t])
            state = out.state
    assert gathered
    gathered.clear()
    plain_out, plain = run(decoder(False))
    assert not gathered
    torch.testing.assert_close(fused_out.alphas, plain_out.alphas)
    torch.testing.assert_close(fused_out.logits, plain_out.logits)
    assert fused.keys() == plain.keys() and "combine.weight" in plain and "out.weight" in plain
    for name in plain:
        torch.testing.assert_close(fused[name], plain[name], msg=name)


def test_anchor_on_word_needs_luong_and_the_anchor():
    from captioner.errors import ConfigError

    with pytest.raises(ConfigError, match="anchor_on_word.*arrangement: luong"):
        make_decoder("model.attention.relative=true", "model.attention.anchor_on_word=true")
    with pytest.raises(ConfigError, match="anchor_on_word.*needs relative: true"):
        make_decoder("model.decoder.arrangement=luong", "model.attention.anchor_on_word=true")


def mixture_decoder(normalizer, *overrides, output="mixture"):
    cfg = load_config(None, ["model.attention.dim=6", "model.decoder.embed_dim=7", "model.decoder.hidden_dim=9",
                             "model.decoder.dropout=0.0", "model.decoder.arrangement=luong",
                             f"model.decoder.output={output}", f"model.attention.normalizer={normalizer}",
                             *overrides]).model
    torch.manual_seed(0)
    return Decoder.from_config(cfg, vocab_size=V, feature_dim=C, grid=(4, 6)).eval()  # L = 24


def mixture_by_hand(dec, feats, h, alpha):
    """log sum_l alpha_l softmax(W_s tanh(W_c [a_l; h])): every location, the layers as written.
    feats (N, L, C), h (N, H), alpha (N, L) -> (N, V)."""
    both = torch.cat([feats, h.unsqueeze(1).expand(-1, feats.shape[1], -1)], -1)  # (N, L, C + H)
    p = torch.softmax(dec.out(torch.tanh(dec.combine(both))), -1)  # (N, L, V)
    return (alpha.unsqueeze(-1) * p).sum(1).log()


@pytest.mark.parametrize("normalizer, extra, output", [
    ("softmax", [], "mixture"), ("sparsemax", [], "mixture"),
    ("sparsemax", ["model.attention.relative=true", "model.attention.anchor_on_word=true"], "mixture"),
    ("sparsemax", [], "product")])
def test_mixture_output_is_the_maps_weighted_sum_of_each_locations_words(normalizer, extra, output):
    """output: mixture. Each step's log-probabilities are log sum_l alpha_l p(y | a_l, h_t), on
    every location (the support path drops only the zeros); one step at a time, K rows per
    image (beam search) and the packed teacher-forced pass with shared images all agree.
    output: product adds the expected output's log-probabilities, log p(y | z_t, h_t)."""
    dec = mixture_decoder(normalizer, *extra, output=output)
    feats = 3 * torch.randn(B, 24, C)  # sharp maps: sparsemax keeps a few cells
    caps = torch.randint(4, V, (B, 6))
    state, projected = dec.init_state(feats), dec.precompute(feats)
    steps = []
    for t in range(5):
        out = dec.step(caps[:, t], state, feats, projected)
        want = mixture_by_hand(dec, feats, out.state.h, out.attention.alpha)
        if output == "product":
            read = torch.tanh(dec.combine(torch.cat([out.attention.context, out.state.h], -1)))  # h~_t
            want = want + torch.log_softmax(dec.out(read), -1)
        else:
            torch.testing.assert_close(out.logits.exp().sum(-1), torch.ones(B))
        torch.testing.assert_close(out.logits, want)
        steps.append(out)
        state = out.state
    if normalizer == "sparsemax":
        assert max(int((s.attention.alpha > 0).sum(-1).max()) for s in steps) < 24 / 2  # the support path ran
    lengths = torch.tensor([5, 3, 4, 5])
    packed = dec(feats, torch.cat([caps, caps[:1]]), lengths=lengths, image_index=torch.tensor([0, 1, 2, 0]))
    by_step = torch.stack([s.logits for s in steps], 1)  # (B, 5, V)
    mask = torch.arange(5) < lengths.unsqueeze(1)
    torch.testing.assert_close(packed.logits, torch.cat([by_step, by_step[:1]])[mask])
    beams_equal_copies(dec, feats, caps, steps=3)  # K rows per image read the image's cells once


def test_mixture_output_does_not_read_a_blend_of_two_objects_as_a_third():
    """A map split between two locations, one of which alone writes word 4 and the other word
    5; the blend of the two (the expected context) writes word 6. The mixture output gives 6
    almost nothing and 4 and 5 half each, where the expected output picks 6; and its gradient
    moves the map onto the location that explains the word. Locations off the map are not read."""
    dec = mixture_decoder("softmax")
    H = dec.hidden_dim
    with torch.no_grad():
        dec.combine.weight.zero_()
        dec.combine.weight[0, 0] = dec.combine.weight[1, 1] = 20.0  # h~ = tanh(20 a[:2]): one unit per location
        dec.out.weight.zero_(), dec.out.bias.zero_()
        dec.out.weight[4, 0] = dec.out.weight[5, 1] = 10.0
        dec.out.weight[6, :2] = 10.0
        dec.out.bias[6] = -5.0  # 6 needs both units on: the blend
    feats = torch.zeros(1, 24, C)
    feats[0, 3, 0] = feats[0, 17, 1] = 1.0  # location 3 says 4, location 17 says 5
    alpha = torch.zeros(1, 24)
    alpha[0, 3] = alpha[0, 17] = 0.5
    alpha.requires_grad_(True)
    h = torch.zeros(1, H)
    log_p = dec.mixture(dec.cells(feats), torch.tensor([0]), h, alpha)[0]
    assert log_p[6].exp() < 0.01 and log_p[4].exp().item() == pytest.approx(0.5, abs=0.01)
    assert log_p[5].exp().item() == pytest.approx(0.5, abs=0.01)
    cells = dec.cells(feats)
    cells[0, 9] = float("nan")  # a location off the map is never read: the support's cells only
    torch.testing.assert_close(dec.mixture(cells, torch.tensor([0]), h, alpha)[0], log_p)
    expected = dec.out(torch.tanh(dec.combine(torch.cat([(alpha.unsqueeze(-1) * feats).sum(1), h], -1))))
    assert expected.argmax().item() == 6  # the expected context reads the blend
    log_p[4].backward()
    assert alpha.grad[0, 3] > 1.5 and alpha.grad[0, 17] < 0.1  # p(4 | l) / p(4): onto location 3


def test_decode_output_product_vetoes_at_decoding_and_trains_the_plain_model():
    """output: expected, decode_output: product. The teacher-forced pass is the plain model's
    (the same weights, the same logits); decoding one step at a time reads the product of the
    expected output and the mixture over the map."""
    plain = mixture_decoder("sparsemax", output="expected")
    vetoed = mixture_decoder("sparsemax", "model.decoder.decode_output=product", output="expected")
    feats, caps = 3 * torch.randn(B, 24, C), torch.randint(4, V, (B, 6))
    torch.testing.assert_close(vetoed(feats, caps).logits, plain(feats, caps).logits)
    states = [dec.init_state(feats) for dec in (plain, vetoed)]
    for t in range(4):
        ref = plain.step(caps[:, t], states[0], feats, plain.precompute(feats))
        out = vetoed.step(caps[:, t], states[1], feats, vetoed.precompute(feats))
        torch.testing.assert_close(out.attention.alpha, ref.attention.alpha)  # the same model, step by step
        want = torch.log_softmax(ref.logits, -1) + mixture_by_hand(vetoed, feats, out.state.h, out.attention.alpha)
        torch.testing.assert_close(out.logits, want)
        states = [ref.state, out.state]
    back = mixture_decoder("sparsemax", "model.decoder.decode_output=expected", output="mixture")
    state, ref_state = back.init_state(feats), plain.init_state(feats)
    for t in range(3):  # trained as a mixture, decoded from the expected context: the plain step
        out = back.step(caps[:, t], state, feats, back.precompute(feats))
        ref = plain.step(caps[:, t], ref_state, feats, plain.precompute(feats))
        torch.testing.assert_close(out.logits, ref.logits)
        state, ref_state = out.state, ref.state


def test_mixture_output_needs_luong():
    from captioner.errors import ConfigError

    with pytest.raises(ConfigError, match="output.*arrangement: luong"):
        load_config(None, ["model.decoder.output=mixture"])
    with pytest.raises(ConfigError, match="output product.*arrangement: luong"):
        load_config(None, ["model.decoder.output=product"])
    with pytest.raises(ConfigError, match="decode_output product.*arrangement: luong"):
        load_config(None, ["model.decoder.decode_output=product"])
    with pytest.raises(ConfigError, match="output.*one of expected, mixture, product"):
        load_config(None, ["model.decoder.output=mixed"])
    with pytest.raises(ConfigError, match="decode_output must be one of '', expected, mixture, product; got 'prodct'"):
        load_config(None, ["model.decoder.decode_output=prodct"])


@pytest.mark.parametrize("attention", ["soft", "hard", "local", "none"])
def test_packed_pass_with_lengths_equals_the_full_pass_on_real_steps(attention):
    """With lengths the decoder runs no step past a caption's end and the output layer only on
    real steps; on those steps logits, maps, loss and every gradient are the full pass's."""
    dec = make_decoder(f"model.attention.name={attention}", "model.attention.hard.inference=argmax")
    dec.eval()  # deterministic hard attention: the same location both ways
    feats = torch.randn(4, L, C)
    caps = torch.tensor([[1, 5, 6, 2, 0, 0, 0], [1, 7, 8, 9, 10, 11, 2], [1, 4, 2, 0, 0, 0, 0],
                         [1, 9, 9, 9, 2, 0, 0]])  # unsorted lengths 3, 6, 2, 4
    targets, mask = caps[:, 1:], caps[:, 1:] != 0
    lengths = mask.sum(1)
    packed, full = dec(feats, caps, lengths=lengths), dec(feats, caps)
    assert packed.token_mask is not None and packed.logits.shape == (int(lengths.sum()), V)
    torch.testing.assert_close(packed.logits, full.logits[mask])
    torch.testing.assert_close(packed.padded_logits()[mask], full.logits[mask])
    assert (packed.padded_logits()[~mask] == 0).all()
    torch.testing.assert_close(packed.alphas[mask], full.alphas[mask])
    torch.testing.assert_close(packed.betas[mask], full.betas[mask])
    assert (packed.alphas[~mask] == 0).all() and (packed.betas[~mask] == 0).all()

    grads = []
    for out in (packed, full):
        dec.zero_grad()
        loss = CaptionLoss(alpha_c=1.0)(out, targets, mask)
        loss.total.backward(retain_graph=True)
        grads.append((loss.total.detach(), {n: p.grad.clone() for n, p in dec.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    assert grads[0][1].keys() == grads[1][1].keys()
    for name in grads[0][1]:
        torch.testing.assert_close(grads[0][1][name], grads[1][1][name], msg=name)


@pytest.mark.parametrize("attention", ["soft", "hard"])
def test_a_batch_that_comes_longest_first_is_not_sorted_again_and_gives_the_same_pass(attention, monkeypatch):
    """Captions already in the loop's order (collate_captions makes a batch so): no order and
    no copy of the features; logits, maps, sampled locations and gradients are those of the
    same captions given in another order."""
    dec = make_decoder(f"model.attention.name={attention}", "model.attention.hard.inference=argmax")
    feats = torch.randn(4, L, C)
    caps = torch.tensor([[1, 7, 8, 9, 10, 11, 2], [1, 9, 9, 9, 2, 0, 0], [1, 5, 6, 2, 0, 0, 0],
                         [1, 4, 2, 0, 0, 0, 0]])  # lengths 6, 4, 3, 2: longest first
    lengths, perm = (caps[:, 1:] != 0).sum(1), torch.tensor([2, 0, 3, 1])
    assert _Packing.plan(lengths, 4, 6).order is None and _Packing.plan(lengths[perm], 4, 6).order is not None
    sorts, index_select = [], torch.Tensor.index_select
    monkeypatch.setattr(torch.Tensor, "index_select",
                        lambda x, dim, index: sorts.append(x.shape) or index_select(x, dim, index))

    def run(rows):
        dec.zero_grad()
        out = dec(feats[rows], caps[rows], lengths=lengths[rows])
        mask = caps[rows, 1:] != 0
        CaptionLoss(alpha_c=1.0)(out, caps[rows, 1:], mask).total.backward()
        return out, {n: p.grad.clone() for n, p in dec.named_parameters() if p.grad is not None}

    (given, grads), sorted_again = run(torch.arange(4)), feats.shape in sorts
    (shuffled, shuffled_grads), sorted_shuffled = run(perm), feats.shape in sorts
    assert not sorted_again and sorted_shuffled  # the spy sees the sort where there is one
    torch.testing.assert_close(given.padded_logits()[perm], shuffled.padded_logits())
    torch.testing.assert_close(given.alphas[perm], shuffled.alphas)
    if attention == "hard":
        assert torch.equal(given.sampled[perm], shuffled.sampled)
    assert grads.keys() == shuffled_grads.keys() and len(grads) > 10
    for name in grads:
        torch.testing.assert_close(grads[name], shuffled_grads[name], msg=name)


def test_packed_pass_with_equal_lengths_is_the_plain_pass():
    dec = make_decoder()
    feats, caps = torch.randn(B, L, C), torch.randint(4, V, (B, 5))
    out = dec(feats, caps, lengths=torch.full((B,), 4))
    assert out.token_mask is None and out.logits.shape == (B, 4, V)
    torch.testing.assert_close(out.logits, dec(feats, caps).logits)


def test_packing_packs_the_steps_rows_as_the_padded_gather_masked_values_and_gradients():
    """packed(parts): each real step's row, row-major in the input order, taken straight from the
    steps' rows (time-major, longest caption first): gather(parts)[token_mask] bit for bit."""
    lengths = torch.tensor([2, 5, 1, 3, 5, 4])
    pack = _Packing.plan(lengths, 6, 5)
    assert pack.active == [6, 5, 4, 3, 2] and pack.order.tolist() == [1, 4, 5, 3, 0, 2]
    rows = [torch.randn(n, 3, requires_grad=True) for n in pack.active]  # step t: sorted rows 0..n-1
    packed, padded = pack.packed(rows), pack.gather(rows)[pack.token_mask]
    assert packed.shape == (int(lengths.sum()), 3) and torch.equal(packed, padded)
    # by hand: caption 0 (sorted 5th) reads step 0's row 4, then step 1's row 4
    assert torch.equal(packed[:2], torch.stack([rows[0][4], rows[1][4]]))
    weight = torch.randn_like(packed)
    grads = [torch.autograd.grad((x * weight).sum(), rows) for x in (packed, padded)]
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="lengths"):
        _Packing.plan(None, 6, 5).packed(rows)
    in_order = _Packing.plan(lengths.sort(descending=True).values, 6, 5)  # 5, 5, 4, 3, 2, 1: no sort
    assert in_order.order is None and in_order.active == pack.active
    assert torch.equal(in_order.packed(rows), in_order.gather(rows)[in_order.token_mask])
    assert torch.equal(in_order.gather(rows)[:, 0], rows[0])  # step 0's rows in the input order


def test_hard_attention_trains_through_the_packed_pass():
    dec = make_decoder("model.attention.name=hard").train()
    caps = torch.tensor([[1, 5, 6, 2, 0], [1, 7, 8, 9, 2]])
    mask = caps[:, 1:] != 0
    out = dec(torch.randn(2, L, C), caps, lengths=mask.sum(1))
    assert (out.log_probs[~mask] == 0).all() and (out.entropies[mask] > 0).all()
    loss = CaptionLoss(alpha_c=1.0)(out, caps[:, 1:], mask)
    loss.total.backward()
    assert torch.isfinite(loss.total) and dec.attention.score.query.weight.grad.abs().sum() > 0
