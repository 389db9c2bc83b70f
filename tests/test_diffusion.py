"""limner.diffusion's backend on a pipeline of another family (its import cost and names are
checked in test_plugin_contract.py)."""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from limner import Capability, ImageGenerationConfig, ModelInfo, ModelSettings, ModelSpec
from limner.diffusion import DiffusersBackend, resolve_seed
from limner.plugin import tiny_clip_text_encoder, tiny_clip_tokenizer

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
    text_encoder = tiny_clip_text_encoder(16, layers=1)
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


# -- editing: declared by naming both pipelines -----------------------------------------------


def test_a_family_names_both_edit_pipelines_or_neither() -> None:
    assert not _SD15Backend.img2img_class
    with pytest.raises(TypeError, match="names one of img2img_class and inpaint_class"):

        class _Half(_SD15Backend):
            img2img_class = "StableDiffusionImg2ImgPipeline"

    class _Both(_SD15Backend):
        img2img_class = "StableDiffusionImg2ImgPipeline"
        inpaint_class = "StableDiffusionInpaintPipeline"

    spec = ModelSpec(
        key="test/tiny-sd15",
        capability=Capability.TEXT_TO_IMAGE,
        factory=_Both,
        info=ModelInfo(memory_mb=10),
    )
    assert _Both(spec, ModelSettings(weights="x", device="cpu")).supports_editing
    assert not _SD15Backend(spec, ModelSettings(weights="x", device="cpu")).supports_editing


@pytest.mark.parametrize(
    ("source", "fitted"),
    [
        ((1024, 768), (1024, 768)),  # fits as it is
        ((1003, 755), (1008, 752)),  # the nearest multiples of 16
        ((4000, 3000), (2048, 1536)),  # scaled down to the largest side, its shape kept
        ((100, 3000), (256, 2048)),  # each side within the limits
        ((1, 1), (256, 256)),
    ],
)
def test_an_edit_without_a_size_takes_the_nearest_the_checkpoint_allows(
    source: tuple[int, int], fitted: tuple[int, int]
) -> None:
    from limner.diffusion import Checkpoint, fit_edit_size

    checkpoint = Checkpoint(
        key="k",
        license="x",
        description="x",
        memory_mb=1,
        working_mb=1,
        default_steps=4,
        default_guidance=0,
    )
    assert fit_edit_size(checkpoint, *source) == fitted
