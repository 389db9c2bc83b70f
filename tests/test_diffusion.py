"""limner.diffusion: cheap to import, its names sorted and importable."""

from __future__ import annotations

import dataclasses
import functools
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import limner.diffusion
from limner import Capability, ImageGenerationConfig, ModelInfo, ModelSettings, ModelSpec
from limner.diffusion import (
    CLIP_BOS_ID,
    CLIP_EOS_ID,
    CLIP_MAX_LENGTH,
    CLIP_VOCAB_SIZE,
    DiffusersBackend,
    resolve_seed,
    tiny_clip_tokenizer,
)


def test_importing_it_imports_no_heavy_library() -> None:
    code = (
        "import sys, limner.diffusion\n"
        "heavy = {'torch', 'diffusers', 'transformers'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_names_are_sorted_and_importable() -> None:
    def isort_style(name: str) -> tuple[int, str]:  # ruff's RUF022 order
        group = 0 if name.isupper() else 1 if name[0].isupper() else 2
        return group, name

    names = limner.diffusion.__all__
    assert names == sorted(names, key=isort_style)
    for name in names:
        assert hasattr(limner.diffusion, name), name


# -- a Stable Diffusion 1.x pipeline on DiffusersBackend --------------------------------------


@dataclass(frozen=True)
class _Variant:
    key: str = "test/tiny-sd15"
    source_repo: str = "test/tiny-sd15"
    working_mb: float = 1.0


class _SD15Backend(DiffusersBackend[_Variant]):
    """The smallest family on the base class: SD 1.x, whose pipeline warns on every
    construction without a safety checker."""

    pipeline_class = "StableDiffusionPipeline"

    def find_variant(self, spec: ModelSpec) -> _Variant:
        return _Variant()

    def resolve_config(self, config: ImageGenerationConfig) -> ImageGenerationConfig:
        return dataclasses.replace(
            config,
            width=config.width or 16,
            height=config.height or 16,
            steps=config.steps or 2,
            guidance=7.5 if config.guidance is None else config.guidance,
            seed=resolve_seed(config.seed),
        )


def _write_tiny_sd15(directory: Path) -> None:
    """A random-weight SD 1.x pipeline of the real classes, saved without a safety checker."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    diffusers: Any = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        norm_num_groups=4,
        attention_head_dim=2,
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=4,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=CLIP_MAX_LENGTH,
            bos_token_id=CLIP_BOS_ID,
            eos_token_id=CLIP_EOS_ID,
            pad_token_id=CLIP_EOS_ID,
        )
    )
    pipeline = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_clip_tokenizer(),
        unet=unet,
        scheduler=diffusers.DDIMScheduler(clip_sample=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
    )
    pipeline.save_pretrained(directory)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_generations_reuse_the_loaded_pipeline_without_rebuilding_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    diffusers: Any = pytest.importorskip("diffusers")
    _write_tiny_sd15(tmp_path)
    spec = ModelSpec(
        key="test/tiny-sd15",
        capability=Capability.TEXT_TO_IMAGE,
        factory=_SD15Backend,
        info=ModelInfo(memory_mb=10),
    )
    backend = _SD15Backend(spec, ModelSettings(weights=str(tmp_path), local_dir=True, device="cpu"))
    backend.load()  # diffusers may warn here, once: the pipeline is built once
    records = _Records()
    logging.getLogger("diffusers").addHandler(records)  # diffusers' loggers do not propagate
    constructed: list[object] = []
    pipeline_class = diffusers.StableDiffusionPipeline
    original_init = pipeline_class.__init__

    @functools.wraps(original_init)  # diffusers reads the components from the signature
    def counting_init(self: object, *args: Any, **kwargs: Any) -> None:
        constructed.append(self)
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(pipeline_class, "__init__", counting_init)
    try:
        results = [
            backend.generate(
                "a red fox",
                backend.resolve_config(ImageGenerationConfig(seed=3)),
                on_step=lambda progress: None,
            )
            for _ in range(2)
        ]
    finally:
        logging.getLogger("diffusers").removeHandler(records)
        backend.unload()
    assert constructed == []
    assert [m for m in records.messages if "safety checker" in m] == []
    first, second = (np.asarray(result.images[0]) for result in results)
    np.testing.assert_array_equal(first, second)  # the copy is a working pipeline
