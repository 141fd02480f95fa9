"""captioner evaluate: decoding a split, the metrics, the output files."""

import json

import pytest

from captioner.cli import main
from captioner.data import load_split
from captioner.evaluate import decode_records, evaluate, instances_file
from captioner.model import Captioner
from captioner.train import fit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shapes_root):
    from conftest import TINY_OVERRIDES

    from captioner.config import load_config

    out = tmp_path_factory.mktemp("run")
    cfg = load_config(None, [*TINY_OVERRIDES, f"data.root={shapes_root}", f"train.out_dir={out}", "train.epochs=1"])
    return fit(cfg, quiet=True).run_dir / "best.pt"


def test_evaluate_writes_coco_results_and_metrics(trained, tmp_path):
    model = Captioner.from_checkpoint(trained)
    result = evaluate(model, model.config.data, split="test", beam_size=2, out_dir=tmp_path, use_java=False)
    results = json.loads((tmp_path / "captions_test.json").read_text())
    records = load_split(model.config.data, "test")
    assert sorted(r["image_id"] for r in results) == sorted(r.image_id for r in records)
    assert all(set(r) == {"image_id", "caption"} and isinstance(r["caption"], str) for r in results)
    metrics = json.loads((tmp_path / "metrics_test.json").read_text())
    assert metrics["beam_size"] == 2 and metrics["tokenizer"] == "python"
    assert {"bleu4", "rouge_l", "cider"} <= set(metrics["scores"]) and "meteor" in metrics["unavailable"]
    assert metrics["attention_correctness"] is not None  # the shapes set has instances
    assert "BLEU-4" in result.table() and "CIDEr-D" in result.table()


def test_each_image_gets_its_own_caption_and_the_scores_are_of_those(trained, tmp_path):
    """Captions are written under the image they describe (a decoder perturbed at random says
    something different for each image), and the metrics score exactly that id -> caption map."""
    import torch

    from captioner.evaluate import references
    from captioner.metrics import caption_metrics

    model = Captioner.from_checkpoint(trained)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.add_(torch.randn_like(p))
    evaluate(model, model.config.data, split="test", beam_size=2, out_dir=tmp_path, use_java=False)
    written = {r["image_id"]: r["caption"] for r in json.loads((tmp_path / "captions_test.json").read_text())}
    records = load_split(model.config.data, "test")
    own = {r.image_id: model.caption(r.path, beam_size=2, max_len=20).text for r in records}
    assert len(set(own.values())) > 1  # the images get different captions: a mix-up would show
    assert written == own
    scores = json.loads((tmp_path / "metrics_test.json").read_text())["scores"]
    expected = caption_metrics(own, references(records), use_java=False, spice=False).scores
    for name in ("bleu4", "rouge_l", "cider"):
        assert scores[name] == pytest.approx(expected[name]), name


def test_validation_and_evaluation_decode_the_same_way(trained):
    """fit() validates from the features it encoded up front, in batches of its own; evaluate
    decodes from pixels: the same captions and maps either way."""
    import torch

    from captioner.evaluate import encode_records

    model = Captioner.from_checkpoint(trained)
    records = load_split(model.config.data, "val")
    features = encode_records(model, records, batch_size=5)
    as_validated = decode_records(model, records, max_len=8, features=features, batch_size=7)
    as_evaluated = decode_records(model, records, max_len=8)
    assert len(as_validated) == len(records) and any(d.words for d in as_evaluated)
    assert [d.words for d in as_validated] == [d.words for d in as_evaluated]
    for v, e in zip(as_validated, as_evaluated):
        assert e.alphas.shape == (len(e.words) + 1, model.encoder.num_locations)
        torch.testing.assert_close(v.alphas, e.alphas, atol=1e-4, rtol=1e-4)


def test_instances_file_is_found_beside_captions(trained):
    model = Captioner.from_checkpoint(trained)
    path = instances_file(model.config.data, "test")
    assert path is not None and path.name == "instances_test.json"


def test_cli_evaluate(trained, tmp_path, capsys):
    code = main(["evaluate", str(trained), "--split", "val", "--beam", "3", "--no-java", "--max-images", "3",
                 "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and "val split, 3 images, beam 3" in out and "CIDEr-D" in out
    assert len(json.loads((tmp_path / "captions_val.json").read_text())) == 3
    code = main(["evaluate", str(trained), "--beam", "0"])
    assert code == 2


def test_ablation_command_on_tiny_settings(shapes_root, tmp_path, capsys):
    """Two variants, one epoch, tiny model: the table has a row per variant with real numbers."""
    from conftest import TINY_OVERRIDES

    from captioner import ablation

    overrides = [o for o in TINY_OVERRIDES if not o.startswith("train.epochs")]
    code = ablation.main(["--variants", "soft", "none", "--epochs", "1", "--beam", "2", "--no-java",
                          "--out", str(tmp_path), f"data.root={shapes_root}", *overrides])
    assert code == 0
    rows = json.loads((tmp_path / "ablation.json").read_text())
    assert [r["attention"] for r in rows] == ["soft", "none"]
    assert all(0 <= r["bleu4"] <= 1 and r["epochs"] == 1 and r["uniform"] is not None for r in rows)
    assert "| soft |" in (tmp_path / "ablation.md").read_text()


def test_evaluate_reports_chair_and_relation_accuracy(trained, tmp_path):
    """CHAIR (object hallucination) and relation accuracy in the result, its table and the metrics json,
    equal to what captioner.chair computes on the captions written."""
    from captioner.chair import chair, load_ground_truth

    model = Captioner.from_checkpoint(trained)
    result = evaluate(model, model.config.data, split="test", beam_size=2, out_dir=tmp_path, use_java=False)
    captions = {r["image_id"]: r["caption"] for r in json.loads((tmp_path / "captions_test.json").read_text())}
    expected = chair(captions, load_ground_truth(instances_file(model.config.data, "test")))
    assert result.chair is not None and result.chair.as_dict() == expected.as_dict()
    assert result.chair.captions == len(captions)
    saved = json.loads((tmp_path / "metrics_test.json").read_text())["chair"]
    assert saved == expected.as_dict() and {"chair_i", "chair_s", "relation_accuracy"} <= set(saved)
    assert "CHAIR_s" in result.table() and "relation accuracy" in result.table()


def test_evaluate_scores_correctness_where_the_features_looked(trained, monkeypatch):
    """Attention correctness is scored with each cell's weight at its receptive field's centre
    (``model.encoder.cell_origin``) by default, at the cell's centre with align_maps=False."""
    import captioner.evaluate as evaluation

    seen = []
    real = evaluation.attention_correctness
    monkeypatch.setattr(evaluation, "attention_correctness",
                        lambda *args, origin: seen.append(origin) or real(*args, origin=origin))
    model = Captioner.from_checkpoint(trained)
    assert model.encoder.cell_origin[0] < 0.5  # a ResNet's features look near the cell's top-left corner
    for align in (True, False):
        evaluate(model, model.config.data, split="val", beam_size=1, use_java=False, spice=False, align_maps=align)
    assert seen == [model.encoder.cell_origin, (0.5, 0.5)]


def test_heatmaps_are_drawn_where_the_features_looked(trained, tmp_path, monkeypatch):
    """visualize_images draws each map with the encoder's receptive-field origin, as correctness scores it."""
    import captioner.visualize as visualize

    seen = []
    real = visualize.attention_figure
    monkeypatch.setattr(visualize, "attention_figure", lambda *a, **kw: seen.append(kw["origin"]) or real(*a, **kw))
    model = Captioner.from_checkpoint(trained)
    image = load_split(model.config.data, "test")[0].path
    visualize.visualize_images(model, [image], tmp_path, beam_size=1)
    assert seen == [model.encoder.cell_origin] and (tmp_path / f"{image.stem}.png").is_file()


def test_no_repeat_ngram_comes_from_the_checkpoint_unless_given(trained, tmp_path):
    from captioner.config import replace

    model = Captioner.from_checkpoint(trained)
    records = load_split(model.config.data, "val")
    assert model.config.decode.no_repeat_ngram == 0
    free = [d.words for d in decode_records(model, records, max_len=12)]
    once = [d.words for d in decode_records(model, records, max_len=12, no_repeat_ngram=1)]
    assert any(len(set(w)) < len(w) for w in free)  # the tiny model repeats words...
    assert all(len(set(w)) == len(w) for w in once)  # ...and with 1 no word comes twice
    model.config = replace(model.config, decode=replace(model.config.decode, no_repeat_ngram=1))
    assert [d.words for d in decode_records(model, records, max_len=12)] == once
    assert [d.words for d in decode_records(model, records, max_len=12, no_repeat_ngram=0)] == free
    result = evaluate(model, model.config.data, split="val", beam_size=2, max_len=12, out_dir=tmp_path, use_java=False)
    assert all(len(set(c.split())) == len(c.split()) for c in result.captions.values())
    assert json.loads((tmp_path / "metrics_val.json").read_text())["no_repeat_ngram"] == 1


def test_cli_evaluate_no_repeat_ngram(trained, tmp_path, capsys):
    code = main(["evaluate", str(trained), "--split", "val", "--beam", "2", "--no-java", "--max-images", "4",
                 "--no-repeat-ngram", "1", "--out", str(tmp_path)])
    assert code == 0
    assert json.loads((tmp_path / "metrics_val.json").read_text())["no_repeat_ngram"] == 1
    captions = json.loads((tmp_path / "captions_val.json").read_text())
    assert all(len(set(c["caption"].split())) == len(c["caption"].split()) for c in captions)
    capsys.readouterr()
    assert main(["evaluate", str(trained), "--no-repeat-ngram", "-1"]) == 2
    assert "--no-repeat-ngram must be >= 0" in capsys.readouterr().err


def test_cli_evaluate_on_a_shapes_set_made_with_another_seed(trained, tmp_path, capsys):
    """Held-out images: ``captioner data shapes --seed 5``, then evaluate there; the set is taken
    as its manifest says, not regenerated or refused for the checkpoint's seed."""
    fresh = tmp_path / "shapes_seed5"
    assert main(["data", "shapes", "--out", str(fresh), "--n", "20", "--seed", "5", "--image-size", "64"]) == 0
    before = {p.name: p.stat().st_mtime_ns for p in (fresh / "train").iterdir()}
    code = main(["evaluate", str(trained), "--data-root", str(fresh), "--split", "train", "--beam", "1", "--no-java",
                 "--out", str(tmp_path / "eval")])
    assert code == 0
    captions = json.loads((tmp_path / "eval" / "captions_train.json").read_text())
    truth = json.loads((fresh / "annotations" / "captions_train.json").read_text())
    assert sorted(c["image_id"] for c in captions) == sorted(i["id"] for i in truth["images"])
    assert {p.name: p.stat().st_mtime_ns for p in (fresh / "train").iterdir()} == before  # read, not remade
    (fresh / "shapes.json").write_text("{}")
    capsys.readouterr()
    assert main(["evaluate", str(trained), "--data-root", str(fresh), "--no-java"]) == 2
    assert "shapes.json is not a shapes manifest" in capsys.readouterr().err
