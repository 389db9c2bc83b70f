"""limner plugin: OpenAI CLIP image (and text) embeddings through transformers.

Importing this package is cheap: it only declares model keys. Torch and transformers load
when a model is first used (see ``limner_clip._backend``).
"""

from __future__ import annotations

from dataclasses import dataclass

from limner.plugin import Capability, ModelInfo, ModelSpec, RegisterModel, hookimpl

from ._footprint import weights_mb, working_mb
from ._tiny import TINY_IMAGE_SIZE, TINY_KEY, TINY_PROJECTION_DIM, TINY_REVISION

#: The major version of limner's plugin API this plugin is written for.
LIMNER_PLUGIN_API = 1

__all__ = ["FACTORY", "LIMNER_PLUGIN_API", "limner_register_models", "specs"]

__version__ = "0.1.0"

FACTORY = "limner_clip._backend:ClipBackend"


@dataclass(frozen=True)
class _Tower:
    """The numbers of a CLIP checkpoint that decide its memory: all parameters (both towers,
    counted from the instantiated ``CLIPModel``) and the shape of the vision tower."""

    parameters: int
    image_size: int
    patch_size: int
    hidden_size: int
    heads: int

    def working_mb(self, batch: int) -> float:
        """Activations of one full batch: what each worker adds on top of shared weights."""
        return round(
            working_mb(
                image_size=self.image_size,
                patch_size=self.patch_size,
                hidden_size=self.hidden_size,
                heads=self.heads,
                batch=batch,
                activation_bytes=2,
            )
        )

    def memory_mb(self, batch: int) -> float:
        """Weights plus one batch, in the default dtype: fp16 on CUDA, bf16 on CPUs with
        native bf16 (2 bytes a value). Plain fp32 CPUs need about twice this; the pool
        replaces the estimate with the backend's figure once the model is loaded."""
        return round(weights_mb(self.parameters, 2) + self.working_mb(batch))


_B32 = _Tower(parameters=151_277_313, image_size=224, patch_size=32, hidden_size=768, heads=12)
_B16 = _Tower(parameters=149_620_737, image_size=224, patch_size=16, hidden_size=768, heads=12)
_L14 = _Tower(parameters=427_616_513, image_size=224, patch_size=14, hidden_size=1024, heads=16)
_L14_336 = _Tower(parameters=427_944_193, image_size=336, patch_size=14, hidden_size=1024, heads=16)
_TINY = _Tower(
    parameters=157_313,
    image_size=TINY_IMAGE_SIZE,
    patch_size=32,
    hidden_size=32,
    heads=4,
)


def _openai(
    key: str,
    *,
    alias: str,
    tower: _Tower,
    dimension: int,
    batch: int,
    description: str,
) -> ModelSpec:
    return ModelSpec(
        key=key,
        capability=Capability.IMAGE_EMBEDDING,
        factory=FACTORY,
        aliases=(alias,),
        info=ModelInfo(
            memory_mb=tower.memory_mb(batch),
            worker_overhead_mb=tower.working_mb(batch),
            embedding_dimension=dimension,
            max_batch_size=batch,
            default_settings={"image_size": tower.image_size},
            source_repo=key,
            revision=None,
            license="MIT",
            description=description,
        ),
    )


def specs() -> list[ModelSpec]:
    """Every key this plugin serves."""
    return [
        _openai(
            "openai/clip-vit-base-patch32",
            alias="clip-vit-b-32",
            tower=_B32,
            dimension=512,
            batch=64,
            description="OpenAI CLIP ViT-B/32: 224 px, 512-d image and text embeddings; "
            "the fastest CLIP",
        ),
        _openai(
            "openai/clip-vit-base-patch16",
            alias="clip-vit-b-16",
            tower=_B16,
            dimension=512,
            batch=32,
            description="OpenAI CLIP ViT-B/16: 224 px, 512-d; finer patches than B/32, "
            "more accurate, about 4x the compute",
        ),
        _openai(
            "openai/clip-vit-large-patch14",
            alias="clip-vit-l-14",
            tower=_L14,
            dimension=768,
            batch=32,
            description="OpenAI CLIP ViT-L/14: 224 px, 768-d image and text embeddings",
        ),
        _openai(
            "openai/clip-vit-large-patch14-336",
            alias="clip-vit-l-14-336",
            tower=_L14_336,
            dimension=768,
            batch=16,
            description="OpenAI CLIP ViT-L/14 at 336 px: 768-d; the most accurate OpenAI CLIP, "
            "the slowest",
        ),
        ModelSpec(
            key=TINY_KEY,
            capability=Capability.IMAGE_EMBEDDING,
            factory=FACTORY,
            info=ModelInfo(
                memory_mb=_TINY.memory_mb(32),
                worker_overhead_mb=_TINY.working_mb(32),
                embedding_dimension=TINY_PROJECTION_DIM,
                max_batch_size=32,
                default_settings={"image_size": TINY_IMAGE_SIZE},
                source_repo=TINY_KEY,
                revision=TINY_REVISION,
                license="MIT",
                description="TINY random-weight CLIP for tests and offline demos; "
                "its vectors mean nothing",
                tiny=True,
            ),
        ),
    ]


@hookimpl
def limner_register_models(register: RegisterModel) -> None:
    for spec in specs():
        register(spec)
