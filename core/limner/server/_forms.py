"""Reading an edit request: ``multipart/form-data`` as OpenAI's ``images.edit`` sends it.

The files are the source images (``image``, or ``image[]`` repeated, as the ``openai``
package names them for a list) and a ``mask``; every other part is a text field, whose
string is read as the JSON value the request model's field takes (``"2"`` for ``n``,
``"true"`` for ``stream``), then checked as strictly as a JSON body. Files are read within
``ImageLimits.max_bytes`` and decoded later, in a thread, by limner's decoders; the number
of parts is bounded before anything is read.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from limner.inputs import ImageLimits

from ._errors import APIError, validation_error
from ._schemas import ImageEditRequest

__all__ = ["MAX_SOURCES", "EditForm", "read_edit_form"]

MAX_SOURCES = 16
"""Source images one edit request may carry, as OpenAI's own limit."""

_SOURCE_FIELDS = ("image", "image[]")


@dataclass
class EditForm:
    """An edit request: its text fields, checked, and its files' bytes, not yet decoded."""

    body: ImageEditRequest
    sources: list[bytes]
    mask: bytes | None


async def read_edit_form(request: Request, *, limits: ImageLimits) -> EditForm:
    """The edit request's fields and files; a 400 naming the field for anything amiss."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "multipart/form-data":
        raise APIError(
            400,
            "an edit is sent as multipart/form-data, its image (and mask) as files, as "
            f"OpenAI's images.edit sends it; this request has Content-Type {media or 'none'!r}",
            code="invalid_request",
        )
    form = await request.form(max_files=MAX_SOURCES + 1, max_fields=64)
    sources: list[bytes] = []
    mask: bytes | None = None
    fields: dict[str, str] = {}
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                data = await _read(value, name, limits)
                if name in _SOURCE_FIELDS:
                    sources.append(data)
                elif name == "mask" and mask is None:
                    mask = data
                else:
                    raise APIError(
                        400,
                        f"{name}: this route takes the files image (or image[]) and one mask",
                        param=name,
                        code="invalid_request",
                    )
            elif name in (*_SOURCE_FIELDS, "mask"):
                raise APIError(
                    400,
                    f"{name} must be a file: upload the image",
                    param=name,
                    code="invalid_request",
                )
            elif name in fields:
                raise APIError(400, f"{name} is given twice", param=name, code="invalid_request")
            else:
                fields[name] = value
    finally:
        await form.close()
    body = _checked(ImageEditRequest, fields)
    if not sources:
        raise APIError(
            400,
            "missing required field 'image': the image to edit, as a file (image[] for several)",
            param="image",
            code="invalid_request",
        )
    return EditForm(body=body, sources=sources, mask=mask)


async def _read(upload: UploadFile, name: str, limits: ImageLimits) -> bytes:
    data = await upload.read(limits.max_bytes + 1)
    if len(data) > limits.max_bytes:
        raise APIError(
            400,
            f"{name} is over the limit of {limits.max_bytes} bytes (ImageLimits.max_bytes)",
            param=name,
            code="invalid_input",
        )
    return data


Model = typing.TypeVar("Model", bound=BaseModel)


def _checked(model: type[Model], fields: dict[str, str]) -> Model:
    """``fields`` as ``model`` takes them, each string read as its field's JSON value."""
    values = {name: _value(model, name, text) for name, text in fields.items()}
    try:
        return model.model_validate(values)
    except ValidationError as error:
        problems = [{**problem, "loc": ("body", *problem["loc"])} for problem in error.errors()]
        raise validation_error(RequestValidationError(problems), "multipart/form-data") from None


def _value(model: type[BaseModel], name: str, text: str) -> Any:
    """A form field's string as its field's JSON value: kept as text for a text field (a
    prompt of "42" is text), else parsed as JSON when it parses (``"0.6"``, ``"true"``, and
    for a list field such as ``loras`` its JSON list)."""
    field = model.model_fields.get(name)
    kinds = set() if field is None else _types_of(field.annotation)
    if field is None or str in kinds:
        return text
    try:
        parsed = json.loads(text)
    except ValueError:
        return text  # the model says what it should have been
    if isinstance(parsed, (bool, int, float)) or (isinstance(parsed, list) and list in kinds):
        return parsed
    return text


def _types_of(annotation: Any) -> set[type]:
    """The plain types an annotation admits: ``str`` for ``Literal["a"]``, ``int`` for
    ``Annotated[int, Strict()] | None``."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return {type(value) for value in typing.get_args(annotation)}
    if origin is typing.Annotated:
        return _types_of(typing.get_args(annotation)[0])
    if origin is list:
        return {list}
    if origin in (Union, types.UnionType):
        return set().union(*(_types_of(arg) for arg in typing.get_args(annotation)))
    return {annotation} if isinstance(annotation, type) else set()
