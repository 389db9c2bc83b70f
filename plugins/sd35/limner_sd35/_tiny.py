"""A tiny random-weight Stable Diffusion 3.5, generated on first use into the HF cache.

Every component has the real class and the real wiring (an MMDiT with RMS-normed attention as
in 3.5 Large, 16 latent channels in 2x2 patches, a VAE that downsamples 8x, two CLIP text
encoders with projections whose hidden states are concatenated and zero-padded to T5's width,
T5 for the sequence, flow-matching Euler), only tiny widths, so tests and offline demos run
exactly the code path of the real keys: ``StableDiffusion3Pipeline.from_pretrained`` from the
cache layout. Its images are noise.
"""

from __future__ import annotations

from typing import Any

from limner.diffusion import tiny_pipeline, tiny_vae
from limner.plugin import (
    tiny_clip_text_encoder,
    tiny_clip_tokenizer,
    tiny_t5_encoder,
    tiny_t5_tokenizer,
)

__all__ = ["TINY", "TRANSFORMER"]

# CLIP-L and CLIP-G stand-ins of different widths (768 and 1280 in the real model), so their
# concatenation (48) is zero-padded to T5's width (64) exactly as 2048 is padded to 4096.
_CLIP_L_WIDTH = 16
_CLIP_G_WIDTH = 32
_T5_WIDTH = 64


#: The tiny transformer's architecture (what its LoRA adapters must fit).
TRANSFORMER: dict[str, Any] = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": _T5_WIDTH,
    "caption_projection_dim": 32,
    "pooled_projection_dim": _CLIP_L_WIDTH + _CLIP_G_WIDTH,
    "pos_embed_max_size": 64,  # patches per side: up to 1024 px
    "qk_norm": "rms_norm",  # as in 3.5 Large
}


def _components(diffusers: Any) -> dict[str, Any]:
    return {
        "transformer": diffusers.SD3Transformer2DModel(**TRANSFORMER),
        "vae": tiny_vae(scaling_factor=1.5305, shift_factor=0.0609),  # SD3's statistics
        # SD3 reads the penultimate layer of each CLIP encoder, and their projections
        "text_encoder": tiny_clip_text_encoder(_CLIP_L_WIDTH, projection=True),
        "text_encoder_2": tiny_clip_text_encoder(_CLIP_G_WIDTH, projection=True),
        "text_encoder_3": tiny_t5_encoder(_T5_WIDTH),
        # SD3.5's scheduler config
        "scheduler": diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        "tokenizer": tiny_clip_tokenizer(),
        "tokenizer_2": tiny_clip_tokenizer(),
        "tokenizer_3": tiny_t5_tokenizer(),
    }


#: Bump the recipe's version whenever the components or the seed change, so caches holding
#: the old snapshot are not reused for a different model.
TINY = tiny_pipeline(
    "limner/tiny-sd35@1",
    seed=20240802,
    pipeline_class="StableDiffusion3Pipeline",
    components=_components,
)
