"""What decoding costs, measured: the peak resident memory of a fresh process that embeds
hostile or large images, so that one request cannot cost memory in proportion to its size.

Each case runs in a subprocess, since a process's peak RSS only ever grows. The bounds hold
however fast the machine is: they follow from how many images may be decoded at once.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from limner import DEFAULT_LIMITS

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="ru_maxrss is in kilobytes on Linux only"
)

MB = 1024 * 1024

# Builds its images without ever holding their pixels, embeds them in one call through the
# fake backend, and prints how far the peak RSS grew during that call.
_SCRIPT = r"""
import dataclasses, json, resource, struct, sys, time, zlib

import limner
from limner.testing import FakeEmbeddingBackend, fake_embedding_spec


class SlowPrepare(FakeEmbeddingBackend):
    def prepare(self, image):
        time.sleep(0.25)  # holds the decoded image a while, as a large resize would
        return super().prepare(image)


def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def black_png(side, channels):
    colour_type = {3: 2, 4: 6}[channels]
    compressor = zlib.compressobj(9)
    row = b"\0" * (1 + side * channels)
    pixels = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def ico_around(inner):  # the directory says 16 x 16
    entry = struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(inner), 22)
    return struct.pack("<HHH", 0, 1, 1) + entry + inner


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


kind, count, side = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
item = ico_around(black_png(side, 4)) if kind == "ico" else black_png(side, 3)
registry = limner.Registry(entry_points=False)
registry.register(dataclasses.replace(fake_embedding_spec("fake/slow"), factory=SlowPrepare))
model = registry.embedder("fake/slow").blocking()
model.embed_images([black_png(8, 3)] * 8)  # load the model, start the threads
before = peak_mb()
try:
    model.embed_images([item] * count)
    outcome = "embedded"
except limner.InvalidInput as error:
    outcome = str(error)
print(json.dumps({"grew_mb": peak_mb() - before, "outcome": outcome, "bytes": len(item)}))
"""


def peak_growth(kind: str, count: int, side: int) -> dict[str, object]:
    """Run the script in a fresh interpreter; its report."""
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, kind, str(count), str(side)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def test_ico_bombs_cost_no_memory() -> None:
    # Each ICO is ~150 KB and says 16 x 16; the PNG inside is 6000 x 6000 RGBA, 144 MB once
    # decoded. Pillow decoded it while opening the ICO, before any size check: three of
    # them raised the peak by ~430 MB.
    report = peak_growth("ico", count=3, side=6000)
    assert isinstance(report["grew_mb"], float) and report["grew_mb"] < 48, report
    assert isinstance(report["bytes"], int) and report["bytes"] < 300_000
    assert "ICO images are not accepted" in str(report["outcome"])


def test_one_call_decodes_a_bounded_number_of_images_at_once() -> None:
    # 16 PNGs of 2500 x 2500, 25 MB each once decoded (Pillow keeps RGB in 4 bytes a pixel).
    # Decoded all at once they raised the peak by ~400 MB; four at a time cost about 100 MB.
    decoded_mb = 2500 * 2500 * 4 / MB
    report = peak_growth("png", count=16, side=2500)
    assert report["outcome"] == "embedded"
    at_once = DEFAULT_LIMITS.max_concurrent_decodes
    assert isinstance(report["grew_mb"], float)
    assert report["grew_mb"] < (at_once + 3) * decoded_mb, report
