import torch

from captioner.data.dataset import CaptionDataset, collate_captions, pad_captions
from captioner.data.records import Caption, ImageRecord
from captioner.encoder import image_transform
from captioner.vocab import Vocabulary


def test_pad_lengths_and_mask_keep_order():
    caps, lengths, mask = pad_captions([[1, 5, 2], [1, 5, 6, 7, 2], [1, 2]])
    assert caps.tolist() == [[1, 5, 2, 0, 0], [1, 5, 6, 7, 2], [1, 2, 0, 0, 0]]  # never sorted
    assert lengths.tolist() == [3, 5, 2]
    assert mask.sum(1).tolist() == [3, 5, 2] and mask.dtype == torch.bool


def test_one_sample_per_caption_with_images(tmp_path, make_image):
    records = [ImageRecord(7, make_image(tmp_path / "a.png", (10, 20)), (Caption("a red dog"), Caption("a dog")), "train"),
               ImageRecord(9, make_image(tmp_path / "b.png"), (Caption("a cat sat on the mat"),), "train")]
    vocab = Vocabulary.build(["a red dog", "a cat"])
    ds = CaptionDataset(records, vocab, max_len=3, transform=image_transform(16))
    assert len(ds) == 3
    batch = collate_captions([ds[0], ds[2]])
    assert batch.index.tolist() == [0, 1]
    assert batch.images.shape == (2, 3, 16, 16)
    assert batch.lengths.tolist() == [5, 5]  # "a cat sat" cut to 3 words + <start> <end>
    assert vocab.decode(batch.captions[1].tolist()) == ["a", "cat", "<unk>"]


def test_feature_mode_loads_no_pixels(tmp_path):
    records = [ImageRecord(1, tmp_path / "missing.png", (Caption("a dog"),), "train")]
    ds = CaptionDataset(records, Vocabulary(["a", "dog"]), max_len=5)
    batch = collate_captions([ds[0]])
    assert batch.images is None and batch.captions.shape == (1, 4)


def test_every_config_format_has_a_loader():
    from captioner.config import FORMATS
    from captioner.data import _LOADERS

    assert set(_LOADERS) == set(FORMATS)
