"""limner-acme: SigLIP image and text embeddings through transformers, for limner."""

from pathlib import Path

from limner.plugin import (
    CLIP_TOKENS,
    ModelInfo,
    ModelSpec,
    RegisterModel,
    TransformersEmbeddingBackend,
    hookimpl,
    tiny_clip_tokenizer,
    tiny_model,
)

LIMNER_PLUGIN_API = 1  # the major version of limner's plugin API this plugin is written for


def write_tiny(directory: Path) -> None:
    """A random-weight SigLIP: the real classes at tiny widths (torch is seeded first)."""
    import transformers

    layers = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}
    text = {**layers, **CLIP_TOKENS, "max_position_embeddings": 16}  # the tiny tokenizer's ids
    vision = {**layers, "image_size": 32, "patch_size": 8}
    config = transformers.SiglipConfig(text_config=text, vision_config=vision)
    transformers.SiglipModel(config).save_pretrained(directory)
    processor = transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32})
    processor.save_pretrained(directory)
    tiny_clip_tokenizer().save_pretrained(directory)


TINY = tiny_model("acme/tiny@1", seed=1, write=write_tiny)


class AcmeBackend(TransformersEmbeddingBackend):
    tiny = TINY
    text_padding = "max_length"  # SigLIP reads the last token: pad every text the same


@hookimpl
def limner_register_models(register: RegisterModel) -> None:
    real = ModelInfo(
        embedding_dimension=768,
        memory_mb=900,
        license="apache-2.0",
        description="SigLIP ViT-B/16, 224 px: 768-d image and text embeddings",
    )
    tiny = TINY.info(family="SigLIP", embedding_dimension=32)
    register(ModelSpec(key="google/siglip-base-patch16-224", factory=AcmeBackend, info=real))
    register(ModelSpec(key=TINY.key, factory=AcmeBackend, info=tiny))
