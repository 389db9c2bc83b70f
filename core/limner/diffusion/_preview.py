"""Step previews: a linear map from latent channels to RGB, fitted to the model's own VAE.

Decoding the latents with the VAE every step would cost about as much as a denoising step;
a 16 x 3 matrix product costs well under a millisecond even for a 1024 px image's 128 x 128
latents. The matrix is not a table copied from elsewhere: it is measured once, on first use,
from the loaded VAE's response to flat latents (a flat latent decodes to a flat colour), so it
fits whichever checkpoint is loaded, the tiny one included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

__all__ = ["LatentRGB", "fit_latent_rgb"]

#: Latents are probed at +-1: the scale of the normalised latents the transformer sees.
_STEP = 1.0
#: Side of the flat latent probes; the decoder's zero padding colours the border, so only the
#: centre half of the decoded image is read.
_PROBE_SIDE = 8


@dataclass(frozen=True)
class LatentRGB:
    """``rgb = latent @ factors + bias``, in the decoder's [-1, 1] range."""

    factors: torch.Tensor  # (channels, 3) float32
    bias: torch.Tensor  # (3,) float32

    def image(self, latents: torch.Tensor) -> Image.Image:
        """The first latent of a ``(batch, channels, h, w)`` batch as an ``h`` x ``w`` image."""
        import torch

        latent = latents[0].detach().to(device=self.factors.device, dtype=torch.float32)
        rgb = torch.einsum("chw,cr->hwr", latent, self.factors) + self.bias
        pixels = ((rgb.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
        return Image.fromarray(np.ascontiguousarray(pixels.cpu().numpy()), "RGB")


def fit_latent_rgb(vae: Any, device: torch.device) -> LatentRGB:
    """Measure the VAE decoder's colour response to each latent channel.

    Decodes one batch of ``2 * channels + 1`` small flat latents (zero, and +-1 along each
    channel, in the normalised space the transformer works in) and takes central differences
    of their mean colours: the decoder's slope around the average latent. ``vae`` is a
    diffusers ``AutoencoderKL``.
    """
    import torch

    channels = int(vae.config.latent_channels)
    scaling = float(vae.config.scaling_factor)
    shift = float(vae.config.shift_factor or 0.0)
    probes = torch.zeros(2 * channels + 1, channels, _PROBE_SIDE, _PROBE_SIDE)
    for channel in range(channels):
        probes[1 + 2 * channel, channel] = _STEP
        probes[2 + 2 * channel, channel] = -_STEP
    with torch.inference_mode():
        decoded = vae.decode(
            (probes / scaling + shift).to(device=device, dtype=vae.dtype), return_dict=False
        )[0].float()
    side = decoded.shape[-1]
    centre = decoded[..., side // 4 : side - side // 4, side // 4 : side - side // 4]
    colours = centre.mean(dim=(2, 3)).cpu()  # (2 * channels + 1, 3)
    factors = (colours[1::2] - colours[2::2]) / (2 * _STEP)
    return LatentRGB(factors=factors.to(device), bias=colours[0].to(device))
