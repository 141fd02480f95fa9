"""The captioner: encoder + (optional position embedding) + decoder + vocabulary.

``Captioner.from_checkpoint(path).caption(image)`` is the Python API for captioning;
everything needed (config, vocabulary, weights) comes from the checkpoint.

Letters: B batch, T steps, L locations, C channels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from captioner.checkpoint import load_checkpoint
from captioner.config import Config, DecodeConfig, config_from_dict
from captioner.data.images import load_image, to_rgb
from captioner.decoder import Decoder, DecoderOutput
from captioner.decoding import Decoded, beam_search, greedy
from captioner.encoder import Encoder, FeatureHead, GridContext, GridCoordinates, LayoutHead, PositionEmbedding2D
from captioner.errors import CaptionerError, CheckpointError, ConfigError
from captioner.precision import cast_parameters
from captioner.vocab import Vocabulary

ImageLike = Image.Image | str | Path | np.ndarray | Tensor


@dataclass
class CaptionResult:
    """One image's caption.

    Attributes:
        words: the caption's words (no specials).
        alphas: (len(words) + 1, L) the attention map of each word and of ``<end>``.
        betas: (len(words) + 1,) the gate of each word and of ``<end>``.
        grid: (h, w): reshape an alpha row to this to get the map over the image.
        score: the caption's log-probability.
    """

    words: list[str]
    alphas: Tensor
    betas: Tensor
    grid: tuple[int, int]
    score: float

    @property
    def text(self) -> str:
        return " ".join(self.words)


def _array_to_image(array: np.ndarray, *, layout: str) -> Image.Image:
    """One image as an array -> PIL. ``layout`` "hwc" (numpy, PIL) or "chw" (torch); values
    uint8 in 0..255 or floats in [0, 1]; 1, 3 or 4 channels, or a 2-D grey image."""
    if array.ndim == 3 and layout == "chw":
        array = array.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        want = "(C, H, W)" if layout == "chw" else "(H, W, C)"
        raise CaptionerError(f"an image array must be {want} with 1, 3 or 4 channels, or (H, W); "
                             f"got shape {tuple(array.shape)}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(array.dtype, np.integer):
            raise CaptionerError(f"an image array must hold numbers; got dtype {array.dtype}")
        array = np.clip(np.nan_to_num(array.astype(np.float32)) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array))


def as_images(images: ImageLike | Sequence[ImageLike]) -> tuple[list[Image.Image | str | Path], bool]:
    """What :meth:`Captioner.caption` accepts -> (images or paths, whether one image was given).

    One image: a path, a PIL image, an ndarray (H, W[, C]), or a tensor (C, H, W). A batch:
    a list or tuple of those, an ndarray (B, H, W, C) or a tensor (B, C, H, W). Arrays hold
    uint8 0..255 or floats in [0, 1].
    """
    if isinstance(images, (str, Path, Image.Image)):
        return [images], True
    if isinstance(images, Tensor):
        array, layout, batch_dims = images.detach().cpu().numpy(), "chw", 4
    elif isinstance(images, np.ndarray):
        array, layout, batch_dims = images, "hwc", 4
    elif isinstance(images, (list, tuple)):
        out: list[Image.Image | str | Path] = []
        for item in images:
            if isinstance(item, (list, tuple)):
                raise CaptionerError("a list of images must hold images, not lists")
            got, single = as_images(item)
            if not single:
                raise CaptionerError("a list of images must hold single images, not batches")
            out += got
        return out, False
    else:
        raise CaptionerError(f"cannot caption a {type(images).__name__}: give a path, a PIL image, an ndarray, "
                             "a tensor, or a list of them")
    if array.ndim == batch_dims:
        return [_array_to_image(a, layout=layout) for a in array], False
    return [_array_to_image(array, layout=layout)], True


def check_names(cfg: Config) -> None:
    """Fail fast, before any data is read, on unknown attention, score or backbone names."""
    from captioner.attention import ATTENTIONS, SCORES
    from captioner.encoder import backbone_names

    ATTENTIONS.get(cfg.model.attention.name)
    SCORES.get(cfg.model.attention.score)
    if cfg.model.encoder.backbone not in backbone_names():
        raise ConfigError(f"model.encoder.backbone: unknown backbone {cfg.model.encoder.backbone!r}; "
                          f"valid: {', '.join(backbone_names())}")


class Captioner(nn.Module):
    """Encoder + decoder + vocabulary.

    Args:
        encoder: image -> raw annotation vectors.
        decoder: the attention LSTM.
        vocab: the words.
        position: an optional module added to the features (learned 2-D positions).
        head: an optional module over the raw features, before ``position`` (trained
            convolutions, :class:`FeatureHead`).
        context: an optional module after ``position`` (self-attention over the grid,
            :class:`GridContext`).
        coords: an optional module last (:class:`GridCoordinates`).
        config: the config that built it (saved in checkpoints).
        layout: the read-out of layout supervision (:class:`~captioner.encoder.LayoutHead`,
            ``train.layout_weight`` > 0; only training uses it).
    """

    def __init__(self, *, encoder: Encoder, decoder: Decoder, vocab: Vocabulary,
                 position: nn.Module | None = None, head: nn.Module | None = None,
                 context: nn.Module | None = None, coords: nn.Module | None = None,
                 config: Config | None = None, layout: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder, self.decoder, self.position, self.head = encoder, decoder, position, head
        self.context, self.coords, self.layout = context, coords, layout
        self.vocab, self.config = vocab, config

    @classmethod
    def from_config(cls, cfg: Config, vocab: Vocabulary, *, load_weights: bool = True) -> Captioner:
        e = cfg.model.encoder
        encoder = Encoder.from_config(e, load_weights=load_weights)
        dim = (e.head_dim or encoder.feature_dim) if e.head_layers else encoder.feature_dim  # C after the head
        head = (FeatureHead(grid=encoder.grid, dim_in=encoder.feature_dim, dim=dim, layers=e.head_layers)
                if e.head_layers else None)
        position = PositionEmbedding2D(grid=encoder.grid, dim=dim) if e.positional else None
        context = (GridContext(grid=encoder.grid, dim=dim, layers=e.context_layers, heads=e.context_heads,
                               content=e.context_content, output=e.context_output, pool=e.context_pool,
                               where=e.context_where)
                   if e.context_layers else None)
        coords = GridCoordinates(grid=encoder.grid, degree=e.coordinate_degree) if e.coordinates else None
        feature_dim = (dim + (context.channels if context is not None else 0)
                       + (coords.channels if coords is not None else 0))  # C of the annotation vectors
        score_mask = None
        if context is not None and context.channels and not e.context_in_scores:  # appended: not in the scores
            score_mask = torch.ones(feature_dim)
            score_mask[dim:dim + context.channels] = 0.0
        decoder = Decoder.from_config(cfg.model, vocab_size=len(vocab), feature_dim=feature_dim, grid=encoder.grid,
                                      score_mask=score_mask)
        layout = LayoutHead(feature_dim) if cfg.train.layout_weight > 0 else None
        return cls(encoder=encoder, decoder=decoder, vocab=vocab, position=position, head=head, context=context,
                   coords=coords, config=cfg, layout=layout)

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, device: str | torch.device = "cpu") -> Captioner:
        """Rebuild the model saved at ``path`` (no weight download: the checkpoint has them)."""
        data = load_checkpoint(path)
        try:
            cfg = config_from_dict(data["config"])
        except ConfigError as err:
            raise CheckpointError(f"{path}: its config does not fit this captioner version: {err}") from None
        vocab = Vocabulary.from_dict(data["vocab"])
        model = cls.from_config(cfg, vocab, load_weights=False)
        model.load_model_state(data["model"], source=str(path))
        return model.to(device).eval()

    def load_model_state(self, state: dict, *, source: str) -> None:
        """load_state_dict with a clear error when the weights do not fit (another vocabulary,
        another backbone or size)."""
        try:
            self.load_state_dict(state)
        except RuntimeError as err:
            detail = " ".join(str(err).split())[:300]
            raise CheckpointError(
                f"{source}: the saved weights do not fit this model (another vocabulary or "
                f"architecture?): {detail}"
            ) from None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def features(self, raw: Tensor) -> Tensor:
        """Raw encoder output (B, L, C) -> annotation vectors the decoder attends over
        (through the head, plus the positions, through the grid's self-attention, then with the
        coordinates, each where configured)."""
        feats = self.head(raw) if self.head is not None else raw
        feats = self.position(feats) if self.position is not None else feats
        feats = self.context(feats) if self.context is not None else feats
        return self.coords(feats) if self.coords is not None else feats

    def encode(self, images: Tensor) -> Tensor:
        """images (B, 3, S, S) -> annotation vectors (B, L, C)."""
        return self.features(self.encoder(images))

    def forward(self, captions: Tensor, *, images: Tensor | None = None, raw_features: Tensor | None = None,
                image_index: Tensor | None = None, dtype: torch.dtype | None = None) -> DecoderOutput:
        """Teacher-forced pass from pixels or from cached raw encoder features; no step runs
        past a caption's ``<end>`` (the logits come packed, see :class:`DecoderOutput`).

        Args:
            captions: (B, T) token ids.
            images: (U, 3, S, S) pixels; ignored when ``raw_features`` is given.
            raw_features: (U, L, C) cached raw encoder output.
            image_index: (B,) each caption's row of ``images`` / ``raw_features``, so that an
                image with several captions is encoded once; None: U == B, row b for caption b.
            dtype: the decoder's compute dtype (``torch.bfloat16``: ``train.amp=bf16``): the
                annotation vectors and the decoder's weights are cast once for the pass, float32
                masters keep the gradients (:mod:`captioner.precision`); None: as they are.
        """
        feats = self.features(raw_features) if raw_features is not None else self.encode(images)  # (U, L, C)
        out = self.teacher_forced(feats, captions, image_index=image_index, dtype=dtype)
        out.features = feats
        return out

    def teacher_forced(self, feats: Tensor, captions: Tensor, *, image_index: Tensor | None = None,
                       dtype: torch.dtype | None = None) -> DecoderOutput:
        """:meth:`forward` from the annotation vectors ``feats`` (U, L, C), as :meth:`features`
        or :meth:`encode` return them."""
        steps = (captions[:, 1:] != self.vocab.pad_id).sum(1)  # words + <end>: the steps worth running
        # the decoder projects each image's keys once and indexes them per caption; the backward
        # sums each image's gradients over its captions
        if dtype is None:
            return self.decoder(feats, captions, lengths=steps, image_index=image_index)
        # one cast of the features and of each weight, none in the time loop; autocast off, as it
        # would move ops back to float32 step by step
        with torch.autocast(feats.device.type, enabled=False), cast_parameters(self.decoder, dtype):
            return self.decoder(feats.to(dtype), captions, lengths=steps, image_index=image_index)

    @torch.no_grad()
    def generate(self, *, images: Tensor | None = None, raw_features: Tensor | None = None,
                 max_len: int = 20, beam_size: int = 1, length_penalty: float = 0.0,
                 no_repeat_ngram: int | None = None) -> Decoded:
        """Captions for a batch of pixels or cached raw features: greedy for ``beam_size`` 1,
        else the best of a batched beam search. ``no_repeat_ngram``: None takes the config's
        ``decode.no_repeat_ngram``."""
        feats = self.features(raw_features) if raw_features is not None else self.encode(images)
        v = self.vocab
        if no_repeat_ngram is None:
            no_repeat_ngram = self.config.decode.no_repeat_ngram if self.config else 0
        ids = dict(start_id=v.start_id, end_id=v.end_id, pad_id=v.pad_id, no_repeat_ngram=no_repeat_ngram)
        if beam_size == 1:
            return greedy(self.decoder, feats, max_len=max_len, **ids)
        return beam_search(self.decoder, feats, beam_size=beam_size, max_len=max_len,
                           length_penalty=length_penalty, **ids).best()

    @torch.no_grad()
    def caption(self, images: ImageLike | Sequence[ImageLike], *, max_len: int | None = None,
                beam_size: int | None = None, batch_size: int = 16) -> CaptionResult | list[CaptionResult]:
        """Caption one image or a batch of them.

        Args:
            images: one image (a path, a PIL image, an ndarray (H, W, C), a tensor (C, H, W))
                or a batch (a list of those, an ndarray (B, H, W, C), a tensor (B, C, H, W));
                arrays hold uint8 0..255 or floats in [0, 1]. See :func:`as_images`.
            max_len, beam_size: default to the config's ``decode`` section; beam 1 is greedy.

        Returns:
            A :class:`CaptionResult` for one image, a list for a batch.

        Raises:
            CaptionerError: an unreadable image or array, or ``beam_size``/``max_len`` < 1.
        """
        items, single = as_images(images)
        decode = self.config.decode if self.config else DecodeConfig()
        max_len = decode.max_len if max_len is None else max_len
        beam_size = decode.beam_size if beam_size is None else beam_size
        if beam_size < 1 or max_len < 1:
            raise CaptionerError(f"beam_size and max_len must be >= 1; got beam_size {beam_size}, max_len {max_len}")
        was_training = self.training
        self.eval()
        tf = self.encoder.transform()
        results: list[CaptionResult] = []
        for k in range(0, len(items), batch_size):
            chunk = items[k:k + batch_size]
            pixels = torch.stack([tf(to_rgb(im) if isinstance(im, Image.Image) else load_image(im)) for im in chunk])
            dec = self.generate(images=pixels.to(self.device), max_len=max_len, beam_size=beam_size,
                                length_penalty=decode.length_penalty)
            for i in range(len(chunk)):
                n = int(dec.lengths[i])
                steps = min(n + 1, dec.tokens.shape[1])
                results.append(CaptionResult(
                    words=self.vocab.decode(dec.tokens[i, :n].tolist()),
                    alphas=dec.alphas[i, :steps].cpu(), betas=dec.betas[i, :steps].cpu(),
                    grid=self.encoder.grid, score=float(dec.scores[i]),
                ))
        self.train(was_training)
        return results[0] if single else results
