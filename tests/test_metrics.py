"""Tests for captioner.metrics: the COCO caption metrics and the PTB tokenizer fallback.

The Java tests (PTB tokenizer, METEOR, SPICE) are skipped where there is no ``java``. The
METEOR JVM takes seconds to start, so the Java reports are module-scoped fixtures that
several tests read.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
import string
import time
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from captioner import metrics
from captioner.errors import CaptionerError
from captioner.metrics import (
    METRICS,
    PTB_PUNCTUATIONS,
    MetricReport,
    bleu,
    caption_metrics,
    ptb_like_tokenize,
    ptb_tokenize,
)

HAS_JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not HAS_JAVA, reason="needs Java (the PTB tokenizer, METEOR, SPICE)")

# Four images, one reference each; every sentence has words no other image uses, so every
# n-gram order has an n-gram with idf > 0 (CIDEr-D of an exact match is then exactly 10).
REFS = {
    1: ["A man riding a wave on top of a surfboard."],
    2: ["Two giraffes standing next to each other in a field."],
    3: ["A red double-decker bus on a London street."],
    4: ["It's a cat sleeping on the laptop's keyboard!"],
}
EXACT = {i: refs[0] for i, refs in REFS.items()}
UNRELATED = {1: "purple elephants juggle cheese", 2: "quantum soup evaporates slowly",
             3: "seven violins whisper loudly", 4: ""}  # an empty hypothesis is allowed (and last)


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def java_reports():
    """{"exact": .., "unrelated": ..}: Java reports (PTB, METEOR, SPICE attempt), with timings,
    what they printed, and every METEOR scorer they started."""
    if not HAS_JAVA:
        pytest.skip("needs Java")
    from pycocoevalcap.meteor import meteor as meteor_module

    started = []
    init = meteor_module.Meteor.__init__

    def spy(self):
        init(self)
        started.append(self)

    out = {"meteors": started}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(meteor_module.Meteor, "__init__", spy)
        for name, hyps in (("exact", EXACT), ("unrelated", UNRELATED)):
            printed = io.StringIO()
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(printed):
                out[name] = caption_metrics(hyps, REFS, use_java=True)
            out[f"{name}_seconds"] = time.perf_counter() - t0
            out[f"{name}_printed"] = printed.getvalue()
    return out


def python_report(hyps, refs=REFS, **kwargs) -> MetricReport:
    return caption_metrics(hyps, refs, use_java=False, **kwargs)


# ----------------------------------------------------------------------------- BLEU, ROUGE-L

def test_exact_match_scores_one():
    report = python_report(EXACT)
    for n in range(1, 5):
        assert report.scores[f"bleu{n}"] == pytest.approx(1.0, abs=1e-6)
    assert report.scores["rouge_l"] == pytest.approx(1.0)


def test_no_common_word_scores_zero():
    report = python_report(UNRELATED)
    assert report.scores["bleu1"] == pytest.approx(0.0, abs=1e-6)
    assert report.scores["rouge_l"] == 0.0
    assert report.scores["cider"] == 0.0


def test_bleu1_by_hand():
    # Clipped unigram precision: "the" x3 is clipped to 2 (its most in one reference), "cat"
    # matches, "today" matches the second reference: 4 of 5 words. Brevity penalty with the
    # closest reference length (6, not 9): exp(1 - 6/5).
    hyps = {0: "the the the cat today"}
    refs = {0: ["the cat is on the mat", "there is a cat on a mat here today"]}
    expected = 4 / 5 * math.exp(1 - 6 / 5)
    assert python_report(hyps, refs).scores["bleu1"] == pytest.approx(expected, rel=1e-6)
    # nltk's corpus BLEU (the training-time bleu()) agrees on this tokenization.
    ours = bleu([hyps[0].split()], [[r.split() for r in refs[0]]])
    assert ours["bleu1"] == pytest.approx(expected, rel=1e-6)


def test_bleu_1_to_4_by_hand():
    """BLEU-n is the geometric mean of the clipped 1..n-gram precisions (same length: no penalty).
    the cat sat on the mat / the cat sat on a mat: 5/6 words, 3/5 bigrams, 2/4 trigrams, 1/3 4-grams."""
    hyps, refs = {0: "the cat sat on the mat"}, {0: ["the cat sat on a mat"]}
    precisions = [5 / 6, 3 / 5, 2 / 4, 1 / 3]
    expected = {f"bleu{n}": math.prod(precisions[:n]) ** (1 / n) for n in range(1, 5)}
    ours = bleu([hyps[0].split()], [[refs[0][0].split()]])
    coco = python_report(hyps, refs).scores
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, rel=1e-6), name
        assert coco[name] == pytest.approx(value, rel=1e-6), name
    assert bleu([], []) == {"bleu1": 0.0, "bleu2": 0.0, "bleu3": 0.0, "bleu4": 0.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nltk's warning about orders with no match is kept quiet
        assert bleu([["a", "dog"]], [[["a", "cat"]]])["bleu4"] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="2 hypotheses but 1 reference"):
        bleu([["a"], ["b"]], [[["a"]]])


# ----------------------------------------------------------------------------- CIDEr-D

def test_cider_exact_corpus_is_ten():
    # Identical tf-idf vectors have cosine 1 for each n-gram order and no length penalty;
    # CIDEr-D averages the 4 orders, divides by the number of references and scales by 10.
    assert python_report(EXACT).scores["cider"] == pytest.approx(10.0)


def test_cider_prefers_the_exact_match():
    partial = {**EXACT, 2: "Two giraffes eating leaves from a tree."}
    wrong = {**EXACT, 2: "purple elephants juggle cheese"}
    exact, part, none = (python_report(h).scores["cider"] for h in (EXACT, partial, wrong))
    assert exact > part > none


def test_cider_of_a_single_image_is_zero():
    # idf = log(#images) - log(df): with one image every n-gram has idf 0.
    assert python_report({5: "a dog"}, {5: ["a dog"]}).scores["cider"] == 0.0


# ----------------------------------------------------------------------------- tokenizers

@pytest.mark.parametrize("caption, expected", [
    ("A man's dog, running!", ["a", "man", "'s", "dog", "running"]),
    ("It's a black-and-white photo; don't you think?",
     ["it", "'s", "a", "black-and-white", "photo", "do", "n't", "you", "think"]),
    ('A sign reads: "STOP" ... -- really', ["a", "sign", "reads", "stop", "really"]),
    ("A few zebras (and a giraffe).", ["a", "few", "zebras", "-lrb-", "and", "a", "giraffe", "-rrb-"]),
    ("The U.S. flag at 3:30 p.m. costs $1,000.50", ["the", "u.s.", "flag", "at", "3:30", "p.m.", "costs",
                                                   "$", "1,000.50"]),
    ("I can't, we cannot. Wow!!", ["i", "ca", "n't", "we", "can", "not", "wow", "!!"]),
    ("The dogs' toys", ["the", "dogs", "toys"]),
    ("Bus 5. at gate 7.", ["bus", "5", "at", "gate", "7"]),  # a number's period is not an abbreviation's
    ("", []),
])
def test_python_tokenizer_rules(caption, expected):
    assert ptb_like_tokenize(caption) == expected


def test_punctuation_list_is_coco_captions():
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    assert PTB_PUNCTUATIONS == frozenset(PUNCTUATIONS)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=string.printable, max_size=60))
def test_python_tokenizer_output_is_clean(caption):
    tokens = ptb_like_tokenize(caption)
    for token in tokens:
        assert token and token == token.lower() and not any(c.isspace() for c in token)
        assert token not in PTB_PUNCTUATIONS


# Ordinary captions, with the punctuation, clitics and abbreviations captions have.
CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "The pizza has pepperoni, cheese and olives on it.",
    "Kids playing soccer on a grassy field .",
    "A stop sign that says 'STOP' in red.",
    "Cows grazing in a field near a barn; trees behind them.",
    "A man -- wearing a hat -- rides a bike",
    "A few zebras (and a giraffe) in the wild.",
    "Three teddy bears sit on a shelf...",
    "A plate w/ a sandwich & fries",
    "A clock tower reads 10:45 on a cloudy day",
    "Someone's cell phone sitting on a wooden table",
    "The people aren't looking at the camera",
    "A sign for St. Patrick's Day on Main St.",
    "A BATHROOM WITH A TOILET AND A SINK",
    "A woman holding an umbrella in the rain?",
    'A man holding a sign that reads "Don\'t Panic!"',
    "The players' uniforms are red and white.",
    "A cake that says \u201cHappy Birthday\u201d on it\u2026",
    "A woman in a t-shirt and jeans stands near a U.S. flag",
    "It's 5 o'clock; i'd've gone by the 1990's, e.g. at 3 p.m. with $20 (or 50%).",
]


@needs_java
def test_python_tokenizer_equals_ptb():
    assert [ptb_like_tokenize(c) for c in CAPTIONS] == ptb_tokenize(CAPTIONS)


@needs_java
def test_ptb_tokenize_keeps_one_line_per_caption():
    # coco-caption's wrapper loses an empty last caption and shifts on "\r"; ours does not.
    assert ptb_tokenize(["a\nb", "c\rd", "", "e.", ""]) == [["a", "b"], ["c", "d"], [], ["e."], []]


# ----------------------------------------------------------------------------- without Java

def test_without_java(capfd):
    report = python_report(EXACT)
    assert report.tokenizer == "python"
    assert set(report.unavailable) == {"meteor", "spice", "ptb"}
    assert all(reason.strip() and "\n" not in reason for reason in report.unavailable.values())
    assert set(report.scores) == {"bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider"}
    assert capfd.readouterr().out == ""  # pycocoevalcap's BLEU prints; the CLI stays clean
    table = report.table()
    assert "METEOR" in table and "n/a (Java disabled" in table and "tokenizer: python" in table


def test_use_java_true_without_java_raises(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with pytest.raises(CaptionerError, match="java"):
        caption_metrics(EXACT, REFS, use_java=True)
    report = caption_metrics(EXACT, REFS)  # auto-detect: falls back
    assert report.tokenizer == "python" and "no `java` on PATH" in report.unavailable["meteor"]


# ----------------------------------------------------------------------------- with Java

@needs_java
def test_java_report(java_reports):
    exact, unrelated = java_reports["exact"], java_reports["unrelated"]
    assert exact.tokenizer == unrelated.tokenizer == "ptb"
    assert exact.scores["meteor"] > 0.9
    assert unrelated.scores["meteor"] < 0.2
    assert exact.scores["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert exact.scores["cider"] == pytest.approx(10.0)
    # On these captions the fallback tokenizer gives the same numbers.
    fallback = python_report(EXACT).scores
    for key in ("bleu1", "bleu4", "rouge_l", "cider"):
        assert exact.scores[key] == pytest.approx(fallback[key])
    assert java_reports["exact_printed"] == java_reports["unrelated_printed"] == ""


@needs_java
def test_spice_scores_or_says_why(java_reports):
    for name in ("exact", "unrelated"):
        report = java_reports[name]
        assert ("spice" in report.scores) != ("spice" in report.unavailable)
        if "spice" in report.scores:
            assert 0.0 <= report.scores["spice"] <= 1.0
        else:
            reason = report.unavailable["spice"]
            assert reason.strip() and "\n" not in reason
        # Offline, SPICE must not wait for a download: the whole call (PTB, METEOR's JVM
        # start, SPICE) stays well under its multi-minute first-use download.
        assert java_reports[f"{name}_seconds"] < 120


@needs_java
def test_meteor_jvm_is_ended(java_reports):
    assert len(java_reports["meteors"]) == 2
    for meteor in java_reports["meteors"]:
        assert meteor.meteor_p.poll() is not None
        assert meteor.meteor_p.stdout.closed and meteor.meteor_p.stderr.closed
        assert not meteor.lock.locked()


@needs_java
def test_same_numbers_as_coco_eval_cap(monkeypatch):
    """Our pipeline against pycocoevalcap's own tokenizer wrapper and scorers (METEOR
    is left out here: its JVM start is slow, and the scorer is called unchanged)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer import ptbtokenizer

    if not os.access(Path(ptbtokenizer.__file__).parent, os.W_OK):
        pytest.skip("pycocoevalcap's PTBTokenizer writes into its package folder, which is read-only here")
    hyps = {**UNRELATED, 1: EXACT[1], 4: "A cat sleeping on a keyboard."}
    tokenizer = ptbtokenizer.PTBTokenizer()
    with contextlib.redirect_stdout(io.StringIO()):
        gts = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in REFS.items()})
        res = tokenizer.tokenize({i: [{"caption": hyps[i]}] for i in REFS})
        expected = dict(zip(("bleu1", "bleu2", "bleu3", "bleu4"), Bleu(4).compute_score(gts, res)[0]))
        expected["rouge_l"] = Rouge().compute_score(gts, res)[0]
        expected["cider"] = Cider().compute_score(gts, res)[0]
    monkeypatch.setattr(metrics, "_run_meteor", lambda gts, res: (None, "skipped in this test"))
    got = caption_metrics(hyps, REFS, use_java=True, spice=False)
    assert got.tokenizer == "ptb"
    assert got.unavailable == {"meteor": "skipped in this test", "spice": "not requested (spice=False)"}
    for key, value in expected.items():
        assert got.scores[key] == pytest.approx(float(value), rel=1e-12, abs=1e-15)


@needs_java
def test_meteor_that_cannot_start_is_reported(monkeypatch):
    from pycocoevalcap.meteor import meteor as meteor_module

    monkeypatch.setattr(meteor_module, "METEOR_JAR", "no-such-meteor.jar")
    gts, res = {1: ["a dog"]}, {1: ["a dog"]}
    value, reason = metrics._run_meteor(gts, res)
    assert value is None and reason.startswith("METEOR failed") and "no-such-meteor.jar" in reason


@needs_java
def test_meteor_timeout_is_reported(monkeypatch):
    monkeypatch.setattr(metrics, "_METEOR_TIMEOUT_S", (0.0, 0.0))
    value, reason = metrics._run_meteor({1: ["a dog"]}, {1: ["a dog"]})
    assert value is None and reason.startswith("METEOR timed out")


def _fake_spice_dir(tmp_path: Path, *, models: bool) -> Path:
    from pycocoevalcap.spice import get_stanford_models as gsm

    lib = tmp_path / gsm.SPICELIB
    lib.mkdir()
    if models:
        for suffix in (".jar", "-models.jar"):
            (lib / f"{gsm.JAR}{suffix}").write_bytes(b"")
    return tmp_path


def test_spice_without_models_does_not_download(monkeypatch, tmp_path):
    spice_dir = _fake_spice_dir(tmp_path, models=False)
    monkeypatch.setattr(metrics, "_spice_dir", lambda: spice_dir)
    value, reason = metrics._run_spice({1: ["a dog"]}, {1: ["a dog"]})
    assert value is None
    assert reason == (f"Stanford CoreNLP models not found in {spice_dir / 'lib'}; "
                      "SPICE downloads them at first use, which needs network")


@needs_java
def test_spice_java_failure_and_timeout_are_reported(monkeypatch, tmp_path):
    # Models "present" but no SPICE jar in the folder: java exits with an error.
    spice_dir = _fake_spice_dir(tmp_path, models=True)
    monkeypatch.setattr(metrics, "_spice_dir", lambda: spice_dir)
    value, reason = metrics._run_spice({1: ["a dog"]}, {1: ["a dog"]})
    assert value is None and reason.startswith("SPICE exited with") and "spice-1.0.jar" in reason
    monkeypatch.setattr(metrics, "_SPICE_TIMEOUT_S", (0.0, 0.0))
    value, reason = metrics._run_spice({1: ["a dog"]}, {1: ["a dog"]})
    assert value is None and reason.startswith("SPICE timed out")


# ----------------------------------------------------------------------------- input checks, table

@pytest.mark.parametrize("hyps, refs, fragment", [
    ({1: "a dog", 42: "a cat"}, {1: ["a dog"]}, "42"),
    ({1: "a dog"}, {1: ["a dog"], 42: ["a cat"]}, "42"),
    ({1: "a dog"}, {1: []}, "non-empty"),
    ({1: "a dog"}, {1: "a dog"}, "non-empty"),
    ({}, {}, "no images"),
])
def test_bad_ids_raise(hyps, refs, fragment):
    with pytest.raises(ValueError, match=fragment):
        caption_metrics(hyps, refs, use_java=False)


def test_table_names_every_metric():
    report = python_report(EXACT)
    table = report.table()
    lines = table.splitlines()
    names = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "SPICE"]
    assert [line.split()[0] for line in lines[1:9]] == names and len(METRICS) == len(names)
    assert "100.0" in lines[1]           # BLEU-1 = 1.0 as x100, one decimal
    assert "1000.0" in lines[7]          # CIDEr-D = 10.0
    assert lines[-1].startswith("tokenizer: python")
