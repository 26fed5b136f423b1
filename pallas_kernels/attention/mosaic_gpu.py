"""Hopper (sm_90a) attention kernels in Pallas Mosaic GPU: dense (+ log-normaliser, + column sums) and column-sparse.

One FlashAttention-3 style kernel serves the three ops. A CTA owns one query group of ``64 * num_compute_wgs``
rows of one (batch, head): each consumer warpgroup holds 64 query rows in SMEM and its output accumulator
[64, D] (f32) in registers; one producer warpgroup fills a ring of ``max_concurrent_steps`` K/V tiles of
``block_kv`` rows. Consumers compute S = Q K^T (wgmma), an online softmax in the exp2 domain and O += P V
(wgmma, P from registers), releasing each ring slot through "consumed" barriers.

Key source, by op:
  * dense: contiguous K/V tiles, one TMA each; K/V are zero-padded to a multiple of ``block_kv`` and the padded
    columns of the last tile get a -inf bias (a [block_kv] vector loaded once).
  * sparse: per (b, h, group) a list of key indices; slots at or beyond the group's count hold -1 and are masked.
    The loop runs ceil(count / block_kv) steps, so the work follows the count, not the capacity. The gather of
    the selected rows is pluggable (``TuningConfig.gather``):
      - "rows_staged" (``default_config``): the producer loads the step's indices into SMEM, issues one TMA per selected
        row into an unswizzled staging tile, then rewrites it through registers into the swizzled wgmma operand
        (``commit_smem`` orders those generic-proxy stores before the tensor cores read them). It is the only
        design that both runs in interpret mode and lowers for sm_90a without aliasing tricks; its costs are
        one TMA issue per row and a register round trip per tile.
      - "pregathered": XLA gathers K[idx], V[idx] into [B, H, G, K, D] first and the kernel streams contiguous
        tiles (an extra HBM round trip of the selected rows; the safe fallback).
      - "rows_direct": one TMA per row straight into the swizzled operand. Interpret mode only: the sm_90
        lowering rejects 1-row slices of an (8, 64)-tiled buffer.
    On an H200 "pregathered" measured 1.7-2.7x faster than "rows_staged" (docs/PERFORMANCE.md), so the tuned
    table (``tuned_config``, written by ``benchmarks/kernels.py --tune``) selects it.
  * dense + column sums: each consumer warpgroup reduces exp(s_ij - prev_lse_i) over its 64 rows into a
    [block_kv] partial in SMEM; the producer sums the partials of the warpgroups and stores the tile of
    cs[b, h, g, :] with a TMA (two SMEM slots, guarded by "full"/"free" barriers).

Interpret mode (``interpret=True``, CPU) swaps the hardware-only operations for equivalents (see
``mosaic_gpu_compat``): transposed and register-LHS wgmma operands go through SMEM scratch, layout casts and
register-count changes are skipped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.attention import mosaic_gpu_compat as mc

ROWS_PER_WG = 64
GATHERS = ("rows_staged", "pregathered", "rows_direct")
_COLSUM_SLOTS = 2
_META = 32  # int32 words per group holding the count (word 0): the copy must move a multiple of 128 bytes


@dataclasses.dataclass(frozen=True)
class TuningConfig:
    """Tiling of the attention kernels.

    Attributes:
      num_compute_wgs: consumer warpgroups of 64 query rows; the query group is 64 * num_compute_wgs (2 or 3).
      block_kv: keys per pipeline step (multiple of 64).
      max_concurrent_steps: K/V ring depth (>= 2).
      gather: sparse-only key gather design, one of GATHERS.
      consumer_regs, producer_regs: per-thread register budgets set with setmaxnreg on hardware.
    """

    num_compute_wgs: int = 3
    block_kv: int = 64
    max_concurrent_steps: int = 2
    gather: str = "rows_staged"
    consumer_regs: int = 152
    producer_regs: int = 56

    def __post_init__(self):
        if self.num_compute_wgs not in (2, 3):
            raise ValueError(f"{self.num_compute_wgs=} must be 2 or 3 (query group 128 or 192)")
        if self.block_kv % 64 or not 64 <= self.block_kv <= mc.TMA_MAX_BOX:
            raise ValueError(f"{self.block_kv=} must be a multiple of 64 in [64, {mc.TMA_MAX_BOX}]")
        if self.max_concurrent_steps < 2:
            raise ValueError(f"{self.max_concurrent_steps=} must be at least 2")
        if self.gather not in GATHERS:
            raise ValueError(f"{self.gather=} must be one of {GATHERS}")
        for regs in (self.consumer_regs, self.producer_regs):
            if regs % 8 or not 24 <= regs <= 256:
                raise ValueError(f"register budgets must be multiples of 8 in [24, 256]; got {regs=}")
        if self.num_compute_wgs * self.consumer_regs + self.producer_regs > 512:
            raise ValueError(
                f"{self.num_compute_wgs=} x {self.consumer_regs=} + {self.producer_regs=} exceeds the 64K-register file"
            )

    @property
    def group(self) -> int:
        return ROWS_PER_WG * self.num_compute_wgs


def default_config(group: int, *, sparse: bool) -> TuningConfig:
    """The shipped config for a query group of 128 or 192 rows."""
    if group not in (128, 192):
        raise ValueError(f"{group=} must be 128 or 192 for the Mosaic GPU attention kernels")
    wgs = group // ROWS_PER_WG
    # setmaxnreg budgets of all warpgroups sum to at most 512 (64K registers / 128 threads); the producer keeps
    # enough for a 64-column retile chunk.
    regs = dict(consumer_regs=232, producer_regs=40) if wgs == 2 else dict(consumer_regs=152, producer_regs=56)
    # rows_staged needs a staging tile per K and V: block_kv 128 would exceed the 227 KiB of SMEM.
    return TuningConfig(num_compute_wgs=wgs, block_kv=64 if sparse else 128, **regs)


TUNED_CONFIGS_PATH = pathlib.Path(__file__).with_name("tuned_configs.json")


@functools.lru_cache(maxsize=1)
def _tuned_table() -> tuple[dict, ...]:
    if not TUNED_CONFIGS_PATH.exists():
        return ()
    return tuple(json.loads(TUNED_CONFIGS_PATH.read_text())["entries"])


def tuned_config(mode: str, group: int, n: int) -> TuningConfig:
    """The best measured config for ``mode`` ('dense' or 'sparse') at query group ``group`` and key count ``n``.

    Reads ``tuned_configs.json`` (written by ``python -m benchmarks.kernels --tune`` on a Hopper GPU): among
    the entries of this mode and group it takes the one measured at the key count nearest to ``n`` (in log
    scale). Without a matching entry it returns ``default_config``.
    """
    if mode not in ("dense", "sparse"):
        raise ValueError(f"{mode=} must be 'dense' or 'sparse'")
    rows = [e for e in _tuned_table() if e["mode"] == mode and e["group"] == group]
    if not rows:
        return default_config(group, sparse=mode == "sparse")
    best = min(rows, key=lambda e: abs(math.log(max(n, 1) / e["n"])))
    return TuningConfig(**best["config"])


SHIPPED_CONFIGS: dict[str, tuple[TuningConfig, ...]] = {
    "dense": (default_config(192, sparse=False), default_config(128, sparse=False)),
    "sparse": (
        default_config(192, sparse=True),
        default_config(128, sparse=True),
        dataclasses.replace(default_config(192, sparse=True), gather="pregathered"),
    ),
}


def _build(
    *,
    mode: str,
    colsum: bool,
    cfg: TuningConfig,
    b: int,
    h: int,
    g: int,
    nk: int,
    d: int,
    dtype,
    interpret: bool,
    detect_races: bool,
):
    """Returns the plgpu.kernel callable for one mode ('dense' or 'sparse') and static shape.

    Kernel operands: dense (q, k, v, last_bias[, prev_lse]) -> (o, lse[, cs]); sparse (q, k, v, idx, meta) -> o.
    q is [B, H, G*group, D]; dense k/v are [B, H, nk, D] with nk a multiple of block_kv; sparse k/v are
    [B, H, Nk, D] (or [B, H, G, K, D] when pregathered); idx [B, H, G, K] (-1 = masked slot); meta [B, H, G, 32]
    holds the count in word 0. ``nk`` is the padded key count (dense) or the padded index capacity (sparse).
    """
    nwg, bk = cfg.num_compute_wgs, cfg.block_kv
    bq = cfg.group
    # The ring prologue slices steps 0..ns-1 statically: they must exist even when fewer steps run.
    ns = min(cfg.max_concurrent_steps, nk // bk)
    sparse = mode == "sparse"
    gather = cfg.gather if sparse else "dense"
    if gather == "rows_direct" and not interpret:
        raise ValueError("gather='rows_direct' runs only in interpret mode (sm_90 rejects 1-row tile slices)")
    staged = gather == "rows_staged"
    row_gather = gather in ("rows_staged", "rows_direct")
    scale_log2 = mc.LOG2E / math.sqrt(d)
    wgmma_layout = plgpu.Layout.WGMMA
    row_layout = wgmma_layout.reduce(1)
    col_layout = wgmma_layout.reduce(0)
    static_steps = nk // bk

    def kernel(*refs, **scratch):
        if sparse:
            q_ref, k_ref, v_ref, idx_ref, meta_ref, o_ref = refs
            lse_ref = cs_ref = bias_ref = prev_ref = None
        elif colsum:
            q_ref, k_ref, v_ref, bias_ref, prev_ref, o_ref, lse_ref, cs_ref = refs
            idx_ref = meta_ref = None
        else:
            q_ref, k_ref, v_ref, bias_ref, o_ref, lse_ref = refs
            idx_ref = meta_ref = prev_ref = cs_ref = None
        sc = scratch
        bi, hi, gi = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("g")
        wg = lax.axis_index("wg")
        k_buf, v_buf = sc["k_buf"], sc["v_buf"]

        def num_steps():
            if sparse:
                return (sc["meta_smem"][0] + (bk - 1)) // bk
            return static_steps

        @pl.when(wg == nwg)
        def _producer():
            if not interpret:
                plgpu.set_max_registers(cfg.producer_regs, action="decrease")
            if sparse:
                plgpu.copy_gmem_to_smem(meta_ref.at[bi, hi, gi], sc["meta_smem"], sc["misc_bar"])
            else:
                plgpu.copy_gmem_to_smem(bias_ref, sc["bias_smem"], sc["misc_bar"])
            plgpu.barrier_wait(sc["misc_bar"])
            steps = num_steps()

            def gather_rows(src, slot, stage, bar):
                @pl.loop(0, bk)
                def _(r):
                    row = jnp.maximum(sc["idx_smem"][slot, r], 0)
                    dst = stage.at[pl.ds(r, 1)] if staged else stage.at[slot, pl.ds(r, 1)]
                    plgpu.copy_gmem_to_smem(src.at[bi, hi, pl.ds(row, 1)], dst, bar)

            def fill(step, slot):
                kv = pl.ds(step * bk, bk)
                if gather == "dense":
                    plgpu.copy_gmem_to_smem(k_ref.at[bi, hi, kv], k_buf.at[slot], sc["k_ready"].at[slot])
                    plgpu.copy_gmem_to_smem(v_ref.at[bi, hi, kv], v_buf.at[slot], sc["v_ready"].at[slot])
                    return
                # The consumers mask with these indices, so they arrive on k_ready with the K tile.
                if gather == "pregathered":
                    plgpu.copy_gmem_to_smem(idx_ref.at[bi, hi, gi, kv], sc["idx_smem"].at[slot], sc["k_ready"].at[slot])
                    plgpu.copy_gmem_to_smem(k_ref.at[bi, hi, gi, kv], k_buf.at[slot], sc["k_ready"].at[slot])
                    plgpu.copy_gmem_to_smem(v_ref.at[bi, hi, gi, kv], v_buf.at[slot], sc["v_ready"].at[slot])
                    return
                plgpu.copy_gmem_to_smem(idx_ref.at[bi, hi, gi, kv], sc["idx_smem"].at[slot], sc["idx_bar"].at[slot])
                plgpu.barrier_wait(sc["idx_bar"].at[slot])
                if staged:
                    gather_rows(k_ref, slot, sc["k_stage"], sc["k_tma"])
                    gather_rows(v_ref, slot, sc["v_stage"], sc["v_tma"])
                    plgpu.barrier_wait(sc["k_tma"])
                    mc.retile(sc["k_stage"], k_buf.at[slot], interpret=interpret)
                    plgpu.commit_smem()  # generic-proxy stores must be visible to the tensor cores
                    plgpu.barrier_arrive(sc["k_ready"].at[slot])
                    plgpu.barrier_wait(sc["v_tma"])
                    mc.retile(sc["v_stage"], v_buf.at[slot], interpret=interpret)
                    plgpu.commit_smem()
                    plgpu.barrier_arrive(sc["v_ready"].at[slot])
                else:
                    gather_rows(k_ref, slot, k_buf, sc["k_ready"].at[slot])
                    gather_rows(v_ref, slot, v_buf, sc["v_ready"].at[slot])

            for s in range(ns):  # prologue: the first slots are free
                pl.when(s < steps)(functools.partial(fill, s, s))

            def reduce_colsum(step):
                slot = lax.rem(step, _COLSUM_SLOTS)
                plgpu.barrier_wait(sc["cs_full"].at[slot])
                total = sc["cs_part"][slot, 0]
                for w in range(1, nwg):
                    total = total + sc["cs_part"][slot, w]
                # The TMA store issued from this slot two steps ago must have finished reading it.
                plgpu.wait_smem_to_gmem(_COLSUM_SLOTS - 1, wait_read_only=True)
                sc["cs_out"][slot] = total
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(sc["cs_out"].at[slot], cs_ref.at[bi, hi, gi, pl.ds(step * bk, bk)])

                @pl.when(step + _COLSUM_SLOTS < steps)  # the last releases would never be waited for
                def _():
                    plgpu.barrier_arrive(sc["cs_free"].at[slot])

            @pl.loop(0, steps)
            def _(step):
                slot = lax.rem(step, ns)
                # Every release is observed exactly once: before refilling the slot, or while draining.
                plgpu.barrier_wait(sc["k_consumed"].at[slot])
                plgpu.barrier_wait(sc["v_consumed"].at[slot])

                @pl.when(step + ns < steps)
                def _():
                    fill(step + ns, slot)

                if colsum:
                    reduce_colsum(step)

            if colsum:
                plgpu.wait_smem_to_gmem(0)

        @pl.when(wg < nwg)
        def _consumer():
            if not interpret:
                plgpu.set_max_registers(cfg.consumer_regs, action="increase")
            row0 = gi * bq + wg * ROWS_PER_WG
            rows = pl.ds(row0, ROWS_PER_WG)
            q_w = sc["q_smem"].at[wg]
            plgpu.copy_gmem_to_smem(q_ref.at[bi, hi, rows], q_w, sc["q_bar"].at[wg])
            if colsum:
                plgpu.copy_gmem_to_smem(prev_ref.at[bi, hi, rows], sc["prev_smem"].at[wg], sc["q_bar"].at[wg])
            plgpu.barrier_wait(sc["q_bar"].at[wg])
            plgpu.barrier_wait(sc["misc_bar"])
            steps = num_steps()
            bt_scr = sc["kt_scr"].at[wg] if interpret else None
            p_scr = sc["p_scr"].at[wg] if interpret else None
            if colsum:
                prev = mc.load(sc["prev_smem"].at[wg], layout=row_layout, interpret=interpret) * mc.LOG2E
            if not sparse:
                last_bias = mc.load(sc["bias_smem"], layout=col_layout, interpret=interpret)

            m_i = mc.lcast(jnp.full((ROWS_PER_WG,), -jnp.inf, jnp.float32), row_layout, interpret=interpret)
            l_i = mc.lcast(jnp.full((ROWS_PER_WG,), 0.0, jnp.float32), row_layout, interpret=interpret)
            acc = mc.lcast(jnp.full((ROWS_PER_WG, d), 0.0, jnp.float32), wgmma_layout, interpret=interpret)

            def body(step, carry):
                acc, m_i, l_i = carry
                slot = lax.rem(step, ns)
                plgpu.barrier_wait(sc["k_ready"].at[slot])
                s = mc.matmul_abt(q_w, k_buf.at[slot], (ROWS_PER_WG, bk), interpret=interpret, bt_scratch=bt_scr)
                s = s * scale_log2
                if sparse:
                    kidx = mc.load(sc["idx_smem"].at[slot], layout=col_layout, interpret=interpret)
                    s = jnp.where(lax.broadcast_in_dim(kidx, s.shape, [1]) >= 0, s, -jnp.inf)
                else:
                    bias = jnp.where(step == static_steps - 1, last_bias, 0.0)
                    s = s + lax.broadcast_in_dim(bias, s.shape, [1])
                plgpu.barrier_arrive(sc["k_consumed"].at[slot])
                m_new = jnp.maximum(m_i, s.max(axis=1))
                m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with no valid key yet
                alpha = jnp.exp2(m_i - m_use)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_use, s.shape, [0]))
                l_i = l_i * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                if colsum:
                    contrib = jnp.exp2(s - lax.broadcast_in_dim(prev, s.shape, [0]))

                    # The row reduction crosses warps and goes through Mosaic GPU's one reduction scratch buffer,
                    # which all warpgroups share: they take turns (token ring over cs_turn) or corrupt each other.
                    @pl.when(jnp.logical_or(wg > 0, step > 0))
                    def _():
                        plgpu.barrier_wait(sc["cs_turn"].at[wg])

                    part = contrib.sum(axis=0)

                    @pl.when(jnp.logical_or(wg + 1 < nwg, step + 1 < steps))  # every phase must be observed
                    def _():
                        plgpu.barrier_arrive(sc["cs_turn"].at[lax.rem(wg + 1, nwg)])

                    cslot = lax.rem(step, _COLSUM_SLOTS)

                    @pl.when(step >= _COLSUM_SLOTS)
                    def _():
                        plgpu.barrier_wait(sc["cs_free"].at[cslot])

                    sc["cs_part"][cslot, wg] = part
                    plgpu.barrier_arrive(sc["cs_full"].at[cslot])
                plgpu.barrier_wait(sc["v_ready"].at[slot])
                acc = mc.matmul_acc_reg_lhs(acc, p.astype(dtype), v_buf.at[slot], interpret=interpret, p_scratch=p_scr)
                plgpu.barrier_arrive(sc["v_consumed"].at[slot])
                return acc, m_new, l_i

            acc, m_i, l_i = lax.fori_loop(0, steps, body, (acc, m_i, l_i))
            empty = l_i == 0.0
            l_div = jnp.where(empty, 1.0, l_i)
            q_w[...] = (acc / lax.broadcast_in_dim(l_div, acc.shape, [0])).astype(dtype)
            if lse_ref is not None:
                sc["lse_smem"][wg] = jnp.where(empty, -jnp.inf, (m_i + jnp.log2(l_div)) * mc.LN2)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_w, o_ref.at[bi, hi, rows])
            if lse_ref is not None:
                plgpu.copy_smem_to_gmem(sc["lse_smem"].at[wg], lse_ref.at[bi, hi, rows])
            plgpu.wait_smem_to_gmem(0)

    def operand(shape):
        return plgpu.SMEM(shape, dtype, transforms=mc.OPERAND_TRANSFORMS)

    # Arrivals per ready barrier: one per TMA that completes on it, or one explicit arrive after a retile.
    ready_arrivals = {"pregathered": (2, 1), "rows_direct": (bk, bk)}.get(gather, (1, 1))
    scratch = dict(
        q_smem=operand((nwg, ROWS_PER_WG, d)),
        k_buf=operand((ns, bk, d)),
        v_buf=operand((ns, bk, d)),
        q_bar=plgpu.Barrier(num_arrivals=2 if colsum else 1, num_barriers=nwg),
        misc_bar=plgpu.Barrier(num_arrivals=1),
        k_ready=plgpu.Barrier(num_arrivals=ready_arrivals[0], num_barriers=ns),
        v_ready=plgpu.Barrier(num_arrivals=ready_arrivals[1], num_barriers=ns),
        k_consumed=plgpu.Barrier(num_arrivals=nwg, num_barriers=ns),
        v_consumed=plgpu.Barrier(num_arrivals=nwg, num_barriers=ns),
    )
    if sparse:
        scratch["meta_smem"] = plgpu.SMEM((_META,), jnp.int32)
        scratch["idx_smem"] = plgpu.SMEM((ns, bk), jnp.int32)
        if row_gather:
            scratch["idx_bar"] = plgpu.Barrier(num_arrivals=1, num_barriers=ns)
        if staged:
            scratch["k_stage"] = plgpu.SMEM((bk, d), dtype)
            scratch["v_stage"] = plgpu.SMEM((bk, d), dtype)
            scratch["k_tma"] = plgpu.Barrier(num_arrivals=bk)
            scratch["v_tma"] = plgpu.Barrier(num_arrivals=bk)
    else:
        scratch["bias_smem"] = plgpu.SMEM((bk,), jnp.float32)
        scratch["lse_smem"] = plgpu.SMEM((nwg, ROWS_PER_WG), jnp.float32)
    if colsum:
        scratch["prev_smem"] = plgpu.SMEM((nwg, ROWS_PER_WG), jnp.float32)
        scratch["cs_part"] = plgpu.SMEM((_COLSUM_SLOTS, nwg, bk), jnp.float32)
        scratch["cs_out"] = plgpu.SMEM((_COLSUM_SLOTS, bk), jnp.float32)
        scratch["cs_full"] = plgpu.Barrier(num_arrivals=nwg, num_barriers=_COLSUM_SLOTS)
        scratch["cs_free"] = plgpu.Barrier(num_arrivals=1, num_barriers=_COLSUM_SLOTS)
        scratch["cs_turn"] = plgpu.Barrier(num_arrivals=1, num_barriers=nwg)
    if interpret:
        scratch["kt_scr"] = plgpu.SMEM((nwg, d, bk), dtype)
        scratch["p_scr"] = plgpu.SMEM((nwg, ROWS_PER_WG, bk), dtype)

    n_pad = g * bq
    out_type = [jax.ShapeDtypeStruct((b, h, n_pad, d), dtype)]
    if not sparse:
        out_type.append(jax.ShapeDtypeStruct((b, h, n_pad), jnp.float32))
    if colsum:
        out_type.append(jax.ShapeDtypeStruct((b, h, g, nk), jnp.float32))
    return plgpu.kernel(
        kernel,
        out_type=tuple(out_type) if len(out_type) > 1 else out_type[0],
        scratch_types=scratch,
        grid=(h, g, b),
        grid_names=("h", "g", "b"),
        num_threads=nwg + 1,
        thread_name="wg",
        compiler_params=mc.compiler_params(),
        interpret=mc.interpret_params(detect_races) if interpret else None,
    )


def _check_qkv(q, k, v):
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"need q [B, H, N, D] and k, v [B, H, Nk, D]; got {q.shape=}, {k.shape=}, {v.shape=}")
    if q.shape[3] != 128:
        raise ValueError(f"the Mosaic GPU attention kernels need head dim 128; got {q.shape=}")
    for x in (q, k, v):
        if x.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
            raise ValueError(f"q, k, v must be bf16, f16 or f32; got {x.dtype=}")


def _kernel_dtype(q):
    # f32 inputs run the bf16 kernel (wgmma takes 16-bit operands); f16 stays f16.
    return jnp.float16 if q.dtype == jnp.float16 else jnp.bfloat16


def _pad_axis(x, axis: int, size: int, value=0):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


@functools.partial(jax.jit, static_argnames=("config", "interpret", "detect_races", "with_colsum"))
def _dense(q, k, v, prev_lse, *, config: TuningConfig, interpret: bool, detect_races: bool, with_colsum: bool):
    b, h, n, d = q.shape
    nk = k.shape[2]
    dt = _kernel_dtype(q)
    g = -(-n // config.group)
    nk_pad = mc.round_up(nk, config.block_kv)
    qp = _pad_axis(q.astype(dt), 2, g * config.group)
    kp = _pad_axis(k.astype(dt), 2, nk_pad)
    vp = _pad_axis(v.astype(dt), 2, nk_pad)
    last_valid = nk - (nk_pad - config.block_kv)
    last_bias = jnp.where(jnp.arange(config.block_kv) < last_valid, 0.0, -jnp.inf).astype(jnp.float32)
    call = _build(
        mode="dense",
        colsum=with_colsum,
        cfg=config,
        b=b,
        h=h,
        g=g,
        nk=nk_pad,
        d=d,
        dtype=dt,
        interpret=interpret,
        detect_races=detect_races,
    )
    if not with_colsum:
        o, lse = call(qp, kp, vp, last_bias)
        return o[:, :, :n].astype(q.dtype), lse[:, :, :n], None
    # Padded query rows get prev_lse = +inf so that they add nothing to the column sums.
    prev = _pad_axis(prev_lse.astype(jnp.float32), 2, g * config.group, jnp.inf)
    o, lse, cs = call(qp, kp, vp, last_bias, prev)
    return o[:, :, :n].astype(q.dtype), lse[:, :, :n], cs[..., :nk]


def dense_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    config: TuningConfig | None = None,
    interpret: bool = False,
    detect_races: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Dense non-causal attention and its log-normaliser on Hopper.

    Args:
      q: [B, H, N, 128]; k, v: [B, H, Nk, 128]; bf16, f16 or f32 (f32 runs the bf16 kernel).
      config: tiling (default: query group 192, block_kv 128).
      interpret: run in Mosaic GPU interpret mode on CPU.
      detect_races: interpret mode only: enable the race detector.

    Returns:
      o [B, H, N, 128] in q.dtype; lse [B, H, N] float32 (natural log of sum_j exp(q_i.k_j / sqrt(D))).
    """
    _check_qkv(q, k, v)
    cfg = config or default_config(192, sparse=False)
    o, lse, _ = _dense(q, k, v, None, config=cfg, interpret=interpret, detect_races=detect_races, with_colsum=False)
    return o, lse


def dense_attention_colsum(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    prev_lse: jax.Array,
    *,
    config: TuningConfig | None = None,
    interpret: bool = False,
    detect_races: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Dense attention plus per-query-group column sums cs[b, h, g, j] = sum_{i in g} exp(s_ij - prev_lse_i).

    Args:
      q, k, v: as in ``dense_attention``.
      prev_lse: [B, H, N] log-normaliser of an earlier dense pass.
      config: tiling; its query group (64 * num_compute_wgs) is the column-sum group.

    Returns:
      o [B, H, N, 128], lse [B, H, N] float32, cs [B, H, ceil(N / group), Nk] float32.
    """
    _check_qkv(q, k, v)
    if prev_lse.shape != q.shape[:3]:
        raise ValueError(f"prev_lse must be [B, H, N] = {q.shape[:3]}; got {prev_lse.shape=}")
    cfg = config or default_config(192, sparse=False)
    return _dense(q, k, v, prev_lse, config=cfg, interpret=interpret, detect_races=detect_races, with_colsum=True)


@functools.partial(jax.jit, static_argnames=("config", "interpret", "detect_races"))
def _sparse(q, k, v, indices, counts, *, config: TuningConfig, interpret: bool, detect_races: bool):
    b, h, n, d = q.shape
    g, kcap = indices.shape[2:]
    dt = _kernel_dtype(q)
    bk = config.block_kv
    kpad = mc.round_up(max(kcap, 1), bk)
    counts = jnp.clip(counts.astype(jnp.int32), 0, kcap)
    slots = lax.broadcasted_iota(jnp.int32, (b, h, g, kpad), 3)
    idx = _pad_axis(jnp.clip(indices.astype(jnp.int32), 0, k.shape[2] - 1), 3, kpad)
    idx = jnp.where(slots < counts[..., None], idx, -1)  # [B, H, G, Kpad]
    meta = _pad_axis(counts[..., None], 3, _META)  # [B, H, G, 32]
    qp = _pad_axis(q.astype(dt), 2, g * config.group)
    kk, vv = k.astype(dt), v.astype(dt)
    if config.gather == "pregathered":
        take = jax.vmap(jax.vmap(lambda x, i: x[jnp.maximum(i, 0)]))  # [B, H, G, Kpad, D]
        kk, vv = take(kk, idx), take(vv, idx)
    call = _build(
        mode="sparse",
        colsum=False,
        cfg=config,
        b=b,
        h=h,
        g=g,
        nk=kpad,
        d=d,
        dtype=dt,
        interpret=interpret,
        detect_races=detect_races,
    )
    o = call(qp, kk, vv, idx, meta)
    return o[:, :, :n].astype(q.dtype)


def sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    indices: jax.Array,
    counts: jax.Array,
    *,
    config: TuningConfig | None = None,
    interpret: bool = False,
    detect_races: bool = False,
) -> jax.Array:
    """Column-sparse attention (SPEC 1.4): per (b, h, query group) softmax over keys indices[..., :counts].

    Args:
      q: [B, H, N, 128]; k, v: [B, H, Nk, 128].
      indices: [B, H, G, K] int32 with G = ceil(N / group); counts: [B, H, G] int32 (<= K).
      config: tiling; its query group is 64 * num_compute_wgs (default 192, rows_staged gather, block_kv 64).
      interpret, detect_races: as in ``dense_attention``.

    Returns:
      [B, H, N, 128] in q.dtype; a group with count 0 gives zeros.
    """
    _check_qkv(q, k, v)
    cfg = config or default_config(192, sparse=True)
    b, h, n, _ = q.shape
    g = -(-n // cfg.group)
    if indices.ndim != 4 or indices.shape[:3] != (b, h, g):
        raise ValueError(f"indices must be [B, H, G, K] with (B, H, G) = {(b, h, g)}; got {indices.shape=}")
    if counts.shape != (b, h, g):
        raise ValueError(f"counts must be [B, H, G] = {(b, h, g)}; got {counts.shape=}")
    if not jnp.issubdtype(indices.dtype, jnp.integer) or not jnp.issubdtype(counts.dtype, jnp.integer):
        raise ValueError(f"indices and counts must be integers; got {indices.dtype=}, {counts.dtype=}")
    return _sparse(q, k, v, indices, counts, config=cfg, interpret=interpret, detect_races=detect_races)
