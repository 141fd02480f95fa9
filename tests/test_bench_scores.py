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
