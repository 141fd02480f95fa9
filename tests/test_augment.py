"""captioner.augment (train.flip): mirrored views, their word swaps, and the trainer's use of
them: the features of a mirrored caption are the encoder's on the flipped pixels, its words
are swapped, and a resumed run draws the same views."""

import pytest
import torch
from PIL import Image

from captioner.augment import Mirror, pixel_dims, swap_table
from captioner.checkpoint import load_checkpoint
from captioner.config import load_config
from captioner.data.dataset import CaptionBatch
from captioner.errors import ConfigError
from captioner.train import Trainer, fit
from captioner.vocab import Vocabulary

WORDS = "a circle to the left of the right square above below over under at top bottom"


@pytest.fixture
def vocab():
    return Vocabulary.build([WORDS], min_count=1)


def ids(vocab, text):
    return torch.tensor([vocab.stoi[w] for w in text.split()])


def words(vocab, row):
    return " ".join(vocab.itos[i] for i in row.tolist())


def test_swap_table_swaps_pairs_present_and_keeps_the_rest(vocab):
    table = swap_table(vocab, (("left", "right"), ("upper", "lower")))  # upper/lower not in the vocabulary
    assert table[vocab.stoi["left"]] == vocab.stoi["right"] and table[vocab.stoi["right"]] == vocab.stoi["left"]
    changed = (table != torch.arange(len(vocab))).nonzero().flatten().tolist()
    assert sorted(changed) == sorted([vocab.stoi["left"], vocab.stoi["right"]])


def test_each_view_swaps_its_own_words(vocab):
    mirror = Mirror("both", vocab, grid=(2, 3))
    caption = "a circle to the left of the square above at top"
    row = ids(vocab, caption)
    out = mirror.captions(row.expand(4, -1), torch.tensor([0, 1, 2, 3]))
    assert words(vocab, out[0]) == caption
    assert words(vocab, out[1]) == "a circle to the right of the square above at top"
    assert words(vocab, out[2]) == "a circle to the left of the square below at bottom"
    assert words(vocab, out[3]) == "a circle to the right of the square below at bottom"


def test_draws_are_the_modes_views_and_repeat_for_a_seed_and_step(vocab):
    horizontal = Mirror("horizontal", vocab, grid=(2, 2))
    drawn = horizontal.draw(400, seed=3, step=17)
    assert set(drawn.tolist()) == {0, 1} and 150 < int(drawn.sum()) < 250  # about half mirrored
    assert torch.equal(drawn, horizontal.draw(400, seed=3, step=17))
    assert not torch.equal(drawn, horizontal.draw(400, seed=3, step=18))
    assert set(Mirror("vertical", vocab, grid=(2, 2)).draw(100, seed=0, step=0).tolist()) == {0, 2}
    assert set(Mirror("both", vocab, grid=(2, 2)).draw(200, seed=0, step=0).tolist()) == {0, 1, 2, 3}


def test_pixels_and_attention_targets_flip_per_row(vocab):
    mirror = Mirror("both", vocab, grid=(2, 3))
    images = torch.arange(4 * 3 * 2 * 3, dtype=torch.float).reshape(4, 3, 2, 3)
    views = torch.tensor([0, 1, 2, 3])
    out = mirror.pixels(images, views)
    assert torch.equal(out[0], images[0]) and torch.equal(out[1], images[1].flip(-1))
    assert torch.equal(out[2], images[2].flip(-2)) and torch.equal(out[3], images[3].flip(-2, -1))
    targets = torch.zeros(4, 1, 6)
    targets[:, 0, 1] = 1.0  # row 0, column 1 of a 2 x 3 grid
    flipped = mirror.targets(targets, views).argmax(-1).flatten().tolist()
    assert flipped == [1, 1, 4, 4]  # left-right keeps column 1 of 3; top-bottom moves it to row 1
    targets = torch.zeros(2, 1, 6)
    targets[:, 0, 0] = 1.0
    assert mirror.targets(targets, torch.tensor([1, 3])).argmax(-1).flatten().tolist() == [2, 5]
    assert pixel_dims(0) == () and pixel_dims(3) == (-1, -2)


def test_the_config_refuses_flips_with_scst():
    with pytest.raises(ConfigError, match="train.flip mirrors .* unmirrored references"):
        load_config(None, ["train.flip=horizontal", "train.objective=scst"])


def test_a_mirrored_caption_trains_on_the_flipped_images_features(tiny_config):
    trainer = Trainer(tiny_config("train.flip=horizontal"), quiet=True)
    trainer.setup()
    assert sorted(trainer.mirrored_feats) == [1]
    index = torch.arange(8)
    sided = [next((c.text for c in r.captions if " left " in c.text or " right " in c.text), r.captions[0].text)
             for r in trainer.train_records[:8]]
    captions = torch.stack([torch.tensor(trainer.vocab.encode(text, max_len=10) + [0] * 12)[:12] for text in sided])
    batch = CaptionBatch(index, captions, (captions != 0).sum(1), captions != 0)
    mirrored, views = trainer.mirrored(batch)
    assert 0 < int(views.sum()) < 8  # some of each view at this seed and step
    trainer.step = 1
    assert not torch.equal(trainer.mirrored(batch)[1], views)  # each step draws anew
    trainer.step = 0
    assert torch.equal(mirrored.captions, trainer.mirror.captions(captions, views))
    left, right = trainer.vocab.stoi["left"], trainer.vocab.stoi["right"]
    sided_rows = ((captions == left) | (captions == right)).any(1)
    assert (sided_rows & (views == 1)).any()  # the check below has a mirrored caption with a side to swap
    changed = (mirrored.captions != captions).any(1)
    assert torch.equal(changed, sided_rows & (views == 1))
    feats = trainer.train_features(index, views)
    model = trainer.model
    for row in (int(views.argmax()), int(views.argmin())):
        pixels = model.encoder.transform()(Image.open(trainer.train_records[row].path).convert("RGB"))[None]
        pixels = pixels.flip(-1) if views[row] else pixels
        with torch.no_grad():
            expected = model.encoder.eval()(pixels)[0]
        torch.testing.assert_close(feats[row], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_resumed_run_with_flips_equals_an_uninterrupted_one(tiny_config, tmp_path):
    small = ["train.batch_size=4", "train.epochs=1", "train.val_images=4", "decode.max_len=4", "train.flip=both"]
    straight = fit(tiny_config(*small, "train.max_steps=6", f"train.out_dir={tmp_path}/straight"), quiet=True)
    split = [*small, f"train.out_dir={tmp_path}/split"]
    fit(tiny_config(*split, "train.max_steps=3"), quiet=True)
    resumed = fit(tiny_config(*split, "train.max_steps=6", "train.resume=auto"), quiet=True)
    a, b = load_checkpoint(straight.run_dir / "last.pt")["model"], load_checkpoint(resumed.run_dir / "last.pt")["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    plain = load_checkpoint(fit(tiny_config(*small[:-1], "train.max_steps=6", f"train.out_dir={tmp_path}/plain"),
                                quiet=True).run_dir / "last.pt")["model"]
    assert any(not torch.equal(a[key], plain[key]) for key in a)  # the flips changed what was learned


def test_image_batches_flip_each_image_once_and_its_captions_with_it(tiny_config):
    """Pixels through the encoder, k captions an image: a view per image, its captions follow it."""
    trainer = Trainer(tiny_config("train.flip=horizontal"), quiet=True)
    trainer.setup()
    left, right = trainer.vocab.stoi["left"], trainer.vocab.stoi["right"]
    images = torch.randn(6, 3, 8, 8)
    image_index = torch.tensor([0, 0, 1, 2, 3, 4, 5, 5])
    captions = torch.full((8, 3), left)
    batch = CaptionBatch(torch.arange(8), captions, torch.full((8,), 3), torch.ones(8, 3, dtype=torch.bool),
                         images, image_index)
    trainer.step = 3
    mirrored, views = trainer.mirrored(batch)
    per_image = trainer.mirror.draw(6, seed=trainer.t.seed, step=3)
    assert 0 < int(per_image.sum()) < 6
    assert torch.equal(views, per_image[image_index])
    for u in range(6):
        expected = images[u].flip(-1) if per_image[u] else images[u]
        assert torch.equal(mirrored.images[u], expected)
    assert torch.equal(mirrored.captions[:, 0] == right, views == 1)
