"""A CLIP worker's memory footprint, estimated from the numbers of its config; no torch.

The same arithmetic serves the estimates declared before loading (``ModelInfo.memory_mb``)
and the working-memory part of the footprint reported after loading, which cannot be
measured until a batch has run.
"""

from __future__ import annotations

__all__ = ["MIB", "weights_mb", "working_mb"]

MIB = 2**20


def weights_mb(parameters: int, weight_bytes: int) -> float:
    return parameters * weight_bytes / MIB


def working_mb(
    *,
    image_size: int,
    patch_size: int,
    hidden_size: int,
    heads: int,
    batch: int,
    activation_bytes: int,
) -> float:
    """Peak activations of one image batch through the vision tower, in MiB.

    Per image, inference keeps about 8 bytes per input pixel channel alive (the uint8 batch,
    its fp32 normalisation, the cast copy) and, inside one layer, about 28 hidden-sized
    vectors per token plus two token x token attention maps per head. Measured peaks (RSS
    during one bf16 batch on CPU) were within 15% of this for ViT-B/32, B/16 and L/14.
    """
    tokens = (image_size // patch_size) ** 2 + 1
    per_token = 28 * hidden_size + 2 * heads * tokens
    per_image = 8 * 3 * image_size**2 + activation_bytes * tokens * per_token
    return batch * per_image / MIB
