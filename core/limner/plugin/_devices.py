"""Device, dtype and flag settings for plugins: parsed without torch, resolved with it.

``parse_*`` validate what a host wrote (``ModelSettings.device`` and ``dtype``, an option)
when a backend is constructed, so a bad setting fails before any weights or torch load.
``resolve_*`` turn the parsed values into torch objects in ``load``; what ``auto`` means for
the dtype is the plugin's policy, passed in. :class:`Placement` holds a backend's two parsed
settings and resolves them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from limner.errors import InvalidInput, ModelLoadError

if TYPE_CHECKING:
    import torch

    from limner._registry._spec import ModelSettings

__all__ = [
    "FALSE_STRINGS",
    "TRUE_STRINGS",
    "DtypePolicy",
    "Placement",
    "parse_device",
    "parse_dtype",
    "parse_flag",
    "resolve_device",
    "resolve_dtype",
]

#: The strings an environment or a config file gives for a true or a false flag.
TRUE_STRINGS = frozenset({"1", "true", "yes", "on"})
FALSE_STRINGS = frozenset({"0", "false", "no", "off", ""})

_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}
_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")

DtypePolicy = Callable[["torch.device"], str]
"""What ``dtype="auto"`` means on a device: ``"float32"``, ``"bfloat16"`` or ``"float16"``."""


def parse_device(value: str) -> str | None:
    """Validate a device setting without importing torch; ``None`` means auto."""
    device = value.strip().lower()
    if device == "auto":
        return None
    if not _DEVICE.match(device):
        raise InvalidInput(
            f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {value!r}",
            field="device",
        )
    return device


def parse_dtype(value: str) -> str | None:
    """Validate a dtype setting without importing torch; ``None`` means auto."""
    dtype = value.strip().lower()
    if dtype == "auto":
        return None
    if dtype not in _DTYPES:
        raise InvalidInput(
            "dtype must be 'auto', 'bfloat16' (bf16), 'float16' (fp16) or 'float32' (fp32), "
            f"got {value!r}",
            field="dtype",
        )
    return _DTYPES[dtype]


def parse_flag(name: str, value: object) -> bool:
    """A boolean option, also from the strings an environment or a config file gives."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in TRUE_STRINGS | FALSE_STRINGS:
        return value.strip().lower() in TRUE_STRINGS
    raise InvalidInput(f"must be true or false, got {value!r}", field=name)


def resolve_device(requested: str | None) -> torch.device:
    """The torch device for a parsed setting: CUDA when there is one, else the CPU."""
    import torch

    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"device {requested!r} was asked for, but torch sees no CUDA device; "
                "set device to 'cpu' or 'auto', or install a CUDA build of torch"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"device {requested!r} was asked for, but there are only "
                f"{torch.cuda.device_count()} CUDA devices"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"device {requested!r} was asked for, but MPS is not available")
    return device


def resolve_dtype(requested: str | None, device: torch.device, *, auto: DtypePolicy) -> torch.dtype:
    """The torch dtype for a parsed setting: as asked, else what the plugin's ``auto`` policy
    picks for ``device``."""
    import torch

    dtype: torch.dtype = getattr(torch, requested if requested is not None else auto(device))
    return dtype


@dataclass(frozen=True)
class Placement:
    """Where a model runs and in what dtype, as the host set them (``ModelSettings.device``
    and ``dtype``): checked without torch when a backend is built (:meth:`of` raises
    ``InvalidInput`` naming the bad setting), resolved with torch in ``load``. ``None`` is
    auto."""

    device: str | None
    dtype: str | None

    @classmethod
    def of(cls, settings: ModelSettings) -> Placement:
        return cls(parse_device(settings.device), parse_dtype(settings.dtype))

    def torch_device(self) -> torch.device:
        """The device: as set, else CUDA when there is one, else the CPU."""
        return resolve_device(self.device)

    def torch_dtype(self, device: torch.device, *, auto: DtypePolicy) -> torch.dtype:
        """The dtype on ``device``: as set, else what the plugin's ``auto`` policy picks."""
        return resolve_dtype(self.dtype, device, auto=auto)

    def memory_device(self) -> str:
        """Whose memory the model occupies: ``"cpu"`` or ``"cuda:N"``, what
        ``Backend.memory_device`` returns; resolves auto (imports torch) without loading."""
        device = self.torch_device()
        if device.type == "cuda":
            import torch

            index = torch.cuda.current_device() if device.index is None else device.index
            return f"cuda:{index}"
        return "cpu"  # the CPU, and MPS's unified memory, are system RAM
