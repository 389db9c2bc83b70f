"""Switching LoRA adapters against loading the model: what a request with another set of
adapters costs on a model that is already loaded, as limner does it (``LoadedAdapters``: a
first use loads the file into the shared transformer, later ones only activate), in the same
run as the model's own load.

1. The tiny FLUX and SD3.5 through ``DiffusersBackend``: the model's load (warm, after a first
   one in the process), an adapter's first use (file to activated), a switch between loaded
   sets, and whole generations alternating four sets against the same set every time.
2. FLUX.1's and SD3.5 Large's transformers at their real widths (random weights, bf16 on disk,
   fp32 in memory as on a CPU), cut to a few blocks so that they fit a shared machine (the
   real ones have 19 + 38 and 38): the transformer's ``from_pretrained`` against a rank-16
   adapter's first use and a switch, through the same ``LoadedAdapters``. Both the load and an
   adapter's size grow with depth, so their ratio holds for the whole model; a switch only
   sets attributes.

    HF_HUB_OFFLINE=1 python benchmarks/lora_switch.py --repeats 5

Medians of ``--repeats`` runs; ratios are what to compare (absolute times on a shared
machine are noise).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from clip_e2e import machine  # benchmarks/ is on sys.path

from limner import ImageGenerationConfig, Registry
from limner.diffusion import LoadedPipeline
from limner.diffusion.testing import write_tiny_lora
from limner.plugin import find_lora

SETS: list[list[tuple[str, float]]] = [
    [],
    [("ink", 0.8)],
    [("oil", 1.0)],
    [("ink", 0.8), ("oil", 0.5)],
]


def median_ms(
    run: Callable[[], object], repeats: int, *, before: Callable[[], object] = lambda: None
) -> float:
    """The median time of ``run``, ``before`` untimed ahead of each."""
    times = []
    for _ in range(repeats):
        before()
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def row(label: str, ms: float, base_ms: float) -> None:
    print(f"  {label:52s} {ms:10.2f} ms  {ms / base_ms:8.4f} x the load")


def use(loaded: LoadedPipeline, folder: Path, chosen: list[tuple[str, float]], key: str) -> None:
    """Activate ``chosen`` as a call would, with nothing to run inside."""
    wanted = []
    for name, scale in chosen:
        adapter = find_lora([str(folder)], name)
        assert adapter is not None
        wanted.append((adapter, scale))
    with loaded.adapters.use(loaded, wanted, key=key):
        pass


def tiny(key: str, repeats: int, scratch: Path) -> None:
    import limner_flux
    import limner_sd35

    folder = scratch / key.replace("/", "-")
    folder.mkdir()
    registry = Registry(entry_points=False, lora_dirs=[folder])
    registry.register_plugin(limner_flux)
    registry.register_plugin(limner_sd35)
    backend: Any = registry.generator(key).backend
    write_tiny_lora(backend.tiny, folder / "ink", rank=4, seed=1)
    write_tiny_lora(backend.tiny, folder / "oil.safetensors", rank=8, seed=2)
    backend.load()  # imports and the first load: not what a swap would cost
    backend.unload()
    load = median_ms(backend.load, repeats, before=backend.unload)
    loaded = backend._require_loaded()
    print(f"{key}: the model's load (warm) {load:.1f} ms")
    row(
        "an adapter's first use (file to active)",
        median_ms(
            lambda: use(loaded, folder, [("ink", 1.0)], key),
            repeats,
            before=lambda: backend.drop_caches(["ink", "oil"]),
        ),
        load,
    )
    use(loaded, folder, [("ink", 1.0), ("oil", 1.0)], key)  # both loaded from here on
    turn = iter(range(10**9))
    row(
        "a switch between loaded sets",
        median_ms(lambda: use(loaded, folder, SETS[next(turn) % len(SETS)], key), repeats * 4),
        load,
    )
    row(
        "the same set again",
        median_ms(lambda: use(loaded, folder, SETS[3], key), repeats * 4),
        load,
    )

    def generate(chosen: list[tuple[str, float]]) -> float:
        config = backend.resolve_config(
            ImageGenerationConfig(width=64, height=64, steps=4, seed=7, loras=chosen)
        )
        started = time.perf_counter()
        backend.generate("a lighthouse", config, on_step=lambda _: None)
        return time.perf_counter() - started

    # Interleaved, so that a slow spell of the machine hits both alike: a generation with
    # the set the one before it had, then one with another set (a switch before it).
    same, switched = [], []
    for index in range(repeats * 4):
        generate(SETS[3])
        same.append(generate(SETS[3]))
        switched.append(generate(SETS[index % 3]))
    same_ms, switched_ms = (statistics.median(times) * 1e3 for times in (same, switched))
    print(
        f"  generations (64x64, 4 steps), interleaved: after a switch {switched_ms:.1f} ms, "
        f"with the set of the one before {same_ms:.1f} ms: {switched_ms / same_ms:.3f}x"
    )
    backend.unload()


# FLUX.1 and SD3.5 Large at their real widths, a few blocks deep.
REAL = {
    "FLUX.1 (3072 wide, 1 double + 2 single blocks of 19 + 38)": (
        "FluxTransformer2DModel",
        "FluxPipeline",
        {
            "patch_size": 1,
            "in_channels": 64,
            "num_layers": 1,
            "num_single_layers": 2,
            "attention_head_dim": 128,
            "num_attention_heads": 24,
            "joint_attention_dim": 4096,
            "pooled_projection_dim": 768,
            "guidance_embeds": True,
            "axes_dims_rope": (16, 56, 56),
        },
    ),
    "SD3.5 Large (2432 wide, 3 blocks of 38)": (
        "SD3Transformer2DModel",
        "StableDiffusion3Pipeline",
        {
            "sample_size": 128,
            "patch_size": 2,
            "in_channels": 16,
            "num_layers": 3,
            "attention_head_dim": 64,
            "num_attention_heads": 38,
            "joint_attention_dim": 4096,
            "caption_projection_dim": 2432,
            "pooled_projection_dim": 2048,
            "out_channels": 16,
            "pos_embed_max_size": 192,
            "qk_norm": "rms_norm",
        },
    ),
}
TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
]


def real_width(label: str, repeats: int, scratch: Path) -> None:
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    diffusers: Any = importlib.import_module("diffusers")  # untyped constructors
    model_class, pipeline_class, config = REAL[label]
    folder = scratch / model_class
    torch.manual_seed(0)
    model = getattr(diffusers, model_class)(**config).to(torch.bfloat16)
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder / "transformer")
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        model.add_adapter(
            LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False),
            adapter_name=name,
        )
        getattr(diffusers, pipeline_class).save_lora_weights(
            folder / "loras",
            transformer_lora_layers=get_peft_model_state_dict(model, adapter_name=name),
            weight_name=f"{name}.safetensors",
        )
    del model
    gc.collect()
    transformer_class = getattr(diffusers, model_class)

    def load() -> Any:
        return transformer_class.from_pretrained(folder / "transformer", torch_dtype=torch.float32)

    load()  # the first read of the files
    base = median_ms(lambda: gc.collect() or load(), repeats)
    size = (folder / "loras" / "a.safetensors").stat().st_size / 2**20
    print(
        f"{label}: {parameters / 1e6:.0f} M parameters; the transformer's from_pretrained "
        f"(fp32) {base:.0f} ms; a rank-16 adapter file {size:.1f} MiB"
    )
    transformer = load()
    # The pipeline around it, as limner holds it: only the transformer takes adapters.
    shell = getattr(diffusers, pipeline_class)(
        **{
            name: None
            for name in getattr(diffusers, pipeline_class)._get_signature_keys(
                getattr(diffusers, pipeline_class)
            )[0]
        }
        | {"transformer": transformer, "scheduler": diffusers.FlowMatchEulerDiscreteScheduler()}
    )
    loaded = LoadedPipeline(
        pipeline=shell, device=torch.device("cpu"), dtype=torch.float32, offload=False
    )
    loras = folder / "loras"
    row(
        "an adapter's first use (file to active)",
        median_ms(
            lambda: use(loaded, loras, [("a", 1.0)], label),
            repeats,
            before=lambda: loaded.adapters.drop(loaded, ["a", "b"]),
        ),
        base,
    )
    use(loaded, loras, [("a", 1.0), ("b", 1.0)], label)
    sets = [[("a", 1.0)], [("b", 1.0)], [("a", 0.7), ("b", 0.5)], []]
    turn = iter(range(10**9))
    row(
        "a switch between loaded sets",
        median_ms(lambda: use(loaded, loras, sets[next(turn) % len(sets)], label), repeats * 4),
        base,
    )
    print(f"  the adapters held: {loaded.adapters.memory_mb:.1f} MB in fp32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-real", action="store_true", help="the tiny models only")
    arguments = parser.parse_args()
    print(machine("float32"))
    scratch = Path(tempfile.mkdtemp(prefix="lora-switch-"))
    try:
        for key in ("limner/tiny-flux", "limner/tiny-sd35"):
            tiny(key, arguments.repeats, scratch)
        if not arguments.no_real:
            for label in REAL:
                real_width(label, arguments.repeats, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
