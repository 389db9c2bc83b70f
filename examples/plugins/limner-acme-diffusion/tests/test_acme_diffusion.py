"""The diffusion family contract on the plugin's tiny model; add the plugin's own tests here."""

from __future__ import annotations

import limner_acme_diffusion
from limner.diffusion.testing import DiffusionFamilyContract
from limner_acme_diffusion import AcmeDiffusionBackend


class TestAcmeDiffusion(DiffusionFamilyContract):
    plugin = limner_acme_diffusion
    backend_class = AcmeDiffusionBackend
    family_name = "Stable Diffusion 1.5"
    real_key = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    tiny_files = ("model_index.json", "tokenizer/tokenizer.json", "unet/config.json")

    @classmethod
    def pipeline_steps(cls, requested: int) -> int:
        return requested + 1  # PNDM's PLMS, SD 1.5's scheduler, runs one more step than asked
