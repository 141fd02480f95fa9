"""benchmarks/bench.py: the quick run writes every section, and its FLOP counts are right.

The analytic count of the decoder's matmuls is what the "share of peak" ratios divide by,
so it is checked here against torch.utils.flop_counter on tiny decoders: forward, forward
plus backward (training), and a batched beam search.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captioner import native
from captioner.decoding import beam_search

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("captioner_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


@pytest.mark.slow
def test_quick_run_writes_every_section(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--repeat", "2", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["errors"] == {}
    assert results["peak"]["gflops"] > 0
    assert results["machine"]["threads"] >= 1 and results["machine"]["cpu"]
    assert set(results["sections"]) == set(bench.SECTIONS)
    for section, rows in results["sections"].items():
        assert rows, section
        for row in rows:
            where = f"{section} {row['case']}"
            assert row["throughput"] > 0 and row["median_s"] > 0, where
            assert len(row["times_s"]) == (1 if section == "epoch" else 2), where  # an epoch is a whole fit()
            assert 0 < row["gflop_needed"] <= row["gflop_executed"] * (1 + 1e-9), where
            assert row["share_of_peak"] > 0 and row["peak_mem_mib"] > 0, where
    assert [r["case"] for r in results["sections"]["beam"]] == ["k=1", "k=3", "k=5", "k=5 bf16", "k=5 bf16-autocast"]
    assert {r["case"] for r in results["sections"]["train"]} == {"soft", "hard", "soft bf16", "soft bf16-autocast",
                                                                   "soft, 5 captions an image"}
    assert results["machine"]["cpu_bf16"] in ("AMX", "AVX512-BF16", "none")
    assert results["machine"]["score_kernel"] in ("C (captioner.native)", "PyTorch ops")
    for section, peak in results["section_peaks"].items():  # the bf16 rows are measured against the bf16 peak
        assert peak["bf16"]["dtype"] == "bfloat16" and peak["bf16"]["gflops"] > 0, section
    for row in results["sections"]["train"] + results["sections"]["beam"]:
        expected = results["section_peaks"][row["section"]]
        expected = expected["bf16"] if "bf16" in row["case"] else expected
        assert row["peak_gflops"] == expected["gflops"], row["case"]
    assert "bfloat16 matmul peak (CPU bf16: " in proc.stdout
    for section, peak in results["section_peaks"].items():  # the memory read, the loops' other bound
        assert peak["read"]["mib"] == bench.QUICK.bandwidth_mib and len(peak["read"]["times_s"]) == bench.QUICK.peak_runs
        assert peak["read"]["gbs"] == pytest.approx(16 * 2**20 / min(peak["read"]["times_s"]) / 1e9), section
    assert "memory read bandwidth (best of 3 sums over 16 MiB" in proc.stdout
    assert {r["case"] for r in results["sections"]["epoch"]} == {"cache", "no cache", "per caption", "cache, no context"}
    assert set(results["targets"]) == {"train soft", "train hard", "beam k=5", "train soft bf16"}
    bf16 = results["targets"]["train soft bf16"]
    rows = {r["case"]: r["throughput"] for r in results["sections"]["train"]}
    assert bf16["speedup"] == pytest.approx(rows["soft bf16"] / rows["soft"]) and bf16["met"] == (bf16["speedup"] >= 1.7)
    assert "% peak" in proc.stdout and "train" in proc.stdout  # the table


def _tiny(attention: str = "soft", **flags) -> tuple:
    dims = bench.DecoderDims(C=12, L=6, A=8, E=10, H=14, V=30, **flags)
    s = bench.Settings(dims=dims, grid=(2, 3), batch=3, words_mean=4.0, words_std=1.5, words_min=2, max_len=6)
    torch.manual_seed(0)
    decoder = bench.make_decoder(s, attention, dropout=0.0)
    return dims, s, decoder


def _close(flops: dict[str, int], counted: int, unseen: tuple[str, ...] = ("attention_scores",)) -> None:
    """The analytic count against FlopCounterMode's. The additive tanh score's w^T tanh(..)
    over L x A runs in one fused function whose matrix-vector products the counter does not
    see (its backward's batched product for the query, it does), and so may other terms that
    run in C (``unseen``): their FLOPs may be seen in part or not at all; everything else must
    match up to rounding."""
    assert counted > 0
    others = sum(v for k, v in flops.items() if k not in unseen)
    hidden = sum(flops[k] for k in unseen)
    low, high = others * 0.999, (others + hidden) * 1.001
    assert low <= counted <= high, f"analytic {others} (+ up to {hidden}) vs counted {counted}"


@pytest.mark.parametrize("attention,flags", [("soft", {}), ("hard", {}),
                                             ("soft", {"beta_gate": False, "deep_output": False})])
def test_decoder_flops_match_the_flop_counter_forward_and_backward(attention, flags):
    dims, s, decoder = _tiny(attention, **flags)
    g = torch.Generator().manual_seed(0)
    captions, _, mask = bench.caption_batch(s, g)
    features = bench.random_features(s.batch, s, torch.device("cpu"), g)
    B, T = captions.shape[0], captions.shape[1] - 1

    counted = bench.counted_flops(lambda: decoder(features, captions))
    _close(bench.decoder_flops(dims, tokens=B * T, images=B), counted)

    criterion = bench.CaptionLoss(alpha_c=1.0).train()
    lengths = mask[:, 1:].sum(1)
    real = int(lengths.sum())
    assert real < B * T  # the batch has padding to leave out

    def train_step() -> None:  # as fit takes it: no step past a caption's <end>
        out = decoder(features, captions, lengths=lengths)
        criterion(out, captions[:, 1:], mask[:, 1:]).total.backward()

    counted = bench.counted_flops(train_step)
    _close(bench.decoder_flops(dims, tokens=real, images=B, backward=True), counted)


def test_decoder_flops_match_the_flop_counter_in_beam_search():
    dims, s, decoder = _tiny()
    decoder.eval()
    bench.rig_no_early_end(decoder)
    features = bench.random_features(2, s, torch.device("cpu"), torch.Generator().manual_seed(1))
    K, out = 3, {}

    def run() -> None:
        out["beam"] = beam_search(decoder, features, beam_size=K, max_len=s.max_len, start_id=bench.START,
                                  end_id=bench.END, pad_id=bench.PAD)

    counted = bench.counted_flops(run)
    steps = out["beam"].tokens.shape[-1]
    assert steps == s.max_len + 1 and (out["beam"].lengths == s.max_len).all()  # the rig: no early <end>
    # the per-image work (keys, h_0 and c_0) once per image, shared by its K beams; the first
    # step on one row per image (its K beams are one hypothesis): 2 + 2 K (steps - 1) rows; the
    # K maps' context in C (captioner.native), where it compiled: not seen by the counter
    tokens = bench.beam_tokens(2, K, steps)
    assert tokens == 2 + 2 * K * (steps - 1)
    flops = bench.decoder_flops(dims, tokens=tokens, images=2)
    if native.library() is None:
        _close(flops, counted)
    else:
        _close(flops, counted, unseen=("attention_scores", "attention_context"))
        others = sum(v for k, v in flops.items() if k not in ("attention_scores", "attention_context"))
        assert counted <= others + flops["attention_scores"]  # the context's products: none seen


def test_caption_batch_is_collated_like_the_data():
    s = bench.Settings()
    captions, words, mask = bench.caption_batch(s, torch.Generator().manual_seed(0))
    assert captions.shape == (s.batch, int(words.max()) + 2)
    assert (captions[:, 0] == bench.START).all()
    assert words.min() >= s.words_min and words.max() <= s.max_len
    assert 10 <= words.float().mean() <= 13  # COCO-like
    assert (words[:-1] >= words[1:]).all() and words[0] > words[-1]  # the longest first, as collate_captions
    for row, n, m in zip(captions, words, mask):
        assert row[n + 1] == bench.END and (row[n + 2:] == bench.PAD).all()
        assert (row[1:n + 1] >= 4).all()  # ordinary words, no specials
        assert m.sum() == n + 2 and m[: n + 2].all()


@pytest.mark.parametrize("flags, expected", [({"fpu", "avx512_bf16", "amx_bf16", "amx_tile"}, "AMX"),
                                             ({"avx512f", "avx512_bf16"}, "AVX512-BF16"), ({"avx2"}, "none")])
def test_cpu_bf16_support_is_named_from_the_flags(flags, expected):
    assert bench.cpu_bf16_support(flags) == expected
