"""Supervised attention: per-word targets from grounding, their delivery in batches, the loss term."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from captioner.config import load_config
from captioner.correctness import load_regions
from captioner.data import load_split
from captioner.data.dataset import (
    CaptionDataset,
    ImageCaptionsDataset,
    choose_captions,
    collate_captions,
    collate_image_captions,
)
from captioner.data.shapes import generate_shapes
from captioner.errors import ConfigError
from captioner.grounding import attention_targets, region_target, target_matrix, training_targets
from captioner.losses import CaptionLoss
from captioner.supervised_attention import attention_supervision_loss
from captioner.vocab import Vocabulary, tokenize

SHAPES = ["data.format=shapes", "data.shapes.n=30", "data.shapes.seed=2", "data.shapes.image_size=64"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, n=30, seed=2, image_size=64)
    data = load_config(None, SHAPES + [f"data.root={root}"]).data
    return root, data, load_split(data, "train")


# ----------------------------------------------------------------------------- targets

def test_region_target_is_the_cells_footprint_share():
    mask = np.zeros((16, 16), dtype=bool)
    mask[:8, 8:] = True  # the top-right quadrant of a 2 x 2 grid
    target = region_target(mask, (2, 2))
    assert target.shape == (4,) and float(target.sum()) == pytest.approx(1.0)
    assert target.argmax() == 1 and float(target[1]) > 0.5 and float(target[2]) < float(target[0])
    # origin at the corner: cell (0, 1)'s weight sits at pixel (0, 8): its footprint is pixels 0..7, 0..15
    corner = region_target(mask, (2, 2), origin=(0.0, 0.0))
    assert not torch.allclose(corner, target)
    assert float(region_target(np.zeros((16, 16), dtype=bool), (2, 2)).sum()) == 0.0


def test_strong_targets_follow_the_per_word_grounding(shapes):
    root, _, records = shapes
    targets = attention_targets(records, root / "annotations" / "instances_train.json", mode="strong", grid=(8, 8))
    regions = load_regions(root / "annotations" / "instances_train.json")
    checked = 0
    for record, per_caption in zip(records, targets):
        by_id = {r.object_id: r for r in regions[record.image_id]}
        assert len(per_caption) == len(record.captions)
        for caption, per_word in zip(record.captions, per_caption):
            assert sorted(per_word) == sorted(w for w, _ in caption.grounding)
            for word, object_id in caption.grounding:
                target = per_word[word].view(8, 8)
                r, c = divmod(int(target.argmax()), 8)
                rows, cols = np.nonzero(by_id[object_id].mask)  # 64 px image: a cell is 8 x 8 px
                assert rows.min() // 8 - 1 <= r <= rows.max() // 8 + 1 and cols.min() // 8 - 1 <= c <= cols.max() // 8 + 1
                assert float(target.sum()) == pytest.approx(1.0)
                checked += 1
    assert checked > 50


def test_weak_targets_name_categories_only(shapes):
    root, _, records = shapes
    targets = attention_targets(records, root / "annotations" / "instances_train.json", mode="weak", grid=(8, 8))
    for record, per_caption in zip(records, targets):
        for caption, per_word in zip(record.captions, per_caption):
            words = tokenize(caption.text)
            assert all(words[t] in ("circle", "square", "triangle", "diamond") for t in per_word)
            shape_words = {t for t, w in enumerate(words) if w in ("circle", "square", "triangle", "diamond")}
            grounded_shapes = {t for t, _ in caption.grounding} & shape_words
            assert grounded_shapes <= set(per_word)  # every shape the caption names is in the image


def test_training_targets_follow_the_config(shapes, tmp_path, write_json):
    root, data, records = shapes
    cfg = load_config(None, [*SHAPES, f"data.root={root}"])
    assert training_targets(cfg, records, grid=(8, 8)) is None  # off by default
    cfg = load_config(None, [*SHAPES, f"data.root={root}", "train.attention_supervision=strong"])
    assert len(training_targets(cfg, records, grid=(8, 8))) == len(records)
    with pytest.raises(ConfigError, match="attention_supervision"):
        load_config(None, ["train.attention_supervision=strongest"])
    folder = load_config(None, ["data.format=folder", f"data.root={tmp_path}", "data.train.captions=c.json",
                                "train.attention_supervision=weak"])
    with pytest.raises(ConfigError, match="instances file"):
        training_targets(folder, records, grid=(8, 8))
    ungrounded = [type(r)(r.image_id, r.path, tuple(type(c)(c.text) for c in r.captions), r.split) for r in records]
    strong = load_config(None, [*SHAPES, f"data.root={root}", "train.attention_supervision=strong"])
    with pytest.raises(ConfigError, match="use weak"):
        training_targets(strong, ungrounded, grid=(8, 8))


# ----------------------------------------------------------------------------- batches

def test_batches_carry_each_words_target_at_its_step(shapes):
    root, _, records = shapes
    records = records[:6]
    targets = attention_targets(records, root / "annotations" / "instances_train.json", mode="strong", grid=(4, 4))
    vocab = Vocabulary.build((c.text for r in records for c in r.captions), min_count=1)
    per_caption = CaptionDataset(records, vocab, max_len=20, attention_targets=targets)
    items = [per_caption[k] for k in range(len(per_caption))]
    batch = collate_captions(items)
    assert batch.attention_targets.shape == (len(items), batch.captions.shape[1] - 1, 16)
    flat = [(i, j) for i, r in enumerate(records) for j in range(len(r.captions))]
    order = sorted(range(len(items)), key=lambda k: -len(items[k][1]))  # the batch's rows: longest caption first
    assert batch.index.tolist() == [items[k][0] for k in order]
    for b, (i, j) in enumerate(flat[k] for k in order):
        for t in range(batch.captions.shape[1] - 1):
            expected = targets[i][j].get(t, torch.zeros(16))
            torch.testing.assert_close(batch.attention_targets[b, t], expected)
    assert collate_captions([(0, [1, 2], None)]).attention_targets is None  # a data set without targets
    per_image = ImageCaptionsDataset(records, vocab, max_len=20, captions_per_image=2, attention_targets=targets)
    batch = collate_image_captions([per_image[k] for k in range(len(per_image))])
    assert batch.attention_targets.shape[0] == batch.captions.shape[0] == 2 * len(records)
    chosen = choose_captions(len(records[0].captions), 2, seed=0, epoch=0, index=0)
    for t, target in targets[0][chosen[0]].items():
        torch.testing.assert_close(batch.attention_targets[0, t], target)
    assert batch.to("cpu").attention_targets is not None


def test_target_matrix_drops_words_beyond_the_steps():
    m = target_matrix([{0: torch.ones(3) / 3, 5: torch.ones(3)}], steps=4, locations=3)
    assert m.shape == (1, 4, 3) and float(m[0, 0].sum()) == pytest.approx(1.0) and float(m.sum()) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- loss

def test_loss_is_the_cross_entropy_to_the_targets():
    alphas = torch.tensor([[[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3], [0.1, 0.1, 0.8]]])  # (1, 3, 3)
    targets = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.5, 0.5]]])  # step 1: no target
    mask = torch.tensor([[1.0, 1.0, 1.0]])
    expected = -math.log(0.5) - 0.5 * math.log(0.1) - 0.5 * math.log(0.8)
    assert float(attention_supervision_loss(alphas, targets, mask)) == pytest.approx(expected, rel=1e-5)
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # a padded step counts nothing
    assert float(attention_supervision_loss(alphas, targets, mask)) == pytest.approx(-math.log(0.5), rel=1e-5)


def test_caption_loss_adds_the_weighted_term_and_its_gradient():
    from captioner.decoder import DecoderOutput

    torch.manual_seed(0)
    B, T, L, V = 2, 3, 4, 5
    scores = torch.randn(B, T, L, requires_grad=True)
    alphas = scores.softmax(-1)
    out = DecoderOutput(logits=torch.randn(B, T, V), alphas=alphas, betas=torch.ones(B, T))
    words, mask = torch.randint(0, V, (B, T)), torch.ones(B, T, dtype=torch.bool)
    targets = torch.zeros(B, T, L)
    targets[0, 1, 2] = 1.0
    plain = CaptionLoss(alpha_c=0.0)(out, words, mask)
    assert plain.attention is None
    loss = CaptionLoss(alpha_c=0.0, attention_weight=2.0)(out, words, mask, attention_targets=targets)
    expected = 2.0 * -math.log(float(alphas[0, 1, 2].detach())) / (B * T)
    assert float(loss.attention) == pytest.approx(expected, rel=1e-5)
    assert float((loss.total - plain.total).detach()) == pytest.approx(expected, rel=1e-5)
    loss.total.backward()
    assert scores.grad[0, 1, 2] < 0 and scores.grad[1].abs().sum() == 0  # pulls the target cell up, nothing else
