"""Test helpers: tiny diffusers Flux models with every parameter randomised, saved in both source layouts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

TINY = dict(
    patch_size=1,
    in_channels=16,
    num_layers=2,
    num_single_layers=3,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    pooled_projection_dim=12,
    axes_dims_rope=(4, 6, 6),
)


def tiny_diffusers(guidance: bool, seed: int = 0):
    """A tiny FluxTransformer2DModel in float32 with every parameter (norm scales too) random."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**TINY, guidance_embeds=guidance).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "norm" in name and p.ndim == 1:
                p.copy_(1.0 + 0.3 * r)
            elif p.ndim == 2:
                p.copy_(r / p.shape[1] ** 0.5)
            else:
                p.copy_(0.3 * r)
    return model


def save_diffusers(model, path: Path) -> Path:
    """Sharded safetensors with an index, as diffusers writes large models."""
    model.save_pretrained(path, safe_serialization=True, max_shard_size="40KB")
    assert list(path.glob("*.index.json")), "expected a sharded checkpoint"
    return path


def to_bfl(sd: dict[str, torch.Tensor], num_double: int, num_single: int) -> dict[str, torch.Tensor]:
    """Diffusers state dict -> original BFL key layout (written independently of the converter's tables)."""
    out = {}

    def lin(dst, src):
        out[f"{dst}.weight"] = sd[f"{src}.weight"]
        out[f"{dst}.bias"] = sd[f"{src}.bias"]

    lin("img_in", "x_embedder")
    lin("txt_in", "context_embedder")
    for dst, src in (
        ("time_in", "timestep_embedder"),
        ("vector_in", "text_embedder"),
        ("guidance_in", "guidance_embedder"),
    ):
        if f"time_text_embed.{src}.linear_1.weight" in sd:
            lin(f"{dst}.in_layer", f"time_text_embed.{src}.linear_1")
            lin(f"{dst}.out_layer", f"time_text_embed.{src}.linear_2")
    for i in range(num_double):
        b = f"transformer_blocks.{i}"
        for side, mod, qkv, qn, kn, proj, ff in (
            ("img", "norm1", ("to_q", "to_k", "to_v"), "norm_q", "norm_k", "to_out.0", "ff"),
            (
                "txt",
                "norm1_context",
                ("add_q_proj", "add_k_proj", "add_v_proj"),
                "norm_added_q",
                "norm_added_k",
                "to_add_out",
                "ff_context",
            ),
        ):
            d = f"double_blocks.{i}.{side}"
            lin(f"{d}_mod.lin", f"{b}.{mod}.linear")
            for part in ("weight", "bias"):
                out[f"{d}_attn.qkv.{part}"] = torch.cat([sd[f"{b}.attn.{p}.{part}"] for p in qkv], 0)
            out[f"{d}_attn.norm.query_norm.scale"] = sd[f"{b}.attn.{qn}.weight"]
            out[f"{d}_attn.norm.key_norm.scale"] = sd[f"{b}.attn.{kn}.weight"]
            lin(f"{d}_attn.proj", f"{b}.attn.{proj}")
            lin(f"{d}_mlp.0", f"{b}.{ff}.net.0.proj")
            lin(f"{d}_mlp.2", f"{b}.{ff}.net.2")
    for i in range(num_single):
        b, d = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for part in ("weight", "bias"):
            out[f"{d}.linear1.{part}"] = torch.cat(
                [sd[f"{b}.attn.{p}.{part}"] for p in ("to_q", "to_k", "to_v")] + [sd[f"{b}.proj_mlp.{part}"]], 0
            )
        lin(f"{d}.linear2", f"{b}.proj_out")
        out[f"{d}.norm.query_norm.scale"] = sd[f"{b}.attn.norm_q.weight"]
        out[f"{d}.norm.key_norm.scale"] = sd[f"{b}.attn.norm_k.weight"]
        lin(f"{d}.modulation.lin", f"{b}.norm.linear")
    lin("final_layer.linear", "proj_out")
    for part in ("weight", "bias"):
        scale, shift = sd[f"norm_out.linear.{part}"].chunk(2, 0)
        out[f"final_layer.adaLN_modulation.1.{part}"] = torch.cat([shift, scale], 0)
    return {k: v.contiguous() for k, v in out.items()}


def save_bfl(model, path: Path) -> Path:
    from safetensors.torch import save_file

    cfg = model.config
    save_file(to_bfl(model.state_dict(), cfg.num_layers, cfg.num_single_layers), str(path))
    return path


def ids(txt_len: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    img = torch.zeros(h, w, 3)
    img[..., 1] = torch.arange(h)[:, None]
    img[..., 2] = torch.arange(w)[None, :]
    return torch.zeros(txt_len, 3), img.reshape(h * w, 3)


def torch_forward(model, img, txt, y, t, guidance, h, w) -> np.ndarray:
    txt_ids, img_ids = ids(txt.shape[1], h, w)
    with torch.no_grad():
        out = model(
            hidden_states=torch.from_numpy(img),
            encoder_hidden_states=torch.from_numpy(txt),
            pooled_projections=torch.from_numpy(y),
            timestep=torch.from_numpy(t),
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=None if guidance is None else torch.from_numpy(guidance),
            return_dict=False,
        )[0]
    return out.numpy()


def config_json(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())
