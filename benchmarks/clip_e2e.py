"""End-to-end CLIP image embedding: limner against the plain transformers pipeline.

Writes seeded 640x480 JPEGs and a real-size random-weight ViT-B/32 (``CLIPConfig()``'s
defaults) to a temp dir, then embeds the same files in this process three ways:

(a) limner: ``ImageEmbedder.batch_embed_images`` through the registry, default dtype
    (bf16 on CPUs with native bf16; ``--dtype float32`` shows what preprocessing alone buys);
(b) plain transformers, batched: ``Image.open(p).convert("RGB")``, ``CLIPImageProcessor``,
    ``get_image_features`` in fp32;
(c) plain transformers, one image at a time.

Each is warmed up once and timed as the median of ``--repeats`` runs. The weights are random,
so every image's embedding shares one large common direction; agreement is also reported
after removing the mean embedding ("centred"), which is the number that can tell images apart.

    python benchmarks/clip_e2e.py --images 64 --repeats 3 --batch-size 32 [--dtype float32]
"""

from __future__ import annotations

import argparse
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
import limner_clip
from limner_clip._backend import ClipBackend

KEY = "openai/clip-vit-base-patch32"
Vectors = npt.NDArray[np.float32]


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
            output = model.get_image_features(pixel_values=pixels)
            features = output if isinstance(output, torch.Tensor) else output.pooler_output
            rows.append(torch.nn.functional.normalize(features, dim=-1).numpy())
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


def breakdown(embedder: limner.ImageEmbedder, paths: Sequence[Path], batch_size: int) -> None:
    """Where limner's time goes, one thread, no overlap: decode + prepare, then the model."""
    backend = embedder.backend
    start = time.perf_counter()
    prepared = [
        backend.prepare(
            limner.decode_image(str(p), kind=limner.InputKind.PATH, draft_size=backend.image_size)
        )
        for p in paths
    ]
    decode = time.perf_counter() - start
    start = time.perf_counter()
    for offset in range(0, len(prepared), batch_size):
        backend.embed_prepared(prepared[offset : offset + batch_size])
    model = time.perf_counter() - start
    n = len(paths)
    print(
        f"  limner stages (1 thread): decode+prepare {1000 * decode / n:.1f} ms/img, "
        f"model {1000 * model / n:.1f} ms/img"
    )


def plain_breakdown(model: Any, processor: Any, paths: Sequence[Path], batch_size: int) -> None:
    start = time.perf_counter()
    batches = []
    for offset in range(0, len(paths), batch_size):
        images = [Image.open(p).convert("RGB") for p in paths[offset : offset + batch_size]]
        batches.append(processor(images=images, return_tensors="pt")["pixel_values"])
    preprocess = time.perf_counter() - start
    start = time.perf_counter()
    with torch.inference_mode():
        for pixels in batches:
            model.get_image_features(pixel_values=pixels)
    compute = time.perf_counter() - start
    n = len(paths)
    print(
        f"  plain stages:             open+process {1000 * preprocess / n:.1f} ms/img, "
        f"model {1000 * compute / n:.1f} ms/img"
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
        model = CLIPModel.from_pretrained(weights)  # in eval mode already

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
        print(
            f"limner on {backend.device} in {backend.dtype}, transformers on cpu in float32; "
            f"torch threads {torch.get_num_threads()}; {n} images 640x480; "
            f"img/s as median (best) of {args.repeats}"
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
        print("where the time goes:")
        breakdown(embedder, paths, limner_clip.specs()[0].info.max_batch_size)
        plain_breakdown(model, processor, paths, args.batch_size)


if __name__ == "__main__":
    main()
