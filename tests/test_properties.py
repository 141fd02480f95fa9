"""Property-based tests (hypothesis): the config parser, collate and beam search never
misbehave, whatever they are given."""

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from captioner.config import load_config
from captioner.data.dataset import pad_captions
from captioner.decoder import Decoder
from captioner.decoding import beam_search, greedy
from captioner.errors import ConfigError

KEYS = ["train.batch_size", "train.lr", "train.epochs", "model.decoder.dropout", "model.attention.name",
        "decode.beam_size", "data.format", "train.amp", "vocab.max_len", "model.encoder.weights", "train.bogus"]
VALUES = st.one_of(st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=8), st.booleans(), st.none(),
                   st.sampled_from(["soft", "1e-3", "null", "[1, 2]", "{a: 1}", "bf16"]))


@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=4))
@example([("train.bogus", 1)])
@example([("train.lr", "1e-3"), ("train.bogus", "soft")])
def test_config_parser_only_ever_raises_config_error(pairs):
    overrides = [f"{k}={v}" for k, v in pairs]
    try:
        cfg = load_config(None, overrides)
    except ConfigError as err:
        assert "\n" not in str(err) and str(err)
        return
    assert "train.bogus" not in dict(pairs), "an unknown key was accepted"
    assert cfg.train.batch_size >= 1 and 0 <= cfg.model.decoder.dropout < 1 and cfg.decode.beam_size >= 1


@given(st.lists(st.lists(st.integers(1, 50), min_size=1, max_size=12), min_size=1, max_size=8))
def test_collate_pads_without_reordering(seqs):
    caps, lengths, mask = pad_captions(seqs)
    assert caps.shape == (len(seqs), max(map(len, seqs)))
    assert lengths.tolist() == [len(s) for s in seqs]
    for i, s in enumerate(seqs):
        assert caps[i, : len(s)].tolist() == s and (caps[i, len(s):] == 0).all()
        assert mask[i].sum() == len(s) and mask[i, : len(s)].all()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), vocab=st.integers(5, 12), beam=st.integers(1, 6), max_len=st.integers(1, 6),
       batch=st.integers(1, 3), sharpness=st.floats(0.1, 30))
def test_beam_search_always_returns_a_ranked_caption(seed, vocab, beam, max_len, batch, sharpness):
    torch.manual_seed(seed)
    cfg = load_config(None, ["model.attention.dim=4", "model.decoder.embed_dim=5", "model.decoder.hidden_dim=6",
                             "model.decoder.dropout=0.0"]).model
    dec = Decoder.from_config(cfg, vocab_size=vocab, feature_dim=3).eval()
    with torch.no_grad():
        dec.out.weight.mul_(sharpness)
    feats = torch.randn(batch, 4, 3)
    out = beam_search(dec, feats, beam_size=beam, max_len=max_len, start_id=1, end_id=2, n_best=beam)
    best = out.best()
    for i in range(batch):
        n = int(best.lengths[i])
        assert 0 <= n <= max_len
        assert best.tokens[i, n] == 2  # every caption ends with <end>
        assert not ((best.tokens[i, :n] == 0) | (best.tokens[i, :n] == 1) | (best.tokens[i, :n] == 2)).any()
    assert torch.isfinite(best.scores).all()
    g = greedy(dec, feats, max_len=max_len, start_id=1, end_id=2)
    if beam == 1:
        assert torch.equal(g.tokens, best.tokens[:, : g.tokens.shape[1]])
    ranked = out.scores.nan_to_num(neginf=-1e30)
    assert (ranked[:, :-1] >= ranked[:, 1:]).all()  # n-best, best first
