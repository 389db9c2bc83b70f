"""An image-embedding backend over a transformers model, and generated tiny models.

:class:`TransformersEmbeddingBackend` is what an embedding plugin over a transformers
checkpoint would otherwise write itself: device and dtype settings, finding the weights (its
tiny model written into the cache first), loading with ``AutoModel``, the checkpoint's own
image processor in ``prepare``, its tokenizer in ``prepare_text``, unit float32 rows,
unloading and memory measurement. A plugin subclasses it and says what differs.
:func:`tiny_model` makes the generated tiny model a plugin ships for its tests. Nothing here
imports torch or transformers until a model loads or writes its tiny weights.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar

import numpy as np
import numpy.typing as npt

from limner.errors import ModelError, ModelLoadError
from limner.plugin._backends import ImageEmbeddingBackend
from limner.plugin._devices import Placement
from limner.plugin._quiet import quiet_loading
from limner.plugin._weights import (
    TinyModel,
    WeightSource,
    locate_weights,
    materialize_in_hf_cache,
    tiny_revision,
    weights_where,
)

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image

    from limner._registry._spec import ModelSettings, ModelSpec

__all__ = [
    "BuiltOnFirstUse",
    "TransformersEmbeddingBackend",
    "embedding_dtype",
    "pad_token_rows",
    "pooled_features",
    "tiny_model",
    "unit_rows",
]

Vectors = npt.NDArray[np.float32]


def tiny_model(recipe: str, *, seed: int, write: Callable[[Path], None]) -> TinyModel:
    """A generated tiny model named by its ``recipe``, ``"<key>@<version>"``.

    When its key is first loaded (``locate_weights(..., tiny=...)``), torch is seeded with
    ``seed`` and ``write(directory)`` saves the model there (``save_pretrained`` of a
    random-weight model, its processor and tokenizer); the directory then becomes the key's
    snapshot in the Hugging Face cache, at the revision :func:`tiny_revision` derives from the
    recipe, so it loads through the same ``from_pretrained`` path as real weights. Bump the
    version whenever what ``write`` writes changes.
    """
    key, at, version = recipe.partition("@")
    if not (at and version):
        raise ValueError(f"a tiny model's recipe looks like 'acme/tiny@1', got {recipe!r}")
    revision = tiny_revision(recipe)

    def seeded_write(directory: Path) -> None:
        import torch

        torch.manual_seed(seed)
        write(directory)

    def ensure(cache_dir: Path | None = None) -> Path:
        return materialize_in_hf_cache(key, revision, seeded_write, cache_dir=cache_dir)

    return TinyModel(key=key, revision=revision, ensure=ensure)


T = TypeVar("T")


class BuiltOnFirstUse(Generic[T]):
    """A part a backend builds the first time a thread asks for it, once, whichever thread
    asks first (a tokenizer image-only users never pay for); ``forget`` drops it (unload)."""

    def __init__(self, build: Callable[[], T]) -> None:
        self._build = build
        self._value: T | None = None
        self._lock = threading.Lock()

    def get(self) -> T:
        value = self._value
        if value is not None:
            return value
        with self._lock:
            if self._value is None:
                self._value = self._build()
            return self._value

    def forget(self) -> None:
        with self._lock:
            self._value = None


def pad_token_rows(
    rows: Sequence[Sequence[int]], *, pad_id: int, pad_left: bool, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths as one batch, ``(input_ids, attention_mask)``, padded
    as the tokenizer pads a batch (on the left or the right) to the longest row, or to
    ``width``: what ``prepare_text`` rows need before the text tower."""
    import torch

    width = max((len(row) for row in rows), default=0) if width is None else width
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        span = slice(width - len(row), width) if pad_left else slice(0, len(row))
        input_ids[index, span] = torch.tensor(list(row), dtype=torch.long)
        attention_mask[index, span] = 1
    return input_ids, attention_mask


def embedding_dtype(device: torch.device) -> str:
    """What ``dtype="auto"`` means for :class:`TransformersEmbeddingBackend`: fp32 on the CPU
    (bf16 is emulated, and slower, on most CPUs), fp16 on accelerators."""
    return "float32" if device.type == "cpu" else "float16"


@dataclass(frozen=True)
class _Loaded:
    model: Any  # a transformers PreTrainedModel
    device: torch.device
    dtype: torch.dtype


@dataclass(frozen=True)
class _Text:
    tokenizer: Any  # a transformers tokenizer; called under the backend's text lock
    max_length: int
    pad_id: int
    pad_left: bool


class TransformersEmbeddingBackend(ImageEmbeddingBackend):
    """Image (and text) embeddings from a transformers checkpoint, read with ``AutoModel``.

    Images go through the checkpoint's own image processor in :meth:`prepare` (in the decode
    threads, before batching) and through ``get_image_features`` (CLIP, SigLIP and the like)
    or the model's pooled output (DINOv2, ViT) in :meth:`embed_prepared`. Texts go through the
    checkpoint's tokenizer and ``get_text_features`` when :attr:`text` is true. Processor and
    tokenizer load on first use, without the weights. Settings: ``device`` and ``dtype`` (auto
    is :attr:`dtype_policy`); the weights come from ``ModelSettings`` as for every plugin.

    A subclass sets :attr:`tiny` and, where its model differs, :attr:`text`,
    :attr:`text_padding`, :attr:`image_size`, or overrides :meth:`image_features` and
    :meth:`text_features`.
    """

    #: The generated tiny model (see :func:`tiny_model`), written into the cache when its key
    #: is loaded, or ``None``.
    tiny: ClassVar[TinyModel | None] = None
    #: Whether the model embeds texts into the image space (``get_text_features``).
    text: ClassVar[bool] = True
    #: ``"longest"`` pads a batch of texts to its longest; ``"max_length"`` pads every text to
    #: the length the text tower reads, for models trained so (SigLIP pools the last token).
    text_padding: ClassVar[Literal["longest", "max_length"]] = "longest"
    #: What ``dtype="auto"`` means on a device.
    dtype_policy: ClassVar[Callable[[torch.device], str]] = staticmethod(embedding_dtype)

    def __init__(self, spec: ModelSpec, settings: ModelSettings) -> None:
        super().__init__(spec, settings)
        self.placement = Placement.of(settings)  # a bad device or dtype fails here
        self._loaded: _Loaded | None = None
        self._processor: Any = None
        self._text = BuiltOnFirstUse(self._load_text_encoder)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec.key} weights={self.settings.weights!r}>"

    @property
    def supports_text(self) -> bool:
        return self.text

    # -- loading ------------------------------------------------------------------------------

    def weights(self) -> WeightSource:
        """What ``from_pretrained`` reads (the tiny model is written into the cache first)."""
        return locate_weights(
            self.settings,
            key=self.spec.key,
            marker="config.json",
            source_repo=self.spec.info.source_repo or self.spec.key,
            tiny=self.tiny,
        )

    @quiet_loading("transformers")
    def load(self) -> None:
        device = self.placement.torch_device()
        dtype = self.placement.torch_dtype(device, auto=type(self).dtype_policy)
        source = self.weights()
        try:
            model = _transformers("AutoModel").from_pretrained(
                source.path, dtype=dtype, **source.kwargs
            )
        except Exception as error:
            raise ModelLoadError(
                f"could not load {self.spec.key} from {weights_where(self.settings)}: {error}"
            ) from error
        model.to(device).eval()
        self._loaded = _Loaded(model=model, device=device, dtype=dtype)

    def unload(self) -> None:
        loaded, self._loaded = self._loaded, None
        if loaded is not None and loaded.device.type == "cuda":
            import torch

            del loaded
            torch.cuda.empty_cache()

    def memory_mb(self) -> float | None:
        """The weights as loaded, measured, plus the declared per-worker working memory."""
        loaded = self._loaded
        if loaded is None:
            return None
        tensors = [*loaded.model.parameters(), *loaded.model.buffers()]
        weights = sum(t.numel() * t.element_size() for t in tensors) / 2**20
        return float(weights + (self.spec.info.worker_overhead_mb or 0.0))

    def memory_device(self) -> str:
        return self.placement.memory_device()

    def _require_loaded(self) -> _Loaded:
        loaded = self._loaded
        if loaded is None:
            raise ModelError(f"{self.spec.key} is not loaded; call load() first")
        return loaded

    # -- images -------------------------------------------------------------------------------

    def prepare(self, image: Image) -> npt.NDArray[np.float32]:
        """The checkpoint's image processor on one image: a ``(3, H, W)`` float32 array."""
        processor = self._image_processor()
        pixels = processor(images=image, return_tensors="np")["pixel_values"][0]
        return np.asarray(pixels, dtype=np.float32)

    def embed_prepared(self, items: Sequence[Any]) -> Vectors:
        import torch

        loaded = self._require_loaded()
        pixels = torch.from_numpy(np.stack(items)).to(loaded.device, loaded.dtype)
        with torch.inference_mode():
            return unit_rows(self.image_features(loaded.model, pixels))

    def image_features(self, model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
        """A batch's image features, before normalising: ``get_image_features`` where the
        model has it, else its pooled output."""
        if hasattr(model, "get_image_features"):
            return pooled_features(model.get_image_features(pixel_values=pixel_values))
        return pooled_features(model(pixel_values=pixel_values))

    def _image_processor(self) -> Any:
        processor = self._processor
        if processor is None:
            with self._lock:  # the decode threads ask at once
                if self._processor is None:
                    load = _transformers("AutoImageProcessor").from_pretrained
                    self._processor = _loading(self, load, self.weights(), "image processor")
                processor = self._processor
        return processor

    # -- texts --------------------------------------------------------------------------------

    def prepare_text(self, text: str) -> list[int]:
        """The token ids the text tower reads: the checkpoint's tokenizer, truncated."""
        encoder = self._text.get()
        with self._lock:  # a fast tokenizer sets its truncation on shared state per call
            ids = encoder.tokenizer(text, truncation=True, max_length=encoder.max_length)
        return list(ids["input_ids"])

    def embed_texts(self, texts: Sequence[Any]) -> Vectors:
        """Embed ``prepare_text``'d texts (or plain strings, tokenized here)."""
        import torch

        loaded = self._require_loaded()
        encoder = self._text.get()
        rows = [self.prepare_text(t) if isinstance(t, str) else list(t) for t in texts]
        input_ids, attention_mask = pad_token_rows(
            rows,
            pad_id=encoder.pad_id,
            pad_left=encoder.pad_left,
            width=encoder.max_length if self.text_padding == "max_length" else None,
        )
        with torch.inference_mode():
            features = self.text_features(
                loaded.model, input_ids.to(loaded.device), attention_mask.to(loaded.device)
            )
            return unit_rows(features)

    def text_features(
        self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """A batch's text features, before normalising: ``get_text_features``."""
        return pooled_features(
            model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        )

    def _load_text_encoder(self) -> _Text:
        source = self.weights()
        tokenizer = _loading(
            self, _transformers("AutoTokenizer").from_pretrained, source, "tokenizer"
        )
        config = _loading(self, _transformers("AutoConfig").from_pretrained, source, "config")
        text_config = getattr(config, "text_config", config)
        longest = getattr(text_config, "max_position_embeddings", None)
        max_length = min(longest or tokenizer.model_max_length, tokenizer.model_max_length)
        pad_id = tokenizer.pad_token_id
        return _Text(
            tokenizer=tokenizer,
            max_length=int(max_length),
            pad_id=pad_id if isinstance(pad_id, int) else 0,
            pad_left=tokenizer.padding_side == "left",
        )


_IMPORTS = threading.Lock()


def _transformers(name: str) -> Any:
    """``transformers.<name>``, imported under a lock: transformers imports its classes
    lazily, and two threads asking for them at once can get an ImportError."""
    with _IMPORTS:
        import transformers

        return getattr(transformers, name)


def _loading(
    backend: TransformersEmbeddingBackend, load: Any, source: WeightSource, what: str
) -> Any:
    try:
        return load(source.path, **source.kwargs)
    except Exception as error:
        raise ModelLoadError(
            f"could not load the {what} of {backend.spec.key} from "
            f"{weights_where(backend.settings)}: {error}"
        ) from error


def pooled_features(output: Any) -> torch.Tensor:
    """The pooled features of a transformers output: the tensor itself (transformers 4's
    ``get_*_features``), or its ``pooler_output`` (transformers 5, vision models)."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    for name in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise ModelError(f"no pooled features in a {type(output).__name__}")


def unit_rows(features: torch.Tensor) -> Vectors:
    """Features as L2-normalised float32 rows on the host, rounded once from fp32."""
    import torch

    vectors: Vectors = torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()
    return vectors
