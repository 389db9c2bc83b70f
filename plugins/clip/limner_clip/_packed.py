"""bf16 CLIP on CPUs: the encoders' Linear layers with their weights packed for oneDNN once.

torch runs a bf16 ``nn.Linear`` on a CPU through oneDNN, which first reorders the weight
matrix into the blocked layout its AVX512-BF16 and AMX kernels read, on every call. Packing
each weight once at load and calling oneDNN's linear on it skips that copy: the real-size
ViT-B/32 vision tower ran 1.14-1.18x faster in batches of 32 on a Xeon with AMX, with
outputs identical there to ``nn.Linear``'s (the same kernels on the same numbers).

This is torch's own path for frozen bf16 graphs (inductor packs weights with the same two
operators). They are not public API: where a torch lacks them, or the CPU has no native
bf16, the layers stay plain ``nn.Linear``.

Imported only in ``load``: it imports torch.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from ._layers import replace_encoder_linears

__all__ = ["ROWS_HINT", "PackedLinear", "pack_encoders", "packing_available"]

_OPS = ("_reorder_linear_weight", "_linear_pointwise")
#: Rows (tokens) oneDNN is told to expect when it picks the packed layout: a full CPU batch
#: of 32 ViT-B/32 images is 1,600. Any number of rows runs on the packed weights.
ROWS_HINT = 1_600


def packing_available(flags: Collection[str], native_bf16: Collection[str]) -> bool:
    """Whether oneDNN's packed bf16 linear is worth using here: torch has the operators and
    oneDNN, and the CPU does bf16 natively (one of ``native_bf16`` is among ``flags``)."""
    mkldnn = torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
    if not (set(flags) & set(native_bf16)) or not mkldnn:
        return False
    return all(hasattr(torch.ops.mkldnn, op) for op in _OPS)


class PackedLinear(torch.nn.Module):
    """``y = x @ W.T + b`` on oneDNN, with ``W`` packed once into its blocked layout."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach()
        self._packed: torch.Tensor = torch.ops.mkldnn._reorder_linear_weight(weight, ROWS_HINT)
        self.bias = linear.bias
        self.out_features = weight.shape[0]
        #: Bytes of the packed weights, which torch's parameters and buffers do not hold.
        self.packed_bytes = weight.numel() * weight.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.detach()
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            x.contiguous(), self._packed, bias, "none", [], ""
        )
        return out


def pack_encoders(model: torch.nn.Module) -> int:
    """Replace every ``nn.Linear`` of CLIP's two transformer stacks with a
    :class:`PackedLinear`, in place; how many were replaced."""
    return replace_encoder_linears(model, PackedLinear)
