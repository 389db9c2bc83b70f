"""int8 CLIP on x86 CPUs: the encoders' Linear layers as int8 matrix products.

Each ``nn.Linear`` inside the vision and text encoders becomes an :class:`Int8Linear`:
weights rounded to int8 once, one scale per output channel; activations rounded to 8 bits on
every call with one scale and one offset per token (row), so a token with a wide range does
not coarsen every other token's steps. The product is fbgemm's int8 linear (VNNI where the
CPU has it), which rounds its input, multiplies and scales back in fused kernels.

Left in float32: the patch and token embeddings, the layer norms, attention's softmax, and
the two projections into the shared space. Rounding the projections' inputs costs the most
agreement for the least time: they are a thousandth of the compute.

Why not ``torch.ao.quantization.quantize_dynamic`` as it is: it rounds a whole batch's
activations with one scale, to 7 bits, and on a real-size random-weight ViT-B/32 its vectors
agreed with fp32 to a centred cosine of only 0.87 (0.91 leaving the projections in fp32),
against 0.98 for this module, which costs about 20% more time.

Imported only in ``load``: it imports torch.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ._layers import replace_encoder_linears

__all__ = ["INT8_ENGINES", "Int8Linear", "int8_available", "quantize_encoders"]

#: torch's quantized engines whose linear takes per-channel int8 weights (fbgemm's).
INT8_ENGINES = frozenset({"x86", "fbgemm"})
_OPS = ("linear_prepack", "linear_with_input_q_dq_qweight_dq_output_fp32")


def int8_available() -> bool:
    """Whether this torch has the fbgemm int8 linear :class:`Int8Linear` runs on: x86 builds
    do (torch 2.4 to 2.13 at least). torch deprecates its quantized tensors for torchao; a
    release without them makes ``auto`` fall back to float32."""
    if torch.backends.quantized.engine not in INT8_ENGINES:
        return False
    return all(hasattr(torch.ops.quantized, op) for op in _OPS)


class Int8Linear(torch.nn.Module):
    """``y = x @ W.T + b`` with W in int8 per output channel and x in 8 bits per row.

    A row ``x`` is shifted by its midpoint ``m = (max + min) / 2`` and divided by its half
    range ``h = (max - min) / 2``, so every row spans exactly -1..1: fbgemm's one scale for
    the whole input is then one scale per row. ``y = h * (Wq @ x') + m * rowsum(Wq) + b``.

    ``exact_bytes``: with VNNI the 8-bit products are summed in int32 exactly; without it
    fbgemm sums pairs in int16, which can saturate, so its inputs get 7 bits instead.
    """

    correction: torch.Tensor  # (2, out): each channel's weight sum, and its bias

    def __init__(self, linear: torch.nn.Linear, *, exact_bytes: bool = True) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        channels = weight.shape[0]
        scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127
        zero = torch.zeros(channels, dtype=torch.long)
        with warnings.catch_warnings():  # "quantized tensors are deprecated": see above
            warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)
            rounded = torch.quantize_per_channel(weight, scale.double(), zero, 0, torch.qint8)
        self._packed: Any = torch.ops.quantized.linear_prepack(rounded, None)
        self.out_features = channels
        self.reduce_range = not exact_bytes
        #: Bytes the packed weights hold outside torch's parameters and buffers: the int8
        #: weights, and a scale, a zero point and a column sum per channel.
        self.packed_bytes = weight.numel() + 12 * channels
        # The midpoint term and the bias in one rank-2 update: [m, 1] @ [rowsum; b].
        bias = torch.zeros(channels) if linear.bias is None else linear.bias.detach().float()
        self.register_buffer("correction", torch.stack([rounded.dequantize().sum(1), bias]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).float()
        # amax and amin: two vectorised passes, several times faster than one aminmax
        high, low = rows.amax(dim=1, keepdim=True), rows.amin(dim=1, keepdim=True)
        middle = (high + low) * 0.5
        half = (high - low).clamp_min_(1e-12) * 0.5
        inverse = half.reciprocal()
        normalised = torch.addcmul(-middle * inverse, rows, inverse)
        # The rows span -1..1: rounded with the scale and zero point that map that span onto
        # 0..254 (0..126 in 7 bits), with no pass to find the range.
        levels = 63 if self.reduce_range else 127
        out: torch.Tensor = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            normalised, 1 / levels, levels, self._packed
        )
        out.mul_(half)
        out.addmm_(torch.cat([middle, torch.ones_like(middle)], dim=1), self.correction)
        return out.reshape(*shape[:-1], self.out_features)


def quantize_encoders(model: torch.nn.Module, *, exact_bytes: bool = True) -> int:
    """Replace every ``nn.Linear`` of CLIP's two transformer stacks with an
    :class:`Int8Linear`, in place; how many were replaced. The float weights they held are
    dropped."""
    return replace_encoder_linears(model, lambda layer: Int8Linear(layer, exact_bytes=exact_bytes))
