"""captioner.ema: the moving average's arithmetic, the swap in and out, its checkpoint, and
train.ema in the trainer (best.pt holds the validated average; a resume continues it exactly)."""

import pytest
import torch
from torch import nn

from captioner.checkpoint import load_checkpoint
from captioner.ema import WeightAverage, averaged
from captioner.errors import CheckpointError
from captioner.train import fit


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    model[1].bias.requires_grad_(False)  # frozen: not averaged
    return model


def test_the_average_follows_the_formula_with_its_warm_up():
    model = _model()
    average = WeightAverage(model, decay=0.9)
    w0 = model[0].weight.detach().clone()
    assert average.rate() == pytest.approx(1 / 10)  # d_0 = min(0.9, 1/10)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    average.update()
    expected = 0.1 * w0 + 0.9 * (w0 + 1.0)
    torch.testing.assert_close(average.shadow["0.weight"], expected)
    assert average.updates == 1 and average.rate() == pytest.approx(2 / 11)
    for _ in range(200):
        average.update()
    assert average.rate() == 0.9  # the warm-up has ended: the configured decay
    torch.testing.assert_close(average.shadow["0.weight"], w0 + 1.0)  # converged on the constant weights


def test_only_trainable_parameters_are_averaged():
    average = WeightAverage(_model(), decay=0.5)
    assert sorted(average.shadow) == ["0.bias", "0.weight", "1.weight"]


def test_applied_swaps_the_average_in_and_restores_the_weights_even_on_an_error():
    model = _model()
    average = WeightAverage(model, decay=0.5)
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    trained = model[0].weight.detach().clone()
    with average.applied():
        torch.testing.assert_close(model[0].weight, average.shadow["0.weight"])
        assert not torch.equal(model[0].weight, trained)
    assert torch.equal(model[0].weight, trained)
    with pytest.raises(RuntimeError, match="boom"), average.applied():
        raise RuntimeError("boom")
    assert torch.equal(model[0].weight, trained)
    with averaged(None):  # no average: the weights stay
        assert torch.equal(model[0].weight, trained)


def test_state_round_trip_and_a_mismatched_average_is_refused():
    model = _model()
    average = WeightAverage(model, decay=0.5)
    with torch.no_grad():
        model[0].weight.add_(2.0)
    average.update()
    other = WeightAverage(_model(), decay=0.5)
    other.load_state_dict(average.state_dict())
    assert other.updates == 1 and torch.equal(other.shadow["0.weight"], average.shadow["0.weight"])
    wider_model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    wider_model[1].bias.requires_grad_(False)
    wider = WeightAverage(wider_model, decay=0.5)
    with pytest.raises(CheckpointError, match=r"run/last.pt.*0.weight.*shape"):
        wider.load_state_dict(average.state_dict(), source="run/last.pt")
    fewer = WeightAverage(nn.Sequential(nn.Linear(3, 2)), decay=0.5)
    with pytest.raises(CheckpointError, match=r"run/last.pt.*other parameters"):
        fewer.load_state_dict(average.state_dict(), source="run/last.pt")


SMALL = ["train.batch_size=4", "train.epochs=1", "train.val_images=4", "decode.max_len=4", "train.ema=0.9"]


@pytest.mark.slow
def test_best_pt_holds_the_validated_average_and_last_pt_the_raw_weights(tiny_config):
    result = fit(tiny_config(*SMALL, "train.max_steps=6"), quiet=True)
    last, best = load_checkpoint(result.run_dir / "last.pt"), load_checkpoint(result.run_dir / "best.pt")
    assert last["ema"]["updates"] == 6
    assert "ema" not in best  # inference needs the averaged weights only
    moved = 0
    for name, shadow in last["ema"]["shadow"].items():
        assert torch.equal(best["model"][name], shadow), name
        moved += not torch.equal(last["model"][name], shadow)
    assert moved > 0  # the raw weights are not the average


@pytest.mark.slow
def test_a_resumed_run_continues_the_average_exactly(tiny_config, tmp_path):
    straight = fit(tiny_config(*SMALL, "train.max_steps=6", f"train.out_dir={tmp_path}/straight"), quiet=True)
    split = [*SMALL, f"train.out_dir={tmp_path}/split"]
    fit(tiny_config(*split, "train.max_steps=3"), quiet=True)
    resumed = fit(tiny_config(*split, "train.max_steps=6", "train.resume=auto"), quiet=True)
    a, b = load_checkpoint(straight.run_dir / "last.pt")["ema"], load_checkpoint(resumed.run_dir / "last.pt")["ema"]
    assert a["updates"] == b["updates"] == 6
    for name in a["shadow"]:
        assert torch.equal(a["shadow"][name], b["shadow"][name]), name
