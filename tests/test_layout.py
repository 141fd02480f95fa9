"""Layout supervision: each object's targets from the instances, the read-out's loss, and its
place in training (train.layout_weight)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from captioner.chair import ground_object, relation_holds
from captioner.config import load_config
from captioner.correctness import Region, load_regions
from captioner.encoder import LayoutHead
from captioner.errors import ConfigError, DataError
from captioner.grounding import region_target
from captioner.layout import DIRECTIONS, layout_targets, object_layout
from captioner.model import Captioner
from captioner.train import fit


def _region(object_id: int, rows: slice, cols: slice, size: int = 32) -> Region:
    mask = np.zeros((size, size), dtype=bool)
    mask[rows, cols] = True
    return Region(object_id, "square", {}, mask)


def test_object_layout_says_on_which_sides_of_others_each_object_lies():
    a = _region(1, slice(12, 18), slice(0, 6))  # middle left
    b = _region(2, slice(12, 18), slice(24, 30))  # middle right: far along x
    c = _region(3, slice(0, 6), slice(22, 30))  # top right, above b
    layout = object_layout([a, b, c])
    assert DIRECTIONS == ("left", "right", "above", "below")
    assert layout.tolist() == [[1.0, 0.0, 0.0, 0.0],  # a: left of b and of c (x dominates both)
                               [0.0, 1.0, 0.0, 1.0],  # b: right of a, below c
                               [0.0, 1.0, 1.0, 0.0]]  # c: right of a, above b
    assert object_layout([a]).tolist() == [[0.0, 0.0, 0.0, 0.0]]  # alone: on no side of anything
    assert object_layout([]).shape == (0, 4)


def test_a_margin_leaves_pairs_near_a_diagonal_on_no_side():
    a = _region(1, slice(0, 4), slice(0, 4))  # top left, centre (2, 2)
    near = _region(2, slice(10, 14), slice(11, 15))  # dx 11, dy 10: x dominates by 1.1
    clear = _region(3, slice(20, 24), slice(8, 12))  # dx 8, dy 20 from a: y dominates by 2.5
    assert object_layout([a, near]).tolist() == [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]
    assert object_layout([a, near], margin=1.2).tolist() == [[0.0] * 4, [0.0] * 4]  # near the diagonal: neither
    assert object_layout([a, near], margin=1.1).tolist() == [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]
    assert object_layout([a, clear], margin=1.2).tolist() == object_layout([a, clear]).tolist() \
        == [[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]


def test_layout_margin_below_one_is_a_config_error():
    with pytest.raises(ConfigError, match="layout_margin"):
        load_config(None, ["train.layout_margin=0.8"])


def test_object_layout_is_the_relation_words_meaning_on_real_instances(shapes_root):
    instances = shapes_root / "annotations" / "instances_train.json"
    checked = 0
    for regions in load_regions(instances).values():
        layout = object_layout(regions)
        objects = [ground_object(r) for r in regions]
        for k, a in enumerate(objects):
            for d, direction in enumerate(DIRECTIONS):
                expected = any(relation_holds(direction, a, b) for b in objects if b is not a)
                assert bool(layout[k, d]) == expected
                checked += 1
    assert checked >= 40


def test_layout_targets_pool_each_object_over_its_footprint(shapes_root):
    from captioner.data import load_split

    cfg = load_config(None, ["data.format=shapes", f"data.root={shapes_root}", "data.shapes.n=40",
                             "data.shapes.image_size=64"])
    records = load_split(cfg.data, "train")
    instances = shapes_root / "annotations" / "instances_train.json"
    targets = layout_targets(records, instances, grid=(4, 4), origin=(0.5, 0.5))
    regions = load_regions(instances)
    assert len(targets) == len(records)
    for record, (weights, bits) in zip(records, targets):
        own = regions[record.image_id]
        assert weights.shape == (len(own), 16) and bits.shape == (len(own), 4)
        torch.testing.assert_close(weights.sum(1), torch.ones(len(own)))
        for k, region in enumerate(own):
            torch.testing.assert_close(weights[k], region_target(region.mask, (4, 4)))
        torch.testing.assert_close(bits, object_layout(own))
    margined = layout_targets(records, instances, grid=(4, 4), origin=(0.5, 0.5), margin=3.0)
    assert [torch.equal(b, object_layout(regions[r.image_id], 3.0)) for r, (_, b) in zip(records, margined)] == \
        [True] * len(records)
    assert sum(int(b.sum()) for _, b in margined) < sum(int(b.sum()) for _, b in targets)  # some pairs are near a diagonal


def test_layout_head_loss_is_the_binary_cross_entropy_of_the_pooled_vectors():
    head = LayoutHead(3)
    with torch.no_grad():
        head.linear.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]]))
        head.linear.bias.zero_()
    feats = torch.tensor([[[2.0, 0, 0], [0, 2, 0]], [[0, 0, 4.0], [0, 0, 0]]], requires_grad=True)  # (B=2, L=2, C=3)
    layouts = [(torch.tensor([[0.5, 0.5], [1.0, 0.0]]), torch.tensor([[1.0, 0, 0, 1], [0, 0, 1, 0]])),
               (torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 1, 1, 1]]))]
    loss = head.loss(feats, layouts)
    # pooled: image 0 object 0 = (1, 1, 0), object 1 = (2, 0, 0); image 1 object 0 = (0, 0, 0)
    logits = torch.tensor([[1.0, 1, 0, 2], [2, 0, 0, 2], [0, 0, 0, 0]])
    targets = torch.tensor([[1.0, 0, 0, 1], [0, 0, 1, 0], [1, 1, 1, 1]])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6)
    loss.backward()
    assert feats.grad[0].abs().sum() > 0 and feats.grad[1, 0].abs().sum() == 0  # image 1's object is cell 1 only
    assert feats.grad[1, 1].abs().sum() > 0
    empty = head.loss(feats.detach().requires_grad_(), [(torch.zeros(0, 2), torch.zeros(0, 4))] * 2)
    assert float(empty.detach()) == 0.0 and empty.requires_grad  # a batch of images without objects adds nothing


def test_layout_head_pools_each_rows_own_objects_with_rows_of_none_between():
    torch.manual_seed(0)
    head = LayoutHead(5)
    feats = torch.randn(4, 6, 5, requires_grad=True)
    counts = [2, 0, 3, 1]  # row 1 has no objects: the padded rows must not shift the others
    layouts = [(torch.rand(k, 6), torch.randint(0, 2, (k, 4)).float()) for k in counts]
    loss = head.loss(feats, layouts)
    loss.backward()
    reference = feats.detach().clone().requires_grad_()
    pooled = torch.cat([w @ reference[b] for b, (w, _) in enumerate(layouts)])  # object by object, by hand
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        head.linear(pooled), torch.cat([t for _, t in layouts]))
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(feats.grad, reference.grad)
    assert feats.grad[1].abs().sum() == 0  # no objects: no gradient


def test_layout_weight_needs_instances_cross_entropy_and_no_flip(tiny_config, monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="layout_weight must be >= 0"):
        load_config(None, ["train.layout_weight=-1"])
    with pytest.raises(ConfigError, match="layout_weight.*flip=none"):
        load_config(None, ["train.layout_weight=1", "train.flip=horizontal"])
    with pytest.raises(ConfigError, match="layout_weight.*objective=scst"):
        load_config(None, ["train.layout_weight=1", "train.objective=scst"])
    monkeypatch.setattr("captioner.train.instances_file", lambda data, split: tmp_path / "missing.json")
    with pytest.raises(DataError, match="missing.json"):  # a named instances file that is not there
        fit(tiny_config("train.layout_weight=1"), quiet=True)
    monkeypatch.setattr("captioner.train.instances_file", lambda data, split: None)  # captions without instances
    with pytest.raises(ConfigError, match="layout_weight=1 needs a COCO instances file for the train split"):
        fit(tiny_config("train.layout_weight=1"), quiet=True)


def test_training_with_layout_supervision_logs_and_lowers_the_layout_loss(tiny_config):
    cfg = tiny_config("train.epochs=3", "train.layout_weight=2", "model.encoder.context_layers=1",
                      "model.encoder.context_output=append", "model.encoder.context_content=false")
    result = fit(cfg, quiet=True)
    layout = [e["train_layout"] for e in result.history]
    assert len(layout) == 3 and all(v > 0 for v in layout)
    assert layout[-1] < layout[0]  # the read-out and the context learn the layout
    steps = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [e["layout"] for e in steps if "loss" in e]
    assert logged and all(0 < v <= e["loss"] for v, e in zip(logged, (e for e in steps if "loss" in e)))
    model = Captioner.from_checkpoint(result.run_dir / "best.pt")  # the read-out is saved and loads back
    assert model.context.channels == 8 and model.layout.linear.in_features == 64 + 8  # layer1's C + 4 heads' where
    plain = fit(tiny_config("train.epochs=1"), quiet=True)
    assert "train_layout" not in plain.history[0] and Captioner.from_checkpoint(plain.run_dir / "best.pt").layout is None


@pytest.mark.parametrize("per_image", [False, True])
def test_each_row_of_features_gets_its_own_images_objects(tiny_config, monkeypatch, per_image):
    import captioner.train

    made, seen = {}, []
    real_targets, real_loss = captioner.train.layout_targets, LayoutHead.loss

    def keep(*args, **kwargs):
        made["targets"], made["margin"] = real_targets(*args, **kwargs), kwargs.get("margin")
        return made["targets"]

    def spy(self, feats, layouts):
        seen.append((feats.shape[0], layouts))
        return real_loss(self, feats, layouts)

    monkeypatch.setattr(captioner.train, "layout_targets", keep)
    monkeypatch.setattr(LayoutHead, "loss", spy)
    mode = ["train.cache_features=false", "train.captions_per_image=2"] if per_image else []
    fit(tiny_config("train.epochs=1", "train.layout_weight=1", "train.layout_margin=1.5", *mode), quiet=True)
    assert made["margin"] == 1.5  # the trainer's targets use train.layout_margin
    assert seen and all(rows == len(layouts) for rows, layouts in seen)  # one image's objects per row of features
    got = sorted(id(weights) for _, layouts in seen for weights, _ in layouts)
    from captioner.data import load_split

    records = load_split(tiny_config().data, "train")
    # an epoch: every image once (rows are images), or once per caption (rows are captions)
    counts = [1 if per_image else len(r.captions) for r in records]
    assert got == sorted(id(weights) for (weights, _), n in zip(made["targets"], counts) for _ in range(n))
