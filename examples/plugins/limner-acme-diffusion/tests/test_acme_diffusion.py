"""limner's conformance suite on the plugin's tiny model; add the plugin's own tests here."""

from __future__ import annotations

import limner_acme_diffusion
from limner.plugin.testing import TextToImageContract


class TestAcmeDiffusion(TextToImageContract):
    key = "acme-diffusion/tiny"
    plugin = limner_acme_diffusion
