"""Swapping the Linear layers of CLIP's two transformer stacks for faster equivalents.

int8 (``_int8``) and packed bf16 (``_packed``) both replace the same layers, keep their
weights outside torch's parameters and buffers, and say how many bytes those take.

Imported only in ``load``: it imports torch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["bytes_outside_parameters", "replace_encoder_linears"]


def replace_encoder_linears(
    model: torch.nn.Module, replacement: Callable[[torch.nn.Linear], torch.nn.Module]
) -> int:
    """Replace every ``nn.Linear`` under a module named ``encoder`` (CLIP's vision and text
    stacks; not the projections into the shared space) with ``replacement(layer)``, in
    place; how many were replaced."""
    replaced = 0
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] != "encoder":
            continue
        for parent in list(module.modules()):
            for child_name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear:
                    setattr(parent, child_name, replacement(child))
                    replaced += 1
    return replaced


def bytes_outside_parameters(model: torch.nn.Module) -> int:
    """Bytes of the weights the replaced layers hold (their ``packed_bytes``), which the
    model's parameters and buffers miss."""
    return sum(getattr(module, "packed_bytes", 0) for module in model.modules())
