"""The FLUX.1 keys, their facts, defaults and limits. No torch here.

``limner.diffusion.resolve_config`` checks a request against them without weights, so the
core can tell the caller which field is wrong before any worker is started.
"""

from __future__ import annotations

from dataclasses import dataclass

from limner.diffusion import Checkpoint

from ._tiny import TINY, TRANSFORMER

__all__ = ["VARIANTS", "FluxVariant"]

# Peak GPU memory of one bf16 FluxPipeline at 1024x1024, 4 steps, no offload, as measured on
# an H100 with plain diffusers (torch.cuda.max_memory_allocated): 33.8 GiB. FLUX.1-dev has the
# same architecture and sizes plus a small guidance embedder, so the same figure is used.
_FLUX_PEAK_MB = 33.8 * 1024
# Of that, the bf16 weights are 31.4 GiB (transformer 11.9B, T5-XXL encoder 4.76B, CLIP-L
# 0.12B, VAE 0.08B parameters at 2 bytes); the rest is one generation's working memory, which
# a second concurrent generation on the same weights adds again.
_FLUX_WORKING_MB = _FLUX_PEAK_MB - 16.86e9 * 2 / 2**20


# The FLUX.1 transformer as its config.json describes it (schnell and dev; dev adds the
# guidance embedder): 19 double-stream and 38 single-stream blocks, 3072 wide.
_FLUX_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
}


@dataclass(frozen=True, kw_only=True)
class FluxVariant(Checkpoint):
    """One FLUX.1 checkpoint's facts and the request limits limner enforces for it. Flux
    latents are 8x smaller than the image and packed in 2x2 patches: sides divide by 16."""

    memory_mb: float = _FLUX_PEAK_MB
    working_mb: float = _FLUX_WORKING_MB
    negative_prompt_refusal: str | None = (
        "FLUX.1 is guidance-distilled and runs without classifier-free guidance; describe "
        "what you want in the prompt"
    )


VARIANTS: tuple[FluxVariant, ...] = (
    FluxVariant(
        key="black-forest-labs/FLUX.1-schnell",
        aliases=("flux-schnell",),
        license="apache-2.0",
        description="FLUX.1 [schnell]: 12B rectified-flow transformer, 1-4 steps, no guidance",
        default_steps=4,
        default_guidance=0.0,
        guidance_distilled_away=True,
        # schnell was trained with 256 T5 tokens; longer prompts are cut off by the pipeline.
        default_prompt_tokens=256,
        max_prompt_tokens=256,
        transformer=_FLUX_TRANSFORMER,
    ),
    FluxVariant(
        key="black-forest-labs/FLUX.1-dev",
        aliases=("flux-dev",),
        license="flux-1-dev-non-commercial-license",
        description=(
            "FLUX.1 [dev]: 12B guidance-distilled transformer, ~28 steps; gated repo, "
            "non-commercial licence"
        ),
        gated=True,
        default_steps=28,
        default_guidance=3.5,
        default_prompt_tokens=512,
        transformer={**_FLUX_TRANSFORMER, "guidance_embeds": True},
    ),
    FluxVariant.for_tiny(
        TINY,
        family="FLUX",
        max_size=512,
        guidance_distilled_away=True,
        max_prompt_tokens=256,
        transformer=TRANSFORMER,
    ),
)
