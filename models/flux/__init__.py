"""FLUX.1 (dev / schnell) in Flax NNX with Chipmunk sparse attention and MLP caches."""

from models.flux.config import CONFIGS, FLUX_DEV, FLUX_SCHNELL, FluxConfig, tiny_config
from models.flux.load import load
from models.flux.model import ChipmunkRun, Flux, FluxCache, init_flux_cache, position_ids, rope_table

__all__ = [
    "CONFIGS",
    "FLUX_DEV",
    "FLUX_SCHNELL",
    "ChipmunkRun",
    "Flux",
    "FluxCache",
    "FluxConfig",
    "init_flux_cache",
    "load",
    "position_ids",
    "rope_table",
    "tiny_config",
]
