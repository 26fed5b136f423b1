"""Train the tiny class-conditioned pixel-space Flux on the procedural shapes: ``python -m models.tiny.train``.

Rectified flow (flow matching) directly on the packed pixel tokens: x_t = (1 - t) x_0 + t eps with t from a
logit-normal distribution, and the model regresses the velocity eps - x_0 (the direction the Flux Euler
sampler integrates along, from sigma 1 to 0). Adam with warm-up, a cosine decay over the steps (or the
wall-clock budget if that runs out first), gradient clipping and an EMA of the weights; the EMA weights are
saved (float16 safetensors + config.json).

The defaults are the recipe of the shipped checkpoint (width 192, 5.1M parameters, 8000 steps of 64 images):
about 3 minutes on one H200 with --data-workers 14, but many hours on a laptop CPU. On 2 CPU cores, 20 minutes
of the small recipe below (about 32k images) gives a model that gets colours and backgrounds right and, sampled
with classifier-free guidance (models.tiny.sampling.guided_images, scale 4.5), about half the shapes; see
docs/DEMO.md for the measurements.

examples:
  # the shipped checkpoint (on a GPU host; same data whatever the worker count):
  python -m models.tiny.train --data-workers 14 --out out/tiny-ckpt
  # 20 minutes on a CPU (width 96, 1.3M parameters, batch 8; 10% null-condition images for guidance):
  python -m models.tiny.train --hidden 96 --batch 8 --lr 2e-3 --p-uncond 0.1 --max-steps 100000 \\
      --budget-minutes 20 --out out/tiny-cpu20
  # a quick smoke run:
  python -m models.tiny.train --out /tmp/tiny-ckpt --max-steps 20 --batch 8
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import multiprocessing
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.flux.config import FluxConfig
from models.flux.model import Flux, position_ids, rope_table
from models.tiny import dataset
from models.tiny.model import (
    IMAGE_SIZE,
    TXT_LEN,
    conditioning,
    image_to_tokens,
    init_model,
    load_checkpoint,
    save_checkpoint,
    tiny_flux_config_for,
    token_grid,
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings.

    Attributes:
      batch: images per step.
      lr: peak learning rate.
      warmup: linear warm-up steps.
      min_lr_frac: the cosine decay ends at lr * min_lr_frac when the budget is used up.
      b1, b2, eps, weight_decay: AdamW.
      clip: global gradient-norm clip.
      ema: EMA decay (with the usual (1 + n) / (10 + n) ramp).
      seed: dataset, initialisation and noise seed.
      p_uncond: share of the images trained with the null condition (label dropout for classifier-free
        guidance; 0 trains the conditional model only).
      token_keep: share of the image tokens the loss sees per step (a random subset, the same for the whole
        batch, with their RoPE positions; MaskDiT-style token dropping). Attention cost falls with its square,
        so 0.5 is about 2.4x the images per second on a CPU; sampling always runs on all tokens.
    """

    batch: int = 64
    lr: float = 1e-3
    warmup: int = 100
    min_lr_frac: float = 0.05
    b1: float = 0.9
    b2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip: float = 1.0
    ema: float = 0.998
    seed: int = 0
    p_uncond: float = 0.0
    token_keep: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.p_uncond < 1.0:
            raise ValueError(f"p_uncond must be in [0, 1), got {self.p_uncond}")
        if not 0.0 < self.token_keep <= 1.0:
            raise ValueError(f"token_keep must be in (0, 1], got {self.token_keep}")


def flow_matching_loss(
    model, tokens: jax.Array, labels: jax.Array, key: jax.Array, rope, p_uncond: float = 0.0, token_keep: float = 1.0
) -> jax.Array:
    """Mean squared velocity error of rectified flow on clean tokens [B, N, C] with class labels [B].

    ``p_uncond``: share of the batch given the null condition. ``token_keep``: share of the N image tokens kept
    (one random subset for the batch; ``rope`` rows follow, the TXT_LEN text rows first).
    """
    b, n = tokens.shape[:2]
    k_t, k_n = jax.random.split(key)  # as before these options existed: the shipped recipe's draws are unchanged
    k_u, k_d = jax.random.fold_in(key, 2), jax.random.fold_in(key, 3)
    if token_keep < 1.0:
        kept = jnp.sort(jax.random.permutation(k_d, n)[: max(1, round(n * token_keep))])
        tokens = tokens[:, kept]
        rope = tuple(jnp.concatenate([r[:TXT_LEN], r[TXT_LEN + kept]]) for r in rope)
    t = jax.nn.sigmoid(jax.random.normal(k_t, (b,), jnp.float32))
    noise = jax.random.normal(k_n, tokens.shape, jnp.float32)
    tb = t[:, None, None]
    xt = (1.0 - tb) * tokens + tb * noise
    if p_uncond > 0.0:
        labels = jnp.where(jax.random.uniform(k_u, (b,)) < p_uncond, -1, labels)
    txt, y = conditioning(labels)
    v, _ = model(xt, txt, y, t, None, rope)
    return jnp.mean(jnp.square(v.astype(jnp.float32) - (noise - tokens)))


def _adam_init(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return {"m": zeros, "v": jax.tree.map(jnp.zeros_like, params), "n": jnp.zeros((), jnp.int32)}


def _adam_update(tc: TrainConfig, params, grads, opt, lr):
    """One AdamW step with global-norm clipping (a few lines instead of a dependency)."""
    gnorm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    scale = jnp.minimum(1.0, tc.clip / (gnorm + 1e-12))
    grads = jax.tree.map(lambda g: g * scale, grads)
    n = opt["n"] + 1
    m = jax.tree.map(lambda m, g: tc.b1 * m + (1.0 - tc.b1) * g, opt["m"], grads)
    v = jax.tree.map(lambda v, g: tc.b2 * v + (1.0 - tc.b2) * g * g, opt["v"], grads)
    nf = n.astype(jnp.float32)
    c1, c2 = 1.0 - tc.b1**nf, 1.0 - tc.b2**nf

    def step(p, m, v):
        return p - lr * ((m / c1) / (jnp.sqrt(v / c2) + tc.eps) + tc.weight_decay * p)

    return jax.tree.map(step, params, m, v), {"m": m, "v": v, "n": n}, gnorm


def make_train_step(graphdef, tc: TrainConfig, rope):
    """The jitted step (params, ema, opt, tokens, labels, key, lr) -> (params, ema, opt, loss, grad norm)."""

    def train_step(params, ema, opt, tokens, labels, key, lr):
        def loss_fn(p):
            return flow_matching_loss(nnx.merge(graphdef, p), tokens, labels, key, rope, tc.p_uncond, tc.token_keep)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        params, opt, gnorm = _adam_update(tc, params, grads, opt, lr)
        nf = opt["n"].astype(jnp.float32)
        d = jnp.minimum(tc.ema, (1.0 + nf) / (10.0 + nf))
        ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
        return params, ema, opt, loss, gnorm

    return jax.jit(train_step, donate_argnums=(0, 1, 2))


def learning_rate(tc: TrainConfig, step: int, progress: float) -> float:
    """Warm-up over steps, then cosine decay over the fraction ``progress`` in [0, 1] of the budget."""
    warm = min(1.0, (step + 1) / max(1, tc.warmup))
    cos = tc.min_lr_frac + (1.0 - tc.min_lr_frac) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return tc.lr * warm * cos


def _batch_at(seed: int, batch: int, image_size: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    return dataset.batch(seed, step * batch, batch, image_size)


def batch_stream(seed: int, batch: int, image_size: int, workers: int = 0):
    """Yields the training batches of steps 0, 1, 2, ... (images, labels), the same whatever ``workers`` is.

    With ``workers`` > 1 the batches are drawn by a pool of that many processes (spawned, so nothing of JAX is
    forked), a bounded number of steps ahead: drawing a batch in numpy costs about 1 ms per image, which would
    otherwise starve an accelerator.
    """
    if workers <= 1:
        step = 0
        while True:
            yield _batch_at(seed, batch, image_size, step)
            step += 1
    ahead = 4 * workers
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pending = collections.deque(pool.apply_async(_batch_at, (seed, batch, image_size, s)) for s in range(ahead))
        step = ahead
        while True:
            yield pending.popleft().get()
            pending.append(pool.apply_async(_batch_at, (seed, batch, image_size, step)))
            step += 1


def train(
    cfg: FluxConfig,
    tc: TrainConfig,
    *,
    budget_s: float,
    max_steps: int | None = None,
    image_size: int = IMAGE_SIZE,
    progress: bool = True,
    log_every: int = 50,
    log=print,
    on_checkpoint=None,
    checkpoint_every_s: float | None = None,
    losses: list[float] | None = None,
    init: Flux | None = None,
    data_workers: int = 0,
):
    """Trains a tiny Flux from scratch, or on from ``init``.

    Args:
      cfg: the architecture (``tiny_flux_config``).
      tc: optimisation settings.
      budget_s: wall-clock budget in seconds (compilation included); the learning rate decays over it.
      max_steps: stop after this many steps even if budget is left; the learning rate then decays over
        whichever of the budget and the steps runs out first.
      image_size: image side in pixels (a multiple of 4).
      progress: tqdm progress bar (over the steps when max_steps is given, else over the time budget).
      log_every: log a line every this many steps.
      log: where log lines go.
      on_checkpoint: called with (EMA model, steps done) every ``checkpoint_every_s`` seconds (interim saves).
      checkpoint_every_s: interval of ``on_checkpoint``.
      losses: a list to append the per-step losses to (the caller can read it during training).
      init: continue from these weights (fresh optimiser state and warm-up); must match ``cfg``.
      data_workers: processes drawing the batches ahead of the training loop (0: drawn in the loop).

    Returns:
      (EMA model, history dict with 'loss' per step, 'steps', 'seconds').
    """
    h, w = token_grid(image_size)
    cos, sin = rope_table(position_ids(TXT_LEN, h, w), cfg.axes_dim, cfg.theta)
    model = init_model(cfg, seed=tc.seed) if init is None else init
    if init is not None and init.cfg != cfg:
        raise ValueError(f"--init checkpoint has config {init.cfg}, not {cfg}")
    graphdef, params = nnx.split(model)
    ema = jax.tree.map(jnp.copy, params)
    opt = _adam_init(params)
    step_fn = make_train_step(graphdef, tc, (cos, sin))
    key = jax.random.key(tc.seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        by_steps = max_steps is not None and max_steps < 10**5
        bar = tqdm(
            total=max_steps if by_steps else int(budget_s),
            desc="training",
            unit="step" if by_steps else "s",
            file=sys.stderr,
        )
    t0 = time.perf_counter()
    losses = [] if losses is None else losses
    step, shown, last_ckpt = 0, 0, 0.0
    batches = batch_stream(tc.seed, tc.batch, image_size, data_workers)
    while True:
        elapsed = time.perf_counter() - t0
        if elapsed >= budget_s or (max_steps is not None and step >= max_steps):
            break
        imgs, labels = next(batches)
        tokens = image_to_tokens(jnp.asarray(imgs))
        progress_frac = elapsed / budget_s if max_steps is None else max(elapsed / budget_s, step / max_steps)
        lr = jnp.asarray(learning_rate(tc, step, progress_frac), jnp.float32)
        params, ema, opt, loss, gnorm = step_fn(
            params, ema, opt, tokens, jnp.asarray(labels), jax.random.fold_in(key, step), lr
        )
        losses.append(float(loss))
        step += 1
        if bar is not None:
            now = step if by_steps else int(min(budget_s, time.perf_counter() - t0))
            bar.update(now - shown)
            shown = now
            bar.set_postfix(step=step, loss=f"{np.mean(losses[-20:]):.4f}")
        if log_every and step % log_every == 0:
            log(
                f"step {step} t={time.perf_counter() - t0:.0f}s loss(avg {min(log_every, len(losses))})="
                f"{np.mean(losses[-log_every:]):.4f} grad_norm={float(gnorm):.3f} lr={float(lr):.2e}"
            )
        now_s = time.perf_counter() - t0
        if on_checkpoint is not None and checkpoint_every_s and now_s - last_ckpt > checkpoint_every_s:
            last_ckpt = now_s
            on_checkpoint(nnx.merge(graphdef, jax.tree.map(jnp.copy, ema)), step)
    batches.close()
    if bar is not None:
        bar.close()
    history = {"loss": losses, "steps": step, "seconds": time.perf_counter() - t0}
    return nnx.merge(graphdef, ema), history


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m models.tiny.train",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--out",
        default="out/tiny-ckpt",
        help="checkpoint directory (pass models/tiny/checkpoint to replace the shipped one)",
    )
    p.add_argument("--budget-minutes", type=float, default=60.0, help="wall-clock cap incl. compilation")
    p.add_argument("--max-steps", type=int, default=8000, help="steps (the learning rate decays over them)")
    p.add_argument("--batch", type=int, default=TrainConfig.batch)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument(
        "--p-uncond",
        type=float,
        default=TrainConfig.p_uncond,
        help="share of images trained with the null condition, for classifier-free guidance (e.g. 0.1)",
    )
    p.add_argument(
        "--token-keep",
        type=float,
        default=TrainConfig.token_keep,
        help="share of image tokens the loss sees per step (token dropping; 0.5 is ~2.4x faster on CPU)",
    )
    p.add_argument("--hidden", type=int, default=192, help="model width (heads of 64 channels or one narrower)")
    p.add_argument("--depth-double", type=int, default=2)
    p.add_argument("--depth-single", type=int, default=4)
    p.add_argument(
        "--init", default=None, help="continue training from this checkpoint directory (its architecture is used)"
    )
    p.add_argument("--save-every-minutes", type=float, default=None, help="also save interim EMA checkpoints")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (log lines only)")
    p.add_argument(
        "--data-workers",
        type=int,
        default=0,
        help="processes drawing batches ahead (use most CPU cores when training on a GPU; same data either way)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = tiny_flux_config_for(args.hidden, args.depth_double, args.depth_single)
    init, prior = None, {}
    if args.init:
        init, prior = load_checkpoint(args.init)
        cfg = init.cfg
    tc = TrainConfig(batch=args.batch, lr=args.lr, seed=args.seed, p_uncond=args.p_uncond, token_keep=args.token_keep)
    n_params = sum(v.size for v in jax.tree.leaves(nnx.state(init_model(cfg))))
    print(f"tiny Flux: {n_params / 1e6:.2f}M parameters, {cfg}", flush=True)
    command = "python -m models.tiny.train " + shlex.join(argv if argv is not None else sys.argv[1:])

    def meta(steps, seconds, losses, final):
        return {
            "command": command,
            "train_config": dataclasses.asdict(tc),
            "image_size": IMAGE_SIZE,
            "steps": steps,
            "train_seconds": round(seconds, 1),
            "final_loss_avg100": round(float(np.mean(losses[-100:])), 5) if losses else None,
            "complete": final,
            "continued_from": prior.get("command") and {k: prior.get(k) for k in ("command", "steps", "train_seconds")},
            "note": f"EMA weights; trained on {jax.devices()[0].device_kind} ({jax.default_backend()})",
        }

    t0 = time.perf_counter()
    losses: list[float] = []

    def interim(model, steps):
        save_checkpoint(model, args.out, meta(steps, time.perf_counter() - t0, losses, False))

    model, hist = train(
        cfg,
        tc,
        budget_s=60.0 * args.budget_minutes,
        max_steps=args.max_steps,
        progress=not args.no_progress,
        log=lambda s: print(s, flush=True),
        on_checkpoint=interim,
        checkpoint_every_s=None if args.save_every_minutes is None else 60.0 * args.save_every_minutes,
        losses=losses,
        init=init,
        data_workers=args.data_workers,
    )
    final = float(np.mean(hist["loss"][-100:])) if hist["loss"] else float("nan")
    out = save_checkpoint(model, args.out, meta(hist["steps"], hist["seconds"], hist["loss"], True))
    print(f"{hist['steps']} steps in {hist['seconds']:.0f} s, final loss {final:.4f}; saved {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
