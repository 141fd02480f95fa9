"""The additive score's elementwise work in C, compiled on first use (the CPU's fused kernel).

:class:`captioner.kernels.TanhScore` computes w^T tanh(keys + query) at every word with a
handful of PyTorch ops, each a full pass over a (B, K, L, A) tensor: 12.8 MB at the bench's
sizes, so the score is bound by memory traffic (about seven passes forward and backward).
The two C functions below do it in one pass each way: the forward reads the keys once,
computes sigmoid(2x) with an inline exponential (see ``sig2``; tanh(x) = 2 sigmoid(2x)
- 1) and reduces over A in registers, writing only the (B, K, L) scores; the backward reads
the keys once more, recomputes s (cheaper than writing the (B, K, L, A) s in the forward and
reading it back: no 12.8 MB tensor a step kept for the backward) and adds into the query's
gradient, the keys' running gradient buffer (:class:`captioner.kernels.StepSum`) and w's
partial sums in the same pass. Where the CPU has AVX-512 (and A is a multiple of 16) both
loops run 16 values at a time with AVX-512's own exponent and clamp steps (``sig2_16``),
20-30% faster than the compiler's vectorised portable loop.

In a CPU bf16 pass, the context sum_l alpha_l a_l over bf16 features runs here too (one map
per image: a teacher-forced step, greedy decoding): oneDNN's bf16 ``bmm`` with one row per
image runs at under half the memory bandwidth (1.16 ms a step at the bench's sizes, against
0.51 ms for one pass here, which widens each value to float32 in registers and accumulates
in float32, as the ``bmm`` does); and in beam search, float32 or bf16, the K maps of each image
in one pass over its features (``kernels.context``). And the loss over float32 or bf16 logits (N, V):
each row's cross-entropy in float32 without a float32 copy of the logits or the (N, V)
log-probabilities, the gradient written in the logits' dtype directly (bf16: 10.4 against 2.4 ms
forward and backward at N = 399, V = 10,000; float32: 4.0-4.3 against 2.7). And a decoding
step's pieces that PyTorch runs as many small ops: the beam's K best continuations of each
image (``beam_topk``, after ``row_logsumexp``) and the LSTM cell from its three gate products
(``lstm_cell``); and the same cell in training, forward and backward, over float32 or bf16
gates (``lstm_forward`` / ``lstm_backward``, :class:`captioner.kernels.LSTMCell`).

The source is compiled with the C compiler on the PATH (``$CC``, else ``cc``) for this CPU
(``-march=native``) into ``$CAPTIONER_NATIVE_CACHE`` (default ``~/.cache/captioner/native``),
keyed by the source, the flags and the CPU's flags; about 0.2 s, once. Without a compiler,
or with ``CAPTIONER_NATIVE=0``, :func:`library` returns None and the kernels run their
PyTorch ops (the same function; ``tests/test_native.py`` checks all three agree).
Float32, contiguous, CPU tensors only; the caller checks (:func:`usable`). Built with
``-ffast-math``, it may turn a NaN key into a finite score where the PyTorch ops give NaN; h_0
(the features' mean) and the context sum read the same features, so a NaN still reaches the
logits (a test checks; it fails only when both paths drop the NaN).

Letters: B images, K queries per image, L locations, A attention dim, C feature channels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>

/* e^y, y clamped to [-80, 80] (e^-80 = 1.8e-35 stands for 0: sums of ones and such, as below,
   do not see the difference; keeps e^y finite and normal): e^y = 2^n e^r with n = round(y log2 e)
   and r = y - n ln 2 in [-0.347, 0.347] (ln 2 in two parts, so r is exact to float), e^r by its
   Taylor series to r^6 (relative error < 2e-7). Inline, so loops stay in registers: with
   libmvec's vector expf (a call every 16 values, the sums spilled around it) the bench's score
   took 1.87 ms, 1.55 with this; a row log-sum-exp of 80 x 10,000 logits 0.17-0.25 against
   0.13-0.19 ms. As accurate: sigmoid(2x) below within 1.5e-7 of float64's over [-60, 60], as
   with expf; log-sum-exps within 2.5e-6 of float64's, as with expf. The clamp turns a NaN into
   a number (under -ffast-math): the loss keeps expf, whose NaN stays a NaN (a test checks). */
static inline float exp_near(float y) {
    y = y > 80.f ? 80.f : (y < -80.f ? -80.f : y);
    const float n = nearbyintf(y * 1.44269504f);
    const float r = fmaf(n, -1.42860682e-6f, fmaf(n, -0.693145752f, y));
    float p = 1.f / 720.f;
    p = fmaf(p, r, 1.f / 120.f);
    p = fmaf(p, r, 1.f / 24.f);
    p = fmaf(p, r, 1.f / 6.f);
    p = fmaf(p, r, 0.5f);
    p = fmaf(p, r, 1.f);
    p = fmaf(p, r, 1.f);
    union { float f; int32_t i; } two_n;
    two_n.i = ((int32_t)n + 127) << 23;
    return p * two_n.f;
}

/* sigmoid(2x) */
static inline float sig2(float x) { return 1.f / (1.f + exp_near(-2.f * x)); }

/* y, or x where x is a NaN: the clamp in exp_near turns a NaN into a number, and the cells below
   would hand a diverged model's NaN gates on as finite values. Tested on the bits, which
   -ffast-math (no NaNs assumed) leaves alone. */
static inline float keep_nan(float x, float y) {
    union { float f; uint32_t u; } v;
    v.f = x;
    return (v.u & 0x7fffffffu) > 0x7f800000u ? x : y;
}

#if defined(__AVX512F__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define SCORE16 1
/* sig2 for 16 values, the same e^y (n, r, the polynomial) with AVX-512's own steps where the
   portable code spends several: |y| clamped to 80 in one vrangeps (min |y|, 80 with y's sign;
   a NaN becomes +-80, as the clamp above makes it a number) and 2^n p by vscalefps (no integer
   exponent built and multiplied in). The score's loop is bound by its vector instructions: the
   bench's k = 5 search step 1.54 -> 1.24 ms, a training step's forward 0.78 -> 0.56 (2 threads,
   an AMX Xeon). 1 / (1 + e^y) by vrcp14ps and one Newton step (relative error ~1e-8). */
static inline __m512 sig2_16(__m512 x) {
    const __m512 y = _mm512_range_ps(_mm512_mul_ps(x, _mm512_set1_ps(-2.f)), _mm512_set1_ps(80.f), 0x2);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(y, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693145752f), y);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(-1.42860682e-6f), r);
    __m512 p = _mm512_set1_ps(1.f / 720.f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    const __m512 d = _mm512_add_ps(_mm512_scalef_ps(p, n), _mm512_set1_ps(1.f));
    const __m512 z = _mm512_rcp14_ps(d);
    return _mm512_mul_ps(z, _mm512_fnmadd_ps(d, z, _mm512_set1_ps(2.f)));
}
#else
#define SCORE16 0
#endif

/* scores[b,k,l] = 2 sum_a w[a] s[b,k,l,a] - sum_a w[a], s = sigmoid(2 (keys[b,l,a] + query[b,k,a])) */
void score_forward(const float *keys, const float *query, const float *w, float *scores,
                   long B, long K, long L, long A, int threads) {
    float wsum = 0.f;
    for (long a = 0; a < A; a++) wsum += w[a];
    #pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (long b = 0; b < B; b++) {
        for (long k = 0; k < K; k++) {
            const float *q = query + (b * K + k) * A;
            for (long l = 0; l < L; l++) {
                const float *key = keys + (b * L + l) * A;
#if SCORE16
                if (A % 16 == 0) {
                    __m512 acc16 = _mm512_setzero_ps();
                    for (long a = 0; a < A; a += 16) {
                        const __m512 x = _mm512_add_ps(_mm512_loadu_ps(key + a), _mm512_loadu_ps(q + a));
                        acc16 = _mm512_fmadd_ps(_mm512_loadu_ps(w + a), sig2_16(x), acc16);
                    }
                    scores[(b * K + k) * L + l] = 2.f * _mm512_reduce_add_ps(acc16) - wsum;
                    continue;
                }
#endif
                float acc = 0.f;
                #pragma omp simd reduction(+:acc)
                for (long a = 0; a < A; a++) acc += w[a] * sig2(key[a] + q[a]);
                scores[(b * K + k) * L + l] = 2.f * acc - wsum;
            }
        }
    }
}

/* With s recomputed as above (cheaper than writing it in the forward and reading it back),
   d = s (1 - s) and g = grad[b,k,l], adds (the caller zeroes or keeps them):
   query_grad[b,k,a] += sum_l g d        (times 4 w[a] afterwards: d tanh(x)/dx = 4 d)
   keys_grad[b,l,a]  += sum_k g d        (the same)
   w_part[b,a]       += sum_{k,l} g s    (dL/dw = 2 sum_b w_part - sum g) */
void score_backward(const float *keys, const float *query, const float *grad, float *query_grad, float *keys_grad,
                    float *w_part, long B, long K, long L, long A, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long b = 0; b < B; b++) {
        float *wp = w_part + b * A;
        for (long k = 0; k < K; k++) {
            const float *q = query + (b * K + k) * A;
            float *gq = query_grad + (b * K + k) * A;
            for (long l = 0; l < L; l++) {
                const float g = grad[(b * K + k) * L + l];
                const float *key = keys + (b * L + l) * A;
                float *kg = keys_grad + (b * L + l) * A;
#if SCORE16
                if (A % 16 == 0) {
                    const __m512 g16 = _mm512_set1_ps(g);
                    for (long a = 0; a < A; a += 16) {
                        const __m512 v = sig2_16(_mm512_add_ps(_mm512_loadu_ps(key + a), _mm512_loadu_ps(q + a)));
                        const __m512 gd = _mm512_mul_ps(g16, _mm512_fnmadd_ps(v, v, v));
                        _mm512_storeu_ps(gq + a, _mm512_add_ps(_mm512_loadu_ps(gq + a), gd));
                        _mm512_storeu_ps(kg + a, _mm512_add_ps(_mm512_loadu_ps(kg + a), gd));
                        _mm512_storeu_ps(wp + a, _mm512_fmadd_ps(g16, v, _mm512_loadu_ps(wp + a)));
                    }
                    continue;
                }
#endif
                #pragma omp simd
                for (long a = 0; a < A; a++) {
                    float v = sig2(key[a] + q[a]);
                    float gd = g * v * (1.f - v);
                    gq[a] += gd;
                    kg[a] += gd;
                    wp[a] += g * v;
                }
            }
        }
    }
}

/* A bf16 value (its 16 bits) widened to float32: exact. */
static inline float widen(uint16_t x) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)x << 16;
    return v.f;
}

/* The context of K maps per image, in float32, over float32 or bf16 features (U, L, C), the
   maps of image b reading image rows[b] (rows NULL: image b):
   context[b,k,c] = sum_l alpha[b,k,l] features[rows[b],l,c]. One pass over the image's features.
   K = 1 (a teacher-forced step): location by location. K > 1 (a beam's K hypotheses): four
   locations at a time, each read of a map's K C-wide sums adding four feature rows, not one.
   The gradient for one map per row (K = 1): alpha_grad[b,l] = sum_c grad[b,c] features[rows[b],l,c],
   four locations at a time: four independent sums (one alone waits on its own adds), one read of grad. */
static inline float same(float x) { return x; }

#define CONTEXT_KERNELS(NAME, T, LOAD)                                                           \
void context_forward_##NAME(const T *features, const long *rows, const float *alpha, float *context, \
                            long B, long K, long L, long C, int threads) {                        \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                            \
    for (long b = 0; b < B; b++) {                                                               \
        const T *image = features + (rows ? rows[b] : b) * L * C;                                \
        const float *maps = alpha + b * K * L;                                                   \
        float *out = context + b * K * C;                                                        \
        memset(out, 0, sizeof(float) * K * C);                                                   \
        long l = 0;                                                                              \
        for (; K > 1 && l + 4 <= L; l += 4) {                                                    \
            const T *f0 = image + l * C, *f1 = f0 + C, *f2 = f1 + C, *f3 = f2 + C;               \
            for (long k = 0; k < K; k++) {                                                       \
                const float *a = maps + k * L + l;                                               \
                const float a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];                          \
                float *o = out + k * C;                                                          \
                _Pragma("omp simd")                                                              \
                for (long c = 0; c < C; c++)                                                     \
                    o[c] += a0 * LOAD(f0[c]) + a1 * LOAD(f1[c]) + a2 * LOAD(f2[c]) + a3 * LOAD(f3[c]); \
            }                                                                                    \
        }                                                                                        \
        for (; l < L; l++) {                                                                     \
            const T *f = image + l * C;                                                          \
            for (long k = 0; k < K; k++) {                                                       \
                const float a = maps[k * L + l];                                                 \
                float *o = out + k * C;                                                          \
                _Pragma("omp simd")                                                              \
                for (long c = 0; c < C; c++) o[c] += a * LOAD(f[c]);                             \
            }                                                                                    \
        }                                                                                        \
    }                                                                                            \
}                                                                                                \
void context_backward_##NAME(const T *features, const long *rows, const float *grad, float *alpha_grad, \
                             long B, long L, long C, int threads) {                               \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                            \
    for (long b = 0; b < B; b++) {                                                               \
        const T *image = features + (rows ? rows[b] : b) * L * C;                                \
        const float *g = grad + b * C;                                                           \
        float *out = alpha_grad + b * L;                                                         \
        long l = 0;                                                                              \
        for (; l + 4 <= L; l += 4) {                                                             \
            const T *f0 = image + l * C, *f1 = f0 + C, *f2 = f1 + C, *f3 = f2 + C;               \
            float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;                                        \
            _Pragma("omp simd reduction(+:a0, a1, a2, a3)")                                      \
            for (long c = 0; c < C; c++) {                                                       \
                const float gc = g[c];                                                           \
                a0 += gc * LOAD(f0[c]);                                                          \
                a1 += gc * LOAD(f1[c]);                                                          \
                a2 += gc * LOAD(f2[c]);                                                          \
                a3 += gc * LOAD(f3[c]);                                                          \
            }                                                                                    \
            out[l] = a0;                                                                         \
            out[l + 1] = a1;                                                                     \
            out[l + 2] = a2;                                                                     \
            out[l + 3] = a3;                                                                     \
        }                                                                                        \
        for (; l < L; l++) {                                                                     \
            const T *f = image + l * C;                                                          \
            float acc = 0.f;                                                                     \
            _Pragma("omp simd reduction(+:acc)")                                                 \
            for (long c = 0; c < C; c++) acc += g[c] * LOAD(f[c]);                               \
            out[l] = acc;                                                                        \
        }                                                                                        \
    }                                                                                            \
}

CONTEXT_KERNELS(f32, float, same)
CONTEXT_KERNELS(bf16, uint16_t, widen)

/* float32 to bf16, rounded to nearest even (a NaN stays a NaN) */
static inline uint16_t narrow(float x) {
    union { float f; uint32_t u; } v;
    v.f = x;
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40u);
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

/* Cross-entropy of each row of logits (N, V), float32 or bf16, in float32: lse[n] = log sum_v
   exp(x[n,v]), nll[n] = lse[n] - x[n, target[n]]. Two passes over the row (its max, then the sum).
   Its gradient in the logits' dtype: grad[n,v] = g[n] (exp(x[n,v] - lse[n]) - [v == target[n]]). */
#define XENT_KERNELS(NAME, T, LOAD, STORE)                                                       \
void xent_forward_##NAME(const T *logits, const long *target, float *nll, float *lse,            \
                         long N, long V, int threads) {                                          \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                            \
    for (long n = 0; n < N; n++) {                                                               \
        const T *x = logits + n * V;                                                             \
        float m = -INFINITY;                                                                     \
        _Pragma("omp simd reduction(max:m)")                                                     \
        for (long v = 0; v < V; v++) m = fmaxf(m, LOAD(x[v]));                                   \
        float sum = 0.f;                                                                         \
        _Pragma("omp simd reduction(+:sum)")                                                     \
        for (long v = 0; v < V; v++) sum += expf(LOAD(x[v]) - m);                                \
        lse[n] = m + logf(sum);                                                                  \
        nll[n] = lse[n] - LOAD(x[target[n]]);                                                    \
    }                                                                                            \
}                                                                                                \
void xent_backward_##NAME(const T *logits, const long *target, const float *lse, const float *g, \
                          T *grad, long N, long V, int threads) {                                \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                            \
    for (long n = 0; n < N; n++) {                                                               \
        const T *x = logits + n * V;                                                             \
        T *out = grad + n * V;                                                                   \
        const float gn = g[n], l = lse[n];                                                       \
        _Pragma("omp simd")                                                                      \
        for (long v = 0; v < V; v++) out[v] = STORE(gn * expf(LOAD(x[v]) - l));                  \
        const long t = target[n];                                                                \
        out[t] = STORE(gn * (expf(LOAD(x[t]) - l) - 1.f));                                       \
    }                                                                                            \
}

XENT_KERNELS(f32, float, same, same)
XENT_KERNELS(bf16, uint16_t, widen, narrow)

/* What log_softmax subtracts from each row of float32 logits (N, V), as it computes it:
   stats[n] = (m, log sum_v exp(x[n,v] - m)) with m the row's max; log p = (x - m) - stats[n,1]. */
void row_logsumexp(const float *logits, float *stats, long N, long V, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long n = 0; n < N; n++) {
        const float *x = logits + n * V;
        float m = -INFINITY;
        #pragma omp simd reduction(max:m)
        for (long v = 0; v < V; v++) m = fmaxf(m, x[v]);
        float sum = 0.f;
        #pragma omp simd reduction(+:sum)
        for (long v = 0; v < V; v++) sum += exp_near(x[v] - m);
        stats[2 * n] = m;
        stats[2 * n + 1] = logf(sum);
    }
}

/* The transpose of a 2-byte (bf16, fp16) matrix src (N, M) into dst (M, N), in 16 x 16 tiles
   (each read by rows into a local block, transposed there, written by rows). oneDNN's bf16 matmul
   runs at about half speed when its left operand comes transposed (a weight's gradient g^T x), and
   PyTorch's strided copy of 2-byte values makes the transpose slower still: 5-6 ms for the (6272,
   512) key gradient or (399, 10000) output-layer gradient of a training step, 0.6-1.4 ms here. */
void transpose_u16(const uint16_t *src, uint16_t *dst, long N, long M, int threads) {
    enum { T = 16 };
    const long row_tiles = (N + T - 1) / T, col_tiles = (M + T - 1) / T;
    #pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (long bi = 0; bi < row_tiles; bi++)
        for (long bj = 0; bj < col_tiles; bj++) {
            const long i0 = bi * T, j0 = bj * T;
            const long n = i0 + T < N ? T : N - i0, m = j0 + T < M ? T : M - j0;
            uint16_t tile[T][T], out[T][T];
            if (n < T || m < T) memset(tile, 0, sizeof tile);  /* an edge tile: no value unset */
            for (long i = 0; i < n; i++) memcpy(tile[i], src + (i0 + i) * M + j0, m * sizeof(uint16_t));
            for (long j = 0; j < T; j++)
                for (long i = 0; i < T; i++) out[j][i] = tile[i][j];
            for (long j = 0; j < m; j++) memcpy(dst + (j0 + j) * N + i0, out[j], n * sizeof(uint16_t));
        }
}

/* The LSTM cell, float32 or bf16 gates (T) with float32 c: the gate pre-activations summed from
   their three products, pre = p0 + p1 + p2 (B, 4H: i, f, g, o, added left to right; row strides
   s0, s1, s2 in values, so a teacher-forced step's column of the embeddings' (B, T, 4H) products
   needs no copy), and c (B, H) -> h = sigmoid(o) tanh(c') (B, H) in T, c' = sigmoid(f) c +
   sigmoid(i) tanh(g) (B, H), in one pass (sigmoid(x) = sig2(x / 2), tanh(x) = 2 sig2(x) - 1:
   within 3e-7 of float64's), in float32 throughout (a bf16 gate sum and each activation are not
   rounded to bf16, as PyTorch's ops round them). A NaN gate stays a NaN (keep_nan), as in
   PyTorch's cell, forward and backward. For a training step the forward also writes what the
   backward reads, act (B, 4H) float32: sigmoid(i), sigmoid(f), tanh(g), sigmoid(o); a decoding
   step passes act = NULL. The backward, from dh (B, H) in T and dc' (B, H): the gates' gradient
   dpre (B, 4H) in T (each part's) and dc (B, H). PyTorch's ops made two sums of (B, 4H) and seven
   (B, H) passes forward (0.3 ms a step of the bench's k = 5 search), about 35 passes forward and
   backward in training (0.33 ms a step at B = 32, H = 512 with autograd's overhead, against 0.10
   here). */
#define LSTM_KERNELS(NAME, T, LOAD, STORE)                                                       \
void lstm_forward_##NAME(const T *p0, const T *p1, const T *p2, long s0, long s1, long s2,       \
                         const float *c, T *h, float *c_out, float *act, long B, long H,          \
                         int threads) {                                                          \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                            \
    for (long b = 0; b < B; b++) {                                                               \
        const T *x0 = p0 + b * s0, *x1 = p1 + b * s1, *x2 = p2 + b * s2;                         \
        float *a = act ? act + b * 4 * H : act;                                                  \
        _Pragma("omp simd")                                                                      \
        for (long j = 0; j < H; j++) {                                                           \
            const float xi = (LOAD(x0[j]) + LOAD(x1[j])) + LOAD(x2[j]);                           \
            const float xf = (LOAD(x0[H + j]) + LOAD(x1[H + j])) + LOAD(x2[H + j]);               \
            const float xg = (LOAD(x0[2 * H + j]) + LOAD(x1[2 * H + j])) + LOAD(x2[2 * H + j]);   \
            const float xo = (LOAD(x0[3 * H + j]) + LOAD(x1[3 * H + j])) + LOAD(x2[3 * H + j]);   \
            const float i = keep_nan(xi, sig2(0.5f * xi)), f = keep_nan(xf, sig2(0.5f * xf));    \
            const float g = keep_nan(xg, 2.f * sig2(xg) - 1.f), o = keep_nan(xo, sig2(0.5f * xo)); \
            if (act) { a[j] = i; a[H + j] = f; a[2 * H + j] = g; a[3 * H + j] = o; }             \
            const float cn = f * c[b * H + j] + i * g;                                           \
            c_out[b * H + j] = cn;                                                               \
            h[b * H + j] = STORE(o * keep_nan(cn, 2.f * sig2(cn) - 1.f));                        \
        }                                                                                        \
    }                                                                                            \
}                                                                                                \
void lstm_backward_##NAME(const float *act, const float *c, const float *c_out, const T *dh,     \
                          const float *dc_out, T *dpre, float *dc, long B, long H, int threads) { \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                            \
    for (long b = 0; b < B; b++) {                                                               \
        const float *a = act + b * 4 * H;                                                        \
        T *d = dpre + b * 4 * H;                                                                 \
        _Pragma("omp simd")                                                                      \
        for (long j = 0; j < H; j++) {                                                           \
            const float i = a[j], f = a[H + j], g = a[2 * H + j], o = a[3 * H + j];              \
            const float cn = c_out[b * H + j], tc = keep_nan(cn, 2.f * sig2(cn) - 1.f);           \
            const float gh = LOAD(dh[b * H + j]);                                                \
            const float dcn = dc_out[b * H + j] + gh * o * (1.f - tc * tc);                      \
            d[j] = STORE(dcn * g * i * (1.f - i));                                               \
            d[H + j] = STORE(dcn * c[b * H + j] * f * (1.f - f));                                \
            d[2 * H + j] = STORE(dcn * i * (1.f - g * g));                                       \
            d[3 * H + j] = STORE(gh * tc * o * (1.f - o));                                       \
            dc[b * H + j] = dcn * f;                                                             \
        }                                                                                        \
    }                                                                                            \
}

LSTM_KERNELS(f32, float, same, same)
LSTM_KERNELS(bf16, uint16_t, widen, narrow)

/* One beam search step: for each image b, the K best of its K hypotheses' continuations,
   scored beam[n] + log p(v) with log p = (x - m) - log sum (row_logsumexp, taken before any word
   was banned: a banned word is -inf in x). A finished hypothesis continues only with pad, at
   beam[n]; with force_end an unfinished one only with end. Writes top (B, K), best first, and
   idx (B, K), flat indices k * V + v; equal scores rank the lower index first. The words go in
   blocks of 16, scored in one vector pass and skipped whole when none beats the K-th best: 0.41 ->
   0.15 ms a step of the bench's k = 5 search (the scores' sum may round one ulp apart from the
   scalar loop's: -ffast-math regroups it). */
void beam_topk(const float *logits, const float *stats, const float *beam, const uint8_t *finished,
               float *top, long *idx, long B, long K, long V, long pad, long end, int force_end, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long b = 0; b < B; b++) {
        float *tv = top + b * K;
        long *ti = idx + b * K;
        long filled = 0;
        for (long k = 0; k < K; k++) {
            const long n = b * K + k;
            const float *x = logits + n * V;
            const float m = stats[2 * n], ls = stats[2 * n + 1], base = beam[n];
            const int done = finished[n], plain = !done && !force_end;
            for (long v0 = 0; v0 < V; v0 += 16) {  /* blocks of 16 words: the scores in one vector pass,
                                                      then the block skipped whole when none beats the
                                                      K-th best (nearly all blocks, once K are in) */
                const long nv = V - v0 < 16 ? V - v0 : 16;
                float vals[16], best = -INFINITY;
                for (long i = 0; i < nv; i++) {
                    const long v = v0 + i;
                    float val;
                    if (plain) val = ((x[v] - m) - ls) + base;
                    else if (done) val = v == pad ? base : -INFINITY;
                    else val = v == end ? ((x[v] - m) - ls) + base : -INFINITY;
                    vals[i] = val;
                    best = val > best ? val : best;
                }
                if (filled == K && !(best > tv[K - 1])) continue;  /* the common case: not among the best */
                for (long i = 0; i < nv; i++) {
                    const float val = vals[i];
                    if (filled == K && !(val > tv[K - 1])) continue;
                    long j = filled < K ? filled++ : K - 1;  /* the slot it takes, then moves up from */
                    while (j > 0 && val > tv[j - 1]) {
                        tv[j] = tv[j - 1];
                        ti[j] = ti[j - 1];
                        j--;
                    }
                    tv[j] = val;
                    ti[j] = k * V + v0 + i;
                }
            }
        }
    }
}
"""

FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC",
         # no peeling of a loop's first elements to reach an aligned address, so that the order of
         # each sum depends on A alone and equal inputs give equal bits wherever they lie in memory
         # (gcc 12 does not peel these loops for AVX-512 anyway; a cost model that would is held off)
         "--param=vect-max-peeling-for-alignment=0",
         # AVX-512's full width where the CPU has it (gcc otherwise keeps to 256 bits): 2.5x here
         *(("-mprefer-vector-width=512",) if platform.machine() in ("x86_64", "AMD64") else ()))
# Linked without -ffast-math: with it, gcc adds startup code that sets flush-to-zero and
# denormals-are-zero for the whole process (Python's floats, torch's ops) when the library loads.
LINK = ("-shared", "-fopenmp", "-lm")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return ""


def _cache_dir() -> Path:
    return Path(os.environ.get("CAPTIONER_NATIVE_CACHE") or Path.home() / ".cache" / "captioner" / "native")


def _compile(target: Path) -> None:
    cc = os.environ.get("CC", "cc")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, out = Path(tmp) / "score.c", Path(tmp) / target.name
        src.write_text(SOURCE)
        obj = Path(tmp) / "score.o"
        for args in ([*FLAGS, "-c", str(src), "-o", str(obj)], [str(obj), "-o", str(out), *LINK]):
            subprocess.run([cc, *args], check=True, capture_output=True, text=True, timeout=120)
        os.replace(out, target)  # whole or not at all: another process may be loading it


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled score (ctypes), compiling it on first use; None where it cannot be had
    (no compiler, not Linux/x86 or ARM, ``CAPTIONER_NATIVE=0``): the PyTorch ops run then."""
    if os.environ.get("CAPTIONER_NATIVE", "1") == "0":
        return None
    key = hashlib.sha256("\n".join([SOURCE, *FLAGS, *LINK, _cpu_flags(), os.environ.get("CC", "cc")]).encode()).hexdigest()
    target = _cache_dir() / f"score-{key[:16]}.so"
    try:
        if not target.exists():
            _compile(target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or e
        log.warning("the C score kernel is not available (%s); the PyTorch ops run instead", str(detail).strip()[:300])
        return None
    p, n = ctypes.c_void_p, ctypes.c_long
    lib.score_forward.argtypes = [p, p, p, p, n, n, n, n, ctypes.c_int]
    lib.score_backward.argtypes = [p, p, p, p, p, p, n, n, n, n, ctypes.c_int]
    for dtype in ("f32", "bf16"):
        forward, backward = getattr(lib, f"context_forward_{dtype}"), getattr(lib, f"context_backward_{dtype}")
        forward.argtypes, forward.restype = [p, p, p, p, n, n, n, n, ctypes.c_int], None  # ..., B, K, L, C
        backward.argtypes, backward.restype = [p, p, p, p, n, n, n, ctypes.c_int], None  # ..., B, L, C
    for name in _XENT.values():
        forward, backward = getattr(lib, f"xent_forward_{name}"), getattr(lib, f"xent_backward_{name}")
        forward.argtypes, forward.restype = [p, p, p, p, n, n, ctypes.c_int], None  # logits, target, nll, lse, N, V
        backward.argtypes, backward.restype = [p, p, p, p, p, n, n, ctypes.c_int], None  # ..., lse, g, grad, N, V
    lib.transpose_u16.argtypes, lib.transpose_u16.restype = [p, p, n, n, ctypes.c_int], None
    lib.row_logsumexp.argtypes = [p, p, n, n, ctypes.c_int]
    lib.beam_topk.argtypes = [p, p, p, p, p, p, n, n, n, n, n, ctypes.c_int, ctypes.c_int]
    lib.row_logsumexp.restype = lib.beam_topk.restype = None
    for name in _LSTM.values():
        forward, backward = getattr(lib, f"lstm_forward_{name}"), getattr(lib, f"lstm_backward_{name}")
        forward.argtypes, forward.restype = [p, p, p, n, n, n, p, p, p, p, n, n, ctypes.c_int], None
        backward.argtypes, backward.restype = [p, p, p, p, p, p, p, n, n, ctypes.c_int], None
    lib.score_forward.restype = lib.score_backward.restype = None
    return lib


def usable(*tensors: Tensor) -> bool:
    """Whether the C kernel can take these: float32 CPU tensors laid out contiguously, and it compiled."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)
            and library() is not None)


def score_forward(keys: Tensor, query: Tensor, w: Tensor) -> Tensor:
    """keys (B, L, A), query (B, K, A), w (A,) -> scores (B, K, L)."""
    B, L, A = keys.shape
    K = query.shape[1]
    scores = keys.new_empty(B, K, L)
    library().score_forward(keys.data_ptr(), query.data_ptr(), w.data_ptr(), scores.data_ptr(), B, K, L, A,
                            torch.get_num_threads())
    return scores


def score_backward(keys: Tensor, query: Tensor, grad: Tensor, keys_grad: Tensor) -> tuple[Tensor, Tensor]:
    """keys (B, L, A), query (B, K, A), grad (B, K, L) contiguous float32; adds sum_k g d into
    ``keys_grad`` (B, L, A). Returns the query's sum_l g d (B, K, A) and w's partial sums
    sum_{k,l} g s (B, A)."""
    B, L, A = keys.shape
    K = query.shape[1]
    query_grad = keys.new_zeros(B, K, A)
    w_part = keys.new_zeros(B, A)
    library().score_backward(keys.data_ptr(), query.data_ptr(), grad.data_ptr(), query_grad.data_ptr(),
                             keys_grad.data_ptr(), w_part.data_ptr(), B, K, L, A, torch.get_num_threads())
    return query_grad, w_part


_CONTEXT = {torch.float32: "f32", torch.bfloat16: "bf16"}  # the C context's dtypes, by name suffix
_XENT = _CONTEXT  # the C cross-entropy's
_LSTM = _CONTEXT  # the C training cell's gate dtypes (c is float32)


def context_usable(features: Tensor, dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,)) -> bool:
    """Whether :func:`context_forward` can take these features: (U, L, C) in one of ``dtypes``
    (of float32 and bf16) laid out contiguously on the CPU, and the library compiled."""
    return (features.device.type == "cpu" and features.dtype in dtypes and features.is_contiguous()
            and library() is not None)


def _rows_pointer(rows: Tensor | None) -> int:
    return 0 if rows is None else rows.data_ptr()


def context_forward(alpha: Tensor, features: Tensor, rows: Tensor | None = None) -> Tensor:
    """alpha (B, L), one map per image, or (B, K, L), K maps per image, float32 contiguous;
    features (U, L, C) float32 or bf16 contiguous; rows (B,) int64 contiguous in [0, U) (None:
    U = B, image b reads features b) -> (B, C) or (B, K, C) float32."""
    _, L, C = features.shape
    B, K = alpha.shape[0], alpha.shape[1] if alpha.dim() == 3 else 1
    out = alpha.new_empty(*alpha.shape[:-1], C)
    getattr(library(), f"context_forward_{_CONTEXT[features.dtype]}")(
        features.data_ptr(), _rows_pointer(rows), alpha.data_ptr(), out.data_ptr(), B, K, L, C,
        torch.get_num_threads())
    return out


def context_backward(grad: Tensor, features: Tensor, rows: Tensor | None = None) -> Tensor:
    """grad (B, C) float32 contiguous (one map per image), features and rows as
    :func:`context_forward` -> the map's gradient (B, L) float32."""
    _, L, C = features.shape
    B = grad.shape[0]
    out = grad.new_empty(B, L)
    getattr(library(), f"context_backward_{_CONTEXT[features.dtype]}")(
        features.data_ptr(), _rows_pointer(rows), grad.data_ptr(), out.data_ptr(), B, L, C, torch.get_num_threads())
    return out


def xent_usable(logits: Tensor) -> bool:
    """Whether :func:`xent_forward` can take these logits: float32 or bf16 (N, V) laid out
    contiguously on the CPU, and the library compiled."""
    return (logits.device.type == "cpu" and logits.dtype in _XENT and logits.dim() == 2
            and logits.is_contiguous() and library() is not None)


def xent_forward(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """logits (N, V) float32 or bf16, target (N,) int64 in [0, V), both contiguous -> (nll, lse),
    each (N,) float32."""
    N, V = logits.shape
    nll, lse = logits.new_empty(N, dtype=torch.float32), logits.new_empty(N, dtype=torch.float32)
    getattr(library(), f"xent_forward_{_XENT[logits.dtype]}")(
        logits.data_ptr(), target.data_ptr(), nll.data_ptr(), lse.data_ptr(), N, V, torch.get_num_threads())
    return nll, lse


def xent_backward(logits: Tensor, target: Tensor, lse: Tensor, grad: Tensor) -> Tensor:
    """The logits' gradient (N, V), in their dtype, for the nll's gradient ``grad`` (N,) float32 contiguous."""
    N, V = logits.shape
    out = torch.empty_like(logits)
    getattr(library(), f"xent_backward_{_XENT[logits.dtype]}")(
        logits.data_ptr(), target.data_ptr(), lse.data_ptr(), grad.data_ptr(), out.data_ptr(), N, V,
        torch.get_num_threads())
    return out


def transpose_usable(x: Tensor) -> bool:
    """Whether :func:`transposed` can take ``x``: a 2-D bf16 or fp16 CPU tensor laid out
    contiguously, and the library compiled."""
    return (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and x.dim() == 2
            and x.is_contiguous() and library() is not None)


def transposed(x: Tensor) -> Tensor:
    """x (N, M), 2-byte, contiguous -> its transpose (M, N), contiguous (``x.t().contiguous()``)."""
    N, M = x.shape
    out = x.new_empty(M, N)
    library().transpose_u16(x.data_ptr(), out.data_ptr(), N, M, torch.get_num_threads())
    return out


def row_logsumexp(logits: Tensor) -> Tensor:
    """logits (N, V) -> (N, 2): each row's max m and log sum exp(x - m), the two terms
    ``log_softmax`` subtracts."""
    N, V = logits.shape
    stats = logits.new_empty(N, 2)
    library().row_logsumexp(logits.data_ptr(), stats.data_ptr(), N, V, torch.get_num_threads())
    return stats


def lstm_cell(parts: tuple[Tensor, Tensor, Tensor], c: Tensor) -> tuple[Tensor, Tensor]:
    """The LSTM cell from its gate pre-activations' three parts, each (B, 4H), and c (B, H) ->
    (h, c'), without gradients (see the C source). Float32 contiguous CPU tensors (:func:`usable`)."""
    B, H = c.shape
    h, c_out = torch.empty_like(c), torch.empty_like(c)
    library().lstm_forward_f32(*(t.data_ptr() for t in parts), *(t.stride(0) for t in parts), c.data_ptr(),
                               h.data_ptr(), c_out.data_ptr(), None, B, H, torch.get_num_threads())
    return h, c_out


def lstm_train_usable(parts: tuple[Tensor, Tensor, Tensor], c: Tensor) -> bool:
    """Whether :func:`lstm_forward` can take these: three (B, 4H) CPU parts of one dtype, float32
    or bf16, each row contiguous (a step's column of a (B, T, 4H) tensor is), and c (B, H) float32
    contiguous; and the library compiled."""
    p = parts[0]
    return (p.dtype in _LSTM and c.dtype == torch.float32 and c.device.type == "cpu" and c.is_contiguous()
            and c.dim() == 2 and p.shape == (c.shape[0], 4 * c.shape[1])
            and all(x.device.type == "cpu" and x.dtype == p.dtype and x.shape == p.shape and x.stride(1) == 1
                    for x in parts)
            and library() is not None)


def lstm_forward(parts: tuple[Tensor, Tensor, Tensor], c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The training cell's forward (see the C source): parts (B, 4H) in T, c (B, H) float32 ->
    h (B, H) in T, c' (B, H) float32 and the activations (B, 4H) float32 its backward reads."""
    B, H = c.shape
    h, c_out = parts[0].new_empty(B, H), torch.empty_like(c)
    act = c.new_empty(B, 4 * H)
    getattr(library(), f"lstm_forward_{_LSTM[parts[0].dtype]}")(
        *(x.data_ptr() for x in parts), *(x.stride(0) for x in parts), c.data_ptr(), h.data_ptr(),
        c_out.data_ptr(), act.data_ptr(), B, H, torch.get_num_threads())
    return h, c_out, act


def lstm_backward(act: Tensor, c: Tensor, c_out: Tensor, dh: Tensor, dc_out: Tensor) -> tuple[Tensor, Tensor]:
    """The training cell's backward: dh (B, H) in the gates' dtype and dc' (B, H) float32, both
    contiguous -> the gates' gradient (B, 4H) in that dtype and c's (B, H) float32."""
    B, H = c.shape
    dpre, dc = dh.new_empty(B, 4 * H), torch.empty_like(c)
    getattr(library(), f"lstm_backward_{_LSTM[dh.dtype]}")(
        act.data_ptr(), c.data_ptr(), c_out.data_ptr(), dh.data_ptr(), dc_out.data_ptr(), dpre.data_ptr(),
        dc.data_ptr(), B, H, torch.get_num_threads())
    return dpre, dc


def beam_topk(logits: Tensor, stats: Tensor, beam_logp: Tensor, finished: Tensor, *, pad_id: int, end_id: int,
              force_end: bool) -> tuple[Tensor, Tensor]:
    """One beam search step's K best continuations of each image's K hypotheses (see the C
    source): logits (B * K, V) with banned words -inf, stats from :func:`row_logsumexp` taken
    before the bans, beam_logp (B, K) float32, finished (B * K,) bool -> scores (B, K) and flat
    indices k * V + v (B, K) int64, best first."""
    B, K = beam_logp.shape
    V = logits.shape[1]
    beam_logp, finished = beam_logp.float().contiguous(), finished.contiguous()
    top, idx = beam_logp.new_empty(B, K), torch.empty(B, K, dtype=torch.long)
    library().beam_topk(logits.data_ptr(), stats.data_ptr(), beam_logp.data_ptr(), finished.data_ptr(),
                        top.data_ptr(), idx.data_ptr(), B, K, V, pad_id, end_id, int(force_end),
                        torch.get_num_threads())
    return top, idx
