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

# The CLIP tokenizers: byte-level BPE without merges, so every byte is a token and every text
# tokenizes. Ids follow the real CLIP vocabulary's layout: the 256 byte symbols, their
# end-of-word variants, then the two special tokens.
_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"
_CLIP_VOCAB_SIZE = 514
_CLIP_MAX_LENGTH = 77

# The T5 tokenizer: a unigram model over single characters (with and without the word-start
# marker), so every ASCII text tokenizes; anything else becomes <unk>. Ids 0-2 are T5's.
_T5_SPECIALS = ("<pad>", "</s>", "<unk>")
_T5_VOCAB_SIZE = 256


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte, in byte order (what ByteLevel emits)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols: dict[int, str] = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in symbols:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[byte] for byte in range(256)]


def clip_vocab() -> dict[str, int]:
    symbols = _byte_symbols()
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    vocab.update({symbol + "</w>": 256 + index for index, symbol in enumerate(symbols)})
    vocab[_BOS] = 512
    vocab[_EOS] = 513
    return vocab


def t5_vocab() -> list[tuple[str, float]]:
    """(piece, log-probability) pairs; the marker-prefixed pieces score higher, so a word's
    first character takes the word-start piece as real SentencePiece vocabularies do."""
    pieces: list[tuple[str, float]] = [(token, 0.0) for token in _T5_SPECIALS]
    pieces.append(("▁", -3.0))
    for code in range(ord("!"), ord("~") + 1):
        pieces.append(("▁" + chr(code), -4.0))
        pieces.append((chr(code), -5.0))
    return pieces


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
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5Tokenizer,  # transformers 5: the tokenizers-backed class the pipeline loads
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
                vocab_size=_CLIP_VOCAB_SIZE,
                hidden_size=width,
                intermediate_size=2 * width,
                num_hidden_layers=2,  # SD3 reads the penultimate layer
                num_attention_heads=2,
                max_position_embeddings=_CLIP_MAX_LENGTH,
                projection_dim=width,
                bos_token_id=512,
                eos_token_id=513,
                pad_token_id=513,
            )
        )
        for width in (_CLIP_L_WIDTH, _CLIP_G_WIDTH)
    ]
    text_encoder_3 = T5EncoderModel(
        T5Config(
            vocab_size=_T5_VOCAB_SIZE,
            d_model=_T5_WIDTH,
            d_ff=2 * _T5_WIDTH,
            d_kv=16,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            feed_forward_proj="gated-gelu",  # T5 v1.1, like the real t5-v1_1-xxl encoder
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(  # SD3.5's scheduler config
        num_train_timesteps=1000, shift=3.0
    )
    tokenizers = [
        CLIPTokenizer(
            vocab=clip_vocab(),
            merges=[],
            bos_token=_BOS,
            eos_token=_EOS,
            pad_token=_EOS,
            unk_token=_EOS,
            model_max_length=_CLIP_MAX_LENGTH,
        )
        for _ in range(2)
    ]
    tokenizer_3 = T5Tokenizer(vocab=t5_vocab(), extra_ids=0, model_max_length=512)
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
