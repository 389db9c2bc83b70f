"""A diffusers pipeline loaded onto its device: the dtype policy, placement (whole, or with
CPU offload), the errors that say what to do, and what the loaded pipeline holds.

Kept apart from the backend class so that the class reads as its hooks and decisions, and
this as the mechanics of ``from_pretrained`` and ``.to(device)``. Torch and diffusers are
imported only inside the functions.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from limner.errors import ModelLoadError
from limner.plugin import WeightSource

from ._lora import LoadedAdapters

if TYPE_CHECKING:
    import torch

    from ._preview import LatentRGB

__all__ = [
    "LoadedPipeline",
    "build_edit_pipelines",
    "diffusers_module",
    "diffusion_dtype",
    "dtype_name",
    "free_cuda_memory",
    "load_pipeline",
]


def diffusion_dtype(device: torch.device) -> str:
    """What ``dtype="auto"`` means for a diffusion pipeline: bf16 on accelerators, fp32 on
    the CPU.

    The large diffusion transformers (FLUX.1, SD3.5) are shipped in bf16, and their T5
    encoders overflow in fp16 (NaNs, black images), so auto never picks fp16. On the CPU, bf16
    matrix products are emulated unless the CPU has AVX512-BF16/AMX, and several of diffusers'
    ops upcast anyway, so fp32 is both the faster and the safer choice there.
    """
    return "float32" if device.type == "cpu" else "bfloat16"


@dataclass
class LoadedPipeline:
    """Everything generation reads. The pipeline is never mutated after ``load``; calls
    work on shallow copies of it (see ``limner.diffusion._generation.call_view``)."""

    pipeline: Any  # a diffusers pipeline; diffusers' pipelines carry no usable types
    device: torch.device
    dtype: torch.dtype
    offload: bool
    #: From the start of ``load`` (finding or writing the weights included) to now.
    load_seconds: float = 0.0
    #: Serialises generations when offloading: the offload hooks move modules between
    #: devices and assume one call at a time.
    offload_lock: threading.Lock = field(default_factory=threading.Lock)
    preview_lock: threading.Lock = field(default_factory=threading.Lock)
    #: Each thread's own copies of the tokenizers (see ``call_view``).
    per_thread: threading.local = field(default_factory=threading.local)
    preview: LatentRGB | None = None
    #: The weights held on the memory device as measured after the load (``device_mb``).
    weights_mb: float = 0.0
    #: The LoRA adapters loaded into the shared transformer, and which apply now.
    adapters: LoadedAdapters = field(default_factory=LoadedAdapters)
    #: The family's edit pipelines by kind (``"img2img"``, ``"inpaint"``), built on
    #: ``pipeline``'s components, every module shared (see :func:`build_edit_pipelines`);
    #: empty for a family that cannot edit.
    edit_pipelines: dict[str, Any] = field(default_factory=dict)

    def device_mb(self) -> float:
        """The weights held on the memory device, measured: all of them, or with offload the
        largest component, which is what sits on the GPU at a time."""
        import torch

        sizes = [
            sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
            for module in self.pipeline.components.values()
            if isinstance(module, torch.nn.Module)
        ]
        held = max(sizes, default=0) if self.offload else sum(sizes)
        return held / 2**20


def load_pipeline(
    pipeline_class: str,
    source: WeightSource,
    *,
    kwargs: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype,
    offload: bool,
    key: str,
    where: str,
    advice: str,
    peak_mb: float,
) -> LoadedPipeline:
    """``diffusers.<pipeline_class>.from_pretrained`` of ``source``, placed on ``device``
    (or offloaded to the CPU between its components' turns).

    Weights that do not load are a ``ModelLoadError`` naming ``where`` they were read from
    and ending with ``advice`` (how to get them); running out of device memory is one that
    says what to change (``peak_mb``: what the model needs at its peak).
    """
    import torch

    try:
        pipeline = getattr(diffusers_module(), pipeline_class).from_pretrained(
            source.path, dtype=dtype, **{**source.kwargs, **kwargs}
        )
    except Exception as error:
        raise ModelLoadError(f"could not load {key} from {where}: {error}. {advice}") from error
    try:
        if offload:
            pipeline.enable_model_cpu_offload(device=device)
        else:
            pipeline.to(device)
    except torch.OutOfMemoryError as error:
        advice = "free the device" if offload else "set the option cpu_offload=true"
        raise ModelLoadError(
            f"{key} does not fit on {device} in {dtype_name(dtype)} "
            f"(about {peak_mb / 1024:.0f} GiB at its peak); {advice}"
        ) from error
    pipeline.set_progress_bar_config(disable=True)
    loaded = LoadedPipeline(pipeline=pipeline, device=device, dtype=dtype, offload=offload)
    loaded.weights_mb = loaded.device_mb()
    return loaded


def build_edit_pipelines(pipeline: Any, classes: dict[str, str], *, key: str) -> dict[str, Any]:
    """``diffusers.<name>`` for each kind in ``classes``, built on ``pipeline``'s components:
    the same module objects, so an edit holds no second copy of the weights (about 1 ms
    each). The plain constructor, never ``from_pipe``: its ``dtype`` defaults to float32 and
    it casts the shared modules in place, which would double a bf16 model's weights.
    A class that cannot be built on them is a ``ModelLoadError`` naming it."""
    diffusers = diffusers_module()
    built = {}
    for kind, name in classes.items():
        try:
            edit = getattr(diffusers, name)(**pipeline.components)
        except Exception as error:
            raise ModelLoadError(
                f"could not build {name} on the components of {key}'s "
                f"{type(pipeline).__name__}: {error!r}"
            ) from error
        edit.set_progress_bar_config(disable=True)
        built[kind] = edit
    return built


def free_cuda_memory() -> None:
    """Return an unloaded pipeline's CUDA memory now: it holds reference cycles, which only
    the cycle collector frees, and torch keeps freed blocks cached."""
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()


def diffusers_module() -> Any:
    """diffusers as ``Any``: its config-decorated constructors carry no annotations, so
    mypy --strict would flag every call."""
    import diffusers

    return diffusers


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
