"""Multi-device sampling on ``jax.sharding``: CFG and Ulysses sequence parallelism, host-offloaded caches.

The device mesh has two axes:
  'cfg': splits the batch axis (cond and uncond CFG branches, or independent samples) across device groups;
  'sp':  sequence parallelism. Outside attention every activation [B, N, ...] is split along its tokens; each
         attention call switches to a split along heads with one ``all_to_all`` per tensor (DeepSpeed-Ulysses),
         runs the single-device operator on whole sequences of H / sp heads, and switches back.

Column-sparse attention needs every key of a head, which the head split provides; its cache (``AttentionCache``,
leaves [B, H, ...]) is therefore split by batch and heads, while MLP caches and step-caching hidden states are
split by batch and tokens like the activations. The rest of the network runs under ``jit`` with those
shardings (GSPMD partitions it); only attention is an explicit ``shard_map``, so any operator backend,
including Pallas kernels, runs unchanged on its local heads.

Host offload: cache fields selected by ``ChipmunkConfig.offloading`` live in host memory (``pinned_host`` where
the platform has it) between uses; each layer moves its slice to the device before the layer runs and the
updated slice back afterwards.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from chipmunk_jax.cache import AttentionCache, MLPCache
from chipmunk_jax.config import OffloadingConfig
from chipmunk_jax.indices import KeySlice, StaticMask

CFG = "cfg"
SP = "sp"
HOST_KINDS = ("pinned_host", "unpinned_host")

if hasattr(jax, "shard_map"):

    def _shard_map(f, mesh, in_specs, out_specs):
        # Replication is not checked: custom kernels (Pallas) inside carry no replication rules.
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)

else:  # jax < 0.6 kept shard_map in jax.experimental with a check_rep flag.
    from jax.experimental.shard_map import shard_map as _experimental_shard_map

    def _shard_map(f, mesh, in_specs, out_specs):
        return _experimental_shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


# ---------------------------------------------------------------------------------------------------------------
# The mesh.


def make_mesh(cfg: int = 1, sp: int = 1, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('cfg', 'sp') mesh on the first ``cfg * sp`` devices.

    Args:
      cfg: devices along the batch (CFG branch) axis.
      sp: devices along the sequence / heads axis; consecutive devices, so that the all-to-alls of one CFG group
        stay on neighbouring (NVLink) devices.
      devices: the devices to use (default ``jax.devices()``, all processes).

    Returns:
      A Mesh with axis types Auto (the network runs under ``jit`` with GSPMD sharding propagation).

    Raises:
      ValueError: a size below 1, or more devices asked for than there are.
    """
    if cfg < 1 or sp < 1:
        raise ValueError(f"mesh sizes must be >= 1, got cfg={cfg}, sp={sp}")
    devices = list(jax.devices() if devices is None else devices)
    need = cfg * sp
    if need > len(devices):
        raise ValueError(
            f"a cfg={cfg} x sp={sp} mesh needs {need} devices but {len(devices)} are available "
            f"({devices[0].platform}); lower cfg or sp"
        )
    grid = np.array(devices[:need], dtype=object).reshape(cfg, sp)
    return Mesh(grid, (CFG, SP), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def mesh_sizes(mesh: Mesh) -> tuple[int, int]:
    """(cfg, sp) sizes of a mesh from ``make_mesh``; raises ValueError for a mesh without those axes."""
    if set(mesh.axis_names) != {CFG, SP}:
        raise ValueError(f"the mesh must have axes ({CFG!r}, {SP!r}) (make_mesh); got {mesh.axis_names}")
    return mesh.shape[CFG], mesh.shape[SP]


def check_attention_shapes(mesh: Mesh, batch: int, heads: int, seq_len: int) -> None:
    """Raises ValueError unless batch splits over 'cfg' and heads and sequence split over 'sp'."""
    n_cfg, n_sp = mesh_sizes(mesh)
    errors = []
    if batch % n_cfg:
        errors.append(f"batch {batch} is not divisible by the cfg axis ({n_cfg})")
    if heads % n_sp:
        errors.append(
            f"{heads} attention heads are not divisible by the sp axis ({n_sp}); choose sp among "
            f"{[d for d in range(1, heads + 1) if heads % d == 0]}"
        )
    if seq_len % n_sp:
        errors.append(f"sequence length {seq_len} is not divisible by the sp axis ({n_sp})")
    if errors:
        raise ValueError("cannot shard attention: " + "; ".join(errors))


def _fit(mesh: Mesh, shape: tuple[int, ...], axes: Sequence[str | None]) -> PartitionSpec:
    """``PartitionSpec(*axes)`` with every mesh axis that does not divide its dimension dropped (replicated)."""
    axes = axes[: len(shape)]
    spec = [a if a is not None and shape[i] % mesh.shape[a] == 0 else None for i, a in enumerate(axes)]
    return PartitionSpec(*spec)


def token_spec(mesh: Mesh, shape: tuple[int, ...]) -> PartitionSpec:
    """Spec of an activation [B, N, ...]: batch over 'cfg', tokens over 'sp' (each where it divides)."""
    return _fit(mesh, shape, (CFG, SP))


def batch_spec(mesh: Mesh, shape: tuple[int, ...]) -> PartitionSpec:
    """Spec of a per-sample array [B, ...] (pooled embeddings, guidance): batch over 'cfg' where it divides."""
    return _fit(mesh, shape, (CFG,))


def constrain_tokens(x: jax.Array, mesh: Mesh | None) -> jax.Array:
    """Sequence-sharding constraint on an activation [B, N, ...] under jit; identity without a mesh."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, token_spec(mesh, x.shape)))


def replicated(mesh: Mesh) -> NamedSharding:
    """The fully replicated sharding of ``mesh`` (parameters, RoPE tables, scalars)."""
    return NamedSharding(mesh, PartitionSpec())


# ---------------------------------------------------------------------------------------------------------------
# Ulysses attention.


def ulysses_attention(
    attend: Callable,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cache=None,
    *,
    mesh: Mesh,
    rng: jax.Array | None = None,
    static_mask: StaticMask | None = None,
):
    """Runs a single-device attention function on each device's heads (Ulysses sequence parallelism).

    Inside a ``shard_map`` over ``mesh``: q/k/v arrive split by batch ('cfg') and sequence ('sp'); an all-to-all
    turns them into whole sequences of H / sp heads, ``attend`` runs there, and a second all-to-all returns the
    output to the sequence split.

    Args:
      attend: ``attend(q, k, v, cache, rng, static_mask) -> (out, new_cache)`` on local [B / cfg, H / sp, N, D]
        tensors; it receives the local block of the cache, a ``KeySlice`` standing for its block of an
        unsharded random draw (or None), and the static mask rows of its heads (or None).
      q, k, v: [B, H, N, D] (RoPE applied), any sharding (resharded to batch x sequence on entry).
      cache: a pytree whose leaves are [B, H, ...] (an ``AttentionCache``), or None.
      mesh: a ``make_mesh`` mesh.
      rng: the layer's random key (replicated), or None.
      static_mask: a StaticMask with [H, G, N] / [H, G] arrays (numpy or traced), or None.

    Returns:
      (out [B, H, N, D] split by batch and sequence, new cache split by batch and heads).

    Raises:
      ValueError: batch, heads or sequence length not divisible by the mesh (``check_attention_shapes``).
    """
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"Ulysses attention needs q, k, v of one [B, H, N, D] shape; got {q.shape}, {k.shape}, {v.shape}"
        )
    b, h, n, _ = q.shape
    check_attention_shapes(mesh, b, h, n)
    n_cfg, n_sp = mesh_sizes(mesh)
    b_loc, h_loc = b // n_cfg, h // n_sp
    seq = PartitionSpec(CFG, None, SP, None)
    heads = PartitionSpec(CFG, SP)
    args = {"q": q, "k": k, "v": v}
    specs = {"q": seq, "k": seq, "v": seq}
    if cache is not None:
        args["cache"], specs["cache"] = cache, jax.tree.map(lambda _: heads, cache)
    if rng is not None:
        args["rng"], specs["rng"] = rng, PartitionSpec()
    if static_mask is not None:
        args["sm"] = (jnp.asarray(static_mask.mask), jnp.asarray(static_mask.sparse_group))
        specs["sm"] = (PartitionSpec(SP), PartitionSpec(SP))

    def local(a):
        def to_heads(x):  # [B', H, N / sp, D] -> [B', H / sp, N, D]
            return jax.lax.all_to_all(x, SP, split_axis=1, concat_axis=2, tiled=True)

        key = None
        if "rng" in a:
            offset = (jax.lax.axis_index(CFG) * b_loc, jax.lax.axis_index(SP) * h_loc)
            key = KeySlice(key=a["rng"], offset=offset, full=(b, h))
        sm = None if "sm" not in a else StaticMask(mask=a["sm"][0], sparse_group=a["sm"][1])
        out, new_cache = attend(to_heads(a["q"]), to_heads(a["k"]), to_heads(a["v"]), a.get("cache"), key, sm)
        out = jax.lax.all_to_all(out, SP, split_axis=2, concat_axis=1, tiled=True)  # [B', H, N / sp, D]
        return out, new_cache

    out_specs = (seq, None if cache is None else jax.tree.map(lambda _: heads, cache))
    return _shard_map(local, mesh, (specs,), out_specs)(args)


# ---------------------------------------------------------------------------------------------------------------
# Cache placement and host offload.


# OffloadingConfig flag -> cache fields it moves to host memory ("attn.<field>" of AttentionCache,
# "mlp.<field>" of MLPCache). The reference's transposed activation cache is our MLPCache.act.
OFFLOAD_FIELDS: Mapping[str, tuple[str, ...]] = {
    "attn_out_cache": ("attn.out",),
    "attn_indices": ("attn.indices", "attn.mask_bits"),
    "attn_counts": ("attn.counts",),
    "attn_lse_constants": ("attn.lse",),
    "mlp_out_cache": ("mlp.out",),
    "mlp_indices": ("mlp.indices",),
    "mlp_counts": ("mlp.counts",),
    "mlp_sparse_act_T": ("mlp.act",),
    "mlp_blockmean_mid_cache": ("mlp.block_mean",),
}


def offloaded_fields(offloading: OffloadingConfig | None) -> frozenset[str]:
    """Cache fields that live in host memory under ``offloading`` (empty when offloading is disabled)."""
    if offloading is None or offloading.global_disable_offloading:
        return frozenset()
    return frozenset(f for flag, fields in OFFLOAD_FIELDS.items() if getattr(offloading, flag) for f in fields)


def host_memory_kind(device: jax.Device | None = None) -> str:
    """'pinned_host' where the device can address it (GPU, and CPU in jax 0.10), else 'unpinned_host'."""
    device = device or jax.devices()[0]
    kinds = {m.kind for m in device.addressable_memories()}
    for kind in HOST_KINDS:
        if kind in kinds:
            return kind
    raise ValueError(f"{device} has no host memory space (memories: {sorted(kinds)}); disable offloading")


def _prefix(x) -> str | None:
    if isinstance(x, AttentionCache):
        return "attn"
    if isinstance(x, MLPCache):
        return "mlp"
    return None


def _is_cache(x) -> bool:
    return _prefix(x) is not None


def _map_fields(tree, fn):
    """Applies ``fn(leaf, field_name or None, lead_axes, prefix)`` to every array of a model cache pytree.

    ``lead_axes`` counts the leading layer axes of AttentionCache / MLPCache leaves (0 for per-layer caches).
    """

    def visit(node):
        prefix = _prefix(node)
        if prefix is None:
            return fn(node, None, 0, None)
        lead = node.out.ndim - (4 if prefix == "attn" else 3)
        updates = {}
        for f in dataclasses.fields(node):
            val = getattr(node, f.name)
            if val is not None:
                updates[f.name] = fn(val, f.name, lead, prefix)
        return node.replace(**updates)

    return jax.tree.map(visit, tree, is_leaf=_is_cache)


def _leaf_spec(mesh: Mesh, x, prefix: str | None, lead: int) -> PartitionSpec:
    shape = tuple(x.shape)
    if prefix == "attn":  # [..., B, H, ...]: the split of Ulysses attention's outputs
        b, h = shape[lead], shape[lead + 1]
        if b % mesh.shape[CFG] or h % mesh.shape[SP]:
            raise ValueError(f"attention cache [..., B={b}, H={h}, ...] does not split over mesh {dict(mesh.shape)}")
        return PartitionSpec(*([None] * lead), CFG, SP)
    if prefix == "mlp":  # [..., B, tokens or token blocks, ...]
        return _fit(mesh, shape, (*([None] * lead), CFG, SP))
    return token_spec(mesh, shape)  # e.g. step-caching hidden states [B, N, C]


def cache_shardings(tree, *, mesh: Mesh | None = None, offload: frozenset[str] = frozenset()):
    """The sharding of every leaf of a model cache (AttentionCache / MLPCache nodes, other [B, N, ...] arrays).

    Attention caches are split by batch and heads, MLP caches and other arrays by batch and tokens; fields named
    in ``offload`` (``offloaded_fields``) get the host memory kind. Without a mesh: the first device.
    """
    host = host_memory_kind()

    def sharding(x, name, lead, prefix):
        kind = host if prefix is not None and f"{prefix}.{name}" in offload else "device"
        if mesh is None:
            return SingleDeviceSharding(jax.devices()[0], memory_kind=kind)
        return NamedSharding(mesh, _leaf_spec(mesh, x, prefix, lead), memory_kind=kind)

    return _map_fields(tree, sharding)


def place_cache(tree, *, mesh: Mesh | None = None, offload: frozenset[str] = frozenset()):
    """``jax.device_put`` of a model cache onto ``cache_shardings(tree, mesh=..., offload=...)``."""
    return jax.device_put(tree, cache_shardings(tree, mesh=mesh, offload=offload))


def constrain_cache(tree, *, mesh: Mesh | None, offload: frozenset[str] = frozenset()):
    """Under jit: pins a new cache to the shardings of ``place_cache`` so that every step sees the same layout."""
    if mesh is None and not offload:
        return tree
    shardings = cache_shardings(tree, mesh=mesh, offload=offload)

    def pin(x, s):
        if s.memory_kind in HOST_KINDS:
            return jax.device_put(x, s)
        return x if mesh is None else jax.lax.with_sharding_constraint(x, s)

    return jax.tree.map(pin, tree, shardings)


def _move(tree, offload: frozenset[str], space):
    if not offload:
        return tree

    def move(x, name, lead, prefix):
        return jax.device_put(x, space) if prefix is not None and f"{prefix}.{name}" in offload else x

    return _map_fields(tree, move)


def fetch(tree, offload: frozenset[str]):
    """Under jit: the offloaded fields of a (per-layer) cache moved to device memory; identity if none."""
    return _move(tree, offload, jax.memory.Space.Device)


def stash(tree, offload: frozenset[str]):
    """Under jit: the offloaded fields of a (per-layer) cache moved back to host memory; identity if none."""
    return _move(tree, offload, jax.memory.Space.Host)


def memory_nbytes(tree) -> dict[str, int]:
    """Bytes of a pytree's arrays by memory: {'device', 'host', 'device_per_device'}.

    'device' and 'host' are global sizes; 'device_per_device' is what one device holds of the device-memory
    arrays (its shard of each). Abstract leaves (ShapeDtypeStruct without sharding) count as device memory.
    """
    out = {"device": 0, "host": 0, "device_per_device": 0}
    for x in jax.tree.leaves(tree):
        size = math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
        sharding = getattr(x, "sharding", None)
        if sharding is not None and sharding.memory_kind in HOST_KINDS:
            out["host"] += size
            continue
        out["device"] += size
        shard = sharding.shard_shape(x.shape) if sharding is not None else x.shape
        out["device_per_device"] += math.prod(shard) * jnp.dtype(x.dtype).itemsize
    return out


# ---------------------------------------------------------------------------------------------------------------
# Multi-host.


@dataclasses.dataclass(frozen=True)
class DistributedArgs:
    """Arguments of ``jax.distributed.initialize`` for one process."""

    coordinator_address: str
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None = None


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    raw = environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def distributed_args(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> DistributedArgs | None:
    """Resolves multi-host settings from arguments, falling back to environment variables.

    Environment: JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES, JAX_PROCESS_ID and
    JAX_LOCAL_DEVICE_IDS (comma-separated). Explicit arguments win over the environment.

    Returns:
      The arguments, or None for a single-process run (no coordinator and at most one process).

    Raises:
      ValueError: incomplete or inconsistent settings (e.g. a coordinator without a process count).
    """
    environ = os.environ if environ is None else environ
    address = coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS") or None
    n = num_processes if num_processes is not None else _env_int(environ, "JAX_NUM_PROCESSES")
    pid = process_id if process_id is not None else _env_int(environ, "JAX_PROCESS_ID")
    if local_device_ids is None and environ.get("JAX_LOCAL_DEVICE_IDS"):
        try:
            local_device_ids = [int(i) for i in environ["JAX_LOCAL_DEVICE_IDS"].split(",")]
        except ValueError:
            raise ValueError(
                f"JAX_LOCAL_DEVICE_IDS={environ['JAX_LOCAL_DEVICE_IDS']!r} is not a list of ints"
            ) from None
    if address is None:
        if (n or 1) > 1 or pid not in (None, 0):
            raise ValueError(
                f"num_processes={n}, process_id={pid} need a coordinator address "
                "(--coordinator-address or JAX_COORDINATOR_ADDRESS, host:port of process 0)"
            )
        return None
    if ":" not in address:
        raise ValueError(f"coordinator address {address!r} must be host:port")
    if n is None or pid is None:
        raise ValueError(
            f"a coordinator ({address}) needs num_processes and process_id "
            "(--num-processes/--process-id or JAX_NUM_PROCESSES/JAX_PROCESS_ID)"
        )
    if n < 1 or not 0 <= pid < n:
        raise ValueError(f"need num_processes >= 1 and 0 <= process_id < num_processes; got {n=}, {pid=}")
    ids = None if local_device_ids is None else tuple(int(i) for i in local_device_ids)
    return DistributedArgs(address, n, pid, ids)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    initialize: Callable[..., None] | None = None,
) -> DistributedArgs | None:
    """Starts JAX's multi-host runtime (one process per host) when the settings ask for more than one process.

    Call it first thing in every process, before any other JAX call; afterwards ``jax.devices()`` lists the
    devices of all hosts and ``make_mesh`` spans them. Settings as ``distributed_args``.

    Args:
      coordinator_address, num_processes, process_id, local_device_ids: as ``jax.distributed.initialize``.
      environ: environment to read (default ``os.environ``).
      initialize: the function to call (default ``jax.distributed.initialize``; tests pass a stub).

    Returns:
      The arguments used, or None when this is a single-process run (nothing is initialised).
    """
    args = distributed_args(coordinator_address, num_processes, process_id, local_device_ids, environ=environ)
    if args is None:
        return None
    initialize = jax.distributed.initialize if initialize is None else initialize
    kwargs = dict(
        coordinator_address=args.coordinator_address, num_processes=args.num_processes, process_id=args.process_id
    )
    if args.local_device_ids is not None:
        kwargs["local_device_ids"] = list(args.local_device_ids)
    initialize(**kwargs)
    return args


def add_distributed_flags(parser) -> None:
    """Adds --coordinator-address, --num-processes, --process-id to an argparse parser."""
    group = parser.add_argument_group("multi-host (default: the JAX_* environment variables)")
    group.add_argument("--coordinator-address", default=None, help="host:port of process 0")
    group.add_argument("--num-processes", type=int, default=None)
    group.add_argument("--process-id", type=int, default=None)
