"""Hopper (sm_90a) column-sparse MLP delta in Pallas Mosaic GPU: two gathered-weight GEMM kernels.

Per token block of ``block`` rows (128, or 64) there is a list of selected hidden neurons idx[b, g, :count].
  up   (mm1): z = x[blk] @ W1[idx]^T + b1[idx];  a = gelu_tanh(z);  delta = (a - act[blk, idx]) * keep
              -> delta [B, N, K] (16-bit, the mm2 operand) and new_act_sel = act_sel + delta [B, N, K] f32.
  down (mm2): out[blk, c-tile] = out[blk, c-tile] + delta[blk, :count] @ W2[idx[:count], c-tile]  (f32 acc).
W1 and W2 are both neuron-major [F, C], so the selection is a ROW gather in both kernels: mm1 gathers a
[block_n, block_c] tile of W1 rows per reduction step and uses it as a transposed wgmma operand (like K in
Q K^T); mm2 gathers [block_k, block_out] tiles of W2 rows as the plain B operand (like V in P V).

Warp specialisation: ``block // 64`` consumer warpgroups (64 token rows each, f32 accumulators in registers)
and one producer warpgroup that fills a ``max_concurrent_steps`` ring. The gather is pluggable:
  - "rows_staged" (default, runs in interpret mode and lowers for sm_90a): one TMA per selected row into an
    unswizzled staging tile, rewritten through registers into the swizzled operand, then ``commit_smem``.
  - "rows_direct": one TMA per row straight into the swizzled operand; interpret mode only.
mm2 runs ceil(count / block_k) steps, so its work follows the count. mm1's grid covers the index capacity;
tiles past the count compute and are zeroed by ``keep`` (the wrapper rounds capacity to ``block_n``).

The cached-activation gather act[blk, idx] (an element gather) and the scatter of the new activations back into
act [B, N, F] are XLA ops in the wrapper; with C = 3072 they are ~1/1500 of mm1's arithmetic per element.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.attention import mosaic_gpu_compat as mc

ROWS_PER_WG = 64
GATHERS = ("rows_staged", "rows_direct")
_META = 32  # int32 words per block holding the count (word 0): the copy must move a multiple of 128 bytes


@dataclasses.dataclass(frozen=True)
class TuningConfig:
    """Tiling of the sparse MLP kernels.

    Attributes:
      block_n: mm1 selected neurons per CTA (multiple of 64, <= 256).
      block_c: mm1 reduction step over the model width C (multiple of 64, <= 256).
      block_k: mm2 selected neurons per reduction step (multiple of 64, <= 256).
      block_out: mm2 output columns per CTA (multiple of 64, <= 256).
      max_concurrent_steps: ring depth (>= 2).
      gather: one of GATHERS.
      consumer_regs, producer_regs: setmaxnreg budgets (hardware only).
    """

    block_n: int = 128
    block_c: int = 64
    block_k: int = 64
    block_out: int = 128
    max_concurrent_steps: int = 2
    gather: str = "rows_staged"
    consumer_regs: int = 232
    producer_regs: int = 40

    def __post_init__(self):
        for name in ("block_n", "block_c", "block_k", "block_out"):
            val = getattr(self, name)
            if val % 64 or not 64 <= val <= mc.TMA_MAX_BOX:
                raise ValueError(f"{name}={val} must be a multiple of 64 in [64, {mc.TMA_MAX_BOX}]")
        if self.max_concurrent_steps < 2:
            raise ValueError(f"{self.max_concurrent_steps=} must be at least 2")
        if self.gather not in GATHERS:
            raise ValueError(f"{self.gather=} must be one of {GATHERS}")
        for regs in (self.consumer_regs, self.producer_regs):
            if regs % 8 or not 24 <= regs <= 256:
                raise ValueError(f"register budgets must be multiples of 8 in [24, 256]; got {regs=}")
        if 2 * self.consumer_regs + self.producer_regs > 512:
            raise ValueError(f"2 x {self.consumer_regs=} + {self.producer_regs=} exceeds the 64K-register file")


DEFAULT_CONFIG = TuningConfig()
SHIPPED_CONFIGS = (DEFAULT_CONFIG, TuningConfig(block_n=64, max_concurrent_steps=3))


def _operand(shape, dtype):
    return plgpu.SMEM(shape, dtype, transforms=mc.OPERAND_TRANSFORMS)


def _kernel_call(kernel, *, out_type, scratch, grid, nwg, interpret, detect_races):
    return plgpu.kernel(
        kernel,
        out_type=out_type,
        scratch_types=scratch,
        grid=grid,
        grid_names=("n", "g", "b"),
        num_threads=nwg + 1,
        thread_name="wg",
        compiler_params=mc.compiler_params(),
        interpret=mc.interpret_params(detect_races) if interpret else None,
    )


def _gather_rows(src, idx_smem, nrows, dst_stage, dst_ring_slot, bar, *, staged):
    """One TMA per row: src.at[idx[r]] -> row r of the staging tile (staged) or of the ring slot (direct)."""

    @pl.loop(0, nrows)
    def _(r):
        row = jnp.maximum(idx_smem[r], 0)
        dst = dst_stage.at[pl.ds(r, 1)] if staged else dst_ring_slot.at[pl.ds(r, 1)]
        plgpu.copy_gmem_to_smem(src.at[pl.ds(row, 1)], dst, bar)


def _build_up(*, cfg, b, g, n, c, kpad, block, dtype, interpret, detect_races):
    """mm1 operands (x, w1, idx, bsel, keep, act_sel) -> (delta, new_act_sel)."""
    nwg, bn, bc, ns = block // ROWS_PER_WG, cfg.block_n, cfg.block_c, cfg.max_concurrent_steps
    steps = c // bc
    ns = min(ns, steps)
    staged = cfg.gather == "rows_staged"
    wl = plgpu.Layout.WGMMA

    def kernel(x_ref, w_ref, idx_ref, b_ref, keep_ref, act_ref, dl_ref, new_ref, **sc):
        ni, gi, bi = lax.axis_index("n"), lax.axis_index("g"), lax.axis_index("b")
        wg = lax.axis_index("wg")
        nsl = pl.ds(ni * bn, bn)

        @pl.when(wg == nwg)
        def _producer():
            if not interpret:
                plgpu.set_max_registers(cfg.producer_regs, action="decrease")
            plgpu.copy_gmem_to_smem(idx_ref.at[bi, gi, nsl], sc["idx_smem"], sc["misc_bar"])
            plgpu.copy_gmem_to_smem(b_ref.at[bi, gi, nsl], sc["b_smem"], sc["misc_bar"])
            plgpu.copy_gmem_to_smem(keep_ref.at[bi, gi, nsl], sc["keep_smem"], sc["misc_bar"])
            plgpu.barrier_wait(sc["misc_bar"])

            def fill(step, slot):
                csl = pl.ds(step * bc, bc)
                plgpu.copy_gmem_to_smem(
                    x_ref.at[bi, pl.ds(gi * block, block), csl], sc["x_buf"].at[slot], sc["x_ready"].at[slot]
                )
                ring = sc["w_buf"].at[slot]
                if staged:
                    _gather_rows(w_ref.at[:, csl], sc["idx_smem"], bn, sc["w_stage"], ring, sc["w_tma"], staged=True)
                    plgpu.barrier_wait(sc["w_tma"])
                    mc.retile(sc["w_stage"], ring, interpret=interpret)
                    plgpu.commit_smem()  # generic-proxy stores must be visible to the tensor cores
                    plgpu.barrier_arrive(sc["w_ready"].at[slot])
                else:
                    _gather_rows(w_ref.at[:, csl], sc["idx_smem"], bn, None, ring, sc["w_ready"].at[slot], staged=False)

            for s in range(ns):
                fill(s, s)

            @pl.loop(0, steps)
            def _(step):
                slot = lax.rem(step, ns)
                plgpu.barrier_wait(sc["consumed"].at[slot])

                @pl.when(step + ns < steps)
                def _():
                    fill(step + ns, slot)

        @pl.when(wg < nwg)
        def _consumer():
            if not interpret:
                plgpu.set_max_registers(cfg.consumer_regs, action="increase")
            rows = pl.ds(gi * block + wg * ROWS_PER_WG, ROWS_PER_WG)
            act_w = sc["act_smem"].at[wg]
            plgpu.copy_gmem_to_smem(act_ref.at[bi, rows, nsl], act_w, sc["act_bar"].at[wg])
            bt_scr = sc["bt_scr"].at[wg] if interpret else None

            def body(step, acc):
                slot = lax.rem(step, ns)
                plgpu.barrier_wait(sc["x_ready"].at[slot])
                plgpu.barrier_wait(sc["w_ready"].at[slot])
                x_w = sc["x_buf"].at[slot, pl.ds(wg * ROWS_PER_WG, ROWS_PER_WG)]
                acc = mc.matmul_acc(
                    acc, x_w, sc["w_buf"].at[slot], transpose_b=True, interpret=interpret, bt_scratch=bt_scr
                )
                plgpu.barrier_arrive(sc["consumed"].at[slot])
                return acc

            acc = mc.lcast(jnp.zeros((ROWS_PER_WG, bn), jnp.float32), wl, interpret=interpret)
            acc = lax.fori_loop(0, steps, body, acc)
            plgpu.barrier_wait(sc["misc_bar"])
            plgpu.barrier_wait(sc["act_bar"].at[wg])
            bias = mc.load(sc["b_smem"], layout=wl.reduce(0), interpret=interpret)
            keep = mc.load(sc["keep_smem"], layout=wl.reduce(0), interpret=interpret)
            a = mc.gelu_tanh(acc + lax.broadcast_in_dim(bias, acc.shape, [1]))
            cached = mc.load(act_w, layout=wl, optimized=False, interpret=interpret)
            delta = (a - cached) * lax.broadcast_in_dim(keep, acc.shape, [1])
            sc["dl_smem"].at[wg][...] = delta.astype(dtype)
            act_w[...] = cached + delta
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(sc["dl_smem"].at[wg], dl_ref.at[bi, rows, nsl])
            plgpu.copy_smem_to_gmem(act_w, new_ref.at[bi, rows, nsl])
            plgpu.wait_smem_to_gmem(0)

    scratch = dict(
        x_buf=_operand((ns, block, bc), dtype),
        w_buf=_operand((ns, bn, bc), dtype),
        idx_smem=plgpu.SMEM((bn,), jnp.int32),
        b_smem=plgpu.SMEM((bn,), jnp.float32),
        keep_smem=plgpu.SMEM((bn,), jnp.float32),
        act_smem=plgpu.SMEM((nwg, ROWS_PER_WG, bn), jnp.float32),
        dl_smem=_operand((nwg, ROWS_PER_WG, bn), dtype),
        misc_bar=plgpu.Barrier(num_arrivals=3),
        act_bar=plgpu.Barrier(num_arrivals=1, num_barriers=nwg),
        x_ready=plgpu.Barrier(num_arrivals=1, num_barriers=ns),
        w_ready=plgpu.Barrier(num_arrivals=1 if staged else bn, num_barriers=ns),
        consumed=plgpu.Barrier(num_arrivals=nwg, num_barriers=ns),
    )
    if staged:
        scratch["w_stage"] = plgpu.SMEM((bn, bc), dtype)
        scratch["w_tma"] = plgpu.Barrier(num_arrivals=bn)
    if interpret:
        scratch["bt_scr"] = plgpu.SMEM((nwg, bc, bn), dtype)
    out_type = (
        jax.ShapeDtypeStruct((b, n, kpad), dtype),
        jax.ShapeDtypeStruct((b, n, kpad), jnp.float32),
    )
    return _kernel_call(
        kernel,
        out_type=out_type,
        scratch=scratch,
        grid=(kpad // bn, g, b),
        nwg=nwg,
        interpret=interpret,
        detect_races=detect_races,
    )


def _build_down(*, cfg, b, g, n, c, kpad, block, dtype, interpret, detect_races):
    """mm2 operands (delta, w2, idx, meta, out) -> new out (f32)."""
    nwg, bk, bo = block // ROWS_PER_WG, cfg.block_k, cfg.block_out
    ns = min(cfg.max_concurrent_steps, kpad // bk)  # the prologue's static slices must stay in bounds
    staged = cfg.gather == "rows_staged"
    wl = plgpu.Layout.WGMMA

    def kernel(d_ref, w_ref, idx_ref, meta_ref, oc_ref, out_ref, **sc):
        ci, gi, bi = lax.axis_index("n"), lax.axis_index("g"), lax.axis_index("b")
        wg = lax.axis_index("wg")
        osl = pl.ds(ci * bo, bo)

        def num_steps():
            return (sc["meta_smem"][0] + (bk - 1)) // bk

        @pl.when(wg == nwg)
        def _producer():
            if not interpret:
                plgpu.set_max_registers(cfg.producer_regs, action="decrease")
            plgpu.copy_gmem_to_smem(meta_ref.at[bi, gi], sc["meta_smem"], sc["misc_bar"])
            plgpu.barrier_wait(sc["misc_bar"])
            steps = num_steps()

            def fill(step, slot):
                ksl = pl.ds(step * bk, bk)
                plgpu.copy_gmem_to_smem(
                    d_ref.at[bi, pl.ds(gi * block, block), ksl], sc["d_buf"].at[slot], sc["d_ready"].at[slot]
                )
                idx_slot = sc["idx_smem"].at[slot]
                plgpu.copy_gmem_to_smem(idx_ref.at[bi, gi, ksl], idx_slot, sc["idx_bar"].at[slot])
                plgpu.barrier_wait(sc["idx_bar"].at[slot])
                ring = sc["w_buf"].at[slot]
                if staged:
                    _gather_rows(w_ref.at[:, osl], idx_slot, bk, sc["w_stage"], ring, sc["w_tma"], staged=True)
                    plgpu.barrier_wait(sc["w_tma"])
                    mc.retile(sc["w_stage"], ring, interpret=interpret)
                    plgpu.commit_smem()
                    plgpu.barrier_arrive(sc["w_ready"].at[slot])
                else:
                    _gather_rows(w_ref.at[:, osl], idx_slot, bk, None, ring, sc["w_ready"].at[slot], staged=False)

            for s in range(ns):  # prologue: the first slots are free
                pl.when(s < steps)(functools.partial(fill, s, s))

            @pl.loop(0, steps)
            def _(step):
                slot = lax.rem(step, ns)
                plgpu.barrier_wait(sc["consumed"].at[slot])

                @pl.when(step + ns < steps)
                def _():
                    fill(step + ns, slot)

        @pl.when(wg < nwg)
        def _consumer():
            if not interpret:
                plgpu.set_max_registers(cfg.consumer_regs, action="increase")
            rows = pl.ds(gi * block + wg * ROWS_PER_WG, ROWS_PER_WG)
            o_w = sc["o_smem"].at[wg]
            plgpu.copy_gmem_to_smem(oc_ref.at[bi, rows, osl], o_w, sc["o_bar"].at[wg])
            plgpu.barrier_wait(sc["misc_bar"])
            steps = num_steps()

            def body(step, acc):
                slot = lax.rem(step, ns)
                plgpu.barrier_wait(sc["d_ready"].at[slot])
                plgpu.barrier_wait(sc["w_ready"].at[slot])
                d_w = sc["d_buf"].at[slot, pl.ds(wg * ROWS_PER_WG, ROWS_PER_WG)]
                acc = mc.matmul_acc(acc, d_w, sc["w_buf"].at[slot], transpose_b=False, interpret=interpret)
                plgpu.barrier_arrive(sc["consumed"].at[slot])
                return acc

            acc = mc.lcast(jnp.zeros((ROWS_PER_WG, bo), jnp.float32), wl, interpret=interpret)
            acc = lax.fori_loop(0, steps, body, acc)
            plgpu.barrier_wait(sc["o_bar"].at[wg])
            o_w[...] = mc.load(o_w, layout=wl, optimized=False, interpret=interpret) + acc
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_w, out_ref.at[bi, rows, osl])
            plgpu.wait_smem_to_gmem(0)

    scratch = dict(
        d_buf=_operand((ns, block, bk), dtype),
        w_buf=_operand((ns, bk, bo), dtype),
        idx_smem=plgpu.SMEM((ns, bk), jnp.int32),
        meta_smem=plgpu.SMEM((_META,), jnp.int32),
        o_smem=plgpu.SMEM((nwg, ROWS_PER_WG, bo), jnp.float32),
        misc_bar=plgpu.Barrier(num_arrivals=1),
        o_bar=plgpu.Barrier(num_arrivals=1, num_barriers=nwg),
        idx_bar=plgpu.Barrier(num_arrivals=1, num_barriers=ns),
        d_ready=plgpu.Barrier(num_arrivals=1, num_barriers=ns),
        w_ready=plgpu.Barrier(num_arrivals=1 if staged else bk, num_barriers=ns),
        consumed=plgpu.Barrier(num_arrivals=nwg, num_barriers=ns),
    )
    if staged:
        scratch["w_stage"] = plgpu.SMEM((bk, bo), dtype)
        scratch["w_tma"] = plgpu.Barrier(num_arrivals=bk)
    return _kernel_call(
        kernel,
        out_type=jax.ShapeDtypeStruct((b, n, c), jnp.float32),
        scratch=scratch,
        grid=(c // bo, g, b),
        nwg=nwg,
        interpret=interpret,
        detect_races=detect_races,
    )


@functools.partial(jax.jit, static_argnames=("block", "config", "interpret", "detect_races"))
def _sparse_mlp_delta(x, w1, b1, w2, indices, counts, act, out, *, block, config, interpret, detect_races):
    b, n, c = x.shape
    f = w1.shape[0]
    g = n // block
    kcap = indices.shape[-1]
    kpad = mc.round_up(max(kcap, 1), max(config.block_n, config.block_k))
    dt = jnp.float16 if x.dtype == jnp.float16 else jnp.bfloat16
    counts = jnp.clip(counts.astype(jnp.int32), 0, kcap)
    slots = lax.broadcasted_iota(jnp.int32, (b, g, kpad), 2)
    valid = slots < counts[..., None]  # [B, G, Kpad]
    idx = jnp.clip(indices.astype(jnp.int32), 0, f - 1)
    idx = jnp.where(valid, jnp.pad(idx, ((0, 0), (0, 0), (0, kpad - kcap))), -1)  # [B, G, Kpad]
    safe = jnp.maximum(idx, 0)
    bsel = jnp.where(valid, b1.astype(jnp.float32)[safe], 0.0)  # [B, G, Kpad]
    keep = valid.astype(jnp.float32)
    # act[b, blk rows, idx[b, blk]] -> [B, N, Kpad]
    act_g = act.reshape(b, g, block, f)
    act_sel = jnp.take_along_axis(act_g, safe[:, :, None, :], axis=3).astype(jnp.float32).reshape(b, n, kpad)
    shape_kw = dict(b=b, g=g, n=n, c=c, kpad=kpad, block=block, dtype=dt, interpret=interpret)
    up = _build_up(cfg=config, detect_races=detect_races, **shape_kw)
    delta, new_sel = up(x.astype(dt), w1.astype(dt), idx, bsel, keep, act_sel)
    meta = jnp.pad(counts[..., None], ((0, 0), (0, 0), (0, _META - 1)))  # [B, G, 32]
    down = _build_down(cfg=config, detect_races=detect_races, **shape_kw)
    new_out = down(delta, w2.astype(dt), idx, meta, out.astype(jnp.float32))
    # Masked slots scatter out of range and are dropped, so they never overwrite a selected neuron.
    dst = jnp.where(valid, idx, f)[:, :, None, :]
    bidx = jnp.arange(b)[:, None, None, None]
    gidx = jnp.arange(g)[None, :, None, None]
    ridx = jnp.arange(block)[None, None, :, None]
    new_act = act_g.at[bidx, gidx, ridx, dst].set(new_sel.reshape(b, g, block, kpad).astype(act.dtype), mode="drop")
    return new_out.astype(out.dtype), new_act.reshape(b, n, f)


def sparse_mlp_delta(
    x: jax.Array,
    w1: jax.Array,
    b1: jax.Array,
    w2: jax.Array,
    indices: jax.Array,
    counts: jax.Array,
    act: jax.Array,
    out: jax.Array,
    *,
    block: int = 128,
    config: TuningConfig = DEFAULT_CONFIG,
    interpret: bool = False,
    detect_races: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Column-sparse MLP delta (SPEC 2.2 step 5) on Hopper; same contract as ``sparse_mlp_delta_reference``.

    Args:
      x: [B, N, C] with N a multiple of ``block`` and C a multiple of the config's block_c and block_out.
      w1: [F, C] neuron-major; b1: [F]; w2: [F, C] neuron-major (fc2's weight transposed).
      indices: [B, N / block, K] int32 selected neurons per token block (duplicate-free); counts: [B, N / block].
      act: [B, N, F] cached activations; out: [B, N, C] cached outputs.
      block: token rows per block, 64 or 128.
      config: tiling; interpret / detect_races: Mosaic GPU interpret mode on CPU (and its race detector).

    Returns:
      (new out [B, N, C] in out.dtype, new act [B, N, F] in act.dtype).
    """
    b, n, c = x.shape
    f = w1.shape[0]
    if block not in (64, 128):
        raise ValueError(f"{block=} must be 64 or 128 for the Mosaic GPU MLP kernels")
    if n % block:
        raise ValueError(f"{x.shape=}: the token count must be a multiple of {block=}")
    if c % config.block_c or c % config.block_out:
        raise ValueError(f"{x.shape=}: C must be a multiple of {config.block_c=} and {config.block_out=}")
    if w1.shape != (f, c) or w2.shape != (f, c) or b1.shape != (f,):
        raise ValueError(f"need w1 [F, C], b1 [F], w2 [F, C] with C={c}; got {w1.shape=}, {b1.shape=}, {w2.shape=}")
    g = n // block
    if indices.ndim != 3 or indices.shape[:2] != (b, g) or counts.shape != (b, g):
        raise ValueError(
            f"need indices [B, G, K], counts [B, G] with (B, G)={(b, g)}; {indices.shape=}, {counts.shape=}"
        )
    if act.shape != (b, n, f) or out.shape != (b, n, c):
        raise ValueError(f"need act [B, N, F] and out [B, N, C]; got {act.shape=}, {out.shape=}")
    for arr in (x, w1, w2):
        if arr.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
            raise ValueError(f"x, w1, w2 must be bf16, f16 or f32; got {arr.dtype=}")
    return _sparse_mlp_delta(
        x,
        w1,
        b1,
        w2,
        indices,
        counts,
        act,
        out,
        block=block,
        config=config,
        interpret=interpret,
        detect_races=detect_races,
    )
