"""One checkpoint of a diffusion family: its facts and the request limits limner enforces."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from limner.plugin import Capability, ModelInfo, ModelSpec, TinyModel

__all__ = ["Checkpoint"]

CheckpointT = TypeVar("CheckpointT", bound="Checkpoint")

#: The fields a checkpoint hands on to its spec's ``ModelInfo`` as they are, by name.
_FACTS_OF_THE_SPEC = ("source_repo", "revision", "license", "description", "tiny", "gated")


@dataclass(frozen=True, kw_only=True)
class Checkpoint:
    """One diffusion checkpoint's facts and the request limits limner enforces for it.

    What :class:`DiffusersBackend` and :func:`resolve_config` read, and what :meth:`spec`
    declares. A family subclasses it (a frozen, keyword-only dataclass) to give its own
    defaults, e.g. that its repos are gated or that it takes no negative prompt.
    """

    key: str
    aliases: tuple[str, ...] = ()
    #: The Hugging Face repo the weights come from, named in load-error advice; by default
    #: the key, which is the repo id by convention.
    source_repo: str = ""
    revision: str | None = None
    license: str
    description: str
    #: Peak memory of one loaded worker generating at the default size, in MB in bf16.
    memory_mb: float
    #: One generation's working memory at the default size in MB in bf16, on top of the
    #: weights: what a second concurrent generation on the same weights adds.
    working_mb: float
    tiny: bool = False
    #: Whether the repo needs its licence accepted before download.
    gated: bool = False
    default_size: int = 1024
    min_size: int = 256
    max_size: int = 2048
    #: Sides must divide by this: the VAE's downsampling times the transformer's patch size.
    size_multiple: int = 16
    default_steps: int
    max_steps: int = 100
    default_guidance: float
    max_guidance: float = 20.0
    #: Distilled to run without guidance: it has no guidance input at all, so a guidance
    #: other than 0 is refused.
    guidance_distilled_away: bool = False
    #: Why the checkpoint takes no negative prompt at all, or ``None`` when it takes one
    #: (which needs classifier-free guidance: guidance above 1).
    negative_prompt_refusal: str | None = None
    #: The request's ``max_sequence_length``: the prompt tokens the T5 encoder reads, by
    #: default and at the most.
    default_prompt_tokens: int = 256
    max_prompt_tokens: int = 512
    #: The transformer's architecture: the arguments its diffusers class takes, as its
    #: ``config.json`` holds them. A family that takes LoRA adapters reads the layers they
    #: may change from it (``DiffusersBackend.lora_layers``), without weights.
    transformer: Mapping[str, Any] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        if not self.source_repo:
            object.__setattr__(self, "source_repo", self.key)

    @classmethod
    def for_tiny(
        cls: type[CheckpointT], tiny: TinyModel, *, family: str, **limits: Any
    ) -> CheckpointT:
        """The checkpoint of a family's generated ``tiny`` model (see :func:`tiny_pipeline`):
        a few MB, 64 px by default (16 at the least), 4 steps without guidance, 32 prompt
        tokens; ``limits`` sets the other fields, such as ``max_size``."""
        fields: dict[str, Any] = {
            "license": "apache-2.0",
            "memory_mb": 64.0,
            "working_mb": 16.0,
            "gated": False,
            "default_size": 64,
            "min_size": 16,
            "default_steps": 4,
            "default_guidance": 0.0,
            "default_prompt_tokens": 32,
            **limits,
        }
        description = (
            f"TINY random-weight {family} for tests and offline demos; its images are noise"
        )
        return cls(
            key=tiny.key, revision=tiny.revision, tiny=True, description=description, **fields
        )

    def spec(self, factory: str, **default_settings: Any) -> ModelSpec:
        """The checkpoint's text-to-image :class:`~limner.plugin.ModelSpec`, built by
        ``factory``. Its default settings: ``cpu_offload=False`` and ``default_settings``."""
        settings: Mapping[str, Any] = {"cpu_offload": False, **default_settings}
        return ModelSpec(
            key=self.key,
            aliases=self.aliases,
            capability=Capability.TEXT_TO_IMAGE,
            factory=factory,
            info=ModelInfo(
                memory_mb=self.memory_mb,
                worker_overhead_mb=self.working_mb,  # a second generation shares the weights
                max_batch_size=1,  # a request is one pipeline call; num_images batch inside it
                default_settings=settings,
                **{name: getattr(self, name) for name in _FACTS_OF_THE_SPEC},
            ),
        )
