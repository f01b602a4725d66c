"""Flash attention for Hopper (sm_90) through Pallas' Mosaic GPU lowering, FlashAttention-3 style.

Why a second kernel next to `flash_attention.py`: the Triton lowering gives no control over
warp specialisation, so that kernel serialises the softmax and the tensor-core work of a tile
(0.77x cuDNN forward; benchmarks/KERNEL_NOTES.md). Here every program has three warpgroups:

* a memory warpgroup that streams tiles (K/V in the forward and dq kernels; Q, dO, lse and
  delta in the dk/dv kernel) with TMA into a ring of `stages` shared-memory slots, reusing a
  slot once both consumers have arrived on its "free" barrier;
* two compute warpgroups that each own a 64-row block (of queries, or of keys in dk/dv) and
  run `wgmma` with fp32 accumulators in registers.

In the forward a shared "turn" barrier makes the two compute warpgroups alternate, so one
runs its softmax (exp2, max, rescale) while the other's QKᵀ and PV matmuls occupy the tensor
cores (the ping-pong schedule of FlashAttention-3; jax's `attention_mgpu.py` showed it in
Pallas). Causal programs start with the longest rows (dq, forward) or columns (dk/dv), split
each loop into unmasked, diagonal (masked) and skipped steps, and mask only on the diagonal.

Scores are kept in base 2: s2 = q·k · scale · log2(e), so exp2 is one FMA away, and the
forward's residual is lse2 = m2 + log2(l) per row, which the backward reads back.

Scope: q [B, S, Hq, D], k/v [B, S, Hkv, D] (BTNH), bf16 or fp16, D in {64, 128}, S a multiple
of 128, causal or full, GQA/MQA by indexing the shared K/V head (dk/dv loop over the query
heads of a group in-kernel, so no per-query-head copies). `supported()` says whether a call
fits; `flash_attention()` sends everything else (sliding window, segment ids, ragged or
unequal lengths, other head dims, CPU) to the Triton/interpret kernel.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # absent from some jaxlib builds; `available()` reports it
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

f32 = jnp.float32
LOG2E = math.log2(math.e)
ROWS = 64  # rows per compute warpgroup: the M of one wgmma tile
NEW_API = tuple(int(x) for x in jax.__version__.split(".")[:2]) >= (0, 11)
_INTERPRET = None  # set by tests: InterpretGPUParams to run the kernels on CPU


# ---- version shims (jax 0.10 lowers these kernels on CPU in CI; 0.11 runs them on the H100) --
def _t(ref):
    """A transposed view of a 2-D shared-memory ref, as wgmma's B operand."""
    if _INTERPRET is not None:  # the interpreter cannot transpose refs: transpose the tile
        return ref[...].T
    return ref.transpose((1, 0)) if NEW_API else plgpu.transpose_ref(ref, (1, 0))


def _load_vec(ref, layout):
    if _INTERPRET is not None:
        return ref[...]
    return plgpu.load(ref, layout=layout) if NEW_API else plgpu.load(ref, (), layout=layout)


def _cdiv(a, b):
    return lax.div(a + (b - 1), b)


def _rem(i, n):
    return lax.rem(i, jnp.asarray(n, i.dtype))


def _mma(*triples, during=None):
    """[acc + a @ b for (acc, a, b)], the accumulators in wgmma registers; `during()` runs while
    the matmuls are in flight. Under the GPU interpreter (CPU tests), which has no `run_state`
    and no transposed refs, they are plain dots: it checks the pipeline, not wgmma."""
    if _INTERPRET is not None:  # plain matmuls of the loaded tiles (x[...] reads refs)
        outs = [acc + jnp.dot(a[...], b[...], preferred_element_type=f32) for acc, a, b in triples]
        if during is not None:
            during()
        return outs

    def body(refs):
        for ref, (_, a, b) in zip(refs, triples):
            plgpu.wgmma(ref, a, b)
        if during is not None:
            during()

    return list(pl.run_state(body)(tuple(plgpu.ACC.init(acc) for acc, _, _ in triples)))


def _full(shape, value, layout=None):
    x = jnp.full(shape, value, f32)
    if _INTERPRET is not None:  # the interpreter has no register layouts
        return x
    return plgpu.layout_cast(x, layout or plgpu.Layout.WGMMA)


def _zeros(shape, layout=None):
    return _full(shape, 0.0, layout)


def _iota(shape, dim):
    if _INTERPRET is not None:
        return lax.broadcasted_iota(jnp.int32, shape, dim)
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def _smem(shape, dtype):
    """Shared memory laid out for TMA + wgmma: 8x64 tiles, 128-byte swizzle."""
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))


def _stream(n_steps, stages, load, free):
    """The memory warpgroup's loop: fill the `stages` slots, then refill slot t % stages with step
    t (`load(t, slot, wait=True)` waits for the slot's release itself), and finally observe the
    last releases (barriers in `free`), so every thread sees every barrier phase."""
    for i in range(stages):
        pl.when(i < n_steps)(functools.partial(load, i, i, False))

    @pl.loop(stages, n_steps)
    def _(t):
        load(t, _rem(t, stages), True)

    @pl.loop(jnp.maximum(n_steps - stages, 0), n_steps)
    def _(t):
        for bar in free:
            plgpu.barrier_wait(bar.at[_rem(t, stages)])


def _kv_loop(step, drain, carry, *, causal, q0, my_steps, n_steps, block_kv):
    """A compute warpgroup's loop over kv blocks (forward and dq): blocks every row of q0's block
    sees run `step(masked=False)`, the diagonal ones `step(masked=True)`; causal programs then
    `drain` the blocks only the other warpgroup needs."""
    if not causal:
        return lax.fori_loop(0, n_steps, functools.partial(step, masked=False), carry)
    full = lax.div(q0, block_kv)
    carry = lax.fori_loop(0, full, functools.partial(step, masked=False), carry)
    carry = lax.fori_loop(full, my_steps, functools.partial(step, masked=True), carry)
    lax.fori_loop(my_steps, n_steps, drain, None)
    return carry


def _kernel(body, out_type, scratch, grid, grid_names):
    return plgpu.kernel(
        body,
        out_type=out_type,
        scratch_types=scratch,
        grid=grid,
        grid_names=grid_names,
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **({} if _INTERPRET is None else {"interpret": _INTERPRET}),
    )


# ---- which calls this kernel takes ----------------------------------------------------------
def available() -> bool:
    """Mosaic GPU importable and the default device a Hopper GPU (wgmma, TMA)."""
    if plgpu is None or jax.default_backend() != "gpu":
        return False
    return getattr(jax.devices()[0], "compute_capability", "") == "9.0"


def supported(q, k, v, *, sliding_window=None, segment_ids=None) -> bool:
    """Whether (shapes, dtype, options) fit this kernel; the caller checks `available()`."""
    B, S, Hq, D = q.shape
    return (
        k.shape == v.shape
        and k.shape[1] == S
        and Hq % k.shape[2] == 0
        and D in (64, 128)
        and S % (2 * ROWS) == 0
        and S >= 2 * ROWS
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and k.dtype == q.dtype == v.dtype
        and sliding_window is None
        and segment_ids is None
    )


# ---- forward --------------------------------------------------------------------------------
def _fwd(q, k, v, *, causal, scale, block_kv=128, stages=2):
    B, S, Hq, D = q.shape
    G = Hq // k.shape[2]
    dtype = q.dtype
    nq, nkv = S // (2 * ROWS), S // block_kv
    stages = min(stages, nkv)
    c = scale * LOG2E

    def kernel(
        q_ref,
        k_ref,
        v_ref,
        o_ref,
        lse_ref,
        qo_smem2,
        k_smem,
        v_smem,
        lse_smem2,
        q_ready,
        k_ready,
        v_ready,
        k_free,
        v_free,
        turn,
    ):
        b, h, wg = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("wg")
        tile = nq - 1 - lax.axis_index("q")  # longest causal rows first: a shorter tail
        n_steps = _cdiv((tile + 1) * (2 * ROWS), block_kv) if causal else nkv

        def take_turn():
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            qo_smem, lse_smem = qo_smem2.at[wg], lse_smem2.at[wg]
            q0 = tile * (2 * ROWS) + wg * ROWS
            my_steps = _cdiv(q0 + ROWS, block_kv) if causal else nkv
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q0, ROWS), h], qo_smem, q_ready.at[wg])
            plgpu.barrier_wait(q_ready.at[wg])
            m = _full((ROWS,), -jnp.inf, plgpu.Layout.WGMMA.reduce(1))
            l = _zeros((ROWS,), plgpu.Layout.WGMMA.reduce(1))
            acc = _zeros((ROWS, D))
            plgpu.barrier_wait(k_ready.at[0])
            pl.when(wg == 1)(take_turn)  # offsets the two warpgroups by half a step

            def step(i, carry, masked):
                acc, m, l = carry
                slot = _rem(i, stages)

                # take_turn while QKᵀ runs: the other warpgroup's PV may start now
                (s,) = _mma((_zeros((ROWS, block_kv)), qo_smem, _t(k_smem.at[slot])), during=take_turn)
                plgpu.barrier_arrive(k_free.at[slot])
                if masked:
                    keep = _iota(s.shape, 0) + q0 >= _iota(s.shape, 1) + i * block_kv
                    s = jnp.where(keep, s, -jnp.inf)
                m_new = jnp.maximum(m, s.max(axis=1) * c)
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(s * c - lax.broadcast_in_dim(m_new, s.shape, [0]))
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                l = l * alpha + p.sum(axis=1)
                p16 = p.astype(dtype)
                # Keep the rescale and row sum before the turn hand-over (measured faster in jax's
                # kernel for D <= 128: the compiler otherwise sinks them past the barrier).
                acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
                plgpu.barrier_arrive(turn)  # softmax done
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_wait(turn)  # tensor cores free

                def next_k():
                    @pl.when(i + 1 < my_steps)
                    def _():
                        plgpu.barrier_wait(k_ready.at[_rem(i + 1, stages)])

                (acc,) = _mma((acc, p16, v_smem.at[slot]), during=next_k)
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l

            def drain(i, _):  # steps the other warpgroup still needs: free slots, keep turns even
                slot = _rem(i, stages)
                plgpu.barrier_wait(k_ready.at[slot])  # every barrier phase is observed by every user
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_arrive(k_free.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])
                take_turn()
                take_turn()

            acc, m, l = _kv_loop(
                step, drain, (acc, m, l), causal=causal, q0=q0, my_steps=my_steps, n_steps=n_steps, block_kv=block_kv
            )
            pl.when(wg == 0)(take_turn)

            inv = 1.0 / l
            qo_smem[...] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(dtype)
            lse_smem[...] = m + jnp.log(l) * LOG2E
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[b, pl.ds(q0, ROWS), h])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, pl.ds(q0, ROWS)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")
            kv_h = lax.div(h, G)

            def load(i, slot, wait):
                rows = (b, pl.ds(i * block_kv, block_kv), kv_h)
                if wait:
                    plgpu.barrier_wait(k_free.at[slot])
                plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_ready.at[slot])
                if wait:
                    plgpu.barrier_wait(v_free.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_ready.at[slot])

            _stream(n_steps, stages, load, (k_free, v_free))

    scratch = [
        _smem((2, ROWS, D), dtype),
        _smem((stages, block_kv, D), dtype),
        _smem((stages, block_kv, D), dtype),
        plgpu.SMEM((2, ROWS), f32),
        plgpu.Barrier(num_barriers=2),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        plgpu.Barrier(num_arrivals=2),
    ]
    out_type = (jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((B, Hq, S), f32))
    return _kernel(kernel, out_type, scratch, (Hq, nq, B), ("h", "q", "b"))(q, k, v)


# ---- backward: dq ---------------------------------------------------------------------------
def _dq(q, k, v, do, lse, delta, *, causal, scale, block_kv=64, stages=2):
    B, S, Hq, D = q.shape
    G = Hq // k.shape[2]
    dtype = q.dtype
    nq, nkv = S // (2 * ROWS), S // block_kv
    stages = min(stages, nkv)
    c = scale * LOG2E

    def kernel(
        q_ref,
        k_ref,
        v_ref,
        do_ref,
        lse_ref,
        delta_ref,
        dq_ref,
        q_smem2,
        do_smem2,
        lse_smem2,
        delta_smem2,
        k_smem,
        v_smem,
        q_ready,
        do_ready,
        lse_ready,
        delta_ready,
        k_ready,
        v_ready,
        kv_free,
    ):
        b, h, wg = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("wg")
        tile = nq - 1 - lax.axis_index("q")
        n_steps = _cdiv((tile + 1) * (2 * ROWS), block_kv) if causal else nkv

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
            q0 = tile * (2 * ROWS) + wg * ROWS
            my_steps = _cdiv(q0 + ROWS, block_kv) if causal else nkv
            rows = (b, pl.ds(q0, ROWS), h)
            plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem, q_ready.at[wg])
            plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem, do_ready.at[wg])
            plgpu.copy_gmem_to_smem(lse_ref.at[b, h, pl.ds(q0, ROWS)], lse_smem2.at[wg], lse_ready.at[wg])
            plgpu.copy_gmem_to_smem(delta_ref.at[b, h, pl.ds(q0, ROWS)], delta_smem2.at[wg], delta_ready.at[wg])
            for bar in (q_ready, do_ready, lse_ready, delta_ready):
                plgpu.barrier_wait(bar.at[wg])
            lse = _load_vec(lse_smem2.at[wg], plgpu.Layout.WGMMA.reduce(1))
            delta = _load_vec(delta_smem2.at[wg], plgpu.Layout.WGMMA.reduce(1))

            def step(i, dq, masked):
                slot = _rem(i, stages)
                plgpu.barrier_wait(k_ready.at[slot])
                plgpu.barrier_wait(v_ready.at[slot])

                zero = _zeros((ROWS, block_kv))
                s, dp = _mma((zero, q_smem, _t(k_smem.at[slot])), (zero, do_smem, _t(v_smem.at[slot])))
                p = jnp.exp2(s * c - lax.broadcast_in_dim(lse, s.shape, [0]))
                if masked:
                    p = jnp.where(_iota(s.shape, 0) + q0 >= _iota(s.shape, 1) + i * block_kv, p, 0.0)
                ds = p * (dp - lax.broadcast_in_dim(delta, s.shape, [0]))
                (dq,) = _mma((dq, ds.astype(dtype), k_smem.at[slot]))
                plgpu.barrier_arrive(kv_free.at[slot])
                return dq

            def drain(i, _):
                slot = _rem(i, stages)
                plgpu.barrier_wait(k_ready.at[slot])
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_arrive(kv_free.at[slot])

            dq = _kv_loop(
                step,
                drain,
                _zeros((ROWS, D)),
                causal=causal,
                q0=q0,
                my_steps=my_steps,
                n_steps=n_steps,
                block_kv=block_kv,
            )
            q_smem[...] = (dq * scale).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[rows])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")
            kv_h = lax.div(h, G)

            def load(i, slot, wait):
                rows = (b, pl.ds(i * block_kv, block_kv), kv_h)
                if wait:
                    plgpu.barrier_wait(kv_free.at[slot])
                plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_ready.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_ready.at[slot])

            _stream(n_steps, stages, load, (kv_free,))

    scratch = [
        _smem((2, ROWS, D), dtype),
        _smem((2, ROWS, D), dtype),
        plgpu.SMEM((2, ROWS), f32),
        plgpu.SMEM((2, ROWS), f32),
        _smem((stages, block_kv, D), dtype),
        _smem((stages, block_kv, D), dtype),
        *[plgpu.Barrier(num_barriers=2) for _ in range(4)],
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),
    ]
    return _kernel(kernel, jax.ShapeDtypeStruct(q.shape, dtype), scratch, (Hq, nq, B), ("h", "q", "b"))(
        q, k, v, do, lse, delta
    )


# ---- backward: dk, dv -----------------------------------------------------------------------
def _dkv(q, k, v, do, lse, delta, *, causal, scale, block_q=64, stages=2):
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    dtype = q.dtype
    nkv, nqb = S // (2 * ROWS), S // block_q
    assert ROWS % block_q == 0, "a key block must start on a query-block boundary"
    c = scale * LOG2E

    def kernel(
        q_ref,
        k_ref,
        v_ref,
        do_ref,
        lse_ref,
        delta_ref,
        dk_ref,
        dv_ref,
        k_smem2,
        v_smem2,
        q_smem,
        do_smem,
        lse_smem,
        delta_smem,
        k_ready,
        v_ready,
        q_ready,
        do_ready,
        lse_ready,
        delta_ready,
        free,
    ):
        b, hk, wg = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("wg")
        tile = lax.axis_index("kv")  # natural order: the first key blocks see the most queries
        q_start = lax.div(tile * (2 * ROWS), block_q) if causal else 0
        n_q = nqb - q_start  # query blocks streamed per query head
        total = G * n_q

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
            k0 = tile * (2 * ROWS) + wg * ROWS
            rows = (b, pl.ds(k0, ROWS), hk)
            plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem, k_ready.at[wg])
            plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem, v_ready.at[wg])
            plgpu.barrier_wait(k_ready.at[wg])
            plgpu.barrier_wait(v_ready.at[wg])
            shape = (ROWS, block_q)  # transposed scores: keys x queries

            def step(t, carry, masked):
                dk, dv = carry
                slot = _rem(t, stages)
                qb = q_start + _rem(t, n_q)
                plgpu.barrier_wait(q_ready.at[slot])
                plgpu.barrier_wait(lse_ready.at[slot])

                (sT,) = _mma((_zeros(shape), k_smem, _t(q_smem.at[slot])))
                lse = _load_vec(lse_smem.at[slot], plgpu.Layout.WGMMA.reduce(0))
                pT = jnp.exp2(sT * c - lax.broadcast_in_dim(lse, shape, [1]))
                if masked:
                    pT = jnp.where(_iota(shape, 0) + k0 <= _iota(shape, 1) + qb * block_q, pT, 0.0)
                plgpu.barrier_wait(do_ready.at[slot])

                dv, dpT = _mma((dv, pT.astype(dtype), do_smem.at[slot]), (_zeros(shape), v_smem, _t(do_smem.at[slot])))
                plgpu.barrier_wait(delta_ready.at[slot])
                delta = _load_vec(delta_smem.at[slot], plgpu.Layout.WGMMA.reduce(0))
                dsT = pT * (dpT - lax.broadcast_in_dim(delta, shape, [1]))
                (dk,) = _mma((dk, dsT.astype(dtype), q_smem.at[slot]))
                plgpu.barrier_arrive(free.at[slot])
                return dk, dv

            def skip(t, carry):  # a query block wholly above the diagonal: nothing to add
                slot = _rem(t, stages)
                for bar in (q_ready, do_ready, lse_ready, delta_ready):
                    plgpu.barrier_wait(bar.at[slot])  # keeps this thread's barrier phases in step
                plgpu.barrier_arrive(free.at[slot])
                return carry

            if causal:
                n_skip = lax.div(k0, block_q) - q_start
                n_diag = _cdiv(k0 + ROWS - 1, block_q) - q_start
            else:
                n_skip = n_diag = 0

            def head(g, carry):
                t0 = g * n_q
                carry = lax.fori_loop(t0, t0 + n_skip, skip, carry)
                carry = lax.fori_loop(t0 + n_skip, t0 + n_diag, functools.partial(step, masked=True), carry)
                return lax.fori_loop(t0 + n_diag, t0 + n_q, functools.partial(step, masked=False), carry)

            dk, dv = lax.fori_loop(0, G, head, (_zeros((ROWS, D)), _zeros((ROWS, D))))
            k_smem[...] = (dk * scale).astype(dtype)
            v_smem[...] = dv.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[rows])
            plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[rows])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            def load(t, slot, wait):
                t = jnp.int32(t) if isinstance(t, int) else t  # the prologue passes Python ints
                head = hk * G + lax.div(t, n_q)
                q0 = (q_start + _rem(t, n_q)) * block_q
                if wait:
                    plgpu.barrier_wait(free.at[slot])
                rows = (b, pl.ds(q0, block_q), head)
                plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem.at[slot], q_ready.at[slot])
                plgpu.copy_gmem_to_smem(lse_ref.at[b, head, pl.ds(q0, block_q)], lse_smem.at[slot], lse_ready.at[slot])
                plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem.at[slot], do_ready.at[slot])
                plgpu.copy_gmem_to_smem(
                    delta_ref.at[b, head, pl.ds(q0, block_q)], delta_smem.at[slot], delta_ready.at[slot]
                )

            _stream(total, stages, load, (free,))

    scratch = [
        _smem((2, ROWS, D), dtype),
        _smem((2, ROWS, D), dtype),
        _smem((stages, block_q, D), dtype),
        _smem((stages, block_q, D), dtype),
        plgpu.SMEM((stages, block_q), f32),
        plgpu.SMEM((stages, block_q), f32),
        plgpu.Barrier(num_barriers=2),
        plgpu.Barrier(num_barriers=2),
        *[plgpu.Barrier(num_barriers=stages) for _ in range(4)],
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),
    ]
    kv_type = jax.ShapeDtypeStruct(k.shape, dtype)
    return _kernel(kernel, (kv_type, kv_type), scratch, (Hkv, nkv, B), ("h", "kv", "b"))(q, k, v, do, lse, delta)


# ---- custom_vjp -----------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _attention(q, k, v, causal, scale):
    return _fwd(q, k, v, causal=causal, scale=scale)[0]


def _attention_fwd(q, k, v, causal, scale):
    o, lse = _fwd(q, k, v, causal=causal, scale=scale)
    return o, (q, k, v, o, lse)


def _attention_bwd(causal, scale, res, do):
    q, k, v, o, lse = res
    do = do.astype(q.dtype)
    delta = jnp.einsum("bshd,bshd->bhs", o.astype(f32), do.astype(f32))
    dq = _dq(q, k, v, do, lse, delta, causal=causal, scale=scale)
    dk, dv = _dkv(q, k, v, do, lse, delta, causal=causal, scale=scale)
    return dq, dk, dv


_attention.defvjp(_attention_fwd, _attention_bwd)


def mgpu_flash_attention(q, k, v, *, causal=True, sm_scale=None):
    """Fused attention on Hopper. q [B,S,Hq,D], k/v [B,S,Hkv,D] -> [B,S,Hq,D]; see `supported`."""
    if not supported(q, k, v):
        raise ValueError(
            f"shapes/dtypes outside the Mosaic GPU kernel: q {q.shape} {q.dtype}, "
            f"k {k.shape} {k.dtype}; use flash_attention(), which falls back"
        )
    scale = float(q.shape[-1] ** -0.5 if sm_scale is None else sm_scale)
    return _attention(q, k, v, bool(causal), scale)
