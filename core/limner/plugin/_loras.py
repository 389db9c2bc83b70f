"""LoRA adapters as files in folders: what each holds, read from its safetensors header
without torch, and a request's adapters checked against them.

A folder a server or script points at (``Registry(lora_dirs=...)``, ``limner serve
--lora-dir``) holds adapters by name: ``NAME.safetensors``, or ``NAME/`` with diffusers' file
name ``pytorch_lora_weights.safetensors`` in it. Their layers, rank and size come from the
file's header (an 8-byte length and a JSON table of tensors), so listing them, and refusing a
request for one that cannot be used, costs a file read and no torch. Which model an adapter
fits is the model's to say (``TextToImageBackend.lora_fit``): only it knows its layers.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from limner.errors import InvalidInput

__all__ = [
    "ADAPTER_FILE",
    "MAX_LORAS",
    "MAX_LORA_SCALE",
    "MIN_LORA_SCALE",
    "LoraAdapter",
    "LoraLayer",
    "check_lora_name",
    "find_lora",
    "lora_adapters",
    "read_lora_file",
    "scan_lora_dirs",
]

#: The file diffusers' ``save_lora_weights`` writes into a folder: ``NAME/`` + this.
ADAPTER_FILE = "pytorch_lora_weights.safetensors"
#: Adapters one request may combine.
MAX_LORAS = 4
#: The scales a request may give an adapter: 1 is the adapter as trained, 0 turns it off,
#: a negative scale pushes away from what it learned. Past these an image is noise, and a
#: value like 80 is a typo for 0.8.
MIN_LORA_SCALE = -4.0
MAX_LORA_SCALE = 4.0

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_LAYER = re.compile(r"transformer\.(?P<module>.+)\.lora_(?P<side>[AB])\.weight")
_DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # what safetensors itself accepts


@dataclass(frozen=True)
class LoraLayer:
    """One layer an adapter changes: the model's ``module`` (a Linear, by its path in the
    transformer), its input and output widths, and the adapter's rank there."""

    module: str
    in_features: int
    out_features: int
    rank: int


@dataclass(frozen=True, kw_only=True)
class LoraAdapter:
    """An adapter file as its header describes it; ``error`` says why it cannot be used (a
    truncated file, another format), in which case its layers are empty."""

    name: str
    path: str
    """The adapter's file."""
    directory: str
    """The adapter folder it was found in."""
    file_bytes: int
    fingerprint: tuple[int, int]
    """The file's size and modification time (ns): a changed file is read, and loaded, again."""
    layers: tuple[LoraLayer, ...] = ()
    parameters: int = 0
    tensor_bytes: int = 0
    error: str | None = None

    @property
    def rank(self) -> int | None:
        """The largest rank of its layers (most adapters have one rank throughout)."""
        return max((layer.rank for layer in self.layers), default=None)

    @property
    def where(self) -> str:
        """The file, relative to its adapter folder (``ink.safetensors``)."""
        return os.path.relpath(self.path, self.directory)

    def memory_mb(self, itemsize: int) -> float:
        """What the adapter holds once loaded in a model whose parameters take ``itemsize``
        bytes each."""
        return self.parameters * itemsize / 2**20


# -- one file ---------------------------------------------------------------------------------

_cache: dict[str, tuple[tuple[int, int], LoraAdapter]] = {}
_cache_lock = threading.Lock()
_CACHE_SIZE = 4096


def read_lora_file(name: str, path: str | os.PathLike[str], *, directory: str) -> LoraAdapter:
    """The adapter in ``path`` as its header describes it; a file that cannot be used comes
    back with its ``error``. Read once per version of the file (size and modification time)."""
    path = os.fspath(path)
    try:
        stat = os.stat(path)
    except OSError as error:
        return LoraAdapter(
            name=name,
            path=path,
            directory=directory,
            file_bytes=0,
            fingerprint=(0, 0),
            error=f"cannot be read: {error.strerror or error}",
        )
    fingerprint = (stat.st_size, stat.st_mtime_ns)
    with _cache_lock:
        cached = _cache.get(path)
    if cached is not None and cached[0] == fingerprint and cached[1].name == name:
        return cached[1]
    adapter = _read(name, path, directory, fingerprint)
    with _cache_lock:
        if len(_cache) >= _CACHE_SIZE:
            _cache.clear()
        _cache[path] = (fingerprint, adapter)
    return adapter


def _read(name: str, path: str, directory: str, fingerprint: tuple[int, int]) -> LoraAdapter:
    size = fingerprint[0]
    found = LoraAdapter(
        name=name, path=path, directory=directory, file_bytes=size, fingerprint=fingerprint
    )
    try:
        layers, parameters, tensor_bytes = _layers(_header(path, size))
    except _Unusable as error:
        return dataclasses.replace(found, error=str(error))
    return dataclasses.replace(
        found, layers=layers, parameters=parameters, tensor_bytes=tensor_bytes
    )


class _Unusable(Exception):
    """Why a file is not an adapter limner can load (its message completes "FILE ...")."""


def _header(path: str, size: int) -> dict[str, dict[str, Any]]:
    """The tensor table of a safetensors file, each entry checked against the file's size."""
    try:
        with open(path, "rb") as file:
            head = file.read(8)
            if len(head) < 8:
                raise _Unusable(f"is not a safetensors file: it holds {size} bytes")
            length = int.from_bytes(head, "little")
            if length > min(size - 8, _MAX_HEADER_BYTES):
                raise _Unusable(
                    f"is not a safetensors file, or is truncated: its header would be {length} "
                    f"bytes, and the file holds {size}"
                )
            text = file.read(length)
    except OSError as error:
        raise _Unusable(f"cannot be read: {error.strerror or error}") from None
    try:
        table = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        raise _Unusable("is not a safetensors file: its header is not JSON") from None
    if not isinstance(table, dict):
        raise _Unusable("is not a safetensors file: its header is not a table of tensors")
    table.pop("__metadata__", None)
    data_bytes = size - 8 - length
    for key, entry in table.items():
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("shape"), list)
            and all(isinstance(n, int) and n >= 0 for n in entry["shape"])
            and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2
            and all(isinstance(n, int) for n in entry["data_offsets"])
        ):
            raise _Unusable(f"is not a safetensors file: its entry {key!r} is malformed")
        start, end = entry["data_offsets"]
        if end > data_bytes:
            raise _Unusable(
                f"is truncated: tensor {key!r} ends at byte {8 + length + end}, and the file "
                f"holds {size}"
            )
        itemsize = _DTYPE_BYTES.get(str(entry.get("dtype")))
        if itemsize is None:
            raise _Unusable(f"holds {key!r} in {entry.get('dtype')}, which is not a float type")
        if end - start != math.prod(entry["shape"]) * itemsize:
            raise _Unusable(f"is corrupt: tensor {key!r} does not take the bytes its shape needs")
    return table


def _layers(table: dict[str, dict[str, Any]]) -> tuple[tuple[LoraLayer, ...], int, int]:
    """The layers an adapter in diffusers' format changes, its parameters and bytes."""
    if not table:
        raise _Unusable("holds no tensors")
    sides: dict[str, dict[str, list[int]]] = {}
    parameters = tensor_bytes = 0
    for key in sorted(table):
        entry = table[key]
        shape: list[int] = entry["shape"]
        start, end = entry["data_offsets"]
        parameters += math.prod(shape)
        tensor_bytes += end - start
        match = _LAYER.fullmatch(key)
        if match is None:
            raise _Unusable(_foreign(key))
        if len(shape) != 2:
            raise _Unusable(f"holds {key!r} of shape {shape}; a LoRA layer's is 2-D")
        sides.setdefault(match["module"], {})[match["side"]] = shape
    layers = []
    for module, pair in sides.items():
        a, b = pair.get("A"), pair.get("B")
        if a is None or b is None:
            missing = "lora_B" if b is None else "lora_A"
            raise _Unusable(f"has no {missing} for layer {module!r}")
        if a[0] != b[1]:
            raise _Unusable(f"has layer {module!r} with lora_A of rank {a[0]}, lora_B of {b[1]}")
        layers.append(LoraLayer(module, in_features=a[1], out_features=b[0], rank=a[0]))
    return tuple(layers), parameters, tensor_bytes


def _foreign(key: str) -> str:
    """Why ``key`` is not one of the transformer's LoRA layers in diffusers' format."""
    if key.startswith(("text_encoder", "te_", "lora_te")):
        return f"changes the text encoder ({key!r}); limner loads adapters of the transformer only"
    if key.startswith(("lora_unet_", "lora_transformer_")) or ".lora_down." in key:
        return (
            f"is in kohya/sd-scripts' format ({key!r}); limner takes diffusers' format, whose "
            "keys look like transformer.<layer>.lora_A.weight (diffusers' "
            "save_lora_weights writes it)"
        )
    return (
        f"holds {key!r}, which is not a LoRA layer of the transformer in diffusers' format "
        "(transformer.<layer>.lora_A.weight and .lora_B.weight)"
    )


# -- folders ----------------------------------------------------------------------------------


def _candidates(directory: str) -> list[tuple[str, str]]:
    """``(name, file)`` for each adapter-looking entry of ``directory``, by name."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []  # a folder gone since it was named: it holds nothing now
    found = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.name.endswith(".safetensors") and entry.is_file():
            found.append((entry.name.removesuffix(".safetensors"), entry.path))
        elif entry.is_dir() and os.path.isfile(os.path.join(entry.path, ADAPTER_FILE)):
            found.append((entry.name, os.path.join(entry.path, ADAPTER_FILE)))
    return sorted(found)


def scan_lora_dirs(dirs: Iterable[str]) -> list[LoraAdapter]:
    """Every adapter in ``dirs``, sorted by name. One whose name is taken by an earlier
    folder (or by the other form in the same folder) is listed with why it is not used."""
    adapters: list[LoraAdapter] = []
    chosen: dict[str, LoraAdapter] = {}
    for directory in dirs:
        for name, path in _candidates(directory):
            if not _NAME.fullmatch(name):
                error = "its name is not an adapter name (letters, digits, '.', '_' and '-')"
                adapters.append(_unusable(name, path, directory, error))
                continue
            earlier = chosen.get(name)
            if earlier is not None:
                adapters.append(_unusable(name, path, directory, f"{earlier.path} comes first"))
                continue
            adapter = read_lora_file(name, path, directory=directory)
            chosen[name] = adapter
            adapters.append(adapter)
    return sorted(adapters, key=lambda adapter: adapter.name)


def _unusable(name: str, path: str, directory: str, error: str) -> LoraAdapter:
    size = os.path.getsize(path) if os.path.exists(path) else 0
    return LoraAdapter(
        name=name, path=path, directory=directory, file_bytes=size, fingerprint=(0, 0), error=error
    )


def find_lora(dirs: Iterable[str], name: str) -> LoraAdapter | None:
    """The adapter called ``name`` (a checked name) in the first of ``dirs`` that holds one,
    as :func:`scan_lora_dirs` would choose it; ``None`` when none does (or when ``name`` is
    no adapter's name: never a path)."""
    if not _NAME.fullmatch(name) or ".." in name:
        return None
    for directory in dirs:
        for path in (
            os.path.join(directory, f"{name}.safetensors"),
            os.path.join(directory, name, ADAPTER_FILE),
        ):
            if os.path.isfile(path):
                return read_lora_file(name, path, directory=directory)
    return None


# -- a request's adapters ---------------------------------------------------------------------


def check_lora_name(name: object, *, field: str) -> str:
    """``name`` if it can name an adapter: letters, digits, ``.``, ``_`` and ``-``, starting
    with a letter or digit, never a path (``../x``, ``/etc/x``)."""
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"must be an adapter's name, got {name!r}", field=field)
    if not _NAME.fullmatch(name) or ".." in name:
        raise InvalidInput(
            f"{name!r} is not an adapter's name: names are letters, digits, '.', '_' and '-' "
            "(the file's name without .safetensors), never a path",
            field=field,
        )
    return name


def _scale(value: object, *, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInput(f"must be a finite number, got {value!r}", field=field)
    if not MIN_LORA_SCALE <= value <= MAX_LORA_SCALE:
        raise InvalidInput(
            f"must be between {MIN_LORA_SCALE:g} and {MAX_LORA_SCALE:g}, got {value!r}",
            field=field,
        )
    return float(value)


def lora_adapters(
    loras: object,
    *,
    dirs: Sequence[str],
    fit: Callable[[LoraAdapter], str | None],
    key: str,
) -> list[tuple[LoraAdapter, float]]:
    """A request's ``(name, scale)`` pairs checked: at most :data:`MAX_LORAS`, each name an
    adapter in ``dirs`` that can be used and fits the model (``fit`` says why not, or
    ``None``), each scale within :data:`MIN_LORA_SCALE` and :data:`MAX_LORA_SCALE`, no name
    twice. Returns each adapter with its scale, in the request's order; raises
    ``InvalidInput`` naming ``loras[i].name`` or ``loras[i].scale``."""
    if not isinstance(loras, (tuple, list)):
        raise InvalidInput(
            f"must be a list of (name, scale) pairs, got {type(loras).__name__}", field="loras"
        )
    if len(loras) > MAX_LORAS:
        raise InvalidInput(
            f"may combine at most {MAX_LORAS} adapters, got {len(loras)}", field="loras"
        )
    chosen: list[tuple[LoraAdapter, float]] = []
    for index, entry in enumerate(loras):
        if not isinstance(entry, (tuple, list)) or len(entry) != 2:
            raise InvalidInput(
                f"must be a (name, scale) pair, got {entry!r}", field=f"loras[{index}]"
            )
        name = check_lora_name(entry[0], field=f"loras[{index}].name")
        scale = _scale(entry[1], field=f"loras[{index}].scale")
        if any(adapter.name == name for adapter, _ in chosen):
            raise InvalidInput(f"{name!r} is given twice", field=f"loras[{index}].name")
        adapter = _check_adapter(name, dirs=dirs, fit=fit, key=key, field=f"loras[{index}].name")
        chosen.append((adapter, scale))
    return chosen


def _check_adapter(
    name: str,
    *,
    dirs: Sequence[str],
    fit: Callable[[LoraAdapter], str | None],
    key: str,
    field: str,
) -> LoraAdapter:
    if not dirs:
        raise InvalidInput(
            f"no LoRA adapter {name!r}: no adapter folders are set (limner serve --lora-dir "
            "DIR, limner generate --lora-dir DIR, Registry(lora_dirs=[...]))",
            field=field,
        )
    adapter = find_lora(dirs, name)
    if adapter is None:
        known = [a.name for a in scan_lora_dirs(dirs) if a.error is None]
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise InvalidInput(
            f"no LoRA adapter {name!r} in {', '.join(dirs)}.{hint} `limner loras` and "
            "GET /v1/loras list them",
            field=field,
        )
    if adapter.error is not None:
        raise InvalidInput(f"{adapter.path} {adapter.error}", field=field)
    reason = fit(adapter)
    if reason is not None:
        raise InvalidInput(f"{adapter.path} does not fit {key}: {reason}", field=field)
    return adapter


def lora_dirs_setting(dirs: Iterable[str | os.PathLike[str]], *, field: str) -> tuple[str, ...]:
    """Adapter folders as settings hold them: absolute paths of existing folders."""
    if isinstance(dirs, (str, os.PathLike)):
        raise InvalidInput("must be a sequence of folders, not one", field=field)
    resolved = []
    for given in dirs:
        path = Path(given).expanduser()
        if not path.is_dir():
            raise InvalidInput(f"{os.fspath(given)!r} is not a folder", field=field)
        resolved.append(str(path.resolve()))
    return tuple(dict.fromkeys(resolved))
