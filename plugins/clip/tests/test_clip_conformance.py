"""limner's conformance suite for image embedders, on the tiny CLIP."""

from __future__ import annotations

import limner_clip
from limner.plugin.testing import ImageEmbeddingContract


class TestClipConformance(ImageEmbeddingContract):
    key = "limner/tiny-clip"
    plugin = limner_clip
    entry_point = "clip"
    distribution = "limner-clip"
    text = True
    bad_settings = tuple(("image_size", size) for size in (0, -3, "224", 22.4, True))
