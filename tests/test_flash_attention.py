"""Flash / decode attention vs. the fp32 reference.

CPU (CI): Pallas interpret mode on small shapes.  Interpret mode fills output
buffers with NaN before the kernel runs, so any tile the kernel fails to write
shows up as NaN and fails the finiteness check.  GPU tests (``-m gpu``) run
the compiled Triton kernels on realistic shapes.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.reference import (attention_reference,
                                      decode_attention_reference)

ON_GPU = jax.default_backend() == "gpu"
gpu = [pytest.mark.gpu,
       pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (compiled "
                          "Triton kernels); default backend is "
                          f"{jax.default_backend()!r}")]


def rel_err(out, ref):
  out = np.asarray(out, np.float32)
  ref = np.asarray(ref, np.float32)
  assert np.isfinite(out).all(), "non-finite values (unwritten tile?)"
  return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def _inputs(seed, B, S, Hq, Hkv, D, dtype, T=None):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  T = S if T is None else T
  q = jax.random.normal(ks[0], (B, S, Hq, D), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (B, T, Hkv, D), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (B, T, Hkv, D), jnp.float32).astype(dtype)
  do = jax.random.normal(ks[3], (B, S, Hq, D), jnp.float32).astype(dtype)
  return q, k, v, do


def _segments(seed, B, S, n=3):
  ids = jax.random.randint(jax.random.PRNGKey(seed + 1000), (B, S), 0, n)
  return jnp.sort(ids, axis=1).astype(jnp.int32)  # packed documents


def _check(seed, B, S, Hq, Hkv, D, dtype, *, causal=True, window=None,
           seg=False, sm_scale=None, bq=32, bk=32, grads=True, T=None,
           tol=None):
  q, k, v, do = _inputs(seed, B, S, Hq, Hkv, D, dtype, T)
  segment_ids = _segments(seed, B, S) if seg else None
  kw = dict(causal=causal, sliding_window=window, segment_ids=segment_ids,
            sm_scale=sm_scale)
  f = lambda q, k, v: flash_attention(q, k, v, block_q=bq, block_k=bk,
                                      block_q_bwd=bq, block_k_bwd=bk, **kw)
  r = lambda q, k, v: attention_reference(q, k, v, **kw)
  if tol is None:
    tol = 1e-4 if dtype == jnp.float32 else 2e-2
  if not grads:
    assert rel_err(f(q, k, v), r(q, k, v)) < tol
    return
  out, vjp = jax.vjp(f, q, k, v)
  ref, rvjp = jax.vjp(r, q.astype(jnp.float32), k.astype(jnp.float32),
                      v.astype(jnp.float32))
  assert out.dtype == q.dtype and out.shape == q.shape
  assert rel_err(out, ref) < tol, "forward"
  grads = vjp(do)
  rgrads = rvjp(do.astype(jnp.float32))
  for name, g, rg, x in zip("qkv", grads, rgrads, (q, k, v)):
    assert g.shape == x.shape and g.dtype == x.dtype
    assert rel_err(g, rg) < 2 * tol, f"d{name}"


# (name, kwargs) grid: causal/full, window, GQA/MQA, segments, ragged S,
# D 64/128, fp32 + bf16.  Each case draws fresh inputs from its own seed.
CASES = [
    ("causal_mha_f32", dict(B=1, S=64, Hq=2, Hkv=2, D=64, dtype=jnp.float32,
                            bq=16, bk=16)),
    ("full_gqa_ragged_f32", dict(B=2, S=100, Hq=4, Hkv=2, D=64,
                                 dtype=jnp.float32, causal=False, bq=64)),
    ("d128_causal_ragged_gqa_bf16", dict(B=1, S=100, Hq=4, Hkv=2, D=128,
                                         dtype=jnp.bfloat16, bk=64)),
    ("window_mqa_f32", dict(B=1, S=64, Hq=4, Hkv=1, D=64, dtype=jnp.float32,
                            window=20, bq=16, bk=16)),
    ("window_ragged_bf16", dict(B=2, S=72, Hq=2, Hkv=1, D=64,
                                dtype=jnp.bfloat16, window=17, bk=16)),
    ("segments_causal_gqa_f32", dict(B=2, S=64, Hq=4, Hkv=2, D=64,
                                     dtype=jnp.float32, seg=True, bq=16)),
    ("segments_full_ragged_f32", dict(B=1, S=72, Hq=2, Hkv=2, D=64,
                                      dtype=jnp.float32, seg=True,
                                      causal=False)),
    ("segments_window_f32", dict(B=1, S=64, Hq=2, Hkv=1, D=64,
                                 dtype=jnp.float32, seg=True, window=30,
                                 bq=16, bk=16)),
    # Window much narrower than the kv block: some rows' first visited block
    # is fully masked (regression: FMA-contracted exp2 overflow gave NaN).
    ("narrow_window_big_blocks_f32", dict(B=2, S=72, Hq=4, Hkv=2, D=64,
                                          dtype=jnp.float32, window=7,
                                          bq=64, bk=64)),
    ("d128_full_scale_f32", dict(B=1, S=48, Hq=2, Hkv=2, D=128,
                                 dtype=jnp.float32, causal=False,
                                 sm_scale=0.3, bq=16)),
]


@pytest.mark.parametrize("seed,name,kw", [(i, n, kw) for i, (n, kw)
                                          in enumerate(CASES)],
                         ids=[n for n, _ in CASES])
def test_flash_attention_fwd_bwd(seed, name, kw):
  _check(seed + 17, **kw)


def test_flash_attention_default_blocks_cross_lengths():
  # Default block sizes and S != T (non-causal cross attention), fwd only.
  _check(99, B=1, S=40, Hq=2, Hkv=1, D=64, dtype=jnp.float32, causal=False,
         bq=None, bk=None, T=72, grads=False)


def test_flash_attention_rejects_bad_heads():
  q, k, v, _ = _inputs(0, 1, 16, 3, 2, 64, jnp.float32)
  with pytest.raises(ValueError):
    flash_attention(q, k, v)


DECODE_CASES = [
    # B, Sq, Hq, Hkv, T, D, window, splits, dtype
    (2, 1, 4, 2, 256, 64, None, None, jnp.float32),
    (1, 4, 8, 1, 200, 64, 50, 3, jnp.float32),     # MQA, window, T % 16 != 0
    (2, 3, 2, 2, 128, 128, None, 2, jnp.bfloat16),
    (1, 16, 4, 2, 512, 64, 100, None, jnp.bfloat16),
    (1, 16, 8, 1, 128, 64, None, 2, jnp.float32),  # 128 rows: 2 row tiles
]


@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_attention(case):
  B, Sq, Hq, Hkv, T, D, W, splits, dtype = case
  seed = T + Sq
  q, k, v, _ = _inputs(seed, B, Sq, Hq, Hkv, D, dtype, T=T)
  last = jax.random.randint(jax.random.PRNGKey(seed), (B, 1), Sq, T)
  pos = (last - Sq + jnp.arange(Sq)[None, :]).astype(jnp.int32)
  out = decode_attention(q, k, v, pos, sliding_window=W, num_splits=splits)
  ref = decode_attention_reference(q, k, v, pos, sliding_window=W)
  assert out.shape == q.shape and out.dtype == q.dtype
  tol = 1e-4 if dtype == jnp.float32 else 2e-2
  assert rel_err(out, ref) < tol


def test_decode_matches_flash_last_rows():
  # Decoding the last Sq tokens of a causal prefix equals prefill's last rows.
  q, k, v, _ = _inputs(5, 1, 64, 4, 2, 64, jnp.float32)
  full = flash_attention(q, k, v, causal=True, block_q=32, block_k=32)
  pos = jnp.arange(58, 64, dtype=jnp.int32)[None]
  dec = decode_attention(q[:, 58:], k, v, pos)
  assert rel_err(dec, full[:, 58:]) < 1e-4


# ------------------------------------------------------------------ GPU --
@pytest.mark.parametrize("S,causal,window,Hq,Hkv", [
    (1024, True, None, 8, 8), (4096, True, None, 8, 2),
    (2048, False, None, 4, 4), (4096, True, 1024, 8, 8)])
@gpu[0]
@gpu[1]
def test_gpu_flash_attention_fwd(S, causal, window, Hq, Hkv):
  _check(S + Hq, B=2, S=S, Hq=Hq, Hkv=Hkv, D=128, dtype=jnp.bfloat16,
         causal=causal, window=window, bq=None, bk=None, grads=False)


@pytest.mark.parametrize("S,D,window,seg,Hkv", [
    (1024, 128, None, False, 2), (2048, 64, None, False, 4),
    (1000, 128, 256, False, 4), (1024, 128, None, True, 4)])
@gpu[0]
@gpu[1]
def test_gpu_flash_attention_fwd_bwd(S, D, window, seg, Hkv):
  _check(S + D, B=2, S=S, Hq=4, Hkv=Hkv, D=D, dtype=jnp.bfloat16,
         window=window, seg=seg, bq=None, bk=None)


@gpu[0]
@gpu[1]
def test_gpu_decode_attention():
  for (B, Sq, T, W) in [(4, 1, 8192, None), (2, 8, 4096, 1024)]:
    q, k, v, _ = _inputs(T, B, Sq, 32, 8, 128, jnp.bfloat16, T=T)
    last = jax.random.randint(jax.random.PRNGKey(T), (B, 1), Sq, T)
    pos = (last - Sq + jnp.arange(Sq)[None, :]).astype(jnp.int32)
    out = decode_attention(q, k, v, pos, sliding_window=W)
    ref = decode_attention_reference(q, k, v, pos, sliding_window=W)
    assert rel_err(out, ref) < 2e-2
