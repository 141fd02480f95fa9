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
    return Decoder.from_config(cfg, vocab_size=V, feature_dim=C).eval()


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

