"""A tiny random-weight Stable Diffusion 3.5, generated on first use into the HF cache.

Every component has the real class and the real wiring (an MMDiT with RMS-normed attention as
in 3.5 Large, 16 latent channels in 2x2 patches, a VAE that downsamples 8x, two CLIP text
encoders with projections whose hidden states are concatenated and zero-padded to T5's width,
T5 for the sequence, flow-matching Euler), only tiny widths, so tests and offline demos run
exactly the code path of the real keys: ``StableDiffusion3Pipeline.from_pretrained`` from the
cache layout. Its images are noise.
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

__all__ = ["TINY_KEY", "TINY_REVISION", "ensure_tiny_sd35", "write_tiny_sd35"]

TINY_KEY = "limner/tiny-sd35"
#: Bump the recipe whenever the architecture, seed or files below change, so caches holding
#: the old snapshot are not reused for a different model.
TINY_REVISION = limner.tiny_revision("limner/tiny-sd35@1")

_SEED = 20240802
# CLIP-L and CLIP-G stand-ins of different widths (768 and 1280 in the real model), so their
# concatenation (48) is zero-padded to T5's width (64) exactly as 2048 is padded to 4096.
_CLIP_L_WIDTH = 16
_CLIP_G_WIDTH = 32
_T5_WIDTH = 64


def _diffusers() -> Any:
    """diffusers as ``Any``: its config-decorated constructors carry no annotations, so
    mypy --strict would flag every call."""
    import diffusers

    return diffusers


def write_tiny_sd35(directory: Path) -> None:
    """Write the tiny pipeline (weights, configs, tokenizers) into ``directory``."""
    import torch
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    diffusers = _diffusers()
    torch.manual_seed(_SEED)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_T5_WIDTH,
        caption_projection_dim=32,
        pooled_projection_dim=_CLIP_L_WIDTH + _CLIP_G_WIDTH,
        pos_embed_max_size=64,  # patches per side: up to 1024 px
        qk_norm="rms_norm",  # as in 3.5 Large
    )
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # four blocks: 8x, as in SD3
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=1.5305,  # SD3's latent statistics
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    text_encoders = [
        CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=CLIP_VOCAB_SIZE,
                hidden_size=width,
                intermediate_size=2 * width,
                num_hidden_layers=2,  # SD3 reads the penultimate layer
                num_attention_heads=2,
                max_position_embeddings=CLIP_MAX_LENGTH,
                projection_dim=width,
                bos_token_id=CLIP_BOS_ID,
                eos_token_id=CLIP_EOS_ID,
                pad_token_id=CLIP_EOS_ID,
            )
        )
        for width in (_CLIP_L_WIDTH, _CLIP_G_WIDTH)
    ]
    text_encoder_3 = T5EncoderModel(
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
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(  # SD3.5's scheduler config
        num_train_timesteps=1000, shift=3.0
    )
    tokenizers = [tiny_clip_tokenizer() for _ in range(2)]
    tokenizer_3 = tiny_t5_tokenizer()
    pipeline = diffusers.StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoders[0],
        tokenizer=tokenizers[0],
        text_encoder_2=text_encoders[1],
        tokenizer_2=tokenizers[1],
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipeline.save_pretrained(directory)  # safetensors and model_index.json


def ensure_tiny_sd35(cache_dir: Path | None = None) -> Path:
    """The tiny pipeline's snapshot directory in the HF cache, written there if missing."""
    return limner.materialize_in_hf_cache(
        TINY_KEY, TINY_REVISION, write_tiny_sd35, cache_dir=cache_dir
    )
