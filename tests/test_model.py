"""Captioner.forward: an image with several captions is encoded once and its features
repeated by ``image_index``, with the same values and gradients as encoding it per caption."""

import pytest
import torch

from captioner.config import load_config
from captioner.model import Captioner
from captioner.vocab import Vocabulary


def tiny_model(*overrides: str) -> Captioner:
    cfg = load_config(None, [
        "model.encoder.backbone=resnet18", "model.encoder.weights=null", "model.encoder.layer=layer1",
        "model.encoder.image_size=32", "model.encoder.positional=true", "model.encoder.fine_tune=1",
        "model.attention.dim=8", "model.decoder.embed_dim=8", "model.decoder.hidden_dim=12",
        "model.decoder.dropout=0.0", *overrides])
    torch.manual_seed(0)
    return Captioner.from_config(cfg, Vocabulary(["a", "red", "blue", "circle", "square"]), load_weights=False)


def loss_and_grads(model: Captioner, captions: torch.Tensor, **inputs) -> tuple:
    """A fixed random weighting of the logits (so that every caption's share differs) and its gradients."""
    model.zero_grad(set_to_none=True)
    out = model(captions, **inputs)
    weights = torch.randn(out.logits.shape, generator=torch.Generator().manual_seed(0))  # the same for both calls
    (out.logits * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("mode, image_index", [
    ("eval", [0, 0, 1, 2, 2, 2]),  # uneven: BatchNorm uses its running statistics
    ("train", [0, 0, 1, 1, 2, 2]),  # even: the batch statistics of U images equal those of them repeated
])
def test_image_index_equals_repeated_images(mode, image_index):
    model = tiny_model()
    model.train(mode == "train")
    image_index = torch.tensor(image_index)
    images = torch.randn(3, 3, 32, 32)
    captions = torch.randint(4, len(model.vocab), (len(image_index), 6))

    indexed, grads_indexed = loss_and_grads(model, captions, images=images, image_index=image_index)
    repeated, grads_repeated = loss_and_grads(model, captions, images=images[image_index])

    torch.testing.assert_close(indexed.logits, repeated.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(indexed.alphas, repeated.alphas, rtol=1e-4, atol=1e-5)
    tuned = {n for n, p in model.encoder.named_parameters(prefix="encoder") if p.requires_grad}
    assert tuned and tuned <= set(grads_indexed)  # the gradient reaches the fine-tuned encoder
    assert all(grads_indexed[n].abs().sum() > 0 for n in tuned)
    assert set(grads_indexed) == set(grads_repeated)
    for name in grads_indexed:
        torch.testing.assert_close(grads_indexed[name], grads_repeated[name], rtol=1e-3, atol=1e-5, msg=name)


def test_image_index_on_cached_features():
    model = tiny_model("model.encoder.fine_tune=0").eval()
    raw = torch.randn(2, model.encoder.num_locations, model.encoder.feature_dim)
    captions = torch.randint(4, len(model.vocab), (3, 5))
    image_index = torch.tensor([1, 0, 1])
    a = model(captions, raw_features=raw, image_index=image_index)
    b = model(captions, raw_features=raw[image_index])
    torch.testing.assert_close(a.logits, b.logits)
    assert a.logits.shape[0] == 3


def test_feature_head_sits_between_the_cached_features_and_the_decoder():
    model = tiny_model("model.encoder.fine_tune=0", "model.encoder.head_layers=2", "model.encoder.head_dim=10")
    assert model.encoder.feature_dim == 64 and model.decoder.init_h.in_features == 10
    assert model.position.rows.shape[-1] == 10
    raw = torch.randn(2, model.encoder.num_locations, model.encoder.feature_dim)
    feats = model.features(raw)
    assert feats.shape == (2, model.encoder.num_locations, 10)
    torch.testing.assert_close(feats, model.position(model.head(raw)))
    captions = torch.randint(4, len(model.vocab), (3, 5))
    out, grads = loss_and_grads(model, captions, raw_features=raw, image_index=torch.tensor([1, 0, 1]))
    head = {n for n, _ in model.named_parameters() if n.startswith("head.")}
    assert len(head) == 10 and head <= set(grads)  # the head trains (its 3x3 convolutions once the 1x1 leave zero)
    assert all(grads[n].abs().sum() > 0 for n in head if n.startswith(("head.project", "head.blocks.0.2", "head.blocks.1.2")))
    assert not any(n.startswith("encoder.") for n in grads)  # the backbone stays frozen

    again = tiny_model("model.encoder.fine_tune=0", "model.encoder.head_layers=2", "model.encoder.head_dim=10")
    torch.manual_seed(1)
    for p in again.head.parameters():
        torch.nn.init.normal_(p)
    again.load_model_state(model.state_dict(), source="test")  # the head is part of the saved weights
    torch.testing.assert_close(again.eval().features(raw), model.eval().features(raw))


def test_feature_head_config_is_checked():
    from captioner.errors import ConfigError
    with pytest.raises(ConfigError, match="head_layers"):
        tiny_model("model.encoder.head_layers=-1")
    with pytest.raises(ConfigError, match="head_dim"):
        tiny_model("model.encoder.head_layers=1", "model.encoder.head_dim=0")


def test_grid_context_sits_after_the_positions_and_before_the_coordinates():
    args = ("model.encoder.fine_tune=0", "model.encoder.coordinates=true", "model.encoder.context_layers=1",
            "model.encoder.context_heads=8")
    model = tiny_model(*args)
    c = model.encoder.feature_dim
    assert len(model.context.layers) == 1 and model.decoder.init_h.in_features == c + 2
    torch.manual_seed(1)
    for p in model.context.parameters():
        torch.nn.init.normal_(p, std=0.1)
    raw = torch.randn(2, model.encoder.num_locations, c)
    torch.testing.assert_close(model.features(raw), model.coords(model.context(model.position(raw))))
    captions = torch.randint(4, len(model.vocab), (3, 5))
    _, grads = loss_and_grads(model, captions, raw_features=raw, image_index=torch.tensor([1, 0, 1]))
    context = {n for n, _ in model.named_parameters() if n.startswith("context.")}
    assert context and context <= set(grads) and all(grads[n].abs().sum() > 0 for n in context)

    again = tiny_model(*args)  # its context is fresh (the identity); loading restores the trained one
    again.load_model_state(model.state_dict(), source="test")
    torch.testing.assert_close(again.eval().features(raw), model.eval().features(raw))


def test_grid_context_config_is_checked():
    from captioner.errors import ConfigError
    with pytest.raises(ConfigError, match="context_layers"):
        tiny_model("model.encoder.context_layers=-1")
    with pytest.raises(ConfigError, match="context_heads"):
        tiny_model("model.encoder.context_layers=1", "model.encoder.context_heads=0")
    assert tiny_model("model.encoder.context_layers=2", "model.encoder.context_content=false").context.layers[1].content is False
    with pytest.raises(ConfigError, match="context_heads: must divide the 64"):
        tiny_model("model.encoder.context_layers=1", "model.encoder.context_heads=5")
    with pytest.raises(ConfigError, match="context_output must be one of residual, append"):
        tiny_model("model.encoder.context_layers=1", "model.encoder.context_output=concat")
    with pytest.raises(ConfigError, match="context_pool must be >= 1"):
        tiny_model("model.encoder.context_layers=1", "model.encoder.context_pool=0")
    with pytest.raises(ConfigError, match="context_pool: must divide"):
        tiny_model("model.encoder.context_layers=1", "model.encoder.context_pool=5")
    with pytest.raises(ConfigError, match="context_where must be one of offset, cones"):
        tiny_model("model.encoder.context_layers=1", "model.encoder.context_where=mean")
    cones = tiny_model("model.encoder.context_layers=1", "model.encoder.context_output=append",
                       "model.encoder.context_where=cones", "model.encoder.context_heads=4")
    assert cones.context.channels == 64 + 4 * 4 and cones.context.layers[0].where == "cones"


def test_appended_context_widens_what_the_decoder_reads():
    model = tiny_model("model.encoder.fine_tune=0", "model.encoder.coordinates=true", "model.encoder.context_layers=1",
                       "model.encoder.context_output=append", "model.encoder.context_content=false",
                       "model.encoder.context_pool=2")
    c = model.encoder.feature_dim
    assert model.context.channels == 8 and model.decoder.init_h.in_features == c + 8 + 2  # cells, 4 heads' where, (row, col)
    raw = torch.randn(2, model.encoder.num_locations, c)
    feats = model.features(raw)
    torch.testing.assert_close(feats[..., :c], model.position(raw))  # the cells as they were
    torch.testing.assert_close(feats[..., -2:], model.coords.coords.expand(2, -1, -1))
    captions = torch.randint(4, len(model.vocab), (3, 5))
    _, grads = loss_and_grads(model, captions, raw_features=raw, image_index=torch.tensor([1, 0, 1]))
    assert grads["context.layers.0.qkv.weight"].abs().sum() > 0 and grads["context.layers.0.bias_table"].abs().sum() > 0


@pytest.mark.parametrize("in_scores", [True, False])
def test_appended_context_can_stay_out_of_the_scores(in_scores):
    args = ("model.encoder.fine_tune=0", "model.encoder.context_layers=1", "model.encoder.context_output=append",
            "model.encoder.context_content=false", f"model.encoder.context_in_scores={str(in_scores).lower()}")
    model = tiny_model(*args).eval()
    c = model.encoder.feature_dim
    assert (model.decoder.score_mask is None) == in_scores
    torch.manual_seed(0)
    feats = torch.randn(2, model.encoder.num_locations, c + 8)
    other = feats.clone()
    perm = torch.randperm(model.encoder.num_locations)
    other[..., c:] = feats[:, perm, c:]  # the appended channels moved between cells: the same mean, so the same h_0
    captions = torch.randint(4, len(model.vocab), (2, 5))
    with torch.no_grad():
        a, b = model.teacher_forced(feats, captions), model.teacher_forced(other, captions)
    # step 0: the same query (h_0 from the same mean, up to the sum's rounding); the maps move only with them
    moved = (a.alphas[:, 0] - b.alphas[:, 0]).abs().max().item()
    assert moved > 1e-3 if in_scores else moved < 1e-6, moved
    assert not torch.allclose(a.logits, b.logits)  # the decoder reads them either way
    assert "score_mask" not in model.decoder.state_dict()


def test_coordinates_reach_the_decoder_as_two_more_channels():
    model = tiny_model("model.encoder.fine_tune=0", "model.encoder.coordinates=true")
    c = model.encoder.feature_dim
    assert model.decoder.init_h.in_features == c + 2
    raw = torch.randn(2, model.encoder.num_locations, c)
    feats = model.features(raw)
    torch.testing.assert_close(feats[..., :c], model.position(raw))  # positions first, then the coordinates
    assert feats[..., c:].min() == -1 and feats[..., c:].max() == 1
    out = model(torch.randint(4, len(model.vocab), (2, 5)), raw_features=raw)
    assert torch.isfinite(out.logits).all()


def test_coordinates_of_degree_two_reach_the_decoder_as_five_more_channels():
    model = tiny_model("model.encoder.fine_tune=0", "model.encoder.coordinates=true",
                       "model.encoder.coordinate_degree=2")
    c = model.encoder.feature_dim
    assert model.decoder.init_h.in_features == c + 5
    raw = torch.randn(2, model.encoder.num_locations, c)
    feats = model.features(raw)
    torch.testing.assert_close(feats[..., c + 2:c + 4], feats[..., c:c + 2] ** 2)
    out = model(torch.randint(4, len(model.vocab), (2, 5)), raw_features=raw)
    assert torch.isfinite(out.logits).all()
