import pytest
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


def teacher_forced_log_prob(dec, feats, tokens, n):
    """Sum of log p of the first n words and <end> of ``tokens`` (1-D), by a teacher-forced pass."""
    seq = tokens[: n + 1]
    logp = torch.log_softmax(dec(feats, torch.cat([torch.tensor([1]), seq]).unsqueeze(0)).logits, -1)[0]
    return logp[torch.arange(n + 1), seq].sum()


def test_greedy_scores_and_stopping_with_captions_of_different_lengths():
    """Scores sum the log-probabilities of each caption's own words and <end> (nothing after it);
    on the CPU the loop stops at the step where the last caption ends."""
    dec = random_decoder(11)
    feats = torch.randn(16, L, C)
    out = greedy(dec, feats, max_len=8, start_id=1, end_id=2)
    assert len(set(out.lengths.tolist())) > 1  # the captions end at different steps
    for i in range(16):
        n = int(out.lengths[i])
        assert out.tokens[i, n] == 2 and (out.tokens[i, n + 1:] == 0).all()
        expected = teacher_forced_log_prob(dec, feats[i:i + 1], out.tokens[i], n)
        torch.testing.assert_close(out.scores[i], expected, rtol=1e-4, atol=1e-4)
    for words in ([5], [5, 7], [5, 7, 9, 4]):  # on the CPU: no step after the last <end>
        said = greedy(decoder_that_says(words), feats[:2], max_len=10, start_id=1, end_id=2)
        assert said.tokens.shape[1] == len(words) + 1


# ----------------------------------------------------------------------------- beam search

from captioner.decoding import beam_search, sample  # noqa: E402


def random_decoder(seed=0, vocab=V, *overrides):
    cfg = load_config(None, ["model.attention.dim=4", "model.decoder.embed_dim=6", "model.decoder.hidden_dim=8",
                             "model.decoder.dropout=0.0", *overrides]).model
    torch.manual_seed(seed)
    dec = Decoder.from_config(cfg, vocab_size=vocab, feature_dim=C).eval()
    with torch.no_grad():
        dec.out.weight.mul_(20)  # peaked distributions: captions end within a few words
    return dec


@pytest.mark.parametrize("hops", [1, 2])
def test_beam_of_one_is_greedy(hops):
    dec = random_decoder(0, V, f"model.attention.hops={hops}")
    feats = torch.randn(5, L, C)
    g = greedy(dec, feats, max_len=7, start_id=1, end_id=2)
    b = beam_search(dec, feats, beam_size=1, max_len=7, start_id=1, end_id=2).best()
    assert torch.equal(g.tokens, b.tokens) and torch.equal(g.lengths, b.lengths)
    torch.testing.assert_close(g.scores, b.scores)
    torch.testing.assert_close(g.alphas, b.alphas)


@pytest.mark.parametrize("hops", [1, 2])
def test_batched_beam_equals_one_image_at_a_time(hops):
    dec = random_decoder(1, V, f"model.attention.hops={hops}")
    feats = torch.randn(4, L, C)
    batched = beam_search(dec, feats, beam_size=3, max_len=6, start_id=1, end_id=2, n_best=3, length_penalty=0.7)
    for i in range(4):
        alone = beam_search(dec, feats[i:i + 1], beam_size=3, max_len=6, start_id=1, end_id=2, n_best=3,
                            length_penalty=0.7)
        T = alone.tokens.shape[2]
        assert torch.equal(batched.tokens[i, :, :T], alone.tokens[0])
        assert (batched.tokens[i, :, T:] == 0).all()
        torch.testing.assert_close(batched.scores[i], alone.scores[0])


def brute_force_best(dec, feats, max_len, vocab_words):
    """Score every sequence of up to max_len words + <end> by teacher forcing."""
    import itertools

    best, best_seq = float("-inf"), None
    for n in range(max_len + 1):
        for words in itertools.product(vocab_words, repeat=n):
            caps = torch.tensor([[1, *words, 2]])
            logp = torch.log_softmax(dec(feats, caps).logits, -1)[0]
            score = sum(logp[t, w].item() for t, w in enumerate([*words, 2]))
            if score > best:
                best, best_seq = score, [*words, 2]
    return best, best_seq


def test_beam_finds_the_best_sequence_of_a_small_model():
    """On a 3-word vocabulary and captions of at most 2 words, a wide beam equals exhaustive search."""
    torch.manual_seed(3)
    dec = random_decoder(3, vocab=7)  # ids 4, 5, 6 are words
    with torch.no_grad():
        dec.out.weight.div_(10)  # flatter: the greedy path is not always best
    feats = torch.randn(1, L, C)
    best, seq = brute_force_best(dec, feats, 2, [4, 5, 6])
    out = beam_search(dec, feats, beam_size=7 * 7, max_len=2, start_id=1, end_id=2)
    n = int(out.lengths[0, 0])
    assert out.tokens[0, 0, : n + 1].tolist() == seq
    assert out.log_probs[0, 0].item() == pytest.approx(best, abs=1e-4)


def test_beam_scores_are_sums_of_log_probs_and_length_normalised():
    dec = random_decoder(2)
    feats = torch.randn(2, L, C)
    out = beam_search(dec, feats, beam_size=4, max_len=5, start_id=1, end_id=2, n_best=4, length_penalty=1.0)
    for i in range(2):
        for k in range(4):
            n = int(out.lengths[i, k])
            seq = out.tokens[i, k, : n + 1]
            caps = torch.cat([torch.tensor([1]), seq]).unsqueeze(0)
            logp = torch.log_softmax(dec(feats[i:i + 1], caps).logits, -1)[0]
            total = logp[torch.arange(n + 1), seq].sum()
            torch.testing.assert_close(out.log_probs[i, k], total, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(out.scores[i, k], total / (n + 1), rtol=1e-4, atol=1e-4)
        assert (out.scores[i, :-1] >= out.scores[i, 1:]).all()  # best first



@pytest.mark.parametrize("length_penalty", [0.0, 0.7, 1.5])
def test_beams_are_ranked_by_the_length_penalised_score(length_penalty):
    """Over many models: scores = log_prob / (words + 1) ** length_penalty, best first, and the single
    best caption is the top of that ranking (not of the raw log-probability)."""
    reordered = 0
    for seed in range(20):
        dec = random_decoder(100 + seed)
        feats = torch.randn(2, L, C)
        full = beam_search(dec, feats, beam_size=5, max_len=6, start_id=1, end_id=2, n_best=5,
                           length_penalty=length_penalty)
        expected = full.log_probs / (full.lengths.float() + 1) ** length_penalty
        torch.testing.assert_close(full.scores, expected)
        assert (full.scores[:, :-1] >= full.scores[:, 1:]).all(), seed
        one = beam_search(dec, feats, beam_size=5, max_len=6, start_id=1, end_id=2, length_penalty=length_penalty)
        assert torch.equal(one.tokens[:, 0], full.tokens[:, 0, : one.tokens.shape[2]]), seed
        reordered += int((full.log_probs[:, :-1] < full.log_probs[:, 1:]).any())
    if length_penalty > 0:
        assert reordered > 0  # the penalty changed the order on some model: the check above has teeth


def test_beam_stops_when_its_last_hypothesis_ends():
    """On the CPU no step runs after every hypothesis has said <end>: T is the longest one + 1."""
    out = beam_search(decoder_that_says([5, 7, 9, 4]), torch.randn(2, L, C), beam_size=2, max_len=10, start_id=1,
                      end_id=2, n_best=2)
    assert out.lengths.max() < 10 and out.tokens.shape[2] == int(out.lengths.max()) + 1
    assert out.tokens[:, 0].tolist() == [[5, 7, 9, 4, 2] + [0] * (out.tokens.shape[2] - 5)] * 2

def test_beam_edge_cases_always_return_a_caption():
    dec = decoder_that_says([], nxt={1: 5, 5: 5})  # never says <end>
    with torch.no_grad():  # <end> below the other words: not one of the ties a beam may keep at step 0
        dec.out.bias[2] = -5.0
    out = beam_search(dec, torch.randn(2, L, C), beam_size=3, max_len=4, start_id=1, end_id=2)
    assert out.tokens[:, 0, -1].tolist() == [2, 2] and out.lengths[:, 0].tolist() == [4, 4]
    tiny = random_decoder(4, vocab=5)  # 1 real word: a beam of 20 exceeds the vocabulary
    out = beam_search(tiny, torch.randn(2, L, C), beam_size=20, max_len=1, start_id=1, end_id=2, n_best=2)
    assert torch.isfinite(out.scores[:, 0]).all() and out.tokens.shape[:2] == (2, 2)
    with pytest.raises(ValueError):
        beam_search(tiny, torch.randn(1, L, C), beam_size=0, max_len=3, start_id=1, end_id=2)


def test_per_word_attention_maps_come_back():
    dec = random_decoder(5)
    out = beam_search(dec, torch.randn(3, L, C), beam_size=2, max_len=5, start_id=1, end_id=2)
    best = out.best()
    assert best.alphas.shape[:2] == best.tokens.shape and best.alphas.shape[2] == L
    real = best.tokens != 0
    torch.testing.assert_close(best.alphas.sum(-1)[real], torch.ones(int(real.sum())))


def test_every_n_best_caption_comes_back_with_the_maps_and_gates_that_wrote_it():
    """The maps of each returned caption, traced back through its parents at the end, are the
    ones the decoder draws when it reads that caption (teacher forcing), word by word; so are
    its gates and its summed log-probability."""
    dec = random_decoder(3)
    with torch.no_grad():
        dec.out.weight.div_(10)  # flatter than random_decoder's: the beams part ways and swap places
    feats = torch.randn(3, L, C)
    out = beam_search(dec, feats, beam_size=4, max_len=6, start_id=1, end_id=2, n_best=4)
    B, N, T = out.tokens.shape
    assert len({tuple(t) for t in out.tokens[0].tolist()}) == N  # four different captions of one image
    captions = torch.cat([torch.ones(B * N, 1, dtype=torch.long), out.tokens.view(B * N, T)], 1)
    lengths = out.lengths.view(-1) + 1  # the words and <end>
    forced = dec(feats.repeat_interleave(N, 0), captions, lengths=lengths)
    real = torch.arange(T) < lengths.unsqueeze(1)  # (B * N, T)
    torch.testing.assert_close(out.alphas.view(B * N, T, L)[real], forced.alphas[real], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.betas.view(B * N, T)[real], forced.betas[real], rtol=1e-5, atol=1e-6)
    assert forced.token_mask is None and forced.logits.shape == (B * N, T, V)  # eval: every step's logits
    words = torch.log_softmax(forced.logits, -1).gather(2, captions[:, 1:].unsqueeze(2)).squeeze(2)
    torch.testing.assert_close(out.log_probs.view(-1), (words * real).sum(1), rtol=1e-4, atol=1e-4)


def test_the_first_beam_step_runs_once_per_image_and_its_k_best_words_start_the_k_beams(monkeypatch):
    """At the first step an image's K beams are one hypothesis: one decoder row per image, then
    B * K; with max_len 1 (the next step forced to <end>) the K captions are the K likeliest first
    words (pad and start banned)."""
    dec = random_decoder(3)
    feats = torch.randn(3, L, C)
    rows, step = [], dec.step
    monkeypatch.setattr(dec, "step", lambda tokens, *a, **kw: rows.append(len(tokens)) or step(tokens, *a, **kw))
    out = beam_search(dec, feats, beam_size=4, max_len=1, start_id=1, end_id=2, n_best=4)
    assert rows == [3, 12]
    with torch.no_grad():
        first = step(torch.ones(3, dtype=torch.long), dec.init_state(feats), feats, dec.precompute(feats))
    logp = torch.log_softmax(first.logits, -1)
    logp[:, [0, 1]] = float("-inf")
    for b in range(3):
        assert set(out.tokens[b, :, 0].tolist()) == set(logp[b].topk(4).indices.tolist())
    torch.testing.assert_close(out.alphas[:, :, 0], first.attention.probs.unsqueeze(1).expand(3, 4, L))


@pytest.mark.skipif(not __import__("captioner.kernels").kernels.packing_available(), reason="no MKL packed GEMM")
def test_every_beam_step_multiplies_through_weights_packed_for_its_rows(monkeypatch):
    """The first step's B rows and the later steps' B * K rows each through weights packed for
    exactly those rows (an MKL pack serves the row count it was made for)."""
    from captioner import kernels

    cfg = load_config(None, ["model.attention.dim=64", "model.decoder.embed_dim=64",
                             "model.decoder.hidden_dim=64"]).model
    torch.manual_seed(0)
    dec = Decoder.from_config(cfg, vocab_size=70, feature_dim=64, grid=(2, 2)).eval()
    feats = torch.randn(3, 4, 64)
    packs, calls, real_pack, real_linear = [], [], kernels.packed_weight, torch.ops.mkl._mkl_linear
    monkeypatch.setattr(kernels, "packed_weight", lambda layer, rows: packs.append(rows) or real_pack(layer, rows))
    monkeypatch.setattr(torch.ops.mkl, "_mkl_linear", lambda x, *a: calls.append(a[-1]) or real_linear(x, *a))
    packed = beam_search(dec, feats, beam_size=4, max_len=3, start_id=1, end_id=2)
    assert set(packs) == {3, 12} and 3 in calls and 12 in calls
    monkeypatch.setattr(dec, "fused", False)  # the plain layers: the same captions
    assert torch.equal(beam_search(dec, feats, beam_size=4, max_len=3, start_id=1, end_id=2).tokens, packed.tokens)


def test_sampling_temperature_and_top_k():
    dec = random_decoder(6)
    feats = torch.randn(64, L, C)
    g = torch.Generator().manual_seed(0)
    cold = sample(dec, feats, max_len=5, start_id=1, end_id=2, temperature=1e-4, generator=g)
    assert torch.equal(cold.tokens, greedy(dec, feats, max_len=5, start_id=1, end_id=2).tokens)
    top1 = sample(dec, feats, max_len=5, start_id=1, end_id=2, top_k=1, generator=g)
    assert torch.equal(top1.tokens, cold.tokens)
    hot = sample(dec, feats, max_len=5, start_id=1, end_id=2, temperature=5.0, generator=g)
    assert not torch.equal(hot.tokens[:, 0], cold.tokens[:, 0])
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            sample(dec, feats, max_len=5, start_id=1, end_id=2, temperature=bad)


@pytest.mark.parametrize("top_k", [2, 3])
def test_top_k_samples_only_the_k_most_likely_words(top_k):
    """Each first word is one of the k most likely first words of its image, and more than one
    of them comes up."""
    dec = random_decoder(6)
    with torch.no_grad():
        dec.out.weight.div_(20)  # flat: without the cut, unlikely words would come up too
    feats = torch.randn(8, L, C).repeat(32, 1, 1)  # each image 32 times
    g = torch.Generator().manual_seed(0)
    out = sample(dec, feats, max_len=1, start_id=1, end_id=2, top_k=top_k, temperature=2.0, generator=g)
    first = dec.step(torch.ones(len(feats), dtype=torch.long), dec.init_state(feats), feats, dec.precompute(feats))
    logits = first.logits.clone()
    logits[:, [0, 1]] = float("-inf")  # <pad> and <start> are never emitted
    allowed = logits.topk(top_k, dim=-1).indices  # (N, k)
    assert (allowed == out.tokens[:, :1]).any(1).all()
    assert len(set(out.tokens[:, 0].tolist())) > top_k  # many images: the cut is per image
    few = feats[:3]
    wide = sample(dec, few, max_len=4, start_id=1, end_id=2, top_k=V + 5, generator=torch.Generator().manual_seed(1))
    uncut = sample(dec, few, max_len=4, start_id=1, end_id=2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(wide.tokens, uncut.tokens)  # k beyond the vocabulary: no cut


def test_checking_for_the_end_less_often_changes_nothing(monkeypatch):
    """On a GPU the loops look for 'all ended' every 8 steps (a host sync each time): the
    captions, lengths and scores are the same as checking every step."""
    import captioner.decoding as decoding

    dec = random_decoder(7)
    feats = torch.randn(4, L, C)
    every_step = beam_search(dec, feats, beam_size=3, max_len=9, start_id=1, end_id=2).best()
    g1 = greedy(dec, feats, max_len=9, start_id=1, end_id=2)
    monkeypatch.setattr(decoding, "_sync_every", lambda device: 8)
    sparse = beam_search(dec, feats, beam_size=3, max_len=9, start_id=1, end_id=2).best()
    g8 = greedy(dec, feats, max_len=9, start_id=1, end_id=2)
    for a, b in ((every_step, sparse), (g1, g8)):
        T = a.tokens.shape[1]
        assert torch.equal(a.tokens, b.tokens[:, :T]) and (b.tokens[:, T:] == 0).all()
        assert torch.equal(a.lengths, b.lengths)
        torch.testing.assert_close(a.scores, b.scores)


# ----------------------------------------------------------------------------- no_repeat_ngram

from captioner.decoding import block_repeats  # noqa: E402


def repeats(words, n):
    """Whether ``words`` holds some n-gram twice."""
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) < len(grams)


def test_block_repeats_bans_exactly_the_words_that_complete_a_repeated_ngram():
    torch.manual_seed(0)
    logp = torch.randn(3, V)
    tokens = torch.tensor([[5, 6, 7, 1, 5, 6],   # (5, 6) came before, then 7: 7 only
                           [5, 6, 7, 5, 6, 8],   # both 7 and 8 followed (5, 6)... but the prefix is (6, 8)
                           [5, 6, 9, 6, 9, 5]])  # (9, 5) never came before
    banned = {0: {7}, 1: set(), 2: set()}
    for n, expect in ((3, banned), (2, {0: {7}, 1: set(), 2: {6}}),
                      (1, {0: {1, 5, 6, 7}, 1: {5, 6, 7, 8}, 2: {5, 6, 9}})):
        out = block_repeats(logp.clone(), tokens, n)
        for r in range(3):
            inf = {int(w) for w in torch.nonzero(torch.isinf(out[r])).flatten()}
            assert inf == expect[r], (n, r)
            keep = ~torch.isinf(out[r])
            assert torch.equal(out[r][keep], logp[r][keep])  # every other word untouched, bit for bit
    # two earlier (5, 6): both continuations banned; a word banned by one window and free by another stays banned
    out = block_repeats(logp[:1].clone(), torch.tensor([[5, 6, 7, 5, 6, 8, 7, 5, 6]]), 3)
    assert {int(w) for w in torch.nonzero(torch.isinf(out[0])).flatten()} == {7, 8}
    out = block_repeats(logp[:1].clone(), torch.tensor([[5, 6, 9, 6, 9, 5, 6]]), 3)  # (6, 9, 6): 6 free there
    assert {int(w) for w in torch.nonzero(torch.isinf(out[0])).flatten()} == {9}
    for n, tok in ((0, tokens), (3, tokens[:, :2]), (4, tokens[:, :3])):  # off, or too short to repeat
        assert torch.equal(block_repeats(logp.clone(), tok, n), logp)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_greedy_with_no_repeat_ngram_never_repeats_and_otherwise_follows_the_model(n):
    dec = decoder_that_says([], nxt={1: 5, 5: 6, 6: 5})  # 5 6 5 6 5 6 ... until max_len
    feats = torch.randn(2, L, C)
    free = greedy(dec, feats, max_len=9, start_id=1, end_id=2)
    assert free.tokens[0, :9].tolist() == [5, 6] * 4 + [5]
    out = greedy(dec, feats, max_len=9, start_id=1, end_id=2, no_repeat_ngram=n)
    for i in range(2):
        words = out.tokens[i, : int(out.lengths[i])].tolist()
        assert not repeats(words, n)
        assert words[:n + 1] == free.tokens[i, : n + 1].tolist()[: len(words[:n + 1])]  # the same until a repeat
    # on a random model: the captions are the unblocked ones up to the first step that would repeat
    dec = random_decoder(4)
    with torch.no_grad():
        dec.out.weight.div_(20)  # flat: long captions that repeat themselves
    feats = torch.randn(16, L, C)
    free = greedy(dec, feats, max_len=12, start_id=1, end_id=2)
    out = greedy(dec, feats, max_len=12, start_id=1, end_id=2, no_repeat_ngram=n)
    changed = 0
    for i in range(16):
        a = free.tokens[i, : int(free.lengths[i])].tolist()
        b = out.tokens[i, : int(out.lengths[i])].tolist()
        assert not repeats(b, n)
        first = next((t for t in range(n, len(a) + 1) if repeats(a[:t], n)), None)
        if first is None:
            assert a == b
        else:
            changed += 1
            assert b[:first - 1] == a[:first - 1] and b[first - 1] != a[first - 1]
    assert changed > 0


@pytest.mark.parametrize("n", [2, 3])
def test_beam_with_no_repeat_ngram_never_repeats(n):
    dec = random_decoder(5)
    with torch.no_grad():
        dec.out.weight.div_(20)
    feats = torch.randn(6, L, C)
    free = beam_search(dec, feats, beam_size=3, max_len=12, start_id=1, end_id=2, n_best=3)
    assert any(repeats(free.tokens[i, k, : int(free.lengths[i, k])].tolist(), n) for i in range(6) for k in range(3))
    out = beam_search(dec, feats, beam_size=3, max_len=12, start_id=1, end_id=2, n_best=3, no_repeat_ngram=n)
    for i in range(6):
        for k in range(3):
            assert not repeats(out.tokens[i, k, : int(out.lengths[i, k])].tolist(), n)
    one = beam_search(dec, feats, beam_size=1, max_len=12, start_id=1, end_id=2, no_repeat_ngram=n).best()
    g = greedy(dec, feats, max_len=12, start_id=1, end_id=2, no_repeat_ngram=n)
    assert torch.equal(one.tokens, g.tokens) and torch.equal(one.lengths, g.lengths)
    torch.testing.assert_close(one.scores, g.scores)


def test_no_repeat_ngram_is_checked_in_the_config():
    from captioner.errors import ConfigError

    assert load_config(None, []).decode.no_repeat_ngram == 0  # off unless a config asks
    assert load_config("configs/shapes_soft.yaml", []).decode.no_repeat_ngram == 3
    with pytest.raises(ConfigError, match="no_repeat_ngram"):
        load_config(None, ["decode.no_repeat_ngram=-1"])


# -- the fused beam step (captioner.native) against its plain expression

from captioner import native  # noqa: E402
from captioner.decoding import _best_continuations, _best_continuations_fused  # noqa: E402

needs_c = pytest.mark.skipif(native.library() is None, reason="no C compiler: the plain path runs")


def _beam_case(seed, B=3, K=4, V=50, finished_rows=(1, 6), dead_beams=((0, 3), (2, 1))):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B * K, V, generator=g) * 4
    beam_logp = -torch.rand(B, K, generator=g) * 5
    for b, k in dead_beams:
        beam_logp[b, k] = float("-inf")  # an empty beam (the first step, a beam wider than the vocabulary)
    finished = torch.zeros(B * K, dtype=torch.bool)
    finished[list(finished_rows)] = True
    tokens = torch.randint(3, V, (B * K, 6), generator=g)
    return logits, beam_logp, finished, tokens


@needs_c
@pytest.mark.parametrize("force_end", [False, True])
@pytest.mark.parametrize("no_repeat_ngram", [0, 2])
def test_fused_beam_step_is_the_plain_one(force_end, no_repeat_ngram):
    """The same K best continuations (scores to rounding, the same indices) with finished
    hypotheses, empty beams, the forced <end> and blocked n-grams; the logits' bans land in place."""
    for seed in range(5):
        logits, beam_logp, finished, tokens = _beam_case(seed)
        kw = dict(pad_id=0, start_id=1, end_id=2, force_end=force_end, no_repeat_ngram=no_repeat_ngram)
        top, idx = _best_continuations(logits.clone(), beam_logp, finished, tokens, **kw)
        ftop, fidx = _best_continuations_fused(logits.clone(), beam_logp, finished, tokens, **kw)
        finite = torch.isfinite(top)
        assert torch.equal(finite, torch.isfinite(ftop))
        torch.testing.assert_close(ftop[finite], top[finite], rtol=0, atol=1e-5)
        assert torch.equal(fidx[finite], idx[finite]), seed
        assert (ftop[:, :-1] >= ftop[:, 1:]).all()  # best first
    # finished rows continue with <pad> (index k * V + 0) at their own score
    assert 1 * 50 in fidx[0].tolist() and ftop[0][fidx[0] == 50].item() == beam_logp[0, 1].item()


@needs_c
def test_fused_beam_step_ranks_equal_scores_lower_index_first_and_fills_every_slot():
    logits = torch.zeros(2, 6)  # every word equally likely
    beam_logp = torch.tensor([[0.0, float("-inf")]])  # the second beam empty: only -inf beside the first's words
    top, idx = _best_continuations_fused(logits, beam_logp, torch.zeros(2, dtype=torch.bool), torch.zeros(2, 0),
                                         pad_id=0, start_id=1, end_id=2, force_end=False, no_repeat_ngram=0)
    assert idx.tolist() == [[2, 3]] and torch.allclose(top, torch.full((1, 2), -torch.log(torch.tensor(6.0))))
    top, idx = _best_continuations_fused(torch.zeros(2, 3), torch.tensor([[0.0, float("-inf")]]),
                                         torch.zeros(2, dtype=torch.bool), torch.zeros(2, 0), pad_id=0, start_id=1,
                                         end_id=2, force_end=True, no_repeat_ngram=0)
    assert idx.tolist() == [[2, 0]] and top[0, 1] == float("-inf")  # one finite continuation; the slot is filled


@needs_c
@pytest.mark.parametrize("K", [1, 3, 12])
def test_beam_search_fused_and_plain_give_the_same_captions(K):
    for seed in range(4):
        dec = random_decoder(seed, 11)
        feats = torch.randn(3, L, C)
        kw = dict(beam_size=K, max_len=7, start_id=1, end_id=2, n_best=min(K, 2), no_repeat_ngram=2 * (seed % 2))
        fused = beam_search(dec, feats, **kw)
        dec.fused = False
        plain = beam_search(dec, feats, **kw)
        assert torch.equal(fused.tokens, plain.tokens) and torch.equal(fused.lengths, plain.lengths), seed
        torch.testing.assert_close(fused.scores, plain.scores)
