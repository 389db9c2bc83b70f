"""The async front of a text-to-image model: a prompt in, a stream of chunks out."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable

from limner._fronts._blocking import BlockingFront, call_blocking
from limner._fronts._front import ModelFront
from limner.errors import InvalidInput, ModelError
from limner.plugin._backends import TextToImageBackend
from limner.plugin._generation import GenerationChunk, GenerationResult, ImageGenerationConfig
from limner.runtime import Runtime, StreamCall

__all__ = ["ImageGenerator", "check_prompt"]


def check_prompt(prompt: object) -> None:
    """Raise ``InvalidInput`` naming the prompt unless it is a string with something in it:
    the first thing a generation checks, before its config and long before any weights."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidInput("prompt must be a non-empty string", field="prompt")


class ImageGenerator(ModelFront[TextToImageBackend]):
    """Implements :class:`~limner.TextToImageCapable` over a plugin's backend.

    The config is validated before any weights load; generation runs in a pool worker
    thread and streams ``Progress`` chunks, then one ``GenerationResult``. Stop iterating
    (or cancel the consumer) and the run stops at its next step.
    """

    def __repr__(self) -> str:
        return f"<ImageGenerator {self.spec.key}>"

    def using(self, runtime: Runtime) -> ImageGenerator:
        """The same model, served by ``runtime`` (a :class:`~limner.Pool`, or any
        :class:`~limner.Runtime`) instead of the current or default pool."""
        bound = ImageGenerator(self.spec, self.backend)
        bound._runtime = runtime
        return bound

    def blocking(self) -> BlockingImageGenerator:
        """The same model behind a plain blocking call, for synchronous host code."""
        return BlockingImageGenerator(self)

    def resolve_config(self, config: ImageGenerationConfig | None = None) -> ImageGenerationConfig:
        """The config with the model's defaults filled in and a seed drawn; validated (its
        LoRA adapters too, in their canonical order)."""
        config = config or ImageGenerationConfig()
        if config.loras and not self.backend.supports_loras:
            raise InvalidInput(f"{self.key} takes no LoRA adapters", field="loras")
        return self.backend.resolve_config(config)

    async def generate_image(
        self, prompt: str, config: ImageGenerationConfig | None = None
    ) -> AsyncGenerator[GenerationChunk, None]:
        check_prompt(prompt)
        resolved = self.resolve_config(config)
        # The adapters are state of the one shared model: calls with another set of them
        # never run beside this one (see StreamCall.group).
        adapters = tuple(sorted(resolved.loras))
        call = StreamCall("generate", (prompt, resolved), group=adapters)
        stream = self._run_stream(call)
        try:
            async for chunk in stream:
                yield chunk
        finally:
            await stream.aclose()

    async def generate(
        self,
        prompt: str,
        config: ImageGenerationConfig | None = None,
        on_progress: Callable[[GenerationChunk], None] | None = None,
    ) -> GenerationResult:
        """Run a whole generation and return its result; ``on_progress`` sees every chunk."""
        result: GenerationResult | None = None
        async for chunk in self.generate_image(prompt, config):
            if on_progress is not None:
                on_progress(chunk)
            if isinstance(chunk, GenerationResult):
                result = chunk
        if result is None:
            raise ModelError(f"{self.key} ended its stream without a result")
        return result


class BlockingImageGenerator(BlockingFront[ImageGenerator]):
    """:class:`~limner.ImageGenerator` as a blocking call with a progress callback."""

    def generate(
        self,
        prompt: str,
        config: ImageGenerationConfig | None = None,
        *,
        on_progress: Callable[[GenerationChunk], None] | None = None,
    ) -> GenerationResult:
        """Generate and return the result; ``on_progress`` sees each chunk on the loop thread."""
        return call_blocking("generate", self.model.generate, prompt, config, on_progress)
