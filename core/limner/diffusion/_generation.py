"""One generation on a shared, loaded pipeline: the denoising loop with its step progress and
previews, and what lets concurrent calls share one set of weights.

Each call works on a shallow copy of the pipeline with its own copy of the scheduler
(``set_timesteps`` and the pipeline's ``_guidance_scale`` and friends are per-call state) and
its thread's own tokenizers (whose padding settings are per-call state too), so two threads
can generate on the same weights at once; with CPU offload, calls take turns. Kept apart from
the backend class, which decides what to generate (config, keyword arguments, metadata), so
this reads as how a call runs. Torch is imported only inside the functions.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from limner.plugin import ImageGenerationConfig, Progress, StepCallback

from ._pipeline import LoadedPipeline

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from ._preview import LatentRGB

__all__ = ["PreviewLatents", "call_view", "exclusive", "latent_rgb", "run_pipeline"]

PreviewLatents = Callable[[Any, "torch.Tensor", ImageGenerationConfig], "torch.Tensor"]
"""A step's latents as ``(batch, channels, h, w)``: ``DiffusersBackend.preview_latents``."""


def run_pipeline(
    loaded: LoadedPipeline,
    prompt: str,
    config: ImageGenerationConfig,
    *,
    seeds: Sequence[int],
    on_step: StepCallback,
    preview_latents: PreviewLatents,
    call_kwargs: dict[str, Any],
    pipeline: Any = None,
) -> tuple[tuple[Image.Image, ...], dict[str, float]]:
    """The images of one pipeline call on a resolved ``config``, one per seed, and its
    timings (``generate``, and ``decode``: from the last step to the images).

    ``on_step`` hears each step (with a preview when ``config.preview``); whatever it raises
    (``Cancelled``) stops the call before the next step. ``pipeline`` is the one to call
    when not the loaded one: an edit pipeline built on its components (``edit_pipelines``).
    """
    import torch

    # CPU generators: the starting noise is then the same on every device, so a seed
    # reproduces (nearly) the same image on another machine, not only on this one.
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    steps = config.steps
    assert steps is not None and config.width is not None and config.height is not None
    started = time.perf_counter()
    last_step = started

    with exclusive(loaded):
        preview = latent_rgb(loaded) if config.preview else None
        view = call_view(loaded, pipeline)

        def step_end(
            pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]
        ) -> dict[str, Any]:
            nonlocal last_step
            image = None
            if preview is not None:
                image = preview.image(preview_latents(pipe, tensors["latents"], config))
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
            output = view(
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
                **call_kwargs,
            )
    finished = time.perf_counter()
    return tuple(output.images), {"generate": finished - started, "decode": finished - last_step}


@contextmanager
def exclusive(loaded: LoadedPipeline) -> Iterator[None]:
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


def latent_rgb(loaded: LoadedPipeline) -> LatentRGB:
    """The preview projection, measured from the VAE on the first preview asked for."""
    with loaded.preview_lock:
        if loaded.preview is None:
            from ._preview import fit_latent_rgb

            execution = loaded.pipeline._execution_device
            loaded.preview = fit_latent_rgb(loaded.pipeline.vae, execution)
        return loaded.preview


def call_view(loaded: LoadedPipeline, pipeline: Any = None) -> Any:
    """A pipeline object for one call around the shared, read-only modules: of ``pipeline``
    (one built on the loaded one's components), else of the loaded pipeline.

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
    pipeline = loaded.pipeline if pipeline is None else pipeline
    # the tokenizers are the loaded pipeline's, shared by the pipelines built on its components
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
    # modules when it ends; ``exclusive`` resets the shared pipeline's once, afterwards.
    view._all_hooks = []
    return view
