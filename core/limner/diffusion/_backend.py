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
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

from limner.errors import InvalidInput, ModelError, ModelLoadError
from limner.plugin import (
    GenerationResult,
    ImageGenerationConfig,
    ModelSettings,
    ModelSpec,
    Placement,
    Progress,
    StepCallback,
    TextToImageBackend,
    TinyModel,
    download_advice,
    locate_weights,
    parse_flag,
    weights_where,
)

from ._checkpoint import Checkpoint
from ._config import resolve_config

if TYPE_CHECKING:
    import torch

    from ._preview import LatentRGB

__all__ = [
    "DiffusersBackend",
    "DiffusionVariant",
    "LoadedPipeline",
    "diffusion_dtype",
    "select_variant",
]

_SEED_SPACE = 2**64


def diffusion_dtype(device: torch.device) -> str:
    """What ``dtype="auto"`` means for a diffusion pipeline: bf16 on accelerators, fp32 on
    the CPU.

    The large diffusion transformers (FLUX.1, SD3.5) are shipped in bf16, and their T5
    encoders overflow in fp16 (NaNs, black images), so auto never picks fp16. On the CPU, bf16
    matrix products are emulated unless the CPU has AVX512-BF16/AMX, and several of diffusers'
    ops upcast anyway, so fp32 is both the faster and the safer choice there.
    """
    return "float32" if device.type == "cpu" else "bfloat16"


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

    A model family subclasses it, sets :attr:`pipeline_class` (and its generated :attr:`tiny`
    model, see :func:`tiny_pipeline`) and implements :meth:`find_variant`. When its variants
    are :class:`Checkpoint` objects, :meth:`resolve_config` checks requests against their
    limits; a family with other variants overrides it. Hooks it may override:
    :meth:`from_pretrained_kwargs`, :meth:`call_kwargs`, :meth:`preview_latents`,
    :meth:`extra_metadata`, :meth:`gated`; :attr:`download_size` goes into load-error advice.

    Options every subclass takes: ``cpu_offload`` (bool, default false) keeps each component in
    CPU memory and moves it to the GPU only while it runs (diffusers'
    ``enable_model_cpu_offload``).
    """

    #: The diffusers pipeline class, by name (``diffusers.<name>.from_pretrained`` loads it);
    #: by default the one of :attr:`tiny`, when it was made by :func:`tiny_pipeline`.
    pipeline_class: ClassVar[str]
    #: The generated tiny model, written into the cache when its key is loaded, or ``None``.
    tiny: ClassVar[TinyModel | None] = None
    #: Rough download size for load-error advice, e.g. ``"34 GB"``.
    download_size: ClassVar[str | None] = None
    #: The family's checkpoints, each key's facts and limits: what the default
    #: :meth:`find_variant` looks a key up in, and what :meth:`specs` declares.
    variants: ClassVar[Sequence[Any]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        named = getattr(cls.tiny, "pipeline_class", "")
        if named and not hasattr(cls, "pipeline_class"):
            cls.pipeline_class = named

    @classmethod
    def register_specs(cls, register: Callable[[ModelSpec], None], **settings: Any) -> None:
        """``register`` each of :meth:`specs`: the body of a family's
        ``limner_register_models``."""
        for spec in cls.specs(**settings):
            register(spec)

    @classmethod
    def specs(cls, **default_settings: Any) -> list[ModelSpec]:
        """A :class:`~limner.plugin.ModelSpec` for each of :attr:`variants` (which must be
        :class:`Checkpoint` objects), built by this class; what the plugin's
        ``limner_register_models`` registers."""
        factory = f"{cls.__module__}:{cls.__qualname__}"
        return [variant.spec(factory, **default_settings) for variant in cls.variants]

    def __init__(self, spec: ModelSpec, settings: ModelSettings) -> None:
        super().__init__(spec, settings)
        self.variant: VariantT = self.find_variant(spec)
        self.placement = Placement.of(settings)
        self._cpu_offload = parse_flag("cpu_offload", settings.options.get("cpu_offload", False))
        self._loaded: LoadedPipeline | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec.key} weights={self.settings.weights!r}>"

    # -- hooks --------------------------------------------------------------------------------

    def find_variant(self, spec: ModelSpec) -> VariantT:
        """This family's facts for ``spec.key``: by default the one of :attr:`variants` with
        that key (see :func:`select_variant`). Called first in ``__init__``; raise
        ``InvalidInput`` for a key the family does not serve."""
        if not self.variants:
            raise NotImplementedError(
                f"{type(self).__name__} must set variants or override find_variant"
            )
        variant: VariantT = select_variant(spec, self.variants, type(self).__module__.split(".")[0])
        return variant

    def resolve_config(self, config: ImageGenerationConfig) -> ImageGenerationConfig:
        """The variant's defaults filled into ``config`` and every field checked against its
        limits (see :func:`resolve_config`); needs no weights."""
        variant = self.variant
        if not isinstance(variant, Checkpoint):
            raise NotImplementedError(
                f"{type(self).__name__} must override resolve_config: its variants are not "
                "limner.diffusion.Checkpoint objects"
            )
        return resolve_config(variant, config)

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for ``from_pretrained``, e.g. ``{"text_encoder_3": None}``
        to leave a component out."""
        return {}

    def call_kwargs(self, config: ImageGenerationConfig) -> dict[str, Any]:
        """Extra keyword arguments for the pipeline call. The base class passes prompt, size,
        steps, guidance, images per prompt, generators, ``max_sequence_length``, the step
        callback, and the negative prompt when there is one (``resolve_config`` refuses it
        where the checkpoint takes none)."""
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
        """Whether the variant's repo needs its licence accepted before download: the
        variant's ``gated`` (see :class:`Checkpoint`), else false."""
        return bool(getattr(self.variant, "gated", False))

    # -- loading ------------------------------------------------------------------------------

    def load(self) -> None:
        started = time.perf_counter()
        import torch

        device = self.placement.torch_device()
        dtype = self.placement.torch_dtype(device, auto=diffusion_dtype)
        offload = self._cpu_offload and device.type != "cpu"  # on the CPU it changes nothing
        if offload and device.type != "cuda":
            raise ModelLoadError(
                f"cpu_offload needs a CUDA device, but {self.spec.key} is set to run on "
                f"{device}; turn cpu_offload off"
            )
        source = locate_weights(
            self.settings,
            key=self.spec.key,
            marker="model_index.json",
            source_repo=self.variant.source_repo,
            writer=f"{self.pipeline_class}.save_pretrained",
            tiny=self.tiny,
            size=self.download_size,
            gated=self.gated(),
        )
        kwargs = {**source.kwargs, **self.from_pretrained_kwargs()}
        try:
            pipeline = getattr(_diffusers(), self.pipeline_class).from_pretrained(
                source.path, dtype=dtype, **kwargs
            )
        except Exception as error:
            raise ModelLoadError(
                f"could not load {self.spec.key} from {weights_where(self.settings)}: {error}. "
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
        return self.placement.memory_device()

    def load_advice(self) -> str:
        """How to get the weights, appended to load errors."""
        return download_advice(
            self.variant.source_repo,
            key=self.spec.key,
            size=self.download_size,
            gated=self.gated(),
        )

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
                        # PNDM's PLMS runs one more step than asked (the pipeline says so)
                        total=getattr(pipe, "_num_timesteps", None) or steps,
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
                    **self._call_kwargs(config),
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

    def _call_kwargs(self, config: ImageGenerationConfig) -> dict[str, Any]:
        # resolve_config refuses a negative prompt where the checkpoint takes none
        given = {"negative_prompt": config.negative_prompt} if config.negative_prompt else {}
        return {**given, **self.call_kwargs(config)}

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
