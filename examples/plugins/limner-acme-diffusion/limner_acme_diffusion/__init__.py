"""limner-acme-diffusion: Stable Diffusion 1.5 text-to-image through diffusers, for limner."""

from dataclasses import dataclass
from typing import Any

from limner.diffusion import Checkpoint, DiffusersBackend, tiny_pipeline, tiny_unet, tiny_vae
from limner.plugin import RegisterModel, hookimpl, tiny_clip_text_encoder, tiny_clip_tokenizer

LIMNER_PLUGIN_API = 1  # the major version of limner's plugin API this plugin is written for


def components(diffusers: Any) -> dict[str, Any]:
    """The tiny model: Stable Diffusion 1.5's classes at tiny widths (torch is seeded first)."""
    return {
        "unet": tiny_unet(cross_attention_dim=16),
        "vae": tiny_vae(scaling_factor=0.18215, shift_factor=0.0, latent_channels=4),
        "text_encoder": tiny_clip_text_encoder(16),
        "tokenizer": tiny_clip_tokenizer(),
        "scheduler": diffusers.PNDMScheduler(skip_prk_steps=True, steps_offset=1),
    }


TINY = tiny_pipeline(
    "acme-diffusion/tiny@2", seed=1, pipeline_class="StableDiffusionPipeline", components=components
)


@dataclass(frozen=True, kw_only=True)
class SD15(Checkpoint):
    size_multiple: int = 8  # the VAE downsamples 8x; the UNet takes any latent size
    default_prompt_tokens: int = 77  # the CLIP text encoder reads 77 tokens
    max_prompt_tokens: int = 77


class AcmeDiffusionBackend(DiffusersBackend[SD15]):
    tiny = TINY  # and its pipeline class, StableDiffusionPipeline
    # Editing: the family's image-to-image and inpainting pipelines, built on the loaded
    # pipeline's components (no second copy of the weights); leave them out to not edit.
    img2img_class = "StableDiffusionImg2ImgPipeline"
    inpaint_class = "StableDiffusionInpaintPipeline"
    variants = (
        SD15(
            key="stable-diffusion-v1-5/stable-diffusion-v1-5",
            license="creativeml-openrail-m",
            description="Stable Diffusion 1.5: 512 px, ~25 steps with guidance 7.5",
            memory_mb=4_000,
            working_mb=1_000,
            default_size=512,
            default_steps=25,
            default_guidance=7.5,
        ),
        SD15.for_tiny(TINY, family="Stable Diffusion 1.5"),
    )


@hookimpl
def limner_register_models(register: RegisterModel) -> None:
    AcmeDiffusionBackend.register_specs(register)
