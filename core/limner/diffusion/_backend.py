"""A text-to-image backend around a diffusers pipeline, shared by the diffusion plugins.

:class:`DiffusersBackend` is what a family subclasses: its hooks, and the decisions of
loading and generating (which weights, device, dtype and offload; which config, seeds and
metadata). The mechanics are beside it: loading and placing the pipeline in ``_pipeline``,
one call on the shared pipeline (views, offload turns, steps and previews) in
``_generation``. Torch and diffusers are imported only in ``load`` and ``generate``:
importing this module, or a plugin's module built on it, stays cheap.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from limner.errors import InvalidInput, ModelError, ModelLoadError
from limner.plugin import (
    CachedPart,
    GenerationResult,
    ImageGenerationConfig,
    LoraAdapter,
    ModelSettings,
    ModelSpec,
    Placement,
    StepCallback,
    TextToImageBackend,
    TinyModel,
    download_advice,
    locate_weights,
    lora_adapters,
    parse_flag,
    quiet_loading,
    weights_where,
)

from ._checkpoint import Checkpoint
from ._config import fit_edit_size, resolve_config
from ._generation import run_pipeline
from ._lora import Wanted
from ._pipeline import (
    LoadedPipeline,
    build_edit_pipelines,
    diffusion_dtype,
    dtype_name,
    free_cuda_memory,
    load_pipeline,
)

if TYPE_CHECKING:
    import torch
    from PIL import Image

__all__ = ["DiffusersBackend", "DiffusionVariant", "select_variant"]

_SEED_SPACE = 2**64


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


class DiffusersBackend(TextToImageBackend, Generic[VariantT]):
    """A text-to-image backend serving one diffusers pipeline class.

    A model family subclasses it, sets :attr:`pipeline_class` (and its generated :attr:`tiny`
    model, see :func:`tiny_pipeline`) and implements :meth:`find_variant`. When its variants
    are :class:`Checkpoint` objects, :meth:`resolve_config` checks requests against their
    limits; a family with other variants overrides it. Hooks it may override:
    :meth:`from_pretrained_kwargs`, :meth:`call_kwargs`, :meth:`preview_latents`,
    :meth:`extra_metadata`, :meth:`gated`; :attr:`download_size` goes into load-error advice.
    A family whose pipeline takes LoRA adapters (diffusers' ``load_lora_weights``) says which
    layers they may change with :meth:`lora_layers`; see docs/lora.md.

    A family that can edit images names its image-to-image and inpainting pipelines,
    :attr:`img2img_class` and :attr:`inpaint_class`: they are built on the loaded pipeline's
    components when it loads, sharing every module, and serve :meth:`edit`.

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
    #: The diffusers image-to-image pipeline class, by name (``"FluxImg2ImgPipeline"``),
    #: whose constructor takes the loaded pipeline's components; ``None``: it cannot edit.
    img2img_class: ClassVar[str | None] = None
    #: The inpainting one (``"FluxInpaintPipeline"``): a family that edits names both.
    inpaint_class: ClassVar[str | None] = None
    #: An edit's strength when the request gives none (diffusers' image-to-image default).
    default_strength: ClassVar[float] = 0.6

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        named = getattr(cls.tiny, "pipeline_class", "")
        if named and not hasattr(cls, "pipeline_class"):
            cls.pipeline_class = named
        if (cls.img2img_class is None) != (cls.inpaint_class is None):
            raise TypeError(
                f"{cls.__name__} names one of img2img_class and inpaint_class: a family that "
                "edits names both (an edit with a mask inpaints), one that cannot neither"
            )

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
        limits (see :func:`resolve_config`), its LoRA adapters too (:meth:`resolve_loras`);
        needs no weights."""
        variant = self.variant
        if not isinstance(variant, Checkpoint):
            raise NotImplementedError(
                f"{type(self).__name__} must override resolve_config: its variants are not "
                "limner.diffusion.Checkpoint objects"
            )
        return self.resolve_loras(resolve_config(variant, config))

    def lora_layers(self) -> Mapping[str, tuple[int, int]] | None:
        """The transformer's Linear layers a LoRA adapter may change, by module path
        (``transformer_blocks.0.attn.to_q``), each with its input and output widths; ``None``
        (the default) when the family takes no adapters. Needs no weights: a family
        computes it from its checkpoint's architecture (``Checkpoint.transformer``)."""
        return None

    @functools.cached_property
    def _lora_table(self) -> Mapping[str, tuple[int, int]] | None:
        return self.lora_layers()

    @property
    def supports_loras(self) -> bool:
        return self._lora_table is not None

    def lora_fit(self, adapter: LoraAdapter) -> str | None:
        table = self._lora_table
        if table is None:
            return super().lora_fit(adapter)
        key = self.spec.key
        for layer in adapter.layers:
            widths = table.get(layer.module)
            if widths is None:
                return f"it changes {layer.module}, a layer {key} does not have"
            if widths != (layer.in_features, layer.out_features):
                return (
                    f"its {layer.module} is {layer.in_features}x{layer.out_features}, "
                    f"{key}'s is {widths[0]}x{widths[1]}"
                )
        return None

    def resolve_loras(self, config: ImageGenerationConfig) -> ImageGenerationConfig:
        """``config`` with its LoRA adapters checked: each one in the settings' adapter
        folders, usable, fitting this model, with a scale in range (``InvalidInput`` naming
        ``loras[i].name`` or ``loras[i].scale`` otherwise)."""
        if isinstance(config.loras, tuple) and not config.loras:
            return config
        loras = tuple((a.name, scale) for a, scale in self._adapters_of(config))
        return dataclasses.replace(config, loras=loras)

    def _adapters_of(self, config: ImageGenerationConfig) -> Wanted:
        if isinstance(config.loras, tuple) and not config.loras:
            return []
        return lora_adapters(
            config.loras, dirs=self.settings.lora_dirs, fit=self.lora_fit, key=self.spec.key
        )

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
        variant's ``gated`` (see :class:`Checkpoint`), else false. Said in load errors; the
        pool's earlier missing-weights check reads the spec's ``ModelInfo.gated``, which a
        :class:`Checkpoint` sets."""
        return bool(getattr(self.variant, "gated", False))

    # -- loading ------------------------------------------------------------------------------

    @quiet_loading("transformers", "diffusers")
    def load(self) -> None:
        started = time.perf_counter()
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
        loaded = load_pipeline(
            self.pipeline_class,
            source,
            kwargs=self.from_pretrained_kwargs(),
            device=device,
            dtype=dtype,
            offload=offload,
            key=self.spec.key,
            where=weights_where(self.settings),
            advice=self.load_advice(),
            peak_mb=self.spec.info.memory_mb,
        )
        if self.img2img_class is not None and self.inpaint_class is not None:
            loaded.edit_pipelines = build_edit_pipelines(
                loaded.pipeline,
                {"img2img": self.img2img_class, "inpaint": self.inpaint_class},
                key=self.spec.key,
            )
        loaded.load_seconds = time.perf_counter() - started
        self._loaded = loaded

    def unload(self) -> None:
        loaded, self._loaded = self._loaded, None
        if loaded is None:
            return
        on_cuda = loaded.device.type == "cuda"
        del loaded  # the last reference, so that its memory can go now
        if on_cuda:
            free_cuda_memory()

    def memory_mb(self) -> float | None:
        """What the pool should reserve for this worker on its memory device: the weights
        held there (all of them, or with ``cpu_offload`` the largest component, which is what
        sits on the GPU at a time), measured after the load, the LoRA adapters loaded since,
        plus one generation's working memory."""
        loaded = self._loaded
        if loaded is None:
            return None
        working = self.variant.working_mb * loaded.dtype.itemsize / 2  # estimated for bf16
        return loaded.weights_mb + loaded.adapters.memory_mb + working

    def caches(self) -> Sequence[CachedPart]:
        """The LoRA adapters loaded and not in use now: the pool drops the least recently
        used of them before it evicts a model."""
        loaded = self._loaded
        return [] if loaded is None else loaded.adapters.caches()

    def drop_caches(self, names: Sequence[str]) -> None:
        loaded = self._loaded
        if loaded is not None:
            loaded.adapters.drop(loaded, names)

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
        loaded = self._require_loaded()
        if not isinstance(prompt, str):
            raise InvalidInput(f"must be a string, got {type(prompt).__name__}", field="prompt")
        config = self.resolve_config(config)  # idempotent; guards direct callers
        assert config.seed is not None
        seeds = [(config.seed + index) % _SEED_SPACE for index in range(config.num_images)]
        images, timings = self._run(loaded, prompt, config, seeds, on_step)
        return GenerationResult(
            model=self.spec.key,
            prompt=prompt,
            images=images,
            seed=config.seed,
            config=config,
            timings={"load": loaded.load_seconds, **timings},
            metadata=self._metadata(loaded, prompt, config, seeds),
        )

    # -- editing ------------------------------------------------------------------------------

    @property
    def supports_editing(self) -> bool:
        """Whether the family names its edit pipelines (:attr:`img2img_class`)."""
        return self.img2img_class is not None and self.inpaint_class is not None

    def edit_size(self, width: int, height: int) -> tuple[int, int]:
        """The source's size, scaled to fit the checkpoint's limits and rounded to its
        multiple (see :func:`fit_edit_size`)."""
        variant = self.variant
        if not isinstance(variant, Checkpoint):
            return width, height
        return fit_edit_size(variant, width, height)

    def edit(
        self,
        prompt: str,
        config: ImageGenerationConfig,
        image: npt.NDArray[np.uint8],
        mask: npt.NDArray[np.uint8] | None,
        *,
        on_step: StepCallback,
    ) -> GenerationResult:
        """Image-to-image, or with a mask inpainting, on the loaded weights: the source
        (and mask) resized to the config's size, ``image=[source] * n`` so that image k
        starts from seed + k as a generation's does; outside the mask the source is
        composited back, so it is kept exactly. Strength 0 returns the source, no step run;
        otherwise the pipeline runs ``ceil(steps * strength)`` steps, as progress says."""
        loaded = self._require_loaded()
        if not loaded.edit_pipelines:
            raise InvalidInput(f"model {self.spec.key} cannot edit images", field="image")
        if not isinstance(prompt, str):
            raise InvalidInput(f"must be a string, got {type(prompt).__name__}", field="prompt")
        config = self.resolve_config(config)  # idempotent; guards direct callers
        seed, width, height = config.seed, config.width, config.height
        assert seed is not None and width is not None and height is not None
        source, area = edit_images(image, mask, (width, height))
        strength = self.default_strength if config.strength is None else config.strength
        config = dataclasses.replace(config, strength=strength)
        seeds = [(seed + index) % _SEED_SPACE for index in range(config.num_images)]
        kind = "img2img" if area is None else "inpaint"
        pipeline = loaded.edit_pipelines[kind]
        if strength == 0:  # diffusers would run no step and fail: the source is the answer
            images: tuple[Image.Image, ...] = tuple(source.copy() for _ in seeds)
            timings = {"generate": 0.0, "decode": 0.0}
        else:
            sources = {"image": [source] * len(seeds), "strength": strength}
            if area is not None:
                sources["mask_image"] = [area] * len(seeds)
            images, timings = self._run(
                loaded, prompt, config, seeds, on_step, sources=sources, pipeline=pipeline
            )
            if area is not None:
                images = tuple(keep_outside(out, source, area) for out in images)
        metadata = self._metadata(loaded, prompt, config, seeds)
        return GenerationResult(
            model=self.spec.key,
            prompt=prompt,
            images=images,
            seed=seed,
            config=config,
            timings={"load": loaded.load_seconds, **timings},
            metadata={
                **metadata,
                "pipeline": type(pipeline).__name__,
                "edit": kind,
                "strength": strength,
            },
        )

    def _run(
        self,
        loaded: LoadedPipeline,
        prompt: str,
        config: ImageGenerationConfig,
        seeds: list[int],
        on_step: StepCallback,
        *,
        sources: dict[str, Any] | None = None,
        pipeline: Any = None,
    ) -> tuple[tuple[Image.Image, ...], dict[str, float]]:
        """One pipeline call (the loaded pipeline's, or an edit pipeline's with its
        ``sources``) with the config's LoRA adapters active: every pipeline shares the loaded
        transformer, adapters and all. The adapters are checked again here: resolve_config
        may be a family's own, and a file may have changed since (it is then loaded again)."""
        with loaded.adapters.use(loaded, self._adapters_of(config), key=self.spec.key):
            return run_pipeline(
                loaded,
                prompt,
                config,
                seeds=seeds,
                on_step=on_step,
                preview_latents=self.preview_latents,
                call_kwargs={**self._call_kwargs(config), **(sources or {})},
                pipeline=pipeline,
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
            "dtype": dtype_name(loaded.dtype),
            "device": str(loaded.device),
            "cpu_offload": loaded.offload,
            **self.extra_metadata(loaded, config),
        }


# -- an edit's images -------------------------------------------------------------------------


def edit_images(
    image: npt.NDArray[np.uint8], mask: npt.NDArray[np.uint8] | None, size: tuple[int, int]
) -> tuple[Image.Image, Image.Image | None]:
    """The source as an RGB image and the mask as a 0/255 ``L`` image, both ``size``;
    ``InvalidInput`` naming the field for arrays of another shape or type."""
    from PIL import Image

    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3:
        raise InvalidInput("must be a (height, width, 3) uint8 array", field="image")
    if image.shape[2] != 3 or 0 in image.shape:
        raise InvalidInput(f"must be RGB pixels, got shape {image.shape}", field="image")
    source = Image.fromarray(image)
    area = None
    if mask is not None:
        if not isinstance(mask, np.ndarray) or mask.dtype != np.uint8 or mask.ndim != 2:
            raise InvalidInput("must be a (height, width) uint8 array", field="mask")
        if mask.shape != image.shape[:2]:
            raise InvalidInput(
                f"the mask is {mask.shape[1]}x{mask.shape[0]} and the image "
                f"{image.shape[1]}x{image.shape[0]}; they must be the same size",
                field="mask",
            )
        area = Image.fromarray(np.where(mask >= 128, 255, 0).astype(np.uint8))
    if source.size != size:
        source = source.resize(size, Image.Resampling.LANCZOS)
        if area is not None:
            area = area.resize(size, Image.Resampling.NEAREST)
    return source, area


def keep_outside(out: Image.Image, source: Image.Image, area: Image.Image) -> Image.Image:
    """``out`` inside the mask, the source outside it, pixel for pixel: the VAE's round trip
    and its decoder's reach across the mask's edge would otherwise change kept pixels."""
    from PIL import Image

    return Image.composite(out.convert("RGB"), source, area)
