"""Shared helpers for the Pallas Mosaic GPU (Hopper) kernels: jax 0.10.2/0.11 and interpret/hardware switches.

GPU interpret mode (``jax._src.pallas.mosaic_gpu.interpret``) runs the kernels on CPU but lacks several
hardware-only operations: ``plgpu.load`` with a layout, ``layout_cast``, wgmma with a transposed operand,
wgmma with a register LHS, ``pl.run_state`` accumulation. Every helper here takes ``interpret`` and then uses an
equivalent made of supported primitives (materialised transposes through an SMEM scratch, fresh accumulators
added in registers); the hardware path keeps the fast form. The helpers are used by
``pallas_kernels.attention.mosaic_gpu`` and ``pallas_kernels.mlp.mosaic_gpu``.

Version notes: ``plgpu.load(ref, idx)`` needs ``idx`` on 0.10.2 and deprecates it on 0.11; the default
``CompilerParams.lowering_semantics`` changed from Lane (0.10.2) to Warpgroup (0.11), so it is always passed.
"""

from __future__ import annotations

import inspect
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

try:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
except ImportError:  # a jax without the GPU interpreter still gets the hardware path
    InterpretGPUParams = None

# The wgmma operand layout: (8, 64) tiles of 16-bit elements with the 128-byte swizzle.
OPERAND_TRANSFORMS = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# TMA boxes hold at most 256 elements per dimension.
TMA_MAX_BOX = 256

_LOAD_NEEDS_IDX = inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty


def interpret_params(detect_races: bool = False):
    """GPU interpret-mode parameters (uninitialised memory reads as NaN, so unwritten outputs show)."""
    if InterpretGPUParams is None:
        raise ImportError("this jax has no Mosaic GPU interpret mode")
    return InterpretGPUParams(detect_races=detect_races)


def compiler_params(**kw) -> plgpu.CompilerParams:
    """CompilerParams with Lane semantics set explicitly (the default differs between jax 0.10.2 and 0.11)."""
    return plgpu.CompilerParams(approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane, **kw)


def load(ref, *, layout, optimized: bool = True, interpret: bool):
    """Reads an SMEM ref into registers in ``layout`` (interpret mode has no layouts: plain read)."""
    if interpret:
        return ref[...]
    if _LOAD_NEEDS_IDX:
        return plgpu.load(ref, (), layout=layout, optimized=optimized)
    return plgpu.load(ref, layout=layout, optimized=optimized)


def lcast(x: jax.Array, layout, *, interpret: bool) -> jax.Array:
    """Layout cast on hardware; identity in interpret mode (layout_cast has no CPU lowering)."""
    return x if interpret else plgpu.layout_cast(x, layout)


def matmul_abt(a_smem, b_smem, out_shape, *, interpret: bool, bt_scratch=None) -> jax.Array:
    """f32 ``a @ b.T`` for SMEM operands a [M, K], b [N, K].

    Hardware: b enters wgmma as a transposed operand. Interpret: b.T is first written to ``bt_scratch`` [K, N].
    """
    if interpret:
        bt_scratch[...] = b_smem[...].T
        rhs = bt_scratch
    else:
        rhs = plgpu.transpose_ref(b_smem, (1, 0))

    def body(acc_ref):
        plgpu.wgmma(acc_ref, a_smem, rhs)
        return acc_ref[...]

    return pl.run_scoped(body, plgpu.ACC(out_shape, jnp.float32))


def matmul_acc_reg_lhs(acc: jax.Array, p: jax.Array, b_smem, *, interpret: bool, p_scratch=None) -> jax.Array:
    """``acc + p @ b`` with p (16-bit) in registers; hardware accumulates in place in the wgmma accumulator.

    Interpret: p is spilled to ``p_scratch`` and a fresh accumulator is added in registers.
    """
    if interpret:
        p_scratch[...] = p

        def body(acc_ref):
            plgpu.wgmma(acc_ref, p_scratch, b_smem)
            return acc_ref[...]

        return acc + pl.run_scoped(body, plgpu.ACC(acc.shape, jnp.float32))

    def body_hw(acc_ref):
        plgpu.wgmma(acc_ref, p, b_smem)

    return pl.run_state(body_hw)(plgpu.ACC.init(acc))


def matmul_acc(acc: jax.Array, a_smem, b_smem, *, transpose_b: bool, interpret: bool, bt_scratch=None) -> jax.Array:
    """``acc + a @ (b.T if transpose_b else b)`` for SMEM operands (see ``matmul_abt`` for the interpret path)."""
    if interpret:
        if transpose_b:
            bt_scratch[...] = b_smem[...].T
            rhs = bt_scratch
        else:
            rhs = b_smem

        def body(acc_ref):
            plgpu.wgmma(acc_ref, a_smem, rhs)
            return acc_ref[...]

        return acc + pl.run_scoped(body, plgpu.ACC(acc.shape, jnp.float32))
    rhs = plgpu.transpose_ref(b_smem, (1, 0)) if transpose_b else b_smem

    def body_hw(acc_ref):
        plgpu.wgmma(acc_ref, a_smem, rhs)

    return pl.run_state(body_hw)(plgpu.ACC.init(acc))


def retile(stage, dst, *, interpret: bool) -> None:
    """Copies an unswizzled [R, C] SMEM tile into a swizzled wgmma operand through registers, 64 columns at a time.

    Column chunks of 64 keep the producer warpgroup's live registers small (R * 64 / 128 elements per thread),
    which matters under its reduced setmaxnreg budget.
    """
    for c in range(0, stage.shape[1], 64):
        cols = slice(c, c + 64)
        dst[:, cols] = load(stage.at[:, cols], layout=plgpu.Layout.WGMMA, optimized=False, interpret=interpret)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """tanh-approximate GELU written with elementwise ops that both the kernel lowering and interpret mode run."""
    c = math.sqrt(2.0 / math.pi)
    return 0.5 * x * (1.0 + jnp.tanh(c * (x + 0.044715 * x * x * x)))


def round_up(x: int, m: int) -> int:
    """Smallest multiple of m that is >= x."""
    return -(-x // m) * m
