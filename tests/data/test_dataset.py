import random

import pytest
import torch

from captioner.data.dataset import (
    CaptionDataset,
    ImageCaptionsDataset,
    choose_captions,
    collate_captions,
    collate_image_captions,
    pad_captions,
)
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
    assert batch.lengths.tolist() == [5, 4]  # "a red dog" + <start> <end>; "a cat sat" cut: <start> and no <end>
    assert vocab.decode(batch.captions[1].tolist()) == ["a", "cat", "<unk>"]


def test_a_batch_comes_longest_caption_first_each_row_with_its_own_record_image_and_targets():
    """collate_captions sorts (stably) so the decoder need not: every row keeps its sample's
    record index, pixels and attention targets."""
    tokens = [[1, 5, 2], [1, 5, 6, 7, 2], [1, 2], [1, 8, 9, 7, 2], [1, 6, 2]]
    samples = [(10 + k, t, torch.full((3, 2, 2), float(k)), {0: torch.full((4,), float(k))})
               for k, t in enumerate(tokens)]
    batch = collate_captions(samples)
    order = [1, 3, 0, 4, 2]  # lengths 5, 5, 3, 3, 2; ties in their first order
    assert batch.index.tolist() == [10 + k for k in order]
    assert batch.lengths.tolist() == [5, 5, 3, 3, 2]
    assert [batch.captions[b, :len(tokens[k])].tolist() for b, k in enumerate(order)] == [tokens[k] for k in order]
    assert batch.images[:, 0, 0, 0].tolist() == [float(k) for k in order]
    assert batch.attention_targets[:, 0, 0].tolist() == [float(k) for k in order]


def test_feature_mode_loads_no_pixels(tmp_path):
    records = [ImageRecord(1, tmp_path / "missing.png", (Caption("a dog"),), "train")]
    ds = CaptionDataset(records, Vocabulary(["a", "dog"]), max_len=5)
    batch = collate_captions([ds[0]])
    assert batch.images is None and batch.captions.shape == (1, 4)


def test_caption_choice_is_a_function_of_seed_epoch_and_image():
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    draws = {(seed, epoch, index): choose_captions(7, 3, seed=seed, epoch=epoch, index=index)
             for seed in (0, 1) for epoch in range(4) for index in range(20)}
    for (seed, epoch, index), chosen in draws.items():
        assert chosen == choose_captions(7, 3, seed=seed, epoch=epoch, index=index)  # the same every time asked
        assert len(set(chosen)) == 3 and chosen == sorted(chosen) and all(0 <= j < 7 for j in chosen)
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state  # no global draws
    def by_image(seed, epoch):
        return [draws[seed, epoch, i] for i in range(20)]

    assert len({tuple(map(tuple, by_image(0, e))) for e in range(4)}) == 4  # a new subset every epoch
    assert by_image(0, 0) != by_image(1, 0)  # and another one for another seed
    assert len({tuple(draws[0, 0, i]) for i in range(20)}) > 1  # images do not all draw alike
    assert choose_captions(3, 3, seed=0, epoch=5, index=2) == [0, 1, 2]  # k or fewer: all of them
    assert choose_captions(2, 5, seed=0, epoch=5, index=2) == [0, 1]


def test_one_sample_per_image_with_up_to_k_captions(tmp_path, make_image):
    texts = ["a dog", "a red dog", "a cat", "a red cat", "a dog sat", "a cat sat", "a mat"]
    records = [ImageRecord(7, make_image(tmp_path / "a.png", (10, 20)), tuple(Caption(t) for t in texts), "train"),
               ImageRecord(8, tmp_path / "none.png", (), "train"),  # no captions: left out
               ImageRecord(9, make_image(tmp_path / "b.png"), (Caption("a cat"), Caption("a red cat")), "train")]
    vocab = Vocabulary.build(texts)
    ds = ImageCaptionsDataset(records, vocab, max_len=5, captions_per_image=3, seed=4, transform=image_transform(16))
    assert len(ds) == 2 and ds.captions_in_epoch() == 3 + 2
    index, captions, image = ds[0]
    assert index == 0 and image.shape == (3, 16, 16)
    words = [" ".join(vocab.decode(c)) for c in captions]
    chosen = choose_captions(7, 3, seed=4, epoch=0, index=0)
    assert words == [texts[j] for j in chosen]
    assert ds[1][0] == 2 and [vocab.decode(c) for c in ds[1][1]] == [["a", "cat"], ["a", "red", "cat"]]

    per_epoch = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        per_epoch.append(ds[0][1])
        again = ImageCaptionsDataset(records, vocab, max_len=5, captions_per_image=3, seed=4)
        again.set_epoch(epoch)
        assert again[0][1] == per_epoch[-1] and again[0][2] is None  # a fresh dataset (a resumed run) agrees
    assert len({str(c) for c in per_epoch}) > 1
    with pytest.raises(ValueError, match="captions_per_image"):
        ImageCaptionsDataset(records, vocab, max_len=5, captions_per_image=0)


@pytest.mark.parametrize("max_len", [1, 2, 4])
def test_per_image_samples_cut_captions_to_max_len(tmp_path, make_image, max_len):
    """vocab.max_len words at most per caption, as in the one-sample-per-caption dataset."""
    texts = ["a red dog sat on the mat", "a cat", "the big red cat sat down"]
    records = [ImageRecord(1, make_image(tmp_path / "a.png"), tuple(Caption(t) for t in texts), "train")]
    vocab = Vocabulary.build(texts)
    per_image = ImageCaptionsDataset(records, vocab, max_len=max_len, captions_per_image=3, seed=0)
    per_caption = CaptionDataset(records, vocab, max_len=max_len)
    _, captions, _ = per_image[0]
    assert sorted(map(tuple, captions)) == sorted(tuple(per_caption[k][1]) for k in range(3))
    assert sorted(vocab.decode(c) for c in captions) == sorted(t.split()[:max_len] for t in texts)
    batch = collate_image_captions([per_image[0]])
    # <start> words, and <end> only where the caption was not cut (a cut caption does not end there)
    expected = max(1 + min(len(t.split()), max_len) + (len(t.split()) <= max_len) for t in texts)
    assert batch.lengths.max().item() == expected


def test_collate_repeats_images_to_captions_by_index(tmp_path, make_image):
    records = [ImageRecord(i, make_image(tmp_path / f"{i}.png", (8 + i, 8)), tuple(Caption(t) for t in caps), "train")
               for i, caps in enumerate([["a dog", "a red dog", "a dog sat"], ["a cat"], ["a mat", "a red mat"]])]
    vocab = Vocabulary.build(["a dog red cat mat sat"])
    ds = ImageCaptionsDataset(records, vocab, max_len=5, captions_per_image=2, transform=image_transform(16))
    batch = collate_image_captions([ds[2], ds[0], ds[1]])
    assert batch.images.shape == (3, 3, 16, 16)  # U = 3 images, each once
    assert batch.captions.shape[0] == 2 + 2 + 1 and batch.lengths.tolist()[:2] == [4, 5]
    assert batch.image_index.tolist() == [0, 0, 1, 1, 2]  # caption -> its image's row
    assert batch.index.tolist() == [2, 2, 0, 0, 1]  # caption -> its record
    assert torch.equal(batch.images[batch.image_index[2]], ds[0][2])
    assert vocab.decode(batch.captions[0].tolist()) == ["a", "mat"]
    assert batch.mask.sum(1).tolist() == batch.lengths.tolist()
    moved = batch.to("cpu")
    assert torch.equal(moved.image_index, batch.image_index)
    no_pixels = collate_image_captions([ImageCaptionsDataset(records, vocab, max_len=5, captions_per_image=2)[1]])
    assert no_pixels.images is None and no_pixels.image_index.tolist() == [0]


def test_every_config_format_has_a_loader():
    from captioner.config import FORMATS
    from captioner.data import _LOADERS

    assert set(_LOADERS) == set(FORMATS)
