"""Caption metrics.

Two ways to score captions:

* :func:`bleu`: BLEU-1..4 from nltk's ``corpus_bleu`` on our tokenization (no Java, no data
  downloads), for quick checks; training validates with :func:`caption_metrics` (no Java).
* :func:`caption_metrics`: the COCO caption metrics computed the standard way, by
  pycocoevalcap's scorers exactly as its ``COCOEvalCap`` calls them (Stanford PTB
  tokenization, then BLEU-1..4, METEOR, ROUGE-L, CIDEr-D and SPICE). These are the numbers
  papers report (Xu et al. 2015, Table 1: BLEU and METEOR). The scorers are called one by
  one rather than through ``COCOEvalCap.evaluate()``, because that one builds SPICE, which
  downloads Stanford CoreNLP at first use and fails (after a long wait) without network.

What needs Java: the PTB tokenizer, METEOR and SPICE are Java programs; BLEU, ROUGE-L and
CIDEr-D are pure Python. Without Java, :func:`caption_metrics` reports METEOR and SPICE as
unavailable and tokenizes with :func:`ptb_like_tokenize`, a pure-Python imitation of the
PTB tokenizer's effect, named ``"python"`` in the report so that the numbers are clearly
marked (they match the standard ones on ordinary captions, not in every corner case).

Files: the Java PTB tokenizer and SPICE are given their input in a fresh temporary
directory (pycocoevalcap itself writes them into its own package folder, which fails when
site-packages is read-only). SPICE keeps its parse cache in pycocoevalcap's ``spice/cache``
as pycocoevalcap does when that folder is writable, and in a temporary folder otherwise.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nltk.translate.bleu_score import corpus_bleu

from captioner.errors import CaptionerError


def bleu(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]]) -> dict[str, float]:
    """Corpus BLEU-1..4.

    Args:
        hypotheses: one word list per image.
        references: for each image, its reference word lists.

    Returns:
        {"bleu1": .., "bleu2": .., "bleu3": .., "bleu4": ..} in [0, 1].
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets")
    if not hypotheses:
        return {f"bleu{n}": 0.0 for n in range(1, 5)}
    weights = [(1.0,), (0.5, 0.5), (1 / 3, 1 / 3, 1 / 3), (0.25, 0.25, 0.25, 0.25)]
    with warnings.catch_warnings():  # nltk warns whenever an n-gram order has no match
        warnings.simplefilter("ignore")
        scores = corpus_bleu([list(r) for r in references], [list(h) for h in hypotheses], weights=weights)
    return {f"bleu{n + 1}": float(s) for n, s in enumerate(scores)}


# ============================================================================ COCO metrics

METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider", "spice")
"""The keys of :attr:`MetricReport.scores`, in the order :meth:`MetricReport.table` prints them."""

DISPLAY_NAMES = {"bleu1": "BLEU-1", "bleu2": "BLEU-2", "bleu3": "BLEU-3", "bleu4": "BLEU-4", "meteor": "METEOR",
            "rouge_l": "ROUGE-L", "cider": "CIDEr-D", "spice": "SPICE"}

# Time limits for the Java programs. METEOR and SPICE get a base (JVM start, loading their
# resources) plus a share per image; the limits only stop a stuck process, they are far
# above what the work takes.
_JAVA_PROBE_TIMEOUT_S = 30.0
_PTB_TIMEOUT_S = (60.0, 0.01)      # (base, per caption)
_METEOR_TIMEOUT_S = (120.0, 0.1)   # (base, per image)
_SPICE_TIMEOUT_S = (300.0, 0.5)    # (base, per image); parsing with CoreNLP is slow


def _limit(base_and_rate: tuple[float, float], n: int) -> float:
    base, rate = base_and_rate
    return base + rate * n


# ----------------------------------------------------------------------------- tokenizers

# coco-caption drops these tokens after PTB tokenization (pycocoevalcap/tokenizer/
# ptbtokenizer.py, PUNCTUATIONS; tests check that the copy agrees). Note that the tokenizer
# runs with -lowerCase, so brackets come out as "-lrb-", "-rrb-", ... which do NOT match the
# upper-case entries here: coco-caption keeps them as words, and so do we.
PTB_PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                              ".", "?", "!", ",", ":", "-", "--", "...", ";"])

_NORMALIZE = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2026": "...",
                            "\u2013": " -- ", "\u2014": " -- "})
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_TOKEN = re.compile(r"""
      (?:[#@](?=[^\W\d_])|(?<![\w.-])-?\.?(?=\d))?             # "#tag", "@user", "-5", ".5"
      \w+(?:(?:[-./]|'(?=[^\W\d_])|(?<=\d)[,:](?=\d))\w+)*      # a word: "x-ray", "o'clock", "1,000"
      (?:\.(?!\.))?                                               # ... may end with one period
    | (?<!\w)'(?:\d\ds|em|cause|n')(?!\w)                          # "'90s", "rock 'n' roll"
    | \.\.\.+ | --+ | [!?]+ | '+ | `+                               # runs of punctuation, one token each
    | \S                                                           # any other symbol
""", re.VERBOSE)
_WORD_START = re.compile(r"[#@.'-]{0,2}\w")  # a _TOKEN match that is a word
# A word keeps its final period when it is an abbreviation: single letters with periods
# ("a.", "u.s.", "e.g.") or one of the abbreviations the PTB lexer knows; otherwise the
# period is a token of its own (and dropped).
_INITIALS = re.compile(r"(?:[^\W\d_]\.)*[^\W\d_]")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st mt ave blvd rd co corp inc ltd jr sr vs etc ft gen gov sen rep capt lt sgt col bros "
    "jan feb mar apr jun jul aug sep sept oct nov dec".split())
_CLITIC = re.compile(r"(.+?)(n't|'s|'m|'d|'re|'ve|'ll)")
_SPLIT_WORDS = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "wanna": ["wan", "na"],
                "gotta": ["got", "ta"], "gimme": ["gim", "me"], "lemme": ["lem", "me"]}


def _split_word(word: str) -> list[str]:
    """One word token -> PTB tokens: abbreviation periods, clitics, 'cannot' and friends."""
    if word.endswith(".") and len(word) > 1:
        stem = word[:-1]
        if _INITIALS.fullmatch(stem) or stem in _ABBREVIATIONS:
            return [word]
        return [*_split_word(stem), "."]
    if word in _SPLIT_WORDS:
        return list(_SPLIT_WORDS[word])
    tail: list[str] = []
    while m := _CLITIC.fullmatch(word):  # "i'd've" -> "i" "'d" "'ve"; "can't" -> "ca" "n't"
        word, clitic = m.groups()
        tail.insert(0, clitic)
    return [word, *tail]


def ptb_like_tokenize(caption: str) -> list[str]:
    """Tokenize one caption the way coco-caption's PTB tokenizer does, in pure Python.

    The fallback for :func:`caption_metrics` when there is no Java. Rules, mimicking
    Stanford's PTBTokenizer (CoreNLP 3.4.1, ``-preserveLines -lowerCase``) followed by
    coco-caption's removal of :data:`PTB_PUNCTUATIONS`:

    1. Curly quotes become straight ones, "…" becomes "...", en and em dashes "--"; lowercase.
    2. Words are runs of letters, digits and "_", joined across "-", ".", "/", across "'"
       before a letter ("black-and-white", "u.s", "3/4", "o'clock") and across "," and ":"
       between digits ("1,000", "3:30"); "#" or "@" before a letter stays on ("#tag"), and
       so do "-" and "." before a number ("-5", ".5"); "'90s", "'em", "'cause", "'n'" are words.
    3. A final period stays on abbreviations (initials like "a." "u.s." "p.m." and a list like
       "mr." "st." "etc."); otherwise it is split off.
    4. Clitics are split off: "man's" -> "man 's", "don't" -> "do n't", "can't" -> "ca n't",
       "i'd've" -> "i 'd 've"; and "cannot" -> "can not", "gonna" -> "gon na" (also wanna,
       gotta, gimme, lemme).
    5. Brackets become "-lrb-", "-rrb-", "-lsb-", "-rsb-", "-lcb-", "-rcb-" (kept: see
       :data:`PTB_PUNCTUATIONS`); runs of "!"/"?" are one token ("!!" is kept, as by PTB);
       every other symbol ("$", "%", "&", "+") is a token of its own.
    6. Tokens in :data:`PTB_PUNCTUATIONS` are dropped; a straight double quote counts as
       one (the PTB turns it into an opening or closing quote, both in the list).

    On ordinary captions the result equals the real tokenizer's (tests compare the two).
    Known differences, all rare in captions: "rock'n'roll", "y'all", "'tis", "a!b",
    "<tag>", e-mail addresses, emoticons, Unicode fractions, "no." before a number, a
    single letter before ".." or "....".

    >>> ptb_like_tokenize("A man's dog (brown), running!")
    ['a', 'man', "'s", 'dog', '-lrb-', 'brown', '-rrb-', 'running']
    """
    text = caption.translate(_NORMALIZE).lower()
    tokens: list[str] = []
    for tok in _TOKEN.findall(text):
        if _WORD_START.match(tok):
            tokens.extend(_split_word(tok))
        else:
            tokens.append(_BRACKETS.get(tok, "''" if tok == '"' else tok))
    return [t for t in tokens if t not in PTB_PUNCTUATIONS]


def _java_problem() -> str | None:
    """None when a working ``java`` is on PATH, else a one-line reason."""
    java = shutil.which("java")
    if java is None:
        return "no `java` on PATH (METEOR, SPICE and the PTB tokenizer are Java programs)"
    try:
        done = subprocess.run([java, "-version"], check=False, capture_output=True, timeout=_JAVA_PROBE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"`java -version` failed: {_one_line(err)}"
    if done.returncode != 0:
        return f"`java -version` exited with {done.returncode}: {_last_line(done.stderr)}"
    return None


def ptb_tokenize(captions: Sequence[str]) -> list[list[str]]:
    """Tokenize captions exactly as coco-caption does: Stanford's PTBTokenizer (Java).

    The command, jar and punctuation filter of pycocoevalcap's ``PTBTokenizer``; it differs
    only where that one is fragile: input goes through a temporary directory (not the
    package folder), every caption gets its output line (coco-caption loses an empty last
    caption), and the run has a time limit.

    Raises:
        RuntimeError: Java or the tokenizer failed.
    """
    from pycocoevalcap.tokenizer import ptbtokenizer

    if not captions:
        return []
    jar_dir = Path(ptbtokenizer.__file__).resolve().parent
    # One caption a line: line breaks inside a caption become spaces (coco-caption replaces
    # "\n"; any other line break would shift every following caption).
    lines = [" ".join(c.splitlines()) for c in captions]
    with tempfile.TemporaryDirectory(prefix="captioner-ptb-") as tmp:
        path = Path(tmp) / "captions.txt"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        cmd = ["java", "-cp", ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR, "edu.stanford.nlp.process.PTBTokenizer",
               "-preserveLines", "-lowerCase", str(path)]
        try:
            done = subprocess.run(cmd, check=False, cwd=jar_dir, capture_output=True,
                                  timeout=_limit(_PTB_TIMEOUT_S, len(captions)))
        except (OSError, subprocess.TimeoutExpired) as err:
            raise RuntimeError(f"the PTB tokenizer failed: {_one_line(err)}") from err
    if done.returncode != 0:
        raise RuntimeError(f"the PTB tokenizer exited with {done.returncode}: {_last_line(done.stderr)}")
    out = done.stdout.decode("utf-8").split("\n")
    if len(out) < len(lines):
        raise RuntimeError(f"the PTB tokenizer returned {len(out)} lines for {len(lines)} captions")
    return [[w for w in line.rstrip().split(" ") if w and w not in ptbtokenizer.PUNCTUATIONS]
            for line in out[:len(lines)]]


# ----------------------------------------------------------------------------- Java scorers

def _run_meteor(gts: dict, res: dict) -> tuple[float | None, str | None]:
    """(METEOR, None), or (None, reason) when it cannot run. The JVM is always ended."""
    from pycocoevalcap.meteor.meteor import Meteor

    try:
        meteor = Meteor()  # starts `java -jar -Xmx2G meteor-1.5.jar ... -stdio` in the package folder
    except OSError as err:
        return None, f"METEOR could not start: {_one_line(err)}"
    proc = meteor.meteor_p
    killed = threading.Event()

    def kill() -> None:
        killed.set()
        proc.kill()  # unblocks the pending readline(): it returns b"" and compute_score raises

    limit = _limit(_METEOR_TIMEOUT_S, len(gts))
    watchdog = threading.Timer(limit, kill)
    watchdog.daemon = True
    watchdog.start()
    error: Exception | None = None
    try:
        score, _ = meteor.compute_score(gts, res)
    except Exception as err:  # a JVM that died or never started: report, do not crash
        error = err
    finally:
        watchdog.cancel()
        stderr = _close_meteor(meteor)
    if error is None:
        return float(score), None
    if killed.is_set():
        return None, f"METEOR timed out after {limit:.0f} s"
    return None, f"METEOR failed: {_last_line(stderr) or _one_line(error)}"


def _close_meteor(meteor) -> bytes:
    """End METEOR's JVM, close its pipes, and return what it wrote to stderr.

    ``Meteor.__del__`` would kill the process too, but it first takes the scorer's lock,
    which ``compute_score`` leaves held when it raises: at garbage collection that would
    deadlock. So release the lock and end the process here; ``__del__`` then finds nothing
    left to do.
    """
    proc = meteor.meteor_p
    if meteor.lock.locked():
        meteor.lock.release()
    with contextlib.suppress(OSError):  # flushing stdin into a dead process: BrokenPipeError
        proc.stdin.close()
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    stderr = proc.stderr.read() if proc.stderr else b""
    for pipe in (proc.stdout, proc.stderr):
        if pipe:
            pipe.close()
    return stderr


def _spice_dir() -> Path:
    from pycocoevalcap.spice import spice

    return Path(spice.__file__).resolve().parent


def _run_spice(gts: dict, res: dict) -> tuple[float | None, str | None]:
    """(SPICE, None), or (None, reason) when it cannot run; never raises, never hangs long.

    pycocoevalcap's ``Spice()`` downloads Stanford CoreNLP 3.6.0 (about 400 MB) into its
    ``spice/lib`` at first use (get_stanford_models.py) with no time limit; offline that
    fails, possibly after a long wait. So check for the two jars up front, and run the SPICE
    command of ``Spice.compute_score`` ourselves, with a time limit.
    """
    from pycocoevalcap.spice import get_stanford_models, spice

    spice_dir = _spice_dir()
    lib = spice_dir / get_stanford_models.SPICELIB
    jars = [lib / f"{get_stanford_models.JAR}.jar", lib / f"{get_stanford_models.JAR}-models.jar"]
    if not all(jar.is_file() for jar in jars):
        return None, (f"Stanford CoreNLP models not found in {lib}; "
                      "SPICE downloads them at first use, which needs network")
    limit = _limit(_SPICE_TIMEOUT_S, len(gts))
    try:
        with tempfile.TemporaryDirectory(prefix="captioner-spice-") as tmp:
            in_file, out_file = Path(tmp) / "input.json", Path(tmp) / "output.json"
            in_file.write_text(json.dumps([{"image_id": i, "test": res[i][0], "refs": gts[i]} for i in gts]),
                               encoding="utf-8")
            cache = spice_dir / spice.CACHE_DIR
            if not os.access(spice_dir, os.W_OK) and not os.access(cache, os.W_OK):
                cache = Path(tmp) / "cache"  # read-only site-packages: a cache for this run only
            cache.mkdir(exist_ok=True)
            cmd = ["java", "-jar", "-Xmx8G", spice.SPICE_JAR, str(in_file), "-cache", str(cache),
                   "-out", str(out_file), "-subset", "-silent"]
            done = subprocess.run(cmd, check=False, cwd=spice_dir, capture_output=True, timeout=limit)
            if done.returncode != 0:
                why = _last_line(done.stderr) or _last_line(done.stdout)
                return None, f"SPICE exited with {done.returncode}: {why}"
            results = json.loads(out_file.read_text(encoding="utf-8"))
        # As Spice.compute_score: the mean over images of the "All" F-score (None -> NaN).
        values = [_float_or_nan(item["scores"]["All"]["f"]) for item in results]
        return sum(values) / len(values), None
    except subprocess.TimeoutExpired:
        return None, f"SPICE timed out after {limit:.0f} s"
    except Exception as err:  # anything else (OSError, bad output): report, do not crash
        return None, f"SPICE failed: {_one_line(err)}"


def _float_or_nan(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _last_line(data: bytes | str | None) -> str:
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else (data or "")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:300]


# ----------------------------------------------------------------------------- report

@dataclass
class MetricReport:
    """The result of :func:`caption_metrics`.

    Attributes:
        scores: metric -> value, keys among :data:`METRICS` ("cider" is CIDEr-D as
            coco-caption computes it, on its usual scale: 1.0 is ``CIDEr 100``). BLEU, METEOR,
            ROUGE-L and SPICE are in [0, 1].
        unavailable: metric -> one-line reason it could not run. Besides metric names it may
            hold "ptb": why the Java PTB tokenizer was not used.
        tokenizer: "ptb" (Stanford's PTBTokenizer, as the COCO evaluation) or "python"
            (:func:`ptb_like_tokenize`, the fallback without Java).
    """

    scores: dict[str, float]
    unavailable: dict[str, str] = field(default_factory=dict)
    tokenizer: str = "ptb"

    def table(self) -> str:
        """Every metric in :data:`METRICS` order, values x100 with one decimal, then the tokenizer."""
        width = max(len(name) for name in DISPLAY_NAMES.values())
        rows = [f"{'metric':<{width}}  {'x100':>5}"]
        for key in METRICS:
            name = DISPLAY_NAMES[key]
            if key in self.scores:
                rows.append(f"{name:<{width}}  {100 * self.scores[key]:5.1f}")
            else:
                rows.append(f"{name:<{width}}  {'n/a':>5} ({self.unavailable.get(key, 'not computed')})")
        if self.tokenizer == "ptb":
            rows.append("tokenizer: ptb (Stanford PTBTokenizer, as the COCO evaluation)")
        else:
            why = self.unavailable.get("ptb", "")
            rows.append(f"tokenizer: {self.tokenizer} (pure-Python imitation of the PTB tokenizer"
                        f"{'; ' + why if why else ''})")
        return "\n".join(rows)


# ----------------------------------------------------------------------------- entry point

def caption_metrics(hypotheses: Mapping[int, str], references: Mapping[int, Sequence[str]], *,
                    use_java: bool | None = None, spice: bool = True) -> MetricReport:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr-D and SPICE, as the COCO caption evaluation computes them.

    The steps of pycocoevalcap's ``COCOEvalCap.evaluate()``: PTB tokenization, then the
    scorers ``Bleu(4)``, ``Meteor()``, ``Rouge()``, ``Cider()``, ``Spice()`` on the same
    tokenized captions; each score is the scorer's corpus score. Note that CIDEr-D's idf
    comes from the references of the images scored, so it depends on the whole set (one
    image alone always scores 0).

    Args:
        hypotheses: image id -> the generated caption (may be empty).
        references: image id -> its reference captions (at least one).
        use_java: True: use Java (the PTB tokenizer, METEOR, SPICE), and raise when there is
            no working ``java``. False: never use Java. None: use it when ``java -version`` works.
        spice: try SPICE (when Java is used). It never raises: any failure, e.g. the Stanford
            CoreNLP models it downloads at first use being absent, lands in ``unavailable``.

    Returns:
        A :class:`MetricReport`. pycocoevalcap's printing is kept off stdout.

    Raises:
        ValueError: an image id is in one mapping but not the other, an image has no
            references, or there are no images.
        CaptionerError: ``use_java=True`` and Java does not work.
        RuntimeError: Java works but the PTB tokenizer failed.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = _check_ids(hypotheses, references)
    if use_java is False:
        no_java = "Java disabled (use_java=False)"
    else:
        no_java = _java_problem()
        if no_java is not None and use_java:
            raise CaptionerError(f"use_java=True, but {no_java}")

    # Tokenize every caption: hypotheses first, then the references image by image.
    captions = [hypotheses[i] for i in ids] + [r for i in ids for r in references[i]]
    if no_java is None:
        tokens, tokenizer, unavailable = ptb_tokenize(captions), "ptb", {}
    else:
        tokens, tokenizer = [ptb_like_tokenize(c) for c in captions], "python"
        unavailable = {"meteor": no_java, "spice": no_java, "ptb": no_java}
    sentences = iter(" ".join(t) for t in tokens)
    res = {i: [next(sentences)] for i in ids}                            # id -> [hypothesis]
    gts = {i: [next(sentences) for _ in references[i]] for i in ids}    # id -> references
    if not any(r for refs in gts.values() for r in refs):
        raise ValueError("every reference caption is empty after tokenization")

    scores: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):  # the scorers print their progress
        bleus, _ = Bleu(4).compute_score(gts, res)
        scores.update({f"bleu{n + 1}": float(b) for n, b in enumerate(bleus)})
        if no_java is None:
            value, why = _run_meteor(gts, res)
            if why is None:
                scores["meteor"] = value
            else:
                unavailable["meteor"] = why
        scores["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
        scores["cider"] = float(Cider().compute_score(gts, res)[0])
        if no_java is None:
            if not spice:
                unavailable["spice"] = "not requested (spice=False)"
            else:
                value, why = _run_spice(gts, res)
                if why is None:
                    scores["spice"] = value
                else:
                    unavailable["spice"] = why
    return MetricReport(scores=scores, unavailable=unavailable, tokenizer=tokenizer)


def _check_ids(hypotheses: Mapping[int, str], references: Mapping[int, Sequence[str]]) -> list[int]:
    """The image ids, in the hypotheses' order, after checking both mappings agree."""
    for i in hypotheses:
        if i not in references:
            raise ValueError(f"image id {i!r} has a hypothesis but no references")
    for i in references:
        if i not in hypotheses:
            raise ValueError(f"image id {i!r} has references but no hypothesis")
    if not hypotheses:
        raise ValueError("no images to score")
    for i, refs in references.items():
        if isinstance(refs, str) or not refs:
            raise ValueError(f"image id {i!r}: references must be a non-empty list of captions")
    return list(hypotheses)
