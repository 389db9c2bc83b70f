"""End-to-end CLIP image embedding: limner against the plain transformers pipeline.

Writes seeded 640x480 JPEGs and a real-size random-weight ViT-B/32 (``CLIPConfig()``'s
defaults) to a temp dir, then embeds the same files in this process three ways:

(a) limner: ``ImageEmbedder.batch_embed_images`` through the registry, default dtype
    (what ``auto`` picks from the CPU's flags: bf16 with native bf16, int8 with AVX512-VNNI,
    else fp32; ``--dtype float32`` shows what preprocessing alone buys);
(b) plain transformers, batched: ``Image.open(p).convert("RGB")``, ``CLIPImageProcessor``,
    ``get_image_features`` in fp32 (``--plain-dtype bfloat16`` for bf16);
(c) plain transformers, one image at a time.

Each is warmed up once and timed as the median of ``--repeats`` runs, interleaved. The
weights are random, so every image's embedding shares one large common direction; agreement
is also reported after removing the mean embedding ("centred"), which is the number that can
tell images apart. The stage breakdown runs both model stages at the same batch size; the
model stages are the same computation when limner runs in the plain path's dtype.

    python benchmarks/clip_e2e.py --images 64 --repeats 3 --batch-size 32 [--dtype float32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

import limner
import limner.inputs
import limner_clip
from limner_clip._backend import BF16_FLAGS, VNNI_FLAGS, ClipBackend, clip_precision, cpu_flags

KEY = "openai/clip-vit-base-patch32"
Vectors = npt.NDArray[np.float32]


def machine(precision: str) -> str:
    """The CPU, the flags that decide CLIP's precision, threads and load, and the precision
    a run uses against what ``auto`` picks here."""
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    name = line.partition(":")[2].strip()
                    break
    except OSError:
        pass
    flags = cpu_flags()
    shown = sorted(flags & (BF16_FLAGS | VNNI_FLAGS | {"avx512f", "avx2", "avx_vnni", "amx_int8"}))
    auto = clip_precision(torch.device("cpu"))
    return (
        f"machine: {name}, {os.cpu_count()} CPUs, flags {' '.join(shown) or 'none of note'}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; load "
        f"{os.getloadavg()[0]:.1f}; precision {precision} (auto here: {auto})"
    )


def write_images(directory: Path, count: int, seed: int = 0) -> list[Path]:
    """Photo-like JPEGs: smooth random colour fields with grain, 640x480, quality 90."""
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((640, 480), Image.Resampling.BICUBIC))
        grain = rng.normal(0, 12, field.shape)
        pixels = np.clip(field + grain, 0, 255).astype(np.uint8)
        path = directory / f"image-{index:03d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def write_model(directory: Path, seed: int = 0) -> None:
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig()).save_pretrained(directory)
    CLIPImageProcessor().save_pretrained(directory)


def plain_batched(model: Any, processor: Any, paths: Sequence[Path], batch_size: int) -> Vectors:
    """What a transformers user writes: open, convert, process, embed, normalise."""
    rows = []
    for start in range(0, len(paths), batch_size):
        images = [Image.open(p).convert("RGB") for p in paths[start : start + batch_size]]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            output = model.get_image_features(pixel_values=pixels.to(model.dtype))
            features = output if isinstance(output, torch.Tensor) else output.pooler_output
            rows.append(torch.nn.functional.normalize(features.float(), dim=-1).numpy())
    return np.concatenate(rows)


def timed(runs: dict[str, Callable[[], Vectors]], repeats: int) -> dict[str, list[float]]:
    """Seconds per run of each path after one warm-up run each. Repeats are interleaved
    (a, b, c, a, b, c, ...) so a slow spell on a shared machine does not land on one path."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def agreement(ours: Vectors, reference: Vectors) -> tuple[Vectors, Vectors]:
    """Per-image cosine, raw and with the reference set's mean embedding removed."""
    raw = np.sum(ours * reference, axis=1)
    mean = reference.mean(axis=0)
    a, b = ours - mean, reference - mean
    centred = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return raw, centred


def stages(
    embedder: limner.ImageEmbedder,
    model: Any,
    processor: Any,
    paths: Sequence[Path],
    batch_size: int,
    repeats: int,
) -> None:
    """Where the time goes, one thread, no overlap: preprocessing, then the model stage on
    the same batches, limner's and plain's runs interleaved; medians, ms per image."""
    backend = embedder.backend
    n = len(paths)

    def limner_prepare() -> list[Any]:
        return [
            backend.prepare(
                limner.inputs.decode_image(
                    str(p), kind=limner.inputs.InputKind.PATH, draft_size=backend.image_size
                )
            )
            for p in paths
        ]

    def plain_prepare() -> list[Any]:
        return [
            processor(
                images=[Image.open(p).convert("RGB") for p in paths[i : i + batch_size]],
                return_tensors="pt",
            )["pixel_values"].to(model.dtype)
            for i in range(0, n, batch_size)
        ]

    prepared, batches = limner_prepare(), plain_prepare()

    def limner_model() -> None:
        for offset in range(0, n, batch_size):
            backend.embed_prepared(prepared[offset : offset + batch_size])

    def plain_model() -> None:
        with torch.inference_mode():
            for pixels in batches:
                model.get_image_features(pixel_values=pixels)

    runs: dict[str, Callable[[], object]] = {
        "limner prepare": limner_prepare,
        "plain prepare": plain_prepare,
        "limner model": limner_model,
        "plain model": plain_model,
    }
    times = timed(runs, repeats)  # type: ignore[arg-type]
    ms = {name: 1000 * statistics.median(values) / n for name, values in times.items()}
    print(
        f"  limner (1 thread): decode+prepare {ms['limner prepare']:.1f} ms/img, "
        f"model {ms['limner model']:.1f} ms/img ({backend.dtype})"  # type: ignore[attr-defined]
    )
    print(
        f"  plain:             open+process   {ms['plain prepare']:.1f} ms/img, "
        f"model {ms['plain model']:.1f} ms/img ({str(model.dtype).removeprefix('torch.')})"
    )
    per_run = ", ".join(
        f"{p / m:.2f}" for m, p in zip(times["limner model"], times["plain model"], strict=True)
    )
    print(
        f"  model stage, plain time / limner time: "
        f"{ms['plain model'] / ms['limner model']:.2f}x (runs: {per_run})"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64, help="JPEGs to embed (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path (default 3)")
    parser.add_argument(
        "--batch-size", type=int, default=32, help="batch of the plain path (default 32)"
    )
    parser.add_argument(
        "--dtype", default="auto", help="limner's dtype: auto (default), float32, bfloat16, ..."
    )
    parser.add_argument(
        "--plain-dtype", default="float32", help="the plain path's dtype (default float32)"
    )
    parser.add_argument("--no-naive", action="store_true", help="skip the one-at-a-time path")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="limner-clip-bench-") as temp:
        root = Path(temp)
        (root / "images").mkdir()
        paths = write_images(root / "images", args.images)
        weights = root / "clip-vit-b-32-random"
        write_model(weights)

        registry = limner.Registry(entry_points=False)
        registry.register_plugin(limner_clip)
        registry.configure(KEY, local_dir=weights, dtype=args.dtype)
        embedder = registry.embedder(KEY)
        backend = embedder.backend
        assert isinstance(backend, ClipBackend)

        def run_limner() -> Vectors:
            return anyio.run(embedder.batch_embed_images, paths)

        processor = CLIPImageProcessor.from_pretrained(weights)
        plain_dtype = getattr(torch, args.plain_dtype)
        model = CLIPModel.from_pretrained(weights, dtype=plain_dtype)  # in eval mode already

        def run_plain() -> Vectors:
            return plain_batched(model, processor, paths, args.batch_size)

        def run_naive() -> Vectors:
            return plain_batched(model, processor, paths, 1)

        n = len(paths)
        runs = {"limner": run_limner, "plain": run_plain}
        if not args.no_naive:
            runs["naive"] = run_naive
        times = timed(runs, args.repeats)
        ours, reference = run_limner(), run_plain()
        print(machine(str(backend.dtype)))
        print(
            f"limner on {backend.device} in {backend.dtype}, transformers on cpu in "
            f"{args.plain_dtype}; {n} images 640x480; img/s as median (best) of {args.repeats}"
        )
        labels = {
            "limner": "(a) limner",
            "plain": f"(b) transformers, batch {args.batch_size}",
            "naive": "(c) transformers, one by one",
        }
        median = {name: statistics.median(values) for name, values in times.items()}
        best = {name: min(values) for name, values in times.items()}
        for name in times:
            print(f"{labels[name]:<30} {n / median[name]:7.1f} ({n / best[name]:.1f})")
        for name, label in (("plain", "plain batched"), ("naive", "naive")):
            if name in times:
                print(
                    f"limner / {label + ':':<14} {median[name] / median['limner']:.2f}x "
                    f"(best {best[name] / best['limner']:.2f}x)"
                )
        raw, centred = agreement(ours, reference)
        print(f"cosine limner vs plain: min {raw.min():.5f}, mean {raw.mean():.5f}")
        print(f"centred cosine:         min {centred.min():.4f}, mean {centred.mean():.4f}")
        print(f"where the time goes (both model stages in batches of {args.batch_size}):")
        stages(embedder, model, processor, paths, args.batch_size, args.repeats)


if __name__ == "__main__":
    main()
