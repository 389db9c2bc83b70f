"""A tiny model's command as the user waits for it: `limner generate` and `limner embed`, each
a fresh process from start to exit, against a plain script doing the same work with diffusers
or transformers directly (import, ``from_pretrained`` of the same snapshot, one call, write
the result). Runs alternate, so a slow spell on a shared machine hits both alike; medians and
the ratio are printed, then where a limner command's time goes (one more run of each, with
``-X importtime``: the imports, and the load and the call as the command reports them).

    python benchmarks/cli_startup.py --repeats 5

On tiny models the model's work is nothing: what is left is Python, imports and the
command's own overhead, which is what this measures. Goal: limner <= 1.1x the plain script.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from clip_e2e import machine  # benchmarks/ is on sys.path

from limner import Registry

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a lighthouse at dusk"

PLAIN_GENERATE = """
import sys
import diffusers
import torch
pipeline = diffusers.FluxPipeline.from_pretrained(sys.argv[1], dtype=torch.float32)
pipeline.set_progress_bar_config(disable=True)
image = pipeline(
    sys.argv[2], width=64, height=64, num_inference_steps=4, guidance_scale=0.0,
    generator=torch.Generator("cpu").manual_seed(7), max_sequence_length=256,
).images[0]
image.save(sys.argv[3])
print(sys.argv[3])
"""

PLAIN_EMBED = """
import sys
import numpy as np
import torch
import transformers
from PIL import Image
model = transformers.CLIPModel.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
processor = transformers.CLIPImageProcessor.from_pretrained(sys.argv[1])
images = [Image.open(path).convert("RGB") for path in sys.argv[2:]]
with torch.inference_mode():
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    output = model.get_image_features(pixel_values=pixels)
    features = getattr(output, "pooler_output", output)
    features = torch.nn.functional.normalize(features, dim=-1).numpy()
for path, row in zip(sys.argv[2:], features):
    print(path + "\\t" + " ".join(f"{x:.6g}" for x in row.tolist()))
"""


def snapshot(key: str) -> str:
    """The model's snapshot in the Hugging Face cache, where limner's run put it."""
    from huggingface_hub import snapshot_download

    settings = Registry().settings(key)
    return str(snapshot_download(settings.weights, revision=settings.revision))


def timed(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{command[:4]} failed:\n{result.stderr[-2000:]}")
    return seconds, result.stderr


def breakdown(command: list[str], env: dict[str, str], total: float) -> str:
    """Where a command's time goes: its imports (cumulative, as ``-X importtime`` reports
    them, which adds some overhead of its own) and what it says of its load and call."""
    _, stderr = timed([command[0], "-X", "importtime", *command[1:]], env)
    imports: dict[str, float] = {}
    for line in stderr.splitlines():
        found = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)$", line)
        if found and len(found.group(2)) == 1:  # imported at the top level of the process
            package = found.group(3).split(".")[0]
            imports[package] = imports.get(package, 0.0) + int(found.group(1)) / 1e6
    told = re.search(r"loading (\d+\.\d) s, generating (\d+\.\d) s", stderr)
    heavy = ("torch", "transformers", "diffusers", "limner", "limner_flux", "limner_clip")
    parts = [f"{name} {imports[name]:.2f} s" for name in heavy if imports.get(name, 0) >= 0.01]
    said = f"; the command says: loading {told[1]} s, generating {told[2]} s" if told else ""
    return f"    median {total:.2f} s; imports: {', '.join(parts)}{said}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(machine("float32"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    images = [str(path) for path in sorted((ROOT / "examples").glob("*.[jp]*g"))]
    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "out.png")
        python = sys.executable
        cases = {
            "generate, limner/tiny-flux, 64x64, 4 steps": (
                [python, "-m", "limner", "generate", PROMPT, "-m", "limner/tiny-flux",
                 "--width", "64", "--height", "64", "--steps", "4", "--seed", "7", "-o", out],
                [python, "-c", PLAIN_GENERATE, "limner/tiny-flux", PROMPT, out],
            ),
            f"embed, limner/tiny-clip, {len(images)} images": (
                [python, "-m", "limner", "embed", *images, "-m", "limner/tiny-clip"],
                [python, "-c", PLAIN_EMBED, "limner/tiny-clip", *images],
            ),
        }  # fmt: skip
        for name, (ours, plain) in cases.items():
            timed(ours, env)  # writes the tiny model, and what later runs find cached
            plain[3] = snapshot(plain[3])  # the key, as the snapshot it names
            times: dict[str, list[float]] = {"limner": [], "plain": []}
            for _ in range(args.repeats):
                times["limner"].append(timed(ours, env)[0])
                times["plain"].append(timed(plain, env)[0])
            limner, direct = (statistics.median(times[k]) for k in ("limner", "plain"))
            print(
                f"{name}: limner {limner:.2f} s, plain script {direct:.2f} s, "
                f"ratio {limner / direct:.2f}x (runs: "
                + ", ".join(f"{a:.1f}/{b:.1f}" for a, b in zip(times["limner"], times["plain"]))
                + ")"
            )
            print(breakdown(ours, env, limner))


if __name__ == "__main__":
    main()
