"""What an edit costs in memory, measured: an edit after a generation on the same loaded key
adds no second copy of the weights, since the edit pipelines are built on the loaded
pipeline's own modules.

The tiny FLUX's weights (under 1 MB) would vanish in the resident set's noise, so the test
loads a FLUX whose transformer is widened to about 100 MB, from a local directory, through
``FluxBackend`` as any key loads. It runs in a fresh process (a process's memory only grows),
prints its figures, and checks them against a control that does copy the transformer.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="reads RSS as Linux counts it"),
    pytest.mark.subprocess,  # a fresh process: its resident memory only ever grows
]

# Writes the widened FLUX into argv[1], loads it, generates, edits, and prints the figures.
_SCRIPT = r"""
import copy, gc, json, sys

import numpy as np
import psutil
import torch

import limner
import limner_flux
from limner import ImageGenerationConfig
from limner.plugin import quiet_loading
from limner_flux._tiny import TINY

where = sys.argv[1]
MB = 2**20


def rss():
    gc.collect()
    return psutil.Process().memory_info().rss / MB


@quiet_loading("transformers", "diffusers")
def write_wide_flux():
    import diffusers

    pipeline = diffusers.FluxPipeline.from_pretrained(TINY.ensure())
    torch.manual_seed(0)
    pipeline.transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=48,  # 768 wide, as the tiny is 32
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    )
    pipeline.save_pretrained(where)


write_wide_flux()
registry = limner.Registry(entry_points=False)
registry.register_plugin(limner_flux)
registry.configure("limner/tiny-flux", local_dir=where, device="cpu")
backend = registry.generator("limner/tiny-flux").backend
backend.load()
loaded = backend._loaded
parameters = loaded.pipeline.transformer.parameters()
transformer_mb = sum(p.numel() * p.element_size() for p in parameters) / MB
weights_before = loaded.device_mb()

config = backend.resolve_config(ImageGenerationConfig(width=64, height=48, steps=2, seed=1))
backend.generate("a fox", config, on_step=lambda progress: None)
after_generation = rss()

source = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
mask = np.zeros((48, 64), dtype=np.uint8)
mask[8:40, 16:48] = 255
edit = backend.resolve_config(
    ImageGenerationConfig(width=64, height=48, steps=2, seed=1, strength=0.8)
)
for area in (None, mask, None, mask):
    backend.edit("a red hat", edit, source, area, on_step=lambda progress: None)
after_edits = rss()

pointers = {t.data_ptr() for m in loaded.pipeline.components.values()
            if isinstance(m, torch.nn.Module) for t in (*m.parameters(), *m.buffers())}
edit_tensors = [t for e in loaded.edit_pipelines.values() for m in e.components.values()
                if isinstance(m, torch.nn.Module) for t in (*m.parameters(), *m.buffers())]

control = copy.deepcopy(loaded.pipeline.transformer)  # what a second copy would cost
after_copy = rss()
print(json.dumps({
    "transformer_mb": transformer_mb,
    "weights_mb_before": weights_before,
    "weights_mb_after": loaded.device_mb(),
    "rss_after_generation_mb": after_generation,
    "rss_after_edits_mb": after_edits,
    "edits_added_mb": after_edits - after_generation,
    "copy_added_mb": after_copy - after_edits,
    "edit_tensors": len(edit_tensors),
    "edit_tensors_shared": sum(t.data_ptr() in pointers for t in edit_tensors),
}))
"""


def test_an_edit_after_a_generation_adds_no_second_copy_of_the_weights(
    tmp_path: Path, hf_cache_for_memory: dict[str, str]
) -> None:
    pytest.importorskip("limner_flux", reason="measures the FLUX plugin's edit pipelines")
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path / "wide-flux")],
        capture_output=True,
        text=True,
        env=hf_cache_for_memory,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    print("\nedit memory:", json.dumps(figures, indent=1))
    transformer = figures["transformer_mb"]
    assert transformer > 80, "too small to tell a copy from noise"
    # Every tensor of both edit pipelines is one the loaded pipeline holds, and the measured
    # weights are the same before and after.
    assert figures["edit_tensors"] > 0
    assert figures["edit_tensors_shared"] == figures["edit_tensors"]
    assert figures["weights_mb_after"] == figures["weights_mb_before"]
    # The resident set: four edits add a small fraction of one transformer; a copy adds it.
    assert figures["edits_added_mb"] < 0.25 * transformer, figures
    assert figures["copy_added_mb"] > 0.8 * transformer, figures


@pytest.fixture
def hf_cache_for_memory(tmp_path: Path) -> dict[str, str]:
    import os

    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    for name in ("LIMNER_MODELS_DIR", "LIMNER_DEVICE", "LIMNER_DTYPE"):
        env.pop(name, None)
    return env
