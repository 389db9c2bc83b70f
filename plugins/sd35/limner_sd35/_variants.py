"""The Stable Diffusion 3.5 keys, their facts, defaults and limits. No torch here.

``limner.diffusion.resolve_config`` checks a request against them without weights, so the
core can tell the caller which field is wrong before any worker is started.
"""

from __future__ import annotations

from dataclasses import dataclass

from limner.diffusion import Checkpoint

from ._tiny import TINY, TRANSFORMER

__all__ = ["VARIANTS", "SD35Variant"]

# Peak GPU memory of one bf16 StableDiffusion3Pipeline (SD3.5 Large) at 1024x1024, no
# offload, as measured on an H100 with plain diffusers (torch.cuda.max_memory_allocated):
# 28.5 GiB. Large Turbo is the same architecture and sizes, distilled.
_LARGE_PEAK_MB = 28.5 * 1024
# Of that, the bf16 weights are 25.6 GiB (transformer 8.1B, T5-XXL encoder 4.76B, CLIP-G
# 0.69B, CLIP-L 0.12B, VAE 0.08B parameters at 2 bytes); the rest is one generation's working
# memory, which a second concurrent generation on the same weights adds again.
_WORKING_MB = _LARGE_PEAK_MB - 13.76e9 * 2 / 2**20
# SD3.5 Medium, estimated rather than measured: its weights from parameter counts (MMDiT-X
# 2.5B, T5-XXL encoder 4.8B, CLIP-G 0.7B, CLIP-L 0.1B, VAE 0.1B: about 15 GiB in bf16) plus the
# 2.9 GiB of working memory measured for Large above its own weights.
_MEDIUM_PEAK_MB = 8.16e9 * 2 / 2**20 + _WORKING_MB


# The SD3.5 transformers as their config.json files describe them: Large (and Large Turbo),
# 38 MMDiT blocks 2432 wide; Medium, 24 MMDiT-X blocks 1536 wide, the first 13 with a
# second attention over the image.
_LARGE_TRANSFORMER = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 38,
    "attention_head_dim": 64,
    "num_attention_heads": 38,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 2432,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
    "qk_norm": "rms_norm",
}
_MEDIUM_TRANSFORMER = {
    **_LARGE_TRANSFORMER,
    "num_layers": 24,
    "num_attention_heads": 24,
    "caption_projection_dim": 1536,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),
}


@dataclass(frozen=True, kw_only=True)
class SD35Variant(Checkpoint):
    """One SD3.5 checkpoint's facts and the request limits limner enforces for it. SD3
    latents are 8x smaller than the image and cut into 2x2 patches: sides divide by 16; the
    pipeline refuses T5 sequences over 512 tokens."""

    license: str = "stabilityai-ai-community"
    memory_mb: float = _LARGE_PEAK_MB
    working_mb: float = _WORKING_MB
    gated: bool = True


VARIANTS: tuple[SD35Variant, ...] = (
    SD35Variant(
        key="stabilityai/stable-diffusion-3.5-large-turbo",
        aliases=("sd3.5-large-turbo",),
        description=(
            "Stable Diffusion 3.5 Large Turbo: 8B MMDiT distilled to 4 steps without guidance"
        ),
        default_steps=4,
        default_guidance=0.0,
        transformer=_LARGE_TRANSFORMER,
    ),
    SD35Variant(
        key="stabilityai/stable-diffusion-3.5-large",
        aliases=("sd3.5-large",),
        description="Stable Diffusion 3.5 Large: 8B MMDiT, ~28 steps with guidance 3.5",
        default_steps=28,
        default_guidance=3.5,
        transformer=_LARGE_TRANSFORMER,
    ),
    SD35Variant(
        key="stabilityai/stable-diffusion-3.5-medium",
        aliases=("sd3.5-medium",),
        description="Stable Diffusion 3.5 Medium: 2.5B MMDiT-X, ~40 steps with guidance 4.5",
        memory_mb=_MEDIUM_PEAK_MB,
        default_steps=40,
        default_guidance=4.5,
        transformer=_MEDIUM_TRANSFORMER,
    ),
    SD35Variant.for_tiny(TINY, family="SD3.5", max_size=1024, transformer=TRANSFORMER),
)
