"""The conformance suite: what every limner plugin passes, run against its real backend.

A plugin's tests subclass the contract of its capability, name the key of its tiny model,
and get every test below with the fixtures they use::

    import limner_acme
    from limner.plugin.testing import ImageEmbeddingContract


    class TestAcme(ImageEmbeddingContract):
        key = "acme/tiny"  # the tiny model the suite loads and runs
        plugin = limner_acme  # or leave it out: found through its `limner` entry point

Or, with nothing written, ``pytest --limner-conformance acme/tiny`` runs the suite on any
installed plugin's key (the option comes with limner, through pytest's ``pytest11`` entry
point). What it checks: the plugin module imports no torch; its specs are valid (the tiny
key pinned at its revision); it declares the plugin API it was written for; bad settings are
typed errors naming the setting, and a device it cannot use fails the load; memory is
reported after load, and an eviction frees the model (weak references die). For an
embedder: float32 rows of unit length and of the declared dimension, in input order; a batch
equals its singles, also through the pool and from several threads; text works where
declared and is refused where not. For a generator: ``resolve_config`` fills the defaults,
is idempotent, and refuses bad ``num_images``, sizes, steps, guidance, seeds, formats and
previews naming the field; generation streams progress then the result, is deterministic by
seed, and stops at the next step when cancelled.

Every test runs offline against a Hugging Face cache of the class's own, where the tiny model
is written on first load. Class attributes tune it (``bad_settings``, ``bad_fields``,
``text``, ``tolerance``, ``steps``); a plugin's own tests go in the same class.
"""

from __future__ import annotations

import re

from limner import Capability, Registry
from limner.plugin.testing._contract import (
    HEAVY_MODULES,
    PluginContract,
    photo_like,
    run_in_threads,
)
from limner.plugin.testing._embedding import ImageEmbeddingContract
from limner.plugin.testing._generation import BAD_FIELDS as BAD_FIELDS
from limner.plugin.testing._generation import TextToImageContract

__all__ = [
    "HEAVY_MODULES",
    "ImageEmbeddingContract",
    "PluginContract",
    "TextToImageContract",
    "contract_for",
    "photo_like",
    "run_in_threads",
]


def contract_for(key: str) -> type[PluginContract]:
    """A contract class for an installed plugin's ``key``, of the key's capability: what
    ``pytest --limner-conformance KEY`` runs."""
    capability = Registry().spec(key).capability
    base: type[PluginContract] = (
        ImageEmbeddingContract if capability is Capability.IMAGE_EMBEDDING else TextToImageContract
    )
    name = "TestConformance_" + re.sub(r"\W", "_", key)
    return type(name, (base,), {"key": key, "__module__": __name__})
