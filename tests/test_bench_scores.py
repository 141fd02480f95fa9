"""benchmarks/scores.py: a step time for every score asked, in a table with ratios."""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("bench_scores", Path(__file__).parents[1] / "benchmarks" / "scores.py")
scores = importlib.util.module_from_spec(spec)
spec.loader.exec_module(scores)

TINY = ["model.encoder.backbone=resnet18", "model.encoder.weights=null", "model.encoder.layer=layer1",
        "model.encoder.image_size=32", "model.attention.dim=8", "model.decoder.embed_dim=8",
        "model.decoder.hidden_dim=16", "train.batch_size=10"]


def test_every_score_gets_a_time_and_the_table_names_the_machine(capsys):
    medians = scores.main([*TINY, "--scores", "additive", "scaled_dot", "additive_dot", "--steps", "1",
                           "--repeat", "2", "--threads", "1"])
    assert list(medians) == ["additive", "scaled_dot", "additive_dot"]
    assert all(0 < m < 60 for m in medians.values())
    out = capsys.readouterr().out
    assert "1 threads" in out and "shapes_soft.yaml" in out
    assert "| additive | " in out and out.count("\n| ") == 5  # header, rule, 3 rows
    assert f"| {1000 * medians['additive']:.1f} | 1.00 |" in out


def test_the_times_are_per_round():
    times = scores.step_times(scores.REPO / "configs" / "shapes_soft.yaml", TINY, ["general"],
                              steps=1, repeat=3)
    assert list(times) == ["general"] and len(times["general"]) == 3


def test_vary_adds_the_first_score_with_one_change_each(capsys):
    medians = scores.main([*TINY, "--scores", "additive", "--vary", "model.decoder.fused=false",
                           "model.attention.dim=4", "--steps", "1", "--repeat", "1", "--threads", "1"])
    assert list(medians) == ["additive", "model.decoder.fused=false", "model.attention.dim=4"]
    out = capsys.readouterr().out
    assert "| additive, model.decoder.fused=false | " in out and out.count("\n| ") == 5


def test_a_varied_model_is_built_with_its_change(monkeypatch):
    built = []
    real = scores.Captioner.from_config
    monkeypatch.setattr(scores.Captioner, "from_config",
                        lambda cfg, *a, **k: built.append((cfg.model.attention.score, cfg.model.attention.dim))
                        or real(cfg, *a, **k))
    scores.step_times(scores.REPO / "configs" / "shapes_soft.yaml", TINY, ["general"], steps=1, repeat=1,
                      vary=["model.attention.dim=4"])
    assert built == [("general", 8), ("general", 4)]
