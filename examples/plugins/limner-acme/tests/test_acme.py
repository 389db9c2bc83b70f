"""limner's conformance suite on the plugin's tiny model; add the plugin's own tests here."""

from __future__ import annotations

import limner_acme
from limner.plugin.testing import ImageEmbeddingContract


class TestAcme(ImageEmbeddingContract):
    key = "acme/tiny"
    plugin = limner_acme
    text = True
