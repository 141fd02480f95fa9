import pytest

from captioner.config import Config, config_from_dict, config_to_dict, load_config, save_config
from captioner.errors import ConfigError


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_are_the_paper_model():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.model.attention.name == "soft" and cfg.model.attention.score == "additive"
    assert cfg.model.decoder.beta_gate and cfg.model.decoder.deep_output


def test_base_merging_and_overrides(tmp_path):
    write(tmp_path / "base.yaml", "train: {lr: 0.01, epochs: 3}\nmodel: {attention: {dim: 32}}\n")
    child = write(tmp_path / "child.yaml", "_base_: base.yaml\ntrain: {epochs: 5}\n")
    cfg = load_config(child, ["model.decoder.hidden_dim=64", "train.lr=1e-3"])
    assert cfg.name == "child"
    assert cfg.train.epochs == 5  # child beats base
    assert cfg.train.lr == pytest.approx(1e-3)  # override beats both; "1e-3" read as a float
    assert cfg.model.attention.dim == 32  # kept from base
    assert cfg.model.decoder.hidden_dim == 64


def test_null_and_bool_overrides():
    cfg = load_config(None, ["model.encoder.weights=null", "model.decoder.beta_gate=false"])
    assert cfg.model.encoder.weights is None and cfg.model.decoder.beta_gate is False


@pytest.mark.parametrize("override, fragments", [
    ("train.lrr=1", ["train.lrr", "did you mean 'train.lr'"]),
    ("model.attention.nme=soft", ["model.attention.nme", "'model.attention.name'"]),
    ("trian.lr=1", ["trian", "'train'"]),
    ("train.batch_size=abc", ["train.batch_size", "int", "abc"]),
    ("train.batch_size=2.5", ["train.batch_size", "int"]),
    ("train.batch_size=-4", ["train.batch_size", ">= 1"]),
    ("train.captions_per_image=-1", ["train.captions_per_image", ">= 0"]),
    ("train.captions_per_image=2.5", ["train.captions_per_image", "int"]),
    ("model.decoder.dropout=1.5", ["model.decoder.dropout", "[0, 1)"]),
    ("train.optimizer=adagrad", ["train.optimizer", "adam"]),
    ("data.format=imagenet", ["data.format", "coco"]),
    ("train.epochs=true", ["train.epochs", "int"]),
    ("model=3", ["model", "mapping"]),
    ("model.attention.hops=0", ["model.attention.hops", ">= 1"]),
    ("model.encoder.coordinate_degree=3", ["model.encoder.coordinate_degree", "must be 1", "got 3"]),
    ("train.ema=1", ["train.ema", "[0, 1)"]),
    ("train.flip=diagonal", ["train.flip", "horizontal", "'diagonal'"]),
    ("no_equals_sign", ["section.key=value"]),
])
def test_bad_values_name_the_key(override, fragments):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    for fragment in fragments:
        assert fragment in str(info.value)


def test_typo_in_file_names_file_and_key(tmp_path):
    path = write(tmp_path / "typo.yaml", "train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match="train.epochz.*'train.epochs'"):
        load_config(path)


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path / "bad.yaml", "train:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "bad.yaml" in str(info.value) and "line" in str(info.value)


def test_missing_file_and_base(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    path = write(tmp_path / "a.yaml", "_base_: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(path)


def test_base_loop_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="loop"):
        load_config(tmp_path / "a.yaml")


def test_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path / "list.yaml", "- 1\n- 2\n"))


def test_round_trip_through_yaml_and_dict(tmp_path):
    cfg = load_config(None, ["train.lr=0.005", "model.encoder.weights=null", "name=x"])
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg


def written_values(path) -> dict[str, object]:
    """A config file's leaves as {"a.b.c": value}, its ``_base_`` chain's first (the file wins)."""
    import yaml

    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    out = written_values(path.parent / raw.pop("_base_")) if "_base_" in raw else {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value

    walk(raw, "")
    return out


def test_configs_folder_loads():
    """Every shipped config is valid, named after its file, and every value it writes is the one loaded."""
    from pathlib import Path

    paths = sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml"))
    assert "shapes_soft.yaml" in [p.name for p in paths]
    for path in paths:
        cfg = load_config(path)
        assert cfg.name == path.stem
        loaded = config_to_dict(cfg)
        for dotted, value in written_values(path).items():
            got = loaded
            for part in dotted.split("."):
                got = got[part]
            assert (list(got) if isinstance(got, tuple) else got) == value, f"{path.name}: {dotted}"
