"""End to end on a tiny shapes set: train, checkpoint, caption, resume."""

import hashlib
import json
from collections import Counter

import pytest
import torch
from torch import Tensor

from captioner.checkpoint import load_checkpoint
from captioner.data import load_split
from captioner.data.images import load_image
from captioner.data.records import Caption, ImageRecord
from captioner.encoder import Encoder
from captioner.errors import CheckpointError
from captioner.model import Captioner
from captioner.train import fit, most_common_caption

pytestmark = pytest.mark.slow


def test_fit_writes_a_run_and_the_checkpoint_captions(tiny_config, shapes_root):
    cfg = tiny_config()
    result = fit(cfg, quiet=True)
    run = result.run_dir
    for name in ("config.yaml", "vocab.json", "metrics.jsonl", "last.pt", "best.pt"):
        assert (run / name).is_file(), name
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_bleu4" in line]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"] + 1.0  # it trains, and nothing blows up
    assert 0.0 <= result.best_score <= 1.0

    model = Captioner.from_checkpoint(run / "best.pt")
    images = sorted((shapes_root / "test").glob("*.png"))[:3]
    results = model.caption(images)
    assert len(results) == 3
    for res in results:
        assert all(w in model.vocab for w in res.words)
        assert res.alphas.shape == (len(res.words) + 1, 16 * 16) and res.grid == (16, 16)
        torch.testing.assert_close(res.alphas.sum(-1), torch.ones(len(res.words) + 1))
    assert model.caption(images[0]).words == results[0].words  # one image or a list: same answer


def test_frozen_cache_and_pixels_give_the_same_training(tiny_config):
    """The feature cache is an optimisation only: one epoch from cached features equals one from pixels."""
    a = fit(tiny_config("train.epochs=1", "train.cache_features=true"), quiet=True)
    state_a = load_checkpoint(a.run_dir / "last.pt")["model"]
    # One sample per caption from pixels (train.captions_per_image=0): the cache's batches, encoded anew.
    b = fit(tiny_config("train.epochs=1", "train.cache_features=false", "train.captions_per_image=0",
                        f"train.out_dir={a.run_dir}_pixels"), quiet=True)
    state_b = load_checkpoint(b.run_dir / "last.pt")["model"]
    # Up to float rounding (the encoder sees other batch compositions; Adam magnifies 1e-7
    # differences to ~3e-5 over 10 steps); features from the wrong images would differ by ~1e-2.
    for key in state_a:
        torch.testing.assert_close(state_a[key], state_b[key], rtol=1e-3, atol=1e-4, msg=key)


def _count_training_encodes(monkeypatch) -> tuple[list[Tensor], list[int]]:
    """Record the images the encoder sees in training steps (not validation) and the
    captions each training step teaches."""
    images, captions = [], []
    encoder_forward, model_forward = Encoder.forward, Captioner.forward

    def encode(self, pixels):
        if self.training and torch.is_grad_enabled():
            images.append(pixels.detach().clone())
        return encoder_forward(self, pixels)

    def forward(self, caps, **inputs):
        captions.append(caps.shape[0])
        return model_forward(self, caps, **inputs)

    monkeypatch.setattr(Encoder, "forward", encode)
    monkeypatch.setattr(Captioner, "forward", forward)
    return images, captions


@pytest.mark.parametrize("per_image", [5, 2, 0])
def test_fine_tuned_training_encodes_each_image_once_per_epoch(tiny_config, monkeypatch, per_image):
    cfg = tiny_config("train.epochs=1", "model.encoder.fine_tune=1", f"train.captions_per_image={per_image}")
    images, captions = _count_training_encodes(monkeypatch)
    fit(cfg, quiet=True)

    records = load_split(cfg.data, "train")
    transform = Encoder.from_config(cfg.model.encoder, load_weights=False).transform()
    def digest(x):
        return hashlib.sha1(x.numpy().tobytes()).hexdigest()

    train_images = Counter(digest(transform(load_image(r.path))) for r in records)
    encoded = Counter(digest(x) for batch in images for x in batch)
    n_captions = sum(len(r.captions) for r in records)
    assert all(len(r.captions) == 5 for r in records)  # the shapes set: five captions per image
    if per_image:
        assert encoded == train_images  # every train image, each exactly once in the epoch
        per_batch = max(1, cfg.train.batch_size // per_image)
        assert [len(b) for b in images] == [min(per_batch, len(records) - k) for k in range(0, len(records), per_batch)]
        assert sum(captions) == len(records) * per_image  # k of each image's five captions
    else:  # the old way: one sample per caption, each encoding its image
        assert sum(encoded.values()) == n_captions and set(encoded) == set(train_images)
        assert sum(captions) == n_captions


def test_resume_continues_where_it_stopped(tiny_config):
    first = fit(tiny_config("train.epochs=1"), quiet=True)
    resumed = fit(tiny_config("train.epochs=2", f"train.resume={first.run_dir / 'last.pt'}"), quiet=True)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert load_checkpoint(resumed.run_dir / "last.pt")["trainer"]["epoch"] == 2
    # a straight 2-epoch run ends at the same weights (same data order and RNG)
    straight = fit(tiny_config("train.epochs=2", f"train.out_dir={first.run_dir}_straight"), quiet=True)
    a = load_checkpoint(resumed.run_dir / "last.pt")["model"]
    b = load_checkpoint(straight.run_dir / "last.pt")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)


def test_resume_on_other_data_is_refused(tiny_config):
    first = fit(tiny_config("train.epochs=1"), quiet=True)
    with pytest.raises(CheckpointError, match="vocabulary"):
        fit(tiny_config("vocab.min_count=3", f"train.resume={first.run_dir / 'last.pt'}"), quiet=True)


def test_most_common_caption_baseline():
    recs = [ImageRecord(1, None, (Caption("A red circle."), Caption("a blue square")), "train"),
            ImageRecord(2, None, (Caption("a red circle"),), "train")]
    assert most_common_caption(recs) == ["a", "red", "circle"]


def logged_losses(run_dir) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["xent"] for line in lines if '"xent"' in line]


def test_bf16_mixed_precision_on_the_cpu(tiny_config):
    result = fit(tiny_config("train.epochs=2", "train.amp=bf16"), quiet=True)
    state = load_checkpoint(result.run_dir / "last.pt")
    assert all(v.dtype == torch.float32 for k, v in state["model"].items() if v.is_floating_point())
    losses = logged_losses(result.run_dir)
    fp32 = tiny_config("train.epochs=2", f"train.out_dir={result.run_dir.parent.parent / 'fp32'}")
    plain = logged_losses(fit(fp32, quiet=True).run_dir)  # token cross-entropy, logged every 5 steps
    assert len(losses) == len(plain) >= 2 and losses != plain  # bf16 did change the arithmetic
    assert losses[0] == pytest.approx(plain[0], rel=0.02)  # bf16 rounding, not another computation
    assert losses[-1] < losses[0] and losses[-1] == pytest.approx(plain[-1], rel=0.1)  # and it learns alike


def test_bf16_autocast_runs_the_decoder_in_bf16():
    from captioner.config import load_config
    from captioner.decoder import Decoder

    cfg = load_config(None, ["model.attention.dim=4", "model.decoder.embed_dim=6", "model.decoder.hidden_dim=8"])
    dec = Decoder.from_config(cfg.model, vocab_size=10, feature_dim=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dec(torch.randn(2, 7, 5), torch.randint(4, 10, (2, 5)))
    assert out.logits.dtype == torch.bfloat16


def test_fp16_needs_a_gpu(tiny_config):
    from captioner.errors import CaptionerError

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(CaptionerError, match="fp16 needs a CUDA GPU"):
        fit(tiny_config("train.epochs=1", "train.amp=fp16"), quiet=True)


def test_train_amp_setting_reaches_the_training_step(tiny_config, monkeypatch):
    """fit enters autocast with the configured dtype (a trainer that ignored train.amp would fail)."""
    seen = []
    real = torch.autocast

    def recording(device_type, dtype=None, enabled=True, **kw):
        seen.append((device_type, dtype, enabled))
        return real(device_type, dtype=dtype, enabled=enabled, **kw)

    monkeypatch.setattr(torch, "autocast", recording)
    fit(tiny_config("train.epochs=1", "train.amp=bf16", "train.max_steps=2"), quiet=True)
    assert ("cpu", torch.bfloat16, True) in seen
    seen.clear()
    fit(tiny_config("train.epochs=1", "train.max_steps=2", "train.out_dir=" + str(tiny_config().train.out_dir) + "_fp32"),
        quiet=True)
    assert seen and all(not enabled for _, _, enabled in seen)


def test_fit_holds_freed_memory_before_its_first_step(tiny_config, monkeypatch):
    """captioner.device.hold_freed_memory: no fresh pages for each step's large tensors."""
    import captioner.train as train_module

    calls = []

    def records(*args, **kwargs):
        calls.append("records")
        raise RuntimeError("stop here")  # the rest of the run is not this test's

    monkeypatch.setattr(train_module, "hold_freed_memory", lambda: calls.append("held") or True)
    monkeypatch.setattr(train_module, "load_split", records)
    with pytest.raises(RuntimeError, match="stop here"):
        fit(tiny_config("train.epochs=1"), quiet=True)
    assert calls == ["held", "records"]


@pytest.mark.parametrize("scale", [1e-3, 0.1232, 0.12324, 0.1233, 1.0, 1e3])  # the norm is 40.571 x scale: 5 at 0.12324
def test_clip_grad_norm_clips_as_torch_does_by_the_exact_norm_and_writes_the_gradients_only_when_it_clips(scale):
    from captioner.train import clip_grad_norm

    g = torch.Generator().manual_seed(0)
    shapes = [(50, 30), (7,), (3, 4, 5)]
    grads = [torch.randn(*s, generator=g) * scale for s in shapes]

    def params():
        ps = [torch.nn.Parameter(torch.zeros(*s)) for s in shapes] + [torch.nn.Parameter(torch.zeros(2))]  # no grad
        for p, grad in zip(ps, grads):
            p.grad = grad.clone()
        return ps

    ours, theirs = params(), params()
    versions = [p.grad._version for p in ours[:3]]
    total = clip_grad_norm(ours, 5.0)
    exact = float(torch.cat([x.double().flatten() for x in grads]).norm())
    assert total.dtype == torch.float32 and total.shape == ()
    assert abs(float(total) / exact - 1) < 1e-6
    clips = float(total) + 1e-6 > 5.0
    if clips:
        torch.nn.utils.clip_grads_with_norm_(theirs, 5.0, total)  # torch's clip by the same norm
        assert abs(float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ours[:3]]))) - 5.0) < 1e-4
    for p, q in zip(ours, theirs):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)
    written = [p.grad._version != v for p, v in zip(ours[:3], versions)]
    assert written == [exact + 1e-6 > 5.0] * 3, (exact, written)


def test_the_total_norm_is_closer_to_the_exact_one_than_torch_s_and_leaves_the_rest_to_torch():
    from captioner.train import total_norm

    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(4_000_000, generator=g), torch.randn(300, 70, generator=g)]  # PyTorch: 7e-5 off
    exact = float(torch.cat([x.double().flatten() for x in grads]).norm())
    ours, torch_s = float(total_norm(grads)), float(torch.nn.utils.get_total_norm(grads))
    assert abs(ours - exact) <= abs(torch_s - exact)
    assert abs(ours / exact - 1) < 1e-5
    # what it does not sum itself is torch's, bit for bit: other dtypes, strided views, non-finite sums
    for case in ([x.double() for x in grads], [grads[0], grads[1].t()],
                 [grads[1], torch.tensor([float("inf"), 1.0])], [grads[1], torch.tensor([float("nan")])],
                 [torch.full((4,), 1e20)]):
        got, want = total_norm(case), torch.nn.utils.get_total_norm(case)
        assert torch.equal(got, want) or (got.isnan() and want.isnan()), (got, want)
