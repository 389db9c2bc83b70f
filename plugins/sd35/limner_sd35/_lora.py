"""The Linear layers of SD3.5's transformer, computed from its config without weights or torch:
what a LoRA adapter's layers are checked against before it is loaded."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["sd3_lora_layers"]

_TIMESTEP_CHANNELS = 256  # the sinusoidal timestep embedding's width


def sd3_lora_layers(config: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """Every Linear of an ``SD3Transformer2DModel`` built from ``config``, by module path,
    with its input and output widths. The last block reads the text but no longer updates
    it (no context output or feed-forward); MMDiT-X blocks (``dual_attention_layers``) have a
    second attention over the image, and a wider modulation."""
    width = config["num_attention_heads"] * config["attention_head_dim"]
    mlp = 4 * width
    out = config["patch_size"] ** 2 * config.get("out_channels", 16)
    layers = {
        "context_embedder": (config["joint_attention_dim"], config["caption_projection_dim"]),
        "time_text_embed.timestep_embedder.linear_1": (_TIMESTEP_CHANNELS, width),
        "time_text_embed.timestep_embedder.linear_2": (width, width),
        "time_text_embed.text_embedder.linear_1": (config["pooled_projection_dim"], width),
        "time_text_embed.text_embedder.linear_2": (width, width),
        "norm_out.linear": (width, 2 * width),
        "proj_out": (width, out),
    }
    count = config["num_layers"]
    dual = set(config.get("dual_attention_layers") or ())
    for index in range(count):
        block = f"transformer_blocks.{index}."
        last = index == count - 1
        layers[block + "norm1.linear"] = (width, (9 if index in dual else 6) * width)
        layers[block + "norm1_context.linear"] = (width, (2 if last else 6) * width)
        names = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj"]
        if not last:
            names.append("to_add_out")
        for name in names:
            layers[block + "attn." + name] = (width, width)
        if index in dual:
            for name in ("to_q", "to_k", "to_v", "to_out.0"):
                layers[block + "attn2." + name] = (width, width)
        for feed_forward in ("ff",) if last else ("ff", "ff_context"):
            layers[f"{block}{feed_forward}.net.0.proj"] = (width, mlp)
            layers[f"{block}{feed_forward}.net.2"] = (mlp, width)
    return layers
