"""Step times on one device vs a ('cfg', 'sp') mesh: Ulysses sequence / CFG parallel Flux and Wan, one run.

Flux: the same random-weight model is sampled with Chipmunk (the Flux preset) through ``generate`` on one
device and on the mesh; per-step-kind mean times (compile excluded) are printed side by side, with the
largest relative difference of the final latents. Wan: the transformer alone (``models.wan.forward``) over a
short Chipmunk schedule with the CFG batch (cond + uncond), each step kind timed after a compile pass.

examples:
  python benchmarks/multi_device.py --tiny --cpu-devices 8 --sp 2 --cfg 2     # CPU smoke run, tiny models
  python benchmarks/multi_device.py --sp 8                                     # 8 GPUs: FLUX.1-dev 1280x768
  python benchmarks/multi_device.py --model wan --cfg 2 --sp 4 --offload       # Wan-14B, caches on the host
  JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 python benchmarks/multi_device.py --sp 16
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import chipmunk_jax as cj
from chipmunk_jax import parallel
from chipmunk_jax.schedules import step_kinds
from models.flux.config import FLUX_DEV
from models.flux.config import tiny_config as flux_tiny
from models.flux.model import Flux
from models.flux.sample import random_model
from models.flux.sampling import default_attention_impl, generate
from models.wan import (
    WAN_T2V_1_3B,
    WAN_T2V_14B,
    ChipmunkRun,
    WanTransformer3D,
    forward,
    init_wan_cache,
    wan_static_mask,
)
from models.wan import tiny_config as wan_tiny


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/multi_device.py",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", choices=("flux", "wan", "both"), default="flux")
    p.add_argument("--sp", type=int, default=1, help="devices on the sequence/heads axis")
    p.add_argument("--cfg", type=int, default=1, help="devices on the batch (CFG branch) axis")
    p.add_argument("--tiny", action="store_true", help="tiny random models and shapes (CPU smoke run)")
    p.add_argument("--cpu-devices", type=int, help="force this many host-platform (CPU) devices")
    p.add_argument("--steps", type=int, default=6, help="Chipmunk steps (>= 3: warm-up, mask, sparse)")
    p.add_argument("--batch", type=int, help="Flux images per prompt batch (default: the cfg axis size)")
    p.add_argument("--width", type=int, help="Flux width in px (default 1280, --tiny 128)")
    p.add_argument("--height", type=int, help="Flux height in px (default 768, --tiny 128)")
    p.add_argument("--frames", type=int, default=81, help="Wan video frames (ignored with --tiny)")
    p.add_argument("--wan-size", choices=("1.3b", "14b"), default="14b")
    p.add_argument("--backend", default="auto", help="Chipmunk operator backend")
    p.add_argument("--offload", action="store_true", help="attention output caches and indices in host memory")
    p.add_argument("--skip-single", action="store_true", help="do not run the one-device baseline (too large)")
    p.add_argument("--seed", type=int, default=0)
    parallel.add_distributed_flags(p)
    return p


def _numpy_random(make, seed: int, scale: float = 0.25):
    """A tiny model with every parameter drawn with numpy (no per-shape random-number compiles on CPU)."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    new = [jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype) for x in leaves]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, new))


def _offloading(enabled: bool):
    if not enabled:
        return cj.OffloadingConfig()
    return cj.OffloadingConfig(global_disable_offloading=False, attn_out_cache=True, attn_indices=True)


def _table(title: str, single: dict[str, list[float]] | None, sharded: dict[str, list[float]], mesh_name: str):
    print(f"\n{title}")
    print(f"{'step kind':<44} {'1 device ms':>12} {mesh_name + ' ms':>14} {'speedup':>8}")
    for label, ts in sharded.items():
        m = 1e3 * float(np.mean(ts))
        if single is not None and label in single:
            s = 1e3 * float(np.mean(single[label]))
            print(f"{label:<44} {s:>12.2f} {m:>14.2f} {s / m:>7.2f}x")
        else:
            print(f"{label:<44} {'-':>12} {m:>14.2f} {'-':>8}")


def bench_flux(args, mesh, mesh_name: str) -> None:
    """Flux generations on one device and on the mesh."""
    if args.tiny:
        cfg, dtype, txt_len = (
            flux_tiny(depth_double=2, depth_single=2, heads=8, hidden=128, mlp_hidden=256, axes_dim=(4, 6, 6)),
            jnp.float32,
            64,
        )
        model = _numpy_random(lambda: Flux(cfg, rngs=nnx.Rngs(args.seed), dtype=dtype), args.seed)
    else:
        cfg, dtype, txt_len = FLUX_DEV, jnp.bfloat16, 512
        model = random_model(cfg, dtype, args.seed)
    width = args.width or (128 if args.tiny else 1280)
    height = args.height or (128 if args.tiny else 768)
    batch = args.batch or args.cfg
    rng = np.random.default_rng(args.seed)
    txt = jnp.asarray(rng.standard_normal((batch, txt_len, cfg.context_dim)), dtype)
    y = jnp.asarray(rng.standard_normal((batch, cfg.vec_dim)), dtype)
    chip = cj.preset("flux")
    if args.tiny:  # selection tiles small enough to leave 128 tokens / 256 neurons really sparse
        chip = chip.replace(
            attn=dataclasses.replace(chip.attn, counts_multiple_of=16),
            mlp=dataclasses.replace(chip.mlp, counts_multiple_of=32),
        )
    chip = chip.replace(offloading=_offloading(args.offload))
    kw = dict(width=width, height=height, steps=args.steps, chipmunk=chip, backend=args.backend, progress=False)
    kw["attention_impl"] = default_attention_impl(dtype)
    print(
        f"Flux {'tiny' if args.tiny else 'dev'}: {width}x{height}, batch {batch}, {args.steps} steps, {dtype.__name__}"
    )
    single = None
    if not args.skip_single:
        single = generate(model, txt, y, **kw)
    sharded = generate(model, txt, y, mesh=mesh, **kw)
    _table(
        "Flux step times (compile excluded)", single and single.report.step_times, sharded.report.step_times, mesh_name
    )
    print(
        f"total: 1 device {single.report.total_s:.3f} s, {mesh_name} {sharded.report.total_s:.3f} s"
        if single
        else f"total: {mesh_name} {sharded.report.total_s:.3f} s"
    )
    if single is not None:
        a, b = np.asarray(sharded.tokens, np.float64), np.asarray(single.tokens, np.float64)
        print(
            f"max |mesh - 1 device| / max |1 device| of the final latents: {np.abs(a - b).max() / np.abs(b).max():.2e}"
        )
    rep = sharded.report
    print(
        f"cache on {mesh_name}: {rep.cache_bytes / 2**20:.1f} MiB total, host {rep.cache_host_bytes / 2**20:.1f} MiB, "
        f"device {rep.cache_device_bytes_per_device / 2**20:.1f} MiB per device"
    )


def _wan_times(model, chip, lat, txt, grid, mesh, backend: str, steps: int) -> tuple[dict[str, list[float]], object]:
    """Runs the schedule twice (compile pass, timed pass); returns per-kind times and the last output."""
    cfg = model.cfg
    graphdef, state = nnx.split(model)
    if mesh is not None:
        state = jax.device_put(state, parallel.replicated(mesh))
    key = jax.random.key(0)
    sm = wan_static_mask(cfg, chip, grid, jax.random.fold_in(key, 1))
    mask = (jnp.asarray(sm.mask), jnp.asarray(sm.sparse_group))
    schedule = step_kinds(chip, steps, cfg.num_layers)
    offload = parallel.offloaded_fields(chip.offloading)
    times: dict[str, list[float]] = {}
    out = None
    for timed in (False, True):
        cache = init_wan_cache(cfg, chip, batch=lat.shape[0], grid=grid, dtype=model.dtype)
        cache = parallel.place_cache(cache, mesh=mesh, offload=offload)
        for s, plan in enumerate(schedule.steps):
            ts = jnp.full((lat.shape[0],), 1000.0 * (1 - s / steps), jnp.float32)
            t0 = time.perf_counter()
            out, cache = forward(
                graphdef,
                state,
                lat,
                ts,
                txt,
                cache,
                chipmunk=ChipmunkRun(chip, plan, backend),
                rng=key,
                step=s,
                static_mask=mask,
                mesh=mesh,
            )
            jax.block_until_ready(out)
            if timed:
                times.setdefault(plan.label, []).append(time.perf_counter() - t0)
    return times, out


def bench_wan(args, mesh, mesh_name: str) -> None:
    """Wan transformer calls (CFG batch) on one device and on the mesh."""
    if args.tiny:
        cfg, dtype = wan_tiny(heads=8, dim=128, num_layers=3), jnp.float32
        latent, text_len = (4, 12, 32), 16
        model = _numpy_random(lambda: WanTransformer3D(cfg, rngs=nnx.Rngs(args.seed), dtype=dtype), args.seed)
    else:
        cfg, dtype = (WAN_T2V_14B if args.wan_size == "14b" else WAN_T2V_1_3B), jnp.bfloat16
        latent, text_len = ((args.frames - 1) // 4 + 1, 90, 160), 512  # 1280x720 after the 8x VAE
        model = nnx.jit(lambda: WanTransformer3D(cfg, rngs=nnx.Rngs(args.seed), dtype=dtype))()
    grid = tuple(d // p for d, p in zip(latent, cfg.patch_size, strict=True))
    chip = cj.preset("wan")
    if args.tiny:
        chip = chip.replace(attn=dataclasses.replace(chip.attn, local_voxels=1, first_n_dense_layers=1))
    chip = chip.replace(offloading=_offloading(args.offload))
    rng = np.random.default_rng(args.seed)
    lat = jnp.asarray(rng.standard_normal((2, cfg.in_channels, *latent)), dtype)  # cond + uncond
    txt = jnp.asarray(rng.standard_normal((2, text_len, cfg.text_dim)), dtype)
    print(
        f"\nWan {'tiny' if args.tiny else args.wan_size}: latent {latent}, {int(np.prod(grid))} tokens, CFG batch 2, "
        f"{args.steps} steps"
    )
    single = out1 = None
    if not args.skip_single:
        single, out1 = _wan_times(model, chip, lat, txt, grid, None, args.backend, args.steps)
    sharded, out2 = _wan_times(model, chip, lat, txt, grid, mesh, args.backend, args.steps)
    _table("Wan transformer call times (compile excluded)", single, sharded, mesh_name)
    if out1 is not None:
        a, b = np.asarray(out2, np.float64), np.asarray(out1, np.float64)
        print(f"max |mesh - 1 device| / max |1 device| of the last output: {np.abs(a - b).max() / np.abs(b).max():.2e}")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.cpu_devices:
        # Takes effect because no JAX backend has started yet.
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    if args.steps < 3:
        print("error: --steps must be >= 3 (warm-up, mask and sparse steps)", file=sys.stderr)
        return 2
    try:
        parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
        mesh = parallel.make_mesh(cfg=args.cfg, sp=args.sp)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    jax.config.update("jax_default_matmul_precision", "highest" if args.tiny else "default")
    mesh_name = f"cfg{args.cfg}xsp{args.sp}"
    print(f"devices: {len(jax.devices())} x {jax.devices()[0].device_kind}; mesh {mesh_name}")
    try:
        if args.model in ("flux", "both"):
            bench_flux(args, mesh, mesh_name)
        if args.model in ("wan", "both"):
            bench_wan(args, mesh, mesh_name)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
