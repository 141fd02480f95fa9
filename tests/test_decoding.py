import torch

from captioner.config import load_config
from captioner.decoder import Decoder
from captioner.decoding import greedy

V, C, L = 12, 6, 5


def decoder_that_says(words, end_id=2, nxt=None):
    """A decoder whose output layer is rigged to emit ``words`` then <end> (or to follow the
    word -> next word map ``nxt``), ignoring the image."""
    cfg = load_config(None, ["model.attention.dim=4", "model.decoder.embed_dim=V_".replace("V_", str(V)),
                             "model.decoder.hidden_dim=8", "model.decoder.dropout=0.0"]).model
    dec = Decoder.from_config(cfg, vocab_size=V, feature_dim=C).eval()
    nxt = nxt or {prev: word for prev, word in zip([1, *words], [*words, end_id])}
    with torch.no_grad():  # logits = L_o tanh(E y_{t-1} + ...): make E one-hot and L_o map prev -> next
        for p in dec.parameters():
            p.zero_()
        dec.embed.weight.copy_(torch.eye(V) * 5)
        for prev, word in nxt.items():
            dec.out.weight[word, prev] = 10.0
    return dec


def test_greedy_follows_the_most_likely_words_and_stops_at_end():
    dec = decoder_that_says([5, 7, 9])
    out = greedy(dec, torch.randn(2, L, C), max_len=10, start_id=1, end_id=2)
    assert out.tokens[0].tolist() == [5, 7, 9, 2]
    assert out.lengths.tolist() == [3, 3]
    assert out.alphas.shape == (2, 4, L) and out.betas.shape == (2, 4)
    torch.testing.assert_close(out.alphas.sum(-1), torch.ones(2, 4))
    assert (out.scores < 0).all()


def test_greedy_always_ends_within_max_len():
    dec = decoder_that_says([], nxt={1: 5, 5: 5})  # 5 5 5 ... never <end>
    out = greedy(dec, torch.randn(1, L, C), max_len=3, start_id=1, end_id=2)
    assert out.tokens[0].tolist() == [5, 5, 5, 2]
    assert out.lengths.tolist() == [3]
