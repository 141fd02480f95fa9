"""Typed, frozen configuration.

``load_config(path, overrides)`` reads ``configs/*.yaml``: a file may name a ``_base_``
file (or a list of them, relative to itself) whose values it overrides key by key;
``key=value`` overrides from the command line come last (``train.lr=1e-3``). The result is
a tree of frozen dataclasses. An unknown key, a wrong type or an impossible value is a
:class:`~captioner.errors.ConfigError` that names the key (and the closest valid key).

Only ``from_config`` constructors read these objects; modules take plain keyword arguments.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from captioner.errors import ConfigError


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key} {msg}")


def _choice(value: str, key: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, key, f"must be one of {', '.join(c or repr(c) for c in choices)}; got {value!r}")


# ----------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class SplitConfig:
    """Where one split's annotations and images are, relative to ``data.root``.

    ``captions`` is the split's annotation file: COCO ``captions_*.json``, a folder's
    captions json, or Flickr8k's ``Flickr_8k.*Images.txt`` list; unused for Karpathy files.
    ``images`` is the split's image folder. ``instances`` is a COCO instances file for
    attention correctness and CHAIR ("" : the ``instances_*.json`` beside ``captions_*.json``,
    if present).
    """

    captions: str = ""
    images: str = ""
    instances: str = ""


@dataclass(frozen=True)
class ShapesConfig:
    """Parameters of the generated shapes set (``data.format: shapes``).

    Attributes:
        n: images over all splits (80% train, 10% val, 10% test).
        seed: the generator's seed: the set is the same for the same n, seed and size.
        image_size: the images' side in pixels.
    """

    n: int = 3000
    seed: int = 0
    image_size: int = 128

    def __post_init__(self) -> None:
        _check(self.n >= 3, "n", f"must be at least 3 (one image per split); got {self.n}")
        _check(self.image_size >= 32, "image_size", f"must be at least 32; got {self.image_size}")


FORMATS = ("shapes", "coco", "karpathy", "flickr8k", "folder")


@dataclass(frozen=True)
class DataConfig:
    """The data set: its layout (``format``), where it is, and how to read it.

    Attributes:
        format: shapes (generated on first use), coco, karpathy, flickr8k or folder.
        root: folder that every other path here is relative to.
        annotations: karpathy: ``dataset_coco.json``; flickr8k: ``Flickr8k.token.txt``.
        restval_in_train: karpathy: train on ``train`` + ``restval`` (the usual 113k for COCO).
        max_images: use at most this many images per split (0: all), for quick runs.
        num_workers: DataLoader worker processes.
        bad_images: what a fast pre-check does with unreadable images before training:
            ``error`` stops with the file and the reason; ``skip`` leaves them out, counted
            and listed in the run's log.
        feature_cache: the on-disk feature cache of a frozen encoder ("": ``<root>/features/
            <backbone>-<weights>-<layer>-<size>``); written by ``captioner features extract``.
    """

    format: str = "shapes"
    root: str = "data/shapes"
    train: SplitConfig = SplitConfig("annotations/captions_train.json", "train")
    val: SplitConfig = SplitConfig("annotations/captions_val.json", "val")
    test: SplitConfig = SplitConfig("annotations/captions_test.json", "test")
    annotations: str = ""
    restval_in_train: bool = True
    shapes: ShapesConfig = ShapesConfig()
    max_images: int = 0
    num_workers: int = 0
    bad_images: str = "error"
    feature_cache: str = ""

    def __post_init__(self) -> None:
        _choice(self.format, "format", FORMATS)
        _choice(self.bad_images, "bad_images", ("error", "skip"))
        _check(self.max_images >= 0, "max_images", f"must be >= 0; got {self.max_images}")
        _check(self.num_workers >= 0, "num_workers", f"must be >= 0; got {self.num_workers}")
        if self.format in ("karpathy", "flickr8k"):
            _check(bool(self.annotations), "annotations", f"must name the annotation file for format {self.format}")


@dataclass(frozen=True)
class VocabConfig:
    """Vocabulary: words seen fewer than ``min_count`` times become ``<unk>``, and only the
    ``max_size`` most frequent are kept (0: no limit; the paper used 10,000); training
    captions are cut to ``max_len`` words."""

    min_count: int = 5
    max_size: int = 0
    max_len: int = 20

    def __post_init__(self) -> None:
        _check(self.max_size >= 0, "max_size", f"must be >= 0 (0: no limit); got {self.max_size}")
        _check(self.min_count >= 1, "min_count", f"must be >= 1; got {self.min_count}")
        _check(self.max_len >= 1, "max_len", f"must be >= 1; got {self.max_len}")


@dataclass(frozen=True)
class EncoderConfig:
    """The CNN encoder.

    Attributes:
        backbone: a torchvision classification model name (resnet101, vgg19, mobilenet_v2, ...).
        weights: a torchvision weights name (``DEFAULT``, ``IMAGENET1K_V1``) or null (random init).
        layer: the feature layer (torchvision node name); null picks the backbone's last
            convolutional stage (VGG: conv5_4 after ReLU, as in the paper).
        image_size: images are resized to this square size; the grid follows from it.
        fine_tune: train the last N stages of the backbone (0: frozen, -1: all of it).
        positional: add a learned 2-D position embedding to the annotation vectors.
        coordinates: append each cell's (row, column), scaled to [-1, 1], as two more
            channels: where a location is, kept apart from what is there.
        coordinate_degree: 1: the two coordinates; 2: also their squares and product (row^2,
            col^2, row * col; five channels). A score's dot term is then a quadratic form of
            the position whose coefficients the query sets: a region around a line through
            a remembered point ("right of A": further right than A and not much above or
            below it), which a linear term (a half-plane) cannot draw.
        head_layers: trained residual blocks (3x3 convolution, ReLU, 1x1 convolution) over
            the backbone's grid, after any feature cache: they let a frozen backbone's cells
            learn what the captions need, at a fraction of fine-tuning's cost (0: none, the
            paper's). A fresh head is the identity.
        head_dim: their channels (null: the backbone's C; else a 1x1 projection first).
        context_layers: trained self-attention layers over the grid, with a learned bias per
            (row, column) offset, after the head and the positions (``GridContext``): each
            cell's vector learns what lies where around it ("a red square to my right"), the
            pairwise geometry a relation between two objects needs (0: none, the paper's).
            Every cell attends to every other: on the shapes set's 16 x 16 grid an epoch takes
            about 2.5 times as long (``context_pool`` 2, appended, with the layout term: about 1.15
            times; ``benchmarks/bench.py --only epoch``).
        context_heads: their heads; each can learn a direction to look in. Must divide C.
        context_content: the heads hand each cell what they read elsewhere as well as where
            they looked; false: only where (each cell keeps its own content, so a map on a
            background cell cannot read an object through it).
        context_output: ``residual``: each layer adds its result back into the cells;
            ``append``: the cells stay as they are and each layer's heads' output comes as
            more channels (4 heads without content: 8 channels, each head's (d_row, d_col)).
        context_in_scores: with ``context_output`` append, whether the attention's scores read
            the appended channels; false: they reach only what the decoder reads through its map
            (z_t, and h_0), and where the map goes is decided by the cells' own channels.
        context_pool: the layers run on the grid average-pooled in blocks of this side, every
            cell taking its block's output (1: cell by cell; 2: the layer about 7x cheaper). Must
            divide the grid.
        context_where: what each head tells a cell of where it looked: ``offset``, its map's
            mean (row, column) minus the cell's (2 channels); ``cones``, the share of its map
            in each of the four cones around the cell, left, right, above, below, in the sense
            the relation words have (4 channels; the layer then forms its maps explicitly, not
            in the fused attention kernel). "Some object lies to my left" is a threshold on one share; from a mean
            offset (a head that finds two objects, one each side, reports zero) it is not.
    """

    backbone: str = "resnet101"
    weights: str | None = "DEFAULT"
    layer: str | None = None
    image_size: int = 224
    fine_tune: int = 0
    positional: bool = False
    coordinates: bool = False
    coordinate_degree: int = 1
    head_layers: int = 0
    head_dim: int | None = None
    context_layers: int = 0
    context_heads: int = 4
    context_content: bool = True
    context_output: str = "residual"
    context_in_scores: bool = True
    context_pool: int = 1
    context_where: str = "offset"

    def __post_init__(self) -> None:
        _check(self.image_size >= 16, "image_size", f"must be >= 16; got {self.image_size}")
        _check(self.coordinate_degree in (1, 2), "coordinate_degree",
               f"must be 1 (row, column) or 2 (also their squares and product); got {self.coordinate_degree}")
        _check(self.head_layers >= 0, "head_layers", f"must be >= 0; got {self.head_layers}")
        _check(self.context_layers >= 0, "context_layers", f"must be >= 0; got {self.context_layers}")
        _check(self.context_heads >= 1, "context_heads", f"must be >= 1; got {self.context_heads}")
        _choice(self.context_output, "context_output", ("residual", "append"))
        _check(self.context_pool >= 1, "context_pool", f"must be >= 1; got {self.context_pool}")
        _choice(self.context_where, "context_where", ("offset", "cones"))
        _check(self.head_dim is None or self.head_dim >= 1, "head_dim", f"must be >= 1 or null; got {self.head_dim}")
        _check(self.fine_tune >= -1, "fine_tune", f"must be -1 (all), 0 (frozen) or a number of stages; got {self.fine_tune}")


@dataclass(frozen=True)
class HardAttentionConfig:
    """Options of ``hard`` attention (Section 4.1).

    Attributes:
        mix_prob: probability of using the expected (soft) context instead of a sampled
            location during training (the paper's 0.5).
        mix_per: draw that choice per ``caption`` or once per ``batch`` (the authors' code).
        inference: at test time attend the ``argmax`` location, the ``expectation`` (soft),
            or ``sample`` a location.
        estimator: how the sampled location learns: ``reinforce`` (the paper's), ``loo``
            (``samples`` paths per caption, leave-one-out baseline), ``gumbel``
            (straight-through Gumbel-softmax at temperature ``tau``).
    """

    mix_prob: float = 0.5
    mix_per: str = "caption"
    inference: str = "argmax"
    estimator: str = "reinforce"
    samples: int = 4
    tau: float = 1.0

    def __post_init__(self) -> None:
        _check(0.0 <= self.mix_prob <= 1.0, "mix_prob", f"must be in [0, 1]; got {self.mix_prob}")
        _choice(self.mix_per, "mix_per", ("caption", "batch"))
        _choice(self.inference, "inference", ("argmax", "expectation", "sample"))
        _choice(self.estimator, "estimator", ("reinforce", "loo", "gumbel"))
        _check(self.samples >= 2, "samples", f"must be >= 2 (the leave-one-out baseline); got {self.samples}")
        _check(self.tau > 0, "tau", f"must be > 0; got {self.tau}")


@dataclass(frozen=True)
class LocalAttentionConfig:
    """Options of ``local`` attention (Luong et al., 2015, local-p, on a 2-D grid).

    Attributes:
        window: D: the window spans D cells on each side of the predicted centre.
        sigma: the Gaussian's standard deviation in cells (0: D / 2, Luong's choice).
        restrict: attend only inside the (2D+1) x (2D+1) window (else the whole grid,
            weighted by the Gaussian alone).
        renormalise: softmax(score + log Gaussian) instead of Luong's softmax(score) * Gaussian.
    """

    window: int = 3
    sigma: float = 0.0
    restrict: bool = True
    renormalise: bool = False

    def __post_init__(self) -> None:
        _check(self.window >= 0, "window", f"must be >= 0; got {self.window}")
        _check(self.sigma >= 0, "sigma", f"must be >= 0 (0: window / 2); got {self.sigma}")


@dataclass(frozen=True)
class AttentionConfig:
    """The attention module: ``name`` from the attention registry (soft, hard, local,
    none), ``score`` from the score registry (additive is the paper's MLP; dot, general,
    scaled_dot, additive_dot: the MLP plus a scaled dot product), ``dim`` the attention space,
    ``activation`` of the additive score;
    ``fused``: the additive tanh score, and over bf16 features on a CPU the context read, run
    as fused kernels (captioner/kernels.py), the same functions as the plain expressions,
    faster (false: the plain expressions);
    ``normalizer``: how soft, hard and local attention turn scores into weights, ``softmax``
    (the paper's) or ``sparsemax`` (Martins and Astudillo, 2016: the Euclidean projection
    onto the simplex; locations far below the best get exactly zero); ``hops``: soft
    attention's reads of the grid per step, each hop's query holding the read before it
    (1: the paper's; 2: the second hop can look for "the object below the one just named");
    ``relative``: soft attention's scores also read where each location lies from an anchor,
    the gated centroid of the maps on the objects named so far (``AnchorTerm``: "a blue square"
    after "left of" is found in the cone right of the circle's centre); ``relative_read``: with
    ``relative``, the context vector also carries where the map sits from the anchor (dx, dy,
    |dx|, |dy|), so a direction word can be read off the map on the second object;
    ``anchor_on_word``: with ``relative`` (and Luong's arrangement), the anchor takes the map
    re-weighted by how well each location alone explains the word it wrote (the output layer
    read at each location): "an orange diamond" written from a map on the orange square and
    the orange diamond anchors on the diamond; ``persist``: with ``anchor_on_word``, the scores
    also read the last step's map, times a gate of h_t (location-aware attention, Chorowski et
    al. 2015, with one feature): at "circle" in "a blue circle" the map can stay on the blue
    object it found at "blue", or at "a" after "left of" leave the one just named."""

    name: str = "soft"
    score: str = "additive"
    dim: int = 512
    activation: str = "tanh"
    fused: bool = True
    normalizer: str = "softmax"
    hops: int = 1
    relative: bool = False
    relative_read: bool = False
    anchor_on_word: bool = False
    persist: bool = False
    hard: HardAttentionConfig = HardAttentionConfig()
    local: LocalAttentionConfig = LocalAttentionConfig()

    def __post_init__(self) -> None:
        _check(self.dim >= 1, "dim", f"must be >= 1; got {self.dim}")
        _choice(self.activation, "activation", ("tanh", "relu"))
        _choice(self.normalizer, "normalizer", ("softmax", "sparsemax"))
        _check(self.hops >= 1, "hops", f"must be >= 1; got {self.hops}")
        _check(self.hops == 1 or self.name == "soft", "hops",
               f"only soft attention reads the grid in hops; got {self.hops} with name {self.name!r}")
        _check(not self.relative or self.hops == 1, "relative",
               f"the anchor term reads one hop; got hops {self.hops}")  # and soft attention: build_attention
        _check(not self.relative_read or self.relative, "relative_read",
               "reads where the map sits from the anchor: it needs relative: true")
        _check(not self.anchor_on_word or self.relative, "anchor_on_word",
               "settles the anchor on the word written: it needs relative: true")
        _check(not self.persist or self.anchor_on_word, "persist",
               "reads the last step's map, which anchor_on_word keeps: it needs anchor_on_word: true")


@dataclass(frozen=True)
class DecoderConfig:
    """The LSTM decoder (Section 3.1.2 of the paper).

    Attributes:
        embed_dim: m, the word embedding's size.
        hidden_dim: n, the LSTM's hidden and cell size (the paper's COCO model: 1800).
        dropout: dropout probability on the output layer's input (the paper's regulariser).
        beta_gate: scale the context by the scalar gate sigma(f_beta(h_{t-1})) (Section 4.2.1).
        deep_output: logits from E y_{t-1} + L_h h_t + L_z z_t (eq. 7) instead of from h_t alone.
        dropout_hidden: also drop h_t before the output layer (the authors' code), not only
            the layer's input.
        fused: the teacher-forced pass sums the recurrent weights' gradients over the steps in
            one matmul each (captioner/kernels.py), and ``anchor_on_word``'s word fit is computed
            on the last map's support only; false: the plain per-step layers and the fit at every
            location (the same function).
        arrangement: ``xu`` attends with h_{t-1} before the LSTM step (the paper); ``luong``
            after it, on h_t, with an attentional hidden state and input feeding (Luong et al., 2015).
        output: ``expected`` reads the word from the expected context, softmax(W_s tanh(W_c
            [z_t; h_t])) with z_t = sum_l alpha_l a_l (the paper, Luong); ``mixture`` from the map
            as a latent alignment, p(y) = sum_l alpha_l softmax(W_s tanh(W_c [a_l; h_t])) (Deng et
            al., 2018): each word must be explained by the locations its map is on, one at a time,
            so a map split between a triangle and a square cannot read as a circle. Luong's
            arrangement only; computed on the map's support (a sparsemax map's few cells: with a
            softmax map it reads every location, L times the output layer's work). ``product``:
            both, as a product of experts, log_softmax(expected) + log mixture, normalised again.
        decode_output: what decoding one step at a time reads the word from (greedy, beam search,
            SCST's samples): ``expected``, ``mixture`` or ``product``; empty: as ``output``.
            ``output: expected`` with ``decode_output: product`` trains the plain model and lets
            decoding veto a word that no single location of the map says (the same weights).
    """

    embed_dim: int = 512
    hidden_dim: int = 512
    dropout: float = 0.5
    beta_gate: bool = True
    deep_output: bool = True
    dropout_hidden: bool = True
    arrangement: str = "xu"
    fused: bool = True
    output: str = "expected"
    decode_output: str = ""

    def __post_init__(self) -> None:
        _check(self.embed_dim >= 1, "embed_dim", f"must be >= 1; got {self.embed_dim}")
        _check(self.hidden_dim >= 1, "hidden_dim", f"must be >= 1; got {self.hidden_dim}")
        _check(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1); got {self.dropout}")
        _choice(self.arrangement, "arrangement", ("xu", "luong"))
        _choice(self.output, "output", ("expected", "mixture", "product"))
        _check(self.output == "expected" or self.arrangement == "luong", "output",
               f"{self.output} reads Luong's output layer at each location: set model.decoder.arrangement: luong "
               "(or output: expected)")
        _choice(self.decode_output, "decode_output", ("", "expected", "mixture", "product"))
        _check(self.decode_output in ("", "expected") or self.arrangement == "luong", "decode_output",
               f"{self.decode_output} reads Luong's output layer at each location: "
               "set model.decoder.arrangement: luong (or decode_output: expected)")


@dataclass(frozen=True)
class ModelConfig:
    encoder: EncoderConfig = EncoderConfig()
    attention: AttentionConfig = AttentionConfig()
    decoder: DecoderConfig = DecoderConfig()


@dataclass(frozen=True)
class TrainConfig:
    """The training loop.

    Attributes:
        epochs: passes over the training captions (early stopping and the budgets may end sooner).
        batch_size: captions per optimizer step (the global batch under DDP; with pixels encoded
            in the step, images x ``captions_per_image``).
        optimizer: adam, adamw, rmsprop (the paper's Flickr8k) or sgd; fused on CPU and CUDA.
        lr: the decoder's learning rate.
        encoder_lr: a fine-tuned encoder's learning rate.
        context_lr: the grid context's and the layout read-out's learning rate
            (``model.encoder.context_layers``, ``layout_weight``); null: ``lr``, as the rest.
        weight_decay: L2 (adam, rmsprop, sgd) or decoupled decay (adamw).
        grad_clip: clip the gradients' global norm to this (0: no clipping).
        flip: mirrored training samples (captioner/augment.py): ``horizontal`` flips a
            caption's image left-right and swaps its "left" and "right"; ``vertical`` flips it
            top-bottom and swaps top/bottom, above/below, over/under; ``both`` draws the two
            independently. Each caption draws its view at every step (half of them as they
            are with ``horizontal``). Vertical suits synthetic scenes, not photos. ``none``: off.
        ema: decay of an exponential moving average of the trainable weights, updated after
            every step with a warm-up (captioner/ema.py); validation, best.pt (and so
            ``evaluate`` and ``caption``) use the average, last.pt keeps the raw weights and the
            average for a resume. About ``1 / (1 - ema)`` steps are averaged; 0: off.
        seed: seeds torch, Python and the data order: a run is repeatable, and resumes exactly.
        device: auto (CUDA when present), cpu, cuda or cuda:N; under torchrun each process takes
            its local rank's GPU.
        log_every: write a metrics.jsonl line every N optimizer steps.
        progress: progress bars (on a terminal) or progress lines (elsewhere) on stderr.
        alpha_c: weight lambda of the doubly stochastic regularisation (eq. 14).
        reinforce_weight: lambda_r of the REINFORCE term of stochastic attention (eq. 12).
        entropy_weight: lambda_e of the entropy bonus of stochastic attention (eq. 12).
        baseline_decay: decay of the moving-average baseline of the log-likelihood (0.9).
        baseline_on: the captions that update it: ``sampled`` (those that sampled their
            locations, the paper's b_k) or ``all`` (the authors' code: every caption).
        momentum: of rmsprop and sgd (the authors' RMSProp used 0.9).
        scheduler: plateau (decay ``lr_decay`` when validation stalls ``lr_patience`` epochs),
            cosine, step (decay every ``lr_patience`` epochs), linear (every step, down to
            ``lr_final`` times the rate as the run spends its budget: the largest share gone of
            ``epochs``, ``max_steps`` and ``max_minutes``; fits a run a time budget ends) or none.
        lr_final: where ``linear`` ends, a fraction of the starting rates (0: at zero).
        patience: stop after this many epochs without a better validation score (0: never).
        val_metric: the validation score that selects ``best.pt``: cider (CIDEr-D), bleu1..4,
            rouge_l, or grounded (CIDEr-D times the share of captions that name no object
            absent from the image and state no relation that does not hold; needs the val
            split's instances file, else CIDEr-D alone), computed on greedy captions of the
            validation images.
        val_images: validate on at most this many images (0: all).
        max_minutes: stop after this much wall time, checkpointing first (0: no limit).
        max_steps: stop after this many optimizer steps in all, checkpointing first (0: no limit).
        amp: mixed precision for the forward pass: none, bf16 (CPU or GPU), fp16 (GPU, with
            a gradient scaler) or auto (bf16 where the device multiplies bf16 natively: a GPU
            with bf16, a CPU with AMX or AVX512-BF16 whose bf16 matmul, measured at start-up,
            is at least 1.2x as fast as float32; else none). bf16: the decoder runs in bf16 with its weights and the features
            cast once per batch and float32 master weights (``captioner.precision``), a
            fine-tuned encoder under bf16 autocast; fp16: autocast. Losses are computed in float32.
        compile: ``torch.compile`` the training step's model (worth it on a GPU; slow to start on a CPU).
        cache_features: with a frozen encoder, encode each image once and train on the
            stored features.
        captions_per_image: k: when pixels go through the encoder during training (a fine-tuned
            encoder, or ``cache_features: false``), a batch holds ``max(1, batch_size // k)``
            images, each with up to k of its captions (a random subset, drawn anew every epoch,
            when it has more), and each image is encoded once per epoch. 0: one sample per
            caption, every caption encoding its image anew (five times per epoch on COCO).
        out_dir: the run folder; ``{name}`` is replaced by the config's name.
        resume: a checkpoint to resume from ("" : none; "auto": the run folder's last.pt if any).
            A resumed run continues at the exact batch, with the RNG, optimizer, scheduler and
            REINFORCE baseline restored.
        checkpoint_every: also write last.pt every N steps within an epoch (0: at epoch ends only).
        nonfinite: a NaN or inf loss ``stop``s the run (the last good checkpoint is kept) or
            ``skip``s the batch, at most ``max_skipped`` times.
        tensorboard: also write every metrics line as TensorBoard scalars and, at each
            validation, the attention figures of three val images, to ``<run folder>/tensorboard``
            (needs the ``tensorboard`` extra).
        attention_supervision: supervised attention (Liu et al., 2017): ``strong`` from the
            data set's per-word grounding (the shapes set), ``weak`` from the instances of the
            categories a caption names (COCO layout), ``none`` (default) off.
        attention_supervision_weight: its weight in the loss.
        layout_weight: layout supervision (``captioner/layout.py``; 0: off): from the instances
            file, a linear read-out of each object's pooled annotation vectors learns on which
            sides of it other objects lie, and this weight times its binary cross-entropy joins
            the loss. It teaches the encoder's trained part (``context_layers``) the geometry a
            stated relation needs. Needs the train split's instances file and ``flip`` none.
        layout_margin: a layout target says A lies left of some other object when the
            horizontal distance of their centres is at least this times the vertical one
            (1: the dominant axis, what the relation words mean to ``chair``); between, the
            pair is near a diagonal and the target says neither.
        objective: ``xent`` (cross-entropy, the paper's) or ``scst``: self-critical sequence
            training (Rennie et al. 2017, captioner/scst.py), after cross-entropy (see ``init_from``).
        init_from: a checkpoint whose model weights start a new run (fresh optimizer, step 0);
            "" : none. Not a resume: SCST starts from a cross-entropy checkpoint this way.
        scst_samples: k captions sampled per image; a batch holds ``max(1, batch_size // k)`` images.
        scst_baseline: ``greedy`` (the greedy caption's reward, Rennie et al.) or ``mean`` (the
            mean reward of the image's other k - 1 samples, Luo 2020).
        scst_reward: ``cider`` (CIDEr-D, df from the training references), ``bleu4``, or a
            weighted sum such as ``cider+0.5*bleu4``.
        scst_xent_weight: gamma of the mixed objective L_scst + gamma * L_xent (Paulus et al.
            2018): the cross-entropy of the batch images' reference captions, teacher-forced,
            keeps the policy near the references' language; 0: SCST alone.
    """

    epochs: int = 20
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 4e-4
    encoder_lr: float = 1e-4
    context_lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    grad_clip: float = 5.0
    ema: float = 0.0
    flip: str = "none"
    scheduler: str = "plateau"
    lr_decay: float = 0.8
    lr_patience: int = 2
    lr_final: float = 0.0
    alpha_c: float = 1.0
    reinforce_weight: float = 1.0
    entropy_weight: float = 0.002
    baseline_decay: float = 0.9
    baseline_on: str = "sampled"
    patience: int = 10
    val_metric: str = "cider"
    val_images: int = 500
    max_minutes: float = 0.0
    max_steps: int = 0
    amp: str = "none"
    compile: bool = False
    cache_features: bool = True
    captions_per_image: int = 5
    seed: int = 0
    device: str = "auto"
    out_dir: str = "runs/{name}"
    resume: str = ""
    checkpoint_every: int = 0
    nonfinite: str = "stop"
    max_skipped: int = 10
    log_every: int = 50
    progress: bool = True
    tensorboard: bool = False
    attention_supervision: str = "none"
    attention_supervision_weight: float = 1.0
    layout_weight: float = 0.0
    layout_margin: float = 1.0
    objective: str = "xent"
    init_from: str = ""
    scst_samples: int = 5
    scst_baseline: str = "greedy"
    scst_reward: str = "cider"
    scst_xent_weight: float = 0.0

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "log_every"):
            _check(getattr(self, key) >= 1, key, f"must be >= 1; got {getattr(self, key)}")
        for key in ("lr", "encoder_lr"):
            _check(getattr(self, key) > 0, key, f"must be > 0; got {getattr(self, key)}")
        _check(self.context_lr is None or self.context_lr > 0, "context_lr",
               f"must be > 0, or null (train.lr); got {self.context_lr}")
        for key in ("max_steps", "momentum", "weight_decay", "grad_clip", "alpha_c", "max_minutes", "patience", "val_images"):
            _check(getattr(self, key) >= 0, key, f"must be >= 0; got {getattr(self, key)}")
        _choice(self.flip, "flip", ("none", "horizontal", "vertical", "both"))
        _check(self.flip == "none" or self.objective == "xent", "flip",
               f"mirrors the image and its reference caption for cross-entropy training; train.objective="
               f"{self.objective} scores sampled captions against unmirrored references: set train.flip=none")
        _check(0 <= self.ema < 1, "ema", f"must be in [0, 1) (0: no weight average); got {self.ema}")
        _check(0 < self.lr_decay <= 1, "lr_decay", f"must be in (0, 1]; got {self.lr_decay}")
        _check(0 <= self.baseline_decay < 1, "baseline_decay", f"must be in [0, 1); got {self.baseline_decay}")
        _choice(self.baseline_on, "baseline_on", ("sampled", "all"))
        for key in ("reinforce_weight", "entropy_weight", "scst_xent_weight"):
            _check(getattr(self, key) >= 0, key, f"must be >= 0; got {getattr(self, key)}")
        _choice(self.optimizer, "optimizer", ("adam", "adamw", "rmsprop", "sgd"))
        _choice(self.scheduler, "scheduler", ("plateau", "cosine", "step", "linear", "none"))
        _check(0 <= self.lr_final <= 1, "lr_final", f"must be in [0, 1] (a fraction of train.lr); got {self.lr_final}")
        _choice(self.nonfinite, "nonfinite", ("stop", "skip"))
        _choice(self.attention_supervision, "attention_supervision", ("none", "strong", "weak"))
        _check(self.attention_supervision_weight >= 0, "attention_supervision_weight",
               f"must be >= 0; got {self.attention_supervision_weight}")
        _check(self.layout_weight >= 0, "layout_weight", f"must be >= 0; got {self.layout_weight}")
        _check(self.layout_margin >= 1, "layout_margin", f"must be >= 1; got {self.layout_margin}")
        _check(self.layout_weight == 0 or self.objective == "xent", "layout_weight",
               f"is a cross-entropy training term; set it to 0 with objective={self.objective}")
        _check(self.layout_weight == 0 or self.flip == "none", "layout_weight",
               f"needs train.flip=none (a mirrored image's layout targets are not mirrored); got flip={self.flip}")
        _choice(self.amp, "amp", ("none", "bf16", "fp16", "auto"))
        _check(self.checkpoint_every >= 0, "checkpoint_every", f"must be >= 0; got {self.checkpoint_every}")
        _check(self.max_skipped >= 0, "max_skipped", f"must be >= 0; got {self.max_skipped}")
        _check(self.captions_per_image >= 0, "captions_per_image",
               f"must be >= 0 (0: one sample per caption); got {self.captions_per_image}")
        _choice(self.val_metric, "val_metric", ("cider", "bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "grounded"))
        _choice(self.objective, "objective", ("xent", "scst"))
        _choice(self.scst_baseline, "scst_baseline", ("greedy", "mean"))
        _check(self.scst_samples >= (2 if self.scst_baseline == "mean" else 1), "scst_samples",
               f"must be >= 1 (>= 2 with scst_baseline=mean); got {self.scst_samples}")
        _check(all(term.rpartition("*")[2].strip() in ("cider", "bleu4") for term in self.scst_reward.split("+")),
               "scst_reward", f"must be cider, bleu4 or a weighted sum like cider+0.5*bleu4; got {self.scst_reward!r}")


@dataclass(frozen=True)
class DecodeConfig:
    """Decoding for captioning and evaluation: at most ``max_len`` words; ``beam_size`` 1 is
    greedy; beam captions are ranked by log p / (words + 1) ** ``length_penalty``.
    Validation during training always decodes greedily (fast, and comparable across runs).
    ``no_repeat_ngram`` n > 0: no caption repeats an n-gram (fairseq's and Hugging Face's
    ``no_repeat_ngram_size``), in greedy decoding, beam search and validation; 0: off.
    With 3, "a blue circle to the right of a blue circle" (one object related to itself: the
    map went back to the first circle at the second "circle") cannot be written (README)."""

    max_len: int = 20
    beam_size: int = 1
    length_penalty: float = 0.0
    no_repeat_ngram: int = 0

    def __post_init__(self) -> None:
        _check(self.max_len >= 1, "max_len", f"must be >= 1; got {self.max_len}")
        _check(self.beam_size >= 1, "beam_size", f"must be >= 1; got {self.beam_size}")
        _check(self.length_penalty >= 0, "length_penalty", f"must be >= 0; got {self.length_penalty}")
        _check(self.no_repeat_ngram >= 0, "no_repeat_ngram", f"must be >= 0 (0: off); got {self.no_repeat_ngram}")


@dataclass(frozen=True)
class Config:
    """The whole experiment; saved next to every run and inside every checkpoint.

    Attributes:
        name: the experiment's name: the run folder is ``train.out_dir`` with ``{name}`` replaced.
    """

    name: str = "captioner"
    data: DataConfig = DataConfig()
    vocab: VocabConfig = VocabConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    decode: DecodeConfig = DecodeConfig()


# ----------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert the few safe cases."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key} must be {_type_name(tp)}; got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {tp.__name__} fields; got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key} must be {_type_name(tp)}; got {value!r} ({type(value).__name__})")


def _build(cls: type, values: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {path!r}{hint} (valid: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{prefix + '.' if prefix else ''}{err}") from None


def config_from_dict(values: dict) -> Config:
    """Build a :class:`Config` from plain data (a merged YAML tree or a checkpoint's copy)."""
    if not isinstance(values, dict):
        raise ConfigError(f"a config must be a mapping; got {type(values).__name__}")
    return _build(Config, values, "")


def config_to_dict(cfg: Config) -> dict:
    """Plain nested dicts, as saved in run folders and checkpoints."""
    return dataclasses.asdict(cfg)


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: _base_ files include each other in a loop")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys; got {type(data).__name__}")
    bases = data.pop("_base_", [])
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = _merge(merged, _read_yaml(path.parent / base, (*seen, path)))
    return _merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-3"`` -> (["train", "lr"], 0.001-ish YAML value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (with its ``_base_`` files) and apply ``key=value`` overrides.

    Args:
        path: the YAML file; None starts from the defaults.
        overrides: ``section.key=value`` strings, applied in order.

    Raises:
        ConfigError: a missing or malformed file, an unknown key, a wrong type or value.
    """
    values = _read_yaml(Path(path)) if path is not None else {}
    if path is not None:
        values.setdefault("name", Path(path).stem)
    for text in overrides:
        keys, value = parse_override(text)
        node = values
        for key in keys[:-1]:
            if not isinstance(node.get(key, {}), dict):
                raise ConfigError(f"override {text!r}: {key!r} is not a section")
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return config_from_dict(values)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable with :func:`load_config`)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")


def replace(cfg: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` re-exported for frozen configs."""
    return dataclasses.replace(cfg, **changes)


__all__ = [
    "AttentionConfig", "HardAttentionConfig", "LocalAttentionConfig", "Config", "DataConfig", "DecodeConfig",
    "DecoderConfig", "EncoderConfig",
    "ModelConfig", "ShapesConfig", "SplitConfig", "TrainConfig", "VocabConfig",
    "config_from_dict", "config_to_dict", "load_config", "save_config", "parse_override", "field",
]
