"""The Linear layers of FLUX.1's transformer, computed from its config without weights or torch:
what a LoRA adapter's layers are checked against before it is loaded."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["flux_lora_layers"]

_TIMESTEP_CHANNELS = 256  # the sinusoidal timestep embedding's width


def flux_lora_layers(config: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """Every Linear of a ``FluxTransformer2DModel`` built from ``config``, by module path,
    with its input and output widths."""
    width = config["num_attention_heads"] * config["attention_head_dim"]
    mlp = 4 * width
    out = config["patch_size"] ** 2 * (config.get("out_channels") or config["in_channels"])
    layers = {
        "x_embedder": (config["in_channels"], width),
        "context_embedder": (config["joint_attention_dim"], width),
        "time_text_embed.timestep_embedder.linear_1": (_TIMESTEP_CHANNELS, width),
        "time_text_embed.timestep_embedder.linear_2": (width, width),
        "time_text_embed.text_embedder.linear_1": (config["pooled_projection_dim"], width),
        "time_text_embed.text_embedder.linear_2": (width, width),
        "norm_out.linear": (width, 2 * width),
        "proj_out": (width, out),
    }
    if config.get("guidance_embeds"):
        layers["time_text_embed.guidance_embedder.linear_1"] = (_TIMESTEP_CHANNELS, width)
        layers["time_text_embed.guidance_embedder.linear_2"] = (width, width)
    for index in range(config["num_layers"]):
        block = f"transformer_blocks.{index}."
        layers[block + "norm1.linear"] = (width, 6 * width)
        layers[block + "norm1_context.linear"] = (width, 6 * width)
        for name in (
            "to_q",
            "to_k",
            "to_v",
            "to_out.0",
            "add_q_proj",
            "add_k_proj",
            "add_v_proj",
            "to_add_out",
        ):
            layers[block + "attn." + name] = (width, width)
        for feed_forward in ("ff", "ff_context"):
            layers[f"{block}{feed_forward}.net.0.proj"] = (width, mlp)
            layers[f"{block}{feed_forward}.net.2"] = (mlp, width)
    for index in range(config["num_single_layers"]):
        block = f"single_transformer_blocks.{index}."
        layers[block + "norm.linear"] = (width, 3 * width)
        layers[block + "proj_mlp"] = (width, mlp)
        layers[block + "proj_out"] = (width + mlp, width)
        for name in ("to_q", "to_k", "to_v"):
            layers[block + "attn." + name] = (width, width)
    return layers
