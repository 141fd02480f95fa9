import os
import pickle

import pytest
import torch

from captioner.checkpoint import FORMAT_VERSION, load_checkpoint, remove_stale_temporaries, save_checkpoint
from captioner.config import config_to_dict, load_config
from captioner.errors import CheckpointError
from captioner.model import Captioner
from captioner.vocab import Vocabulary


def plain(**extra):
    return {"config": {"name": "x"}, "vocab": {"words": ["a"]}, "model": {"w": torch.ones(2)}, **extra}


def test_round_trip_is_plain_data(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, plain(trainer={"epoch": 3, "rng": torch.get_rng_state()}))
    data = load_checkpoint(path)
    assert data["format_version"] == FORMAT_VERSION and data["trainer"]["epoch"] == 3
    assert torch.equal(data["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary files left behind


def test_written_in_format_1_into_a_new_folder(tmp_path):
    """The on-disk format this code writes is version 1 (what older captioners read), and the run
    folder is made if it is not there yet."""
    path = tmp_path / "runs" / "new" / "c.pt"
    save_checkpoint(path, plain())
    raw = torch.load(path, weights_only=True)
    assert raw["format_version"] == 1 and sorted(raw) == ["config", "format_version", "model", "vocab"]


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, plain())
    with pytest.raises((AttributeError, pickle.PicklingError)):  # a local lambda: AttributeError
        save_checkpoint(path, plain(bad=lambda: 0))  # a lambda cannot be saved
    assert load_checkpoint(path)["model"]["w"].sum() == 2
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_stale_temporaries_of_a_killed_writer_are_removed(tmp_path):
    save_checkpoint(tmp_path / "last.pt", plain())
    (tmp_path / "last.pt.k3x9.tmp").write_bytes(b"half a checkpoint")  # what SIGKILL mid-save leaves
    (tmp_path / "best.pt.q1.tmp").write_bytes(b"")
    (tmp_path / "notes.tmp").write_text("a user's file")  # not ours: kept
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == ["best.pt.q1.tmp", "last.pt.k3x9.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "notes.tmp"]
    assert load_checkpoint(tmp_path / "last.pt")["model"]["w"].sum() == 2


def test_missing_truncated_and_garbage_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    save_checkpoint(tmp_path / "c.pt", plain())
    blob = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_checkpoint(tmp_path / "cut.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")


class Evil:
    def __reduce__(self):  # unpickling would run a shell command
        return (os.system, ("touch pwned",))


def test_code_objects_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({**plain(), "format_version": 1, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused") as caught:
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()
    message = str(caught.value)
    reason = message[message.index("(") + 1:-1]
    assert "\n" not in message and reason.strip()  # one line, with torch's reason
    assert "weights_only` set to `False`" not in message  # but not torch's advice to turn the check off


def test_not_a_checkpoint_and_newer_version(tmp_path):
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a captioner checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    torch.save({**plain(), "format_version": FORMAT_VERSION + 1}, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="newer"):
        load_checkpoint(tmp_path / "new.pt")


def tiny_model(words):
    cfg = load_config(None, ["model.encoder.backbone=resnet18", "model.encoder.weights=null",
                             "model.encoder.layer=layer1", "model.encoder.image_size=32",
                             "model.attention.dim=4", "model.decoder.embed_dim=4", "model.decoder.hidden_dim=8"])
    return cfg, Captioner.from_config(cfg, Vocabulary(words))


def test_model_round_trip_and_other_vocabulary(tmp_path):
    cfg, model = tiny_model(["a", "b"])
    save_checkpoint(tmp_path / "m.pt", {"config": config_to_dict(cfg), "vocab": model.vocab.to_dict(),
                                        "model": model.state_dict()})
    loaded = Captioner.from_checkpoint(tmp_path / "m.pt")
    assert loaded.vocab == model.vocab
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    # weights of a 3-word model under a 2-word vocabulary: a clear error, not a size-mismatch traceback
    _, other = tiny_model(["a", "b", "c"])
    save_checkpoint(tmp_path / "bad.pt", {"config": config_to_dict(cfg), "vocab": model.vocab.to_dict(),
                                          "model": other.state_dict()})
    with pytest.raises(CheckpointError, match="do not fit"):
        Captioner.from_checkpoint(tmp_path / "bad.pt")


def test_checkpoint_with_unknown_config_key(tmp_path):
    cfg, model = tiny_model(["a"])
    conf = config_to_dict(cfg)
    conf["train"]["bogus"] = 1
    save_checkpoint(tmp_path / "m.pt", {"config": conf, "vocab": model.vocab.to_dict(), "model": model.state_dict()})
    with pytest.raises(CheckpointError, match="train.bogus"):
        Captioner.from_checkpoint(tmp_path / "m.pt")
