"""What a plugin implements: synchronous backends that the core runs off the event loop.

A plugin author writes plain blocking code: ``load`` reads weights, ``embed_prepared`` or
``generate`` runs a batch. The core owns everything asynchronous: decoding inputs, queueing,
batching, worker threads, cancellation. Constructing a backend must be cheap (no weights, no
torch import); heavy work belongs in ``load``, which runs once per worker, in a thread.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import numpy.typing as npt

from limner.plugin._generation import GenerationResult, ImageGenerationConfig, Progress
from limner.plugin._memory import CachedPart

if TYPE_CHECKING:
    from PIL.Image import Image

    from limner._registry._spec import ModelSettings, ModelSpec
    from limner.plugin._loras import LoraAdapter

__all__ = [
    "Backend",
    "ImageEmbeddingBackend",
    "StepCallback",
    "TextToImageBackend",
]

StepCallback = Callable[[Progress], None]
"""Called by a generating backend after each step; raising from it stops the generation."""


class Backend(abc.ABC):
    """Shared part of every backend: the spec it serves, its settings, loading and unloading."""

    def __init__(self, spec: ModelSpec, settings: ModelSettings) -> None:
        self.spec = spec
        self.settings = settings

    @abc.abstractmethod
    def load(self) -> None:
        """Load weights and get ready to serve. Blocking; the core calls it in a thread."""

    def unload(self) -> None:  # noqa: B027 - optional hook, nothing to do by default
        """Drop references to weights so their memory can be freed."""

    def memory_mb(self) -> float | None:
        """The measured footprint after ``load`` in MB, or ``None`` if unknown."""
        return None

    def max_concurrent_calls(self) -> int | None:
        """How many batches or generations may run at once on the loaded model; ``None``
        means one per worker. Called after ``load``.

        A CPU model whose every call already uses all cores is faster one call at a time;
        saying so lets the pool form each batch when it can start, so it is larger.
        """
        return None

    def memory_device(self) -> str:
        """Whose memory a loaded worker occupies: ``"cpu"`` (system RAM) or ``"cuda:N"``.

        Called in a thread just before ``load``, so resolving ``"auto"`` may import torch.
        """
        return "cpu"

    def caches(self) -> Sequence[CachedPart]:
        """What the loaded model holds beyond its weights and can drop now, without stopping
        a call, to load again when needed (LoRA adapters no running call uses). A pool short
        of room drops the least recently used of these before it evicts any model. Called
        on the runtime's event loop: it must be cheap and never wait."""
        return ()

    def drop_caches(self, names: Sequence[str]) -> None:  # noqa: B027 - optional hook
        """Drop the named :meth:`caches` (those still unused now; others are kept), so that
        ``memory_mb()`` no longer counts them. Called in a thread."""


class ImageEmbeddingBackend(Backend):
    """Turns decoded RGB images (and optionally texts) into L2-normalised float32 vectors."""

    #: Side in pixels the model's input is resized to; lets the decoder take a cheap
    #: reduced-size JPEG decode (draft mode) that is still at least this large.
    image_size: int | None = None

    def prepare(self, image: Image) -> Any:
        """Per-image preprocessing done at decode time, before batching; needs no weights.

        Runs in a thread for each input on its own, so a bad image fails only its caller.
        Returns whatever ``embed_prepared`` takes; the default passes the image through.
        """
        return image

    @abc.abstractmethod
    def embed_prepared(self, items: Sequence[Any]) -> npt.NDArray[np.float32]:
        """Embed a batch of ``prepare``'d items: an ``(n, d)`` float32 array, rows L2-normalised."""

    def prepare_text(self, text: str) -> Any:
        """Per-text preprocessing (tokenizing, say) done before batching; needs no weights.

        Runs in a thread for each call's own texts, outside the model's turn, so one caller's
        long texts never hold up another's batch. Returns whatever ``embed_texts`` takes; the
        default passes the text through.
        """
        return text

    def embed_texts(self, texts: Sequence[Any]) -> npt.NDArray[np.float32]:
        """Embed a batch of ``prepare_text``'d texts into the image space (CLIP-style models);
        others need not override."""
        raise NotImplementedError(f"{self.spec.key} does not embed text")

    @property
    def supports_text(self) -> bool:
        return type(self).embed_texts is not ImageEmbeddingBackend.embed_texts


class TextToImageBackend(Backend):
    """Turns a prompt and a config into images, reporting each denoising step."""

    #: The family of base models whose LoRA adapters this backend loads ("FLUX.1"), named
    #: in listings of adapters; ``None`` for a backend that loads none.
    lora_family: ClassVar[str | None] = None

    @property
    def supports_loras(self) -> bool:
        """Whether requests may name LoRA adapters (``ImageGenerationConfig.loras``): a
        backend that says so checks them in ``resolve_config`` and applies them in
        ``generate``. The front refuses adapters for one that does not."""
        return False

    def lora_fit(self, adapter: LoraAdapter) -> str | None:
        """Why ``adapter`` cannot be loaded into this model (a layer it lacks, another
        width), or ``None`` when it fits. Needs no weights."""
        return f"{self.spec.key} takes no LoRA adapters"

    @abc.abstractmethod
    def resolve_config(self, config: ImageGenerationConfig) -> ImageGenerationConfig:
        """Fill the model's defaults into ``config`` and validate it; raise ``InvalidInput``
        naming the field for a bad one. Needs no weights."""

    @abc.abstractmethod
    def generate(
        self, prompt: str, config: ImageGenerationConfig, *, on_step: StepCallback
    ) -> GenerationResult:
        """Run the pipeline with a resolved config (its seed set), calling ``on_step`` per step."""

    # -- editing: an optional feature ------------------------------------------------------------

    def edit(
        self,
        prompt: str,
        config: ImageGenerationConfig,
        image: npt.NDArray[np.uint8],
        mask: npt.NDArray[np.uint8] | None,
        *,
        on_step: StepCallback,
    ) -> GenerationResult:
        """Repaint ``image`` (RGB, ``(height, width, 3)`` uint8) after ``prompt``, with a
        resolved config whose size is the output's; where ``mask`` (``(height, width)``
        uint8, the image's size) is given, only its 255 pixels, keeping the rest. Streams
        like :meth:`generate`. ``config.strength`` 0 returns the source.

        Optional: a backend that overrides it can edit (:attr:`supports_editing`); the front
        checks the inputs (decoded, sizes matching, the mask 0 or 255) before it is called.
        """
        raise NotImplementedError(f"model {self.spec.key} cannot edit images")

    @property
    def supports_editing(self) -> bool:
        """Whether :meth:`edit` works: true where a subclass overrides it."""
        return type(self).edit is not TextToImageBackend.edit

    def edit_size(self, width: int, height: int) -> tuple[int, int]:
        """The output size of an edit whose config gives none, for a ``width`` x ``height``
        source: by default the source's own. A model with size rules (multiples of 16, a
        largest side) returns the nearest size it takes. Needs no weights."""
        return width, height
