"""The ablation's variants and table (the runs themselves are measured, not tested here)."""

from pathlib import Path

import torch

from captioner import ablation
from captioner.config import load_config


def test_every_estimator_is_a_row_on_the_hard_config():
    for estimator in ("reinforce", "loo", "gumbel"):
        v = ablation.VARIANTS[f"hard_{estimator}"]
        cfg = load_config(Path("configs") / f"shapes_{v.stem}.yaml", list(v.overrides))
        assert cfg.model.attention.name == "hard" and cfg.model.attention.hard.estimator == estimator
        other = ablation.VARIANTS[f"hard_{estimator}_expectation"]  # the same run, fed the expected context
        assert other.run == f"hard_{estimator}" and other.inference == "expectation" and other.overrides == v.overrides
    assert {"soft", "local", "none"} <= set(ablation.DEFAULT_VARIANTS)


def test_argmax_maps_are_one_hot_at_the_distributions_mode():
    probs = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]])
    torch.testing.assert_close(ablation._argmax_maps(probs), torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))


def test_table_reports_correctness_on_the_distribution_and_on_its_argmax():
    row = ablation.Row(attention="hard_gumbel", bleu4=0.3, meteor=None, cider=0.9, correctness=0.12,
                       argmax_correctness=0.35, uniform=0.04, chair_s=0.25, chair_i=0.125, relation_accuracy=float("nan"),
                       val_bleu4=0.2, val_cider=0.7, epochs=4)
    table = ablation.markdown([row], epochs=4, beam=3)
    assert "| CHAIR_s | CHAIR_i | relation acc. | correctness | argmax correctness | uniform |" in table
    assert "| hard_gumbel | 30.0 | n/a | 90.0 | 25.0 | 12.5 | n/a | 12.0 | 35.0 | 4.0 | 20.0 | 70.0 |" in table


def test_a_scored_row_is_reused_only_for_the_same_budget(tmp_path, monkeypatch):
    calls = []
    row = ablation.Row(attention="soft", bleu4=0.3, meteor=None, cider=0.9, correctness=0.1, argmax_correctness=0.2,
                       uniform=0.05, chair_s=0.5, chair_i=0.4, relation_accuracy=None, val_bleu4=0.2, val_cider=0.7,
                       epochs=4)
    monkeypatch.setattr(ablation, "_train_and_score", lambda name, **kw: calls.append(kw["epochs"]) or row)
    kw = dict(config_dir=Path("configs"), out_root=tmp_path, beam=3, overrides=[], use_java=False)
    assert ablation.run_variant("soft", epochs=4, **kw) == row
    assert ablation.run_variant("soft", epochs=4, **kw) == row and calls == [4]  # reused
    ablation.run_variant("soft", epochs=5, **kw)
    assert calls == [4, 5]  # another budget: trained and scored again


def test_gradvar_reports_a_finite_spread_per_estimator():
    from captioner import gradvar

    state = gradvar.warm_up(2, batch=8, seed=0)
    rows = [gradvar.gradient_spread(e, state, draws=3, batch=8, samples=2, seed=0) for e in gradvar.ESTIMATORS]
    assert [r.estimator for r in rows] == list(gradvar.ESTIMATORS)
    assert all(r.variance > 0 and r.mean_norm > 0 and r.ms_per_draw > 0 for r in rows)
    assert gradvar.table(rows).count("\n") == 4  # header, rule, three rows
