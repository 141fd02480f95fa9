"""tools/layout_probe.py: the layout objective alone, scored on held-out objects."""

import pytest
import torch

from captioner.data import instances_file
from captioner.layout import layout_targets
from captioner.model import Captioner
from captioner.train import Trainer


@pytest.fixture(scope="module")
def probe(tool):
    return tool("layout_probe")


def layout_model(tiny_config):
    cfg = tiny_config("train.layout_weight=1", "model.encoder.context_layers=1", "model.encoder.context_output=append",
                      "model.encoder.context_content=false")
    trainer = Trainer(cfg, quiet=True)
    trainer.setup()
    return cfg, trainer


def test_score_counts_targets_and_whole_objects(probe, tiny_config):
    cfg, trainer = layout_model(tiny_config)
    model = trainer.model
    cells = model.encoder.num_locations
    weights = torch.zeros(2, cells)
    weights[0, 0] = weights[1, 5] = 1.0
    layouts = [(weights, torch.tensor([[1.0, 0, 0, 0], [1.0, 1.0, 0, 0]]))]
    with torch.no_grad():
        model.layout.linear.weight.zero_()
        model.layout.linear.bias.copy_(torch.tensor([2.0, -2.0, -2.0, -2.0]))  # says "left" only, for every object
    loss, bits, objects = probe.score(model, trainer.val_feats[:1], layouts)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor([[2.0, -2, -2, -2]] * 2), layouts[0][1]).item()
    assert loss == pytest.approx(expected) and bits == pytest.approx(7 / 8) and objects == pytest.approx(1 / 2)


def test_the_probe_trains_the_grid_and_the_read_out_only_and_learns(probe, tiny_config):
    cfg, trainer = layout_model(tiny_config)
    encoder = trainer.model.encoder
    val = layout_targets(trainer.val_records, instances_file(cfg.data, "val"), grid=encoder.grid,
                         origin=encoder.cell_origin)
    torch.manual_seed(0)
    model = Captioner.from_config(cfg, trainer.vocab, load_weights=False)
    names = {id(p): n for n, p in model.named_parameters()}
    trained = {names[id(p)].split(".")[0] for p in probe.geometry_parameters(model)}
    assert {"context", "layout"} <= trained and not trained & {"encoder", "decoder"}
    decoder = {n: p.detach().clone() for n, p in model.decoder.named_parameters()}
    rows = probe.train_probe(model, trainer.train_feats, trainer.layouts, trainer.train_feats, trainer.layouts,
                             steps=[1, 60], batch=16, lr=1e-2)
    assert [r[0] for r in rows] == [1, 60] and rows[1][1] < rows[0][1]  # the training images' loss falls
    assert all(0 <= r[2] <= 1 and 0 <= r[3] <= r[2] for r in rows)
    assert all(torch.equal(p, decoder[n]) for n, p in model.decoder.named_parameters())  # the decoder is untouched
    assert probe.score(model, trainer.val_feats, val)[0] > 0
