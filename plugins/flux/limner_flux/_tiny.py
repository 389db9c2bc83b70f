"""A tiny random-weight FLUX, generated on first use into the Hugging Face cache.

Every component has the real class and the real wiring (16 latent channels packed 2x2 into 64
transformer channels, a VAE that downsamples 8x, CLIP for the pooled vector, T5 for the
sequence, flow-matching Euler), only tiny widths, so tests and offline demos run exactly the
code path of the real keys: ``FluxPipeline.from_pretrained`` from the cache layout. Its images
are noise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import limner
from limner.diffusion import (
    CLIP_BOS_ID,
    CLIP_EOS_ID,
    CLIP_MAX_LENGTH,
    CLIP_VOCAB_SIZE,
    T5_EOS_ID,
    T5_PAD_ID,
    T5_VOCAB_SIZE,
    tiny_clip_tokenizer,
    tiny_t5_tokenizer,
)

__all__ = ["TINY_KEY", "TINY_REVISION", "ensure_tiny_flux", "write_tiny_flux"]

TINY_KEY = "limner/tiny-flux"
#: Bump the recipe whenever the architecture, seed or files below change, so caches holding
#: the old snapshot are not reused for a different model.
TINY_REVISION = limner.tiny_revision("limner/tiny-flux@1")

_SEED = 20240801
_CLIP_WIDTH = 32
_T5_WIDTH = 32


def write_tiny_flux(directory: Path) -> None:
    """Write the tiny pipeline (weights, configs, tokenizers) into ``directory``."""
    import torch
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        T5Config,
        T5EncoderModel,
    )

    diffusers = _diffusers()

    torch.manual_seed(_SEED)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels in 2x2 patches, as in FLUX.1
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_T5_WIDTH,
        pooled_projection_dim=_CLIP_WIDTH,
        guidance_embeds=False,  # schnell: guidance-distilled away
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim, like (16, 56, 56) for 128
    )
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # four blocks: 8x, as in FLUX.1
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.3611,  # FLUX.1's latent statistics
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE,
            hidden_size=_CLIP_WIDTH,
            intermediate_size=2 * _CLIP_WIDTH,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=CLIP_MAX_LENGTH,
            projection_dim=_CLIP_WIDTH,
            bos_token_id=CLIP_BOS_ID,
            eos_token_id=CLIP_EOS_ID,
            pad_token_id=CLIP_EOS_ID,
        )
    )
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=T5_VOCAB_SIZE,
            d_model=_T5_WIDTH,
            d_ff=2 * _T5_WIDTH,
            d_kv=16,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            feed_forward_proj="gated-gelu",  # T5 v1.1, like the real t5-v1_1-xxl encoder
            pad_token_id=T5_PAD_ID,
            eos_token_id=T5_EOS_ID,
        )
    )
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(  # FLUX.1-schnell's scheduler config
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=False,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_t5_tokenizer()
    pipeline = diffusers.FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipeline.save_pretrained(directory)  # safetensors and model_index.json


def _diffusers() -> Any:
    """diffusers as ``Any``: its config-decorated constructors carry no annotations, so
    mypy --strict would flag every call."""
    import diffusers

    return diffusers


def ensure_tiny_flux(cache_dir: Path | None = None) -> Path:
    """The tiny pipeline's snapshot directory in the HF cache, written there if missing."""
    return limner.materialize_in_hf_cache(
        TINY_KEY, TINY_REVISION, write_tiny_flux, cache_dir=cache_dir
    )
