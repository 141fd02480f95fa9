"""Decoder behaviour the paper specifies, through the public forward/step API (eq. 7, Section 4.2.1)."""

import pytest
import torch

from captioner.config import load_config
from captioner.decoder import Decoder

B, L, C, V = 2, 6, 5, 11


def make_decoder(*overrides: str) -> Decoder:
    cfg = load_config(None, ["model.attention.dim=6", "model.decoder.embed_dim=7", "model.decoder.hidden_dim=8",
                             "model.decoder.dropout=0.0", *overrides]).model
    torch.manual_seed(0)
    return Decoder.from_config(cfg, vocab_size=V, feature_dim=C, grid=(2, 3)).eval()  # L = 6


def same_mean_features() -> tuple[torch.Tensor, torch.Tensor]:
    """Two feature maps with the same mean over locations (so the same h_0, c_0) but other contexts."""
    torch.manual_seed(1)
    feats = torch.randn(B, L, C)
    noise = torch.randn(B, L, C)
    return feats, feats + 3 * (noise - noise.mean(dim=1, keepdim=True))


def closed_gate(dec: Decoder) -> Decoder:
    """beta_t = sigmoid(-1e4) = 0: the context beta_t z_t reaches neither the LSTM nor the output layer."""
    with torch.no_grad():
        dec.f_beta.weight.zero_()
        dec.f_beta.bias.fill_(-1e4)
    return dec


@pytest.mark.parametrize("gate_closed", [True, False])
def test_output_layer_sees_the_gated_context(gate_closed):
    dec = make_decoder()
    if gate_closed:
        closed_gate(dec)
    a, b = same_mean_features()
    caps = torch.randint(3, V, (B, 5))
    out_a, out_b = dec(a, caps), dec(b, caps)
    if gate_closed:
        assert out_a.betas.max() < 1e-6
        torch.testing.assert_close(out_a.logits, out_b.logits)  # the context is gated away entirely
    else:
        assert (out_a.logits - out_b.logits).abs().max() > 1e-3  # the context matters when the gate is open


def test_step_output_layer_sees_the_gated_context():
    dec = closed_gate(make_decoder())
    a, b = same_mean_features()
    tokens = torch.randint(3, V, (B,))
    steps = [dec.step(tokens, dec.init_state(f), f, dec.precompute(f)) for f in (a, b)]
    torch.testing.assert_close(steps[0].logits, steps[1].logits)
    torch.testing.assert_close(steps[0].state.h, steps[1].state.h)
    assert not torch.allclose(steps[0].attention.context, steps[1].attention.context)  # yet attention differs



def reference_lstm(dec: Decoder) -> torch.nn.LSTMCell:
    """torch's own LSTM cell with the decoder's weights: input [E y, x] (x: beta_t z_t, or
    Luong's h~_{t-1}), gates (i, f, g, o), the one bias on the embedding's share."""
    H = dec.hidden_dim
    cell = torch.nn.LSTMCell(dec.gate_embed.in_features + dec.gate_context.in_features, H)
    with torch.no_grad():
        cell.weight_ih.copy_(torch.cat([dec.gate_embed.weight, dec.gate_context.weight], 1))
        cell.weight_hh.copy_(dec.gate_hidden.weight)
        cell.bias_ih.copy_(dec.gate_embed.bias)
        cell.bias_hh.zero_()
    return cell


@pytest.mark.parametrize("arrangement", ["xu", "luong"])
def test_step_is_a_standard_lstm_cell(arrangement):
    """eq. 1-3: (h_t, c_t) = LSTM([E y_{t-1}, beta_t z_t], h_{t-1}, c_{t-1}); in Luong's
    arrangement the input is [E y_{t-1}, h~_{t-1}] (input feeding)."""
    dec = make_decoder(f"model.decoder.arrangement={arrangement}")
    cell = reference_lstm(dec)
    feats = torch.randn(B, L, C)
    state, projected = dec.init_state(feats), dec.precompute(feats)
    with torch.no_grad():
        for tokens in torch.randint(3, V, (4, B)):
            out = dec.step(tokens, state, feats, projected)
            fed = state.out if arrangement == "luong" else out.attention.context * out.beta.unsqueeze(1)
            h, c = cell(torch.cat([dec.embed(tokens), fed], 1), (state.h, state.c))
            torch.testing.assert_close(out.state.h, h)
            torch.testing.assert_close(out.state.c, c)
            state = out.state
        if arrangement == "luong":
            assert (state.out != 0).any()  # h~ was fed back (not only the zero h~_0)


def test_deep_output_is_eq_7():
    """p(y_t) = softmax(L_o tanh(E y_{t-1} + L_h h_t + L_z beta_t z_t)): L_z has no bias
    (L_h's would absorb it)."""
    dec = make_decoder()
    feats = torch.randn(B, L, C)
    state, projected = dec.init_state(feats), dec.precompute(feats)
    tokens = torch.randint(3, V, (B,))
    with torch.no_grad():
        out = dec.step(tokens, state, feats, projected)
        z = out.attention.context * out.beta.unsqueeze(1)
        pre = dec.embed.weight[tokens] + out.state.h @ dec.out_hidden.weight.T + dec.out_hidden.bias \
            + z @ dec.out_context.weight.T
        torch.testing.assert_close(out.logits, torch.tanh(pre) @ dec.out.weight.T + dec.out.bias)
    assert {n for n, _ in dec.out_context.named_parameters()} == {"weight"}


def test_luong_attentional_state_is_tanh_of_w_c_on_context_and_h():
    """h~_t = tanh(W_c [z_t; h_t]) (Luong et al., 2015, eq. 5): no bias."""
    dec = make_decoder("model.decoder.arrangement=luong")
    feats = torch.randn(B, L, C)
    state, projected = dec.init_state(feats), dec.precompute(feats)
    with torch.no_grad():
        out = dec.step(torch.randint(3, V, (B,)), state, feats, projected)
        w_z, w_h = dec.combine.weight[:, :C], dec.combine.weight[:, C:]
        expected = torch.tanh(out.attention.context @ w_z.T + out.state.h @ w_h.T)
    torch.testing.assert_close(out.state.out, expected)
    assert {n for n, _ in dec.combine.named_parameters()} == {"weight"}


@pytest.mark.parametrize("flags", [["model.decoder.beta_gate=false"], ["model.decoder.arrangement=luong"]])
def test_without_a_gate_beta_is_one_per_caption_and_step(flags):
    dec = make_decoder(*flags)
    feats, caps = torch.randn(B, L, C), torch.randint(3, V, (B, 5))
    torch.testing.assert_close(dec(feats, caps).betas, torch.ones(B, 4))
    step = dec.step(caps[:, 0], dec.init_state(feats), feats, dec.precompute(feats))
    torch.testing.assert_close(step.beta, torch.ones(B))


def test_initialisation():
    """Embeddings U(-0.1, 0.1); LSTM gate biases 0 except the forget gate's, 1 (Jozefowicz
    et al., 2015), gates ordered (i, f, g, o)."""
    cfg = load_config(None, ["model.decoder.embed_dim=16", "model.decoder.hidden_dim=8"]).model
    torch.manual_seed(0)
    dec = Decoder.from_config(cfg, vocab_size=200, feature_dim=C)
    w = dec.embed.weight.detach()
    assert w.abs().max() <= 0.1 and w.min() < -0.09 and w.max() > 0.09
    assert abs(float(w.mean())) < 0.01
    H = 8
    torch.testing.assert_close(dec.gate_embed.bias, torch.cat([torch.zeros(H), torch.ones(H), torch.zeros(2 * H)]))
    cell = reference_lstm(dec)  # forget gate open: with zero input and state, c_1 = sigma(0) tanh(0) = 0, c_t
    c0 = torch.ones(1, H)       # kept at sigma(1) of c_{t-1}
    _, c = cell(torch.zeros(1, cell.input_size), (torch.zeros(1, H), c0))
    torch.testing.assert_close(c, torch.sigmoid(torch.tensor(1.0)) * c0)


@pytest.mark.parametrize("overrides", [["model.decoder.arrangement=xu"], ["model.decoder.arrangement=luong"],
                                       ["model.decoder.arrangement=luong", "model.attention.relative=true"]])
def test_k_hypotheses_per_image_step_like_copied_images(overrides):
    """Beam search steps K hypotheses per image (rows i * K .. i * K + K - 1 are image i's)
    on one copy of the features: the same as K copies of each image (the anchor too)."""
    K = 3
    dec = make_decoder(*overrides)
    feats = torch.randn(B, L, C)
    copies = feats.repeat_interleave(K, 0)
    state = dec.init_state(copies)
    state.h = state.h + 0.3 * torch.randn_like(state.h)  # hypotheses of one image differ
    if state.memory is not None:
        state.memory = torch.rand_like(state.memory) * 2 - 1
        with torch.no_grad():
            dec.attention.anchor.coefficients.weight.normal_()
    tokens = torch.randint(3, V, (B * K,))
    grouped = dec.step(tokens, state, feats, dec.precompute(feats))
    flat = dec.step(tokens, state, copies, dec.precompute(copies))
    torch.testing.assert_close(grouped.logits, flat.logits)
    torch.testing.assert_close(grouped.state.h, flat.state.h)
    torch.testing.assert_close(grouped.attention.alpha, flat.attention.alpha)
    torch.testing.assert_close(grouped.attention.context, flat.attention.context)
    assert grouped.attention.alpha.shape == (B * K, L)
    if state.memory is not None:
        torch.testing.assert_close(grouped.state.memory, flat.state.memory)
        assert grouped.state.memory.shape == (B * K, 3)


def test_state_index_select_reorders_every_part():
    from captioner.decoder import DecoderState

    h, c, out = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
    index = torch.tensor([2, 2, 0])
    picked = DecoderState(h, c, out).index_select(index)
    for got, x in zip((picked.h, picked.c, picked.out), (h, c, out)):
        torch.testing.assert_close(got, x[[2, 2, 0]])
    assert DecoderState(h, c).index_select(index).out is None
    memory = torch.randn(4, 3)
    torch.testing.assert_close(DecoderState(h, c, out, memory).index_select(index).memory, memory[[2, 2, 0]])
    torch.testing.assert_close(DecoderState(h, c, out, memory).narrow(3).memory, memory[:3])


def test_the_anchor_is_carried_from_step_to_step_as_teacher_forcing_does():
    """Stepping the decoder word by word, its state carrying the anchor, gives the teacher-
    forced pass's logits and maps; the anchor it carries is the gated centroid of the last map."""
    dec = make_decoder("model.decoder.arrangement=luong", "model.attention.relative=true")
    with torch.no_grad():
        dec.attention.anchor.coefficients.weight.normal_()
    feats, captions = torch.randn(B, L, C), torch.randint(3, V, (B, 5))
    forced = dec(feats, captions)
    state, projected = dec.init_state(feats), dec.precompute(feats)
    assert state.memory.shape == (B, 3) and (state.memory == 0).all()
    for t in range(4):
        step = dec.step(captions[:, t], state, feats, projected)
        torch.testing.assert_close(step.logits, forced.logits[:, t])
        torch.testing.assert_close(step.attention.alpha, forced.alphas[:, t])
        assert not torch.allclose(step.state.memory, state.memory)
        state = step.state


def test_a_caption_of_length_one_runs_one_step():
    """lengths count the steps that predict a real word; <end> alone is one step (0 is read as 1)."""
    dec = make_decoder()
    feats = torch.randn(3, L, C)
    caps = torch.tensor([[1, 2, 0, 0], [1, 5, 6, 2], [1, 2, 0, 0]])
    out = dec(feats, caps, lengths=torch.tensor([1, 3, 0]))
    assert out.token_mask.tolist() == [[True, False, False], [True, True, True], [True, False, False]]
    assert out.logits.shape == (5, V)
    full = dec(feats, caps)
    torch.testing.assert_close(out.padded_logits()[out.token_mask], full.logits[out.token_mask])


@pytest.mark.parametrize("k", [2, 3])
def test_leave_one_out_runs_k_paths_of_each_caption_in_training(k):
    """Rows i * k .. i * k + k - 1 are caption i's k paths: the same words and image, so with
    the expected context (no sampling) the same outputs; at test time one path."""
    dec = make_decoder("model.attention.name=hard", "model.attention.hard.estimator=loo",
                       f"model.attention.hard.samples={k}", "model.attention.hard.mix_prob=1.0").train()
    feats, caps = torch.randn(B, L, C), torch.randint(3, V, (B, 5))
    out = dec(feats, caps)
    assert out.samples == k and out.logits.shape == (B * k, 4, V) and not out.sampled.any()
    torch.testing.assert_close(out.logits.view(B, k, 4, V), out.logits.view(B, k, 4, V)[:, :1].expand(B, k, 4, V))
    assert not torch.allclose(out.logits[0], out.logits[k])  # caption 0 and caption 1 differ
    dec.eval()
    assert dec(feats, caps).logits.shape == (B, 4, V)


def test_attention_without_paths_runs_each_caption_once_in_training():
    dec = make_decoder().train()  # soft attention asks for no paths
    out = dec(torch.randn(B, L, C), torch.randint(3, V, (B, 5)))
    assert out.samples == 1 and out.logits.shape == (B, 4, V)


def test_packed_pass_with_a_mask_and_more_captions_than_hidden_units():
    """Packing sorts the captions (and their masks) longest first and drops the ended ones,
    whatever the batch size; on real steps the result is the full pass's, masks obeyed."""
    n, T = 12, 5  # n > hidden_dim = 8, and 10 of them still going after the first step
    dec = make_decoder()
    torch.manual_seed(2)
    feats, caps = torch.randn(n, L, C), torch.randint(3, V, (n, T + 1))
    lengths = torch.tensor([1, 5, 2, 3, 5, 1, 4, 2, 3, 4, 5, 2])
    mask = torch.rand(n, L) > 0.4
    mask[:, 0] = True
    packed, full = dec(feats, caps, mask, lengths=lengths), dec(feats, caps, mask)
    real = packed.token_mask
    assert real.sum(1).tolist() == lengths.tolist()
    torch.testing.assert_close(packed.logits, full.logits[real])
    torch.testing.assert_close(packed.alphas[real], full.alphas[real])
    assert (packed.alphas.permute(0, 2, 1)[~mask] == 0).all()


def test_packed_hard_pass_reports_each_captions_flag_in_the_input_order():
    """``sampled`` is per caption, in the order given, also when some captions end after one
    step: a sampled caption attends one-hot, the others the expected (soft) weights."""
    dec = make_decoder("model.attention.name=hard", "model.attention.hard.mix_prob=0.5").train()
    torch.manual_seed(3)
    n = 8
    feats, caps = torch.randn(n, L, C), torch.randint(3, V, (n, 5))
    lengths = torch.tensor([1, 4, 2, 1, 3, 4, 1, 2])
    for _ in range(3):
        out = dec(feats, caps, lengths=lengths)
        assert out.sampled.shape == (n,) and out.sampled.any() and not out.sampled.all()
        one_hot = out.alphas[:, 0].max(-1).values == 1
        assert one_hot.tolist() == out.sampled.tolist()


@pytest.mark.parametrize("overrides", [
    ("model.attention.score=additive",), ("model.attention.score=additive", "model.attention.fused=false"),
    ("model.attention.score=general",), ("model.attention.score=scaled_dot",),
    ("model.attention.name=hard", "model.attention.hard.estimator=loo"), ("model.attention.name=local",),
    ("model.attention.name=mean",), ("model.attention.name=none",), ("model.decoder.arrangement=luong",),
    ("model.decoder.arrangement=luong", "model.attention.relative=true"),
])
def test_captions_sharing_images_equal_the_images_copied_per_caption(overrides):
    """image_index: the keys are projected once per image and indexed per caption; values and
    every gradient (the features' summed over each image's captions) as with copied features."""
    cfg = load_config(None, ["model.attention.dim=6", "model.decoder.embed_dim=7", "model.decoder.hidden_dim=8",
                             "model.decoder.dropout=0.0", *overrides]).model
    torch.manual_seed(0)
    dec = Decoder.from_config(cfg, vocab_size=V, feature_dim=C, grid=(2, 3)).train()  # L = 6
    torch.manual_seed(3)
    feats = torch.randn(3, L, C, requires_grad=True)
    index = torch.tensor([2, 0, 0, 2, 1, 2])
    captions = torch.randint(3, V, (6, 6))
    lengths = torch.tensor([5, 3, 5, 2, 4, 1])
    mask = torch.ones(3, L, dtype=torch.bool)
    mask[0, -2:] = mask[2, :1] = False  # per image, so indexed per caption with the features

    def run(**kw):
        torch.manual_seed(4)  # the same draws for the stochastic variants
        if kw:
            out = dec(feats, captions, mask, lengths=lengths, **kw)
        else:
            out = dec(feats[index], captions, mask[index], lengths=lengths)
        (out.logits.square().sum() + out.probs.square().sum()).backward()
        grads = [feats.grad.clone()] + [p.grad.clone() for p in dec.parameters() if p.grad is not None]
        feats.grad = None
        dec.zero_grad()
        return out, grads

    shared, shared_grads = run(image_index=index)
    copied, copied_grads = run()
    assert torch.allclose(shared.logits, copied.logits, atol=1e-6)
    assert torch.allclose(shared.alphas, copied.alphas, atol=1e-6)
    assert len(shared_grads) == len(copied_grads)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(shared_grads, copied_grads))


def test_the_keys_are_projected_once_per_image():
    dec = make_decoder().train()
    seen = []
    dec.attention.score.key.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    feats, captions = torch.randn(2, L, C), torch.randint(3, V, (6, 5))
    dec(feats, captions, lengths=torch.tensor([4, 4, 3, 2, 4, 1]), image_index=torch.tensor([0, 1, 0, 1, 1, 0]))
    assert seen == [2]
