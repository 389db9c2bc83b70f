"""A request's LoRA adapters as the routes receive them, and the adapters a server lists.

Generations take ``"loras": [{"name": "ink", "scale": 0.8}]`` in their JSON body; a multipart
form (OpenAI's image edits) carries the same list as a JSON string in its ``loras`` field.
Both become the config's ``(name, scale)`` pairs through :func:`lora_pairs`, so a bad entry
is the same 400 naming the same field (``loras[1].scale``) whichever way it came. Whether the
names exist and fit the model is the model's to say, with the rest of the config.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from pydantic import TypeAdapter, ValidationError

from limner import InvalidInput, LoraEntry

from ._schemas import LoraCard, LoraChoice

__all__ = ["lora_cards", "lora_pairs"]

_CHOICES = TypeAdapter(list[LoraChoice])


def lora_pairs(value: str | Sequence[LoraChoice] | None) -> tuple[tuple[str, float], ...]:
    """``(name, scale)`` for each adapter a request names: ``value`` is the JSON body's
    validated list, or a form field's JSON text (``'[{"name": "ink", "scale": 0.8}]'``).
    Raises ``InvalidInput`` naming the field (``loras``, ``loras[0].scale``)."""
    if value is None:
        return ()
    if isinstance(value, str):
        if not value.strip():
            return ()
        try:
            decoded = json.loads(value)
        except ValueError:
            raise InvalidInput(
                'must be a JSON list of adapters, such as [{"name": "ink", "scale": 0.8}]',
                field="loras",
            ) from None
        try:
            value = _CHOICES.validate_python(decoded)
        except ValidationError as error:
            problem = error.errors()[0]
            raise InvalidInput(problem["msg"], field=_field(problem["loc"])) from None
    return tuple((choice.name, choice.scale) for choice in value)


def _field(location: Sequence[int | str]) -> str:
    """``(0, "scale")`` as ``loras[0].scale``."""
    field = "loras"
    for part in location:
        field += f"[{part}]" if isinstance(part, int) else f".{part}"
    return field


def lora_cards(entries: Sequence[LoraEntry]) -> list[LoraCard]:
    """The adapters as ``GET /v1/loras`` lists them: where each file is, within its adapter
    folder (the server's own paths are not the client's business)."""
    return [
        LoraCard(
            name=entry.name,
            family=entry.family,
            models=list(entry.models),
            rank=entry.adapter.rank,
            size_bytes=entry.adapter.tensor_bytes,
            where=entry.adapter.where,
            reason=entry.reason and entry.reason.replace(entry.adapter.path, entry.adapter.where),
        )
        for entry in entries
    ]
