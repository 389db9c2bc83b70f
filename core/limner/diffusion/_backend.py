"""A text-to-image backend around a diffusers pipeline, shared by the diffusion plugins.

One pipeline is loaded per worker and shared by every generation on it: each call works on
a shallow copy of it with its own copy of the scheduler (``set_timesteps`` and the pipeline's
``_guidance_scale`` and friends are per-call state) and its thread's own tokenizers (whose
padding settings are per-call state too), so two threads can generate on the same weights at
once. Torch and diffusers are imported only in ``load``
and ``generate``: importing this module, or a plugin's module built on it, stays cheap.
"""

from __future__ import annotations

import copy
import re
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

import limner
from limner._backends import StepCallback, TextToImageBackend
from limner._generation_types import GenerationResult, ImageGenerationConfig, Progress
from limner.errors import InvalidInput, ModelError, ModelLoadError

if TYPE_CHECKING:
    import torch

    from limner._spec import ModelSettings, ModelSpec

    from ._preview import LatentRGB

__all__ = [
    "DiffusersBackend",
    "DiffusionVariant",
    "LoadedPipeline",
    "parse_device",
    "parse_dtype",
    "parse_flag",
    "resolve_device",
    "resolve_dtype",
    "select_variant",
]

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
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_SEED_SPACE = 2**64


# -- settings ---------------------------------------------------------------------------------


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
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
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


def resolve_dtype(requested: str | None, device: torch.device) -> torch.dtype:
    """As asked, else bf16 on accelerators and fp32 on the CPU.

    The large diffusion transformers (FLUX.1, SD3.5) are shipped in bf16, and their T5
    encoders overflow in fp16 (NaNs, black images), so auto never picks fp16. On the CPU, bf16
    matrix products are emulated unless the CPU has AVX512-BF16/AMX, and several of diffusers'
    ops upcast anyway, so fp32 is both the faster and the safer choice there.
    """
    import torch

    if requested is not None:
        dtype: torch.dtype = getattr(torch, requested)
        return dtype
    return torch.float32 if device.type == "cpu" else torch.bfloat16


# -- variants ---------------------------------------------------------------------------------


class DiffusionVariant(Protocol):
    """What the base class reads from a plugin's per-key facts (a frozen dataclass will do)."""

    @property
    def key(self) -> str: ...

    @property
    def source_repo(self) -> str:
        """The Hugging Face repo the weights come from, named in load-error advice."""

    @property
    def working_mb(self) -> float:
        """One generation's working memory in MB in bf16, on top of the weights."""


VariantT = TypeVar("VariantT", bound=DiffusionVariant)


def select_variant(spec: ModelSpec, variants: Sequence[VariantT], plugin: str) -> VariantT:
    """The variant whose key is ``spec.key``; ``InvalidInput`` naming ``plugin`` otherwise."""
    for variant in variants:
        if variant.key == spec.key:
            return variant
    raise InvalidInput(
        f"{plugin} has no defaults for {spec.key!r}; it serves "
        + ", ".join(v.key for v in variants),
        field="key",
    )


# -- the backend ------------------------------------------------------------------------------


@dataclass
class LoadedPipeline:
    """Everything generation reads. The pipeline is never mutated after ``load``; calls
    work on shallow copies of it (``_call_view``)."""

    pipeline: Any  # a diffusers pipeline; diffusers' pipelines carry no usable types
    device: torch.device
    dtype: torch.dtype
    offload: bool
    load_seconds: float
    #: Serialises generations when offloading: the offload hooks move modules between
    #: devices and assume one call at a time.
    offload_lock: threading.Lock
    preview_lock: threading.Lock
    #: Each thread's own copies of the tokenizers (see ``_call_view``).
    per_thread: threading.local = field(default_factory=threading.local)
    preview: LatentRGB | None = None


class DiffusersBackend(TextToImageBackend, Generic[VariantT]):
    """A text-to-image backend serving one diffusers pipeline class.

    A model family subclasses it, sets :attr:`pipeline_class` (and the tiny model's
    :attr:`tiny_key` and :attr:`tiny_revision`), and implements :meth:`find_variant`,
    :meth:`ensure_tiny` and :meth:`resolve_config`. Hooks it may override:
    :meth:`from_pretrained_kwargs`, :meth:`call_kwargs`, :meth:`preview_latents`,
    :meth:`extra_metadata`, :meth:`gated`; :attr:`download_size` goes into load-error advice.

    Options every subclass takes: ``cpu_offload`` (bool, default false) keeps each component in
    CPU memory and moves it to the GPU only while it runs (diffusers'
    ``enable_model_cpu_offload``).
    """

    #: The diffusers pipeline class, by name (``diffusers.<name>.from_pretrained`` loads it).
    pipeline_class: ClassVar[str]
    #: The generated tiny model's repo id and revision, or ``None`` when there is none.
    tiny_key: ClassVar[str | None] = None
    tiny_revision: ClassVar[str | None] = None
    #: Rough download size for load-error advice, e.g. ``"34 GB"``.
    download_size: ClassVar[str | None] = None

    def __init__(self, spec: ModelSpec, settings: ModelSettings) -> None:
        super().__init__(spec, settings)
        self.variant: VariantT = self.find_variant(spec)
        self._device_setting = parse_device(settings.device)
        self._dtype_setting = parse_dtype(settings.dtype)
        self._cpu_offload = parse_flag("cpu_offload", settings.options.get("cpu_offload", False))
        self._loaded: LoadedPipeline | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec.key} weights={self.settings.weights!r}>"

    # -- hooks --------------------------------------------------------------------------------

    def find_variant(self, spec: ModelSpec) -> VariantT:
        """This family's facts for ``spec.key`` (see :func:`select_variant`). Called first
        in ``__init__``; raise ``InvalidInput`` for a key the family does not serve."""
        raise NotImplementedError

    def ensure_tiny(self, cache_dir: Path) -> None:
        """Write the tiny model into the Hugging Face cache ``cache_dir`` if missing (with
        ``limner.materialize_in_hf_cache``). Called in ``load`` when the weights are
        :attr:`tiny_key`."""
        raise NotImplementedError

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for ``from_pretrained``, e.g. ``{"text_encoder_3": None}``
        to leave a component out."""
        return {}

    def call_kwargs(self, config: ImageGenerationConfig) -> dict[str, Any]:
        """Extra keyword arguments for the pipeline call, e.g. a negative prompt. The base
        class passes prompt, size, steps, guidance, images per prompt, generators,
        ``max_sequence_length`` and the step callback."""
        return {}

    def preview_latents(
        self, pipe: Any, latents: torch.Tensor, config: ImageGenerationConfig
    ) -> torch.Tensor:
        """The step's ``latents`` as a ``(batch, channels, h, w)`` tensor for the preview;
        a pipeline that packs its latents (Flux) unpacks them here."""
        return latents

    def extra_metadata(
        self, loaded: LoadedPipeline, config: ImageGenerationConfig
    ) -> dict[str, Any]:
        """Family-specific entries for the result's metadata."""
        return {}

    def gated(self) -> bool:
        """Whether the variant's repo needs its licence accepted before download."""
        return False

    # -- loading ------------------------------------------------------------------------------

    def load(self) -> None:
        started = time.perf_counter()
        import torch

        device = resolve_device(self._device_setting)
        dtype = resolve_dtype(self._dtype_setting, device)
        offload = self._cpu_offload and device.type != "cpu"  # on the CPU it changes nothing
        if offload and device.type != "cuda":
            raise ModelLoadError(
                f"cpu_offload needs a CUDA device, but {self.spec.key} is set to run on "
                f"{device}; turn cpu_offload off"
            )
        source, kwargs = self._locate()
        kwargs.update(self.from_pretrained_kwargs())
        try:
            pipeline = getattr(_diffusers(), self.pipeline_class).from_pretrained(
                source, dtype=dtype, **kwargs
            )
        except Exception as error:
            raise ModelLoadError(
                f"could not load {self.spec.key} from {self._where()}: {error}. "
                + self.load_advice()
            ) from error
        try:
            if offload:
                pipeline.enable_model_cpu_offload(device=device)
            else:
                pipeline.to(device)
        except torch.OutOfMemoryError as error:
            advice = "free the device" if offload else "set the option cpu_offload=true"
            raise ModelLoadError(
                f"{self.spec.key} does not fit on {device} in {_dtype_name(dtype)} "
                f"(about {self.spec.info.memory_mb / 1024:.0f} GiB at its peak); {advice}"
            ) from error
        pipeline.set_progress_bar_config(disable=True)
        self._loaded = LoadedPipeline(
            pipeline=pipeline,
            device=device,
            dtype=dtype,
            offload=offload,
            load_seconds=time.perf_counter() - started,
            offload_lock=threading.Lock(),
            preview_lock=threading.Lock(),
        )

    def unload(self) -> None:
        loaded, self._loaded = self._loaded, None
        if loaded is None:
            return
        on_cuda = loaded.device.type == "cuda"
        del loaded
        if on_cuda:
            import gc

            import torch

            gc.collect()  # the pipeline holds reference cycles; free its tensors now
            torch.cuda.empty_cache()

    def memory_mb(self) -> float | None:
        """What the pool should reserve for this worker on its memory device: the weights
        held there (all of them, or with ``cpu_offload`` the largest component, which is what
        sits on the GPU at a time), measured, plus one generation's working memory."""
        loaded = self._loaded
        if loaded is None:
            return None
        import torch

        sizes = [
            sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
            for module in loaded.pipeline.components.values()
            if isinstance(module, torch.nn.Module)
        ]
        held = max(sizes, default=0) if loaded.offload else sum(sizes)
        working = self.variant.working_mb * loaded.dtype.itemsize / 2  # estimated for bf16
        return held / 2**20 + working

    def memory_device(self) -> str:
        """``"cpu"`` or ``"cuda:N"``: resolves ``auto`` (imports torch) without loading."""
        device = resolve_device(self._device_setting)
        if device.type == "cuda":
            import torch

            index = torch.cuda.current_device() if device.index is None else device.index
            return f"cuda:{index}"
        return "cpu"  # the CPU, and MPS's unified memory, are system RAM

    def _locate(self) -> tuple[str, dict[str, Any]]:
        """What ``from_pretrained`` reads (the source and its keyword arguments, the revision
        among them), failing early with advice when a repo is neither cached nor
        downloadable."""
        settings = self.settings
        if settings.local_dir:
            path = Path(settings.weights).expanduser()
            if not (path / "model_index.json").is_file():
                raise ModelLoadError(
                    f"{path} holds no model_index.json; point the local dir of {self.spec.key} "
                    f"at a directory written by {self.pipeline_class}.save_pretrained (or "
                    f"downloaded with `hf download {self.variant.source_repo}`)"
                )
            return str(path), {}
        from huggingface_hub import try_to_load_from_cache

        cache = limner.hf_cache_dir()
        kwargs: dict[str, Any] = {"cache_dir": str(cache), "revision": settings.revision}
        if self.tiny_key is not None and settings.weights == self.tiny_key:
            # Unset means the only revision there is: the one limner writes itself.
            if settings.revision not in (None, self.tiny_revision):
                raise ModelLoadError(
                    f"{self.tiny_key} exists only at revision {self.tiny_revision}, which "
                    "limner writes into the cache itself; got revision "
                    f"{settings.revision!r}: leave it unset"
                )
            self.ensure_tiny(cache)
            # local_files_only: it is not on the hub.
            return settings.weights, {
                **kwargs,
                "revision": self.tiny_revision,
                "local_files_only": True,
            }
        cached = try_to_load_from_cache(
            settings.weights, "model_index.json", cache_dir=cache, revision=settings.revision
        )
        if isinstance(cached, str):
            kwargs["local_files_only"] = True  # cached: no network round trips
        elif _offline():
            raise ModelLoadError(
                f"{self.spec.key} ({self._where()}) is not in the Hugging Face cache ({cache}) "
                "and HF_HUB_OFFLINE is set. " + self.load_advice()
            )
        return settings.weights, kwargs

    def _where(self) -> str:
        if self.settings.local_dir:
            return self.settings.weights
        revision = f"@{self.settings.revision}" if self.settings.revision else ""
        return f"the Hugging Face repo {self.settings.weights}{revision}"

    def load_advice(self) -> str:
        """How to get the weights, appended to load errors."""
        repo = self.variant.source_repo
        size = f" (about {self.download_size})" if self.download_size else ""
        advice = (
            f"Download it with `hf download {repo}`{size}, or point LIMNER_MODELS_DIR at a "
            "directory holding a local copy."
        )
        if self.gated():
            advice += (
                f" {repo} is gated: accept its licence on huggingface.co and log in with "
                "`hf auth login` first."
            )
        return advice

    # -- generating ---------------------------------------------------------------------------

    def generate(
        self, prompt: str, config: ImageGenerationConfig, *, on_step: StepCallback
    ) -> GenerationResult:
        import torch

        loaded = self._require_loaded()
        if not isinstance(prompt, str):
            raise InvalidInput(f"must be a string, got {type(prompt).__name__}", field="prompt")
        config = self.resolve_config(config)  # idempotent; guards direct callers
        assert config.seed is not None
        assert config.steps is not None
        assert config.width is not None
        assert config.height is not None
        seeds = [(config.seed + index) % _SEED_SPACE for index in range(config.num_images)]
        # CPU generators: the starting noise is then the same on every device, so a seed
        # reproduces (nearly) the same image on another machine, not only on this one.
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        steps = config.steps
        started = time.perf_counter()
        last_step = started

        with self._exclusive(loaded):
            preview = self._latent_rgb(loaded) if config.preview else None
            pipeline = _call_view(loaded)

            def step_end(
                pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]
            ) -> dict[str, Any]:
                nonlocal last_step
                image = None
                if preview is not None:
                    image = preview.image(self.preview_latents(pipe, tensors["latents"], config))
                last_step = time.perf_counter()
                on_step(
                    Progress(
                        step=index + 1,
                        total=steps,
                        elapsed=last_step - started,
                        preview=image,
                    )
                )
                return {}

            with torch.inference_mode():
                output = pipeline(
                    prompt=prompt,
                    width=config.width,
                    height=config.height,
                    num_inference_steps=steps,
                    guidance_scale=config.guidance,
                    num_images_per_prompt=config.num_images,
                    generator=generators,
                    max_sequence_length=config.max_sequence_length,
                    output_type="pil",
                    callback_on_step_end=step_end,
                    callback_on_step_end_tensor_inputs=["latents"],
                    **self.call_kwargs(config),
                )
        finished = time.perf_counter()
        images = tuple(output.images)
        return GenerationResult(
            model=self.spec.key,
            prompt=prompt,
            images=images,
            seed=config.seed,
            config=config,
            timings={
                "load": loaded.load_seconds,
                "generate": finished - started,
                "decode": finished - last_step,
            },
            metadata=self._metadata(loaded, prompt, config, seeds),
        )

    def _require_loaded(self) -> LoadedPipeline:
        loaded = self._loaded
        if loaded is None:
            raise ModelError(f"{self.spec.key} is not loaded; call load() first")
        return loaded

    @contextmanager
    def _exclusive(self, loaded: LoadedPipeline) -> Iterator[None]:
        """One call at a time with offloading, and the shared pipeline's offload hooks reset
        afterwards (a per-call pipeline object cannot do that itself); no lock otherwise."""
        if not loaded.offload:
            yield
            return
        with loaded.offload_lock:
            try:
                yield
            finally:
                loaded.pipeline.maybe_free_model_hooks()

    def _latent_rgb(self, loaded: LoadedPipeline) -> LatentRGB:
        """The preview projection, measured from the VAE on the first preview asked for."""
        with loaded.preview_lock:
            if loaded.preview is None:
                from ._preview import fit_latent_rgb

                execution = loaded.pipeline._execution_device
                loaded.preview = fit_latent_rgb(loaded.pipeline.vae, execution)
            return loaded.preview

    def _metadata(
        self,
        loaded: LoadedPipeline,
        prompt: str,
        config: ImageGenerationConfig,
        seeds: list[int],
    ) -> dict[str, Any]:
        """What a PNG text chunk needs to tell how the image was made."""
        return {
            "model": self.spec.key,
            "weights": self.settings.weights,
            "revision": self.settings.revision,
            "pipeline": self.pipeline_class,
            "scheduler": type(loaded.pipeline.scheduler).__name__,
            "prompt": prompt,
            "seed": config.seed,
            "seeds": seeds,
            "generator": "cpu",
            "steps": config.steps,
            "guidance": config.guidance,
            "width": config.width,
            "height": config.height,
            "max_sequence_length": config.max_sequence_length,
            "dtype": _dtype_name(loaded.dtype),
            "device": str(loaded.device),
            "cpu_offload": loaded.offload,
            **self.extra_metadata(loaded, config),
        }


def _call_view(loaded: LoadedPipeline) -> Any:
    """A pipeline object for one call around the shared, read-only modules.

    Per-call state must not be shared between concurrent calls: ``__call__`` sets the
    scheduler's timesteps (so each call gets a fresh copy of the scheduler), and a fast
    tokenizer sets its padding and truncation on the shared Rust object before encoding (the
    pipelines ask for "max_length" and "longest" padding in turn), so each thread gets its
    own copies of the tokenizers, made on its first call (tens of ms for the real ones).

    The view is a shallow copy of the loaded pipeline, never a new one: the pipeline's
    ``__init__`` re-runs its checks and warnings (Stable Diffusion 1.x warns about a disabled
    safety checker, every time) and rebuilds its helpers. Assigning a component to the copy
    updates the copy's own config, not the shared pipeline's.
    """
    pipeline = loaded.pipeline
    tokenizers: dict[str, Any] | None = getattr(loaded.per_thread, "tokenizers", None)
    if tokenizers is None:
        tokenizers = {
            name: copy.deepcopy(component)
            for name, component in pipeline.components.items()
            if name.startswith("tokenizer") and component is not None
        }
        loaded.per_thread.tokenizers = tokenizers
    view = copy.copy(pipeline)
    for name, tokenizer in tokenizers.items():
        setattr(view, name, tokenizer)
    view.scheduler = copy.deepcopy(pipeline.scheduler)
    # No offload hooks of its own, so that the call does not reinstall them on the shared
    # modules when it ends; ``_exclusive`` resets the shared pipeline's once, afterwards.
    view._all_hooks = []
    return view


def _diffusers() -> Any:
    """diffusers as ``Any``: its config-decorated constructors carry no annotations, so
    mypy --strict would flag every call."""
    import diffusers

    return diffusers


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _offline() -> bool:
    import os

    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(flag.strip().lower() in _TRUE for flag in flags) or bool(constants.HF_HUB_OFFLINE)
