"""A tiny random-weight FLUX, generated on first use into the Hugging Face cache.

Every component has the real class and the real wiring (16 latent channels packed 2x2 into 64
transformer channels, a VAE that downsamples 8x, CLIP for the pooled vector, T5 for the
sequence, flow-matching Euler), only tiny widths, so tests and offline demos run exactly the
code path of the real keys: ``FluxPipeline.from_pretrained`` from the cache layout. Its images
are noise.
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

_CLIP_WIDTH = 32
_T5_WIDTH = 32


#: The tiny transformer's architecture (what its LoRA adapters must fit).
TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,  # 16 latent channels in 2x2 patches, as in FLUX.1
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": _T5_WIDTH,
    "pooled_projection_dim": _CLIP_WIDTH,
    "guidance_embeds": False,  # schnell: guidance-distilled away
    "axes_dims_rope": (4, 6, 6),  # sums to attention_head_dim, like (16, 56, 56) for 128
}


def _components(diffusers: Any) -> dict[str, Any]:
    return {
        "transformer": diffusers.FluxTransformer2DModel(**TRANSFORMER),
        "vae": tiny_vae(scaling_factor=0.3611, shift_factor=0.1159),  # FLUX.1's statistics
        "text_encoder": tiny_clip_text_encoder(_CLIP_WIDTH),
        "text_encoder_2": tiny_t5_encoder(_T5_WIDTH),
        # FLUX.1-schnell's scheduler config
        "scheduler": diffusers.FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=1.0,
            use_dynamic_shifting=False,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        "tokenizer": tiny_clip_tokenizer(),
        "tokenizer_2": tiny_t5_tokenizer(),
    }


#: Bump the recipe's version whenever the components or the seed change, so caches holding
#: the old snapshot are not reused for a different model.
TINY = tiny_pipeline(
    "limner/tiny-flux@1", seed=20240801, pipeline_class="FluxPipeline", components=_components
)
