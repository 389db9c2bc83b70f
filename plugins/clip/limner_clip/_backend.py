"""CLIP served through transformers' ``CLIPModel``: images and texts into one vector space.

Preprocessing is split the way limner's embedder wants it: ``prepare`` does the geometric
part (resize and centre crop, one PIL call per image, no weights) in the decode threads, and
``embed_prepared`` does the arithmetic part (normalisation) for the whole batch in torch,
right before the vision tower. Texts are tokenized the same way, in ``prepare_text`` before
batching (a long text is first cut to a prefix that surely holds the tokens the text tower
reads), and padded into a batch in ``embed_texts``. Torch and transformers are imported only
in ``load`` and on the first text.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import re
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from limner.errors import InvalidInput, ModelError, ModelLoadError
from limner.plugin import (
    BuiltOnFirstUse,
    ImageEmbeddingBackend,
    ModelSettings,
    ModelSpec,
    Placement,
    WeightSource,
    locate_weights,
    pad_token_rows,
    parse_device,
    parse_dtype,
    pooled_features,
    quiet_loading,
    unit_rows,
    weights_where,
)

from ._footprint import MIB, working_mb
from ._tiny import TINY

if TYPE_CHECKING:
    import tokenizers
    import torch
    from transformers import CLIPConfig, CLIPModel

__all__ = [
    "AMX_FLAGS",
    "BF16_FLAGS",
    "CLIP_MEAN",
    "CLIP_STD",
    "VNNI_FLAGS",
    "ClipBackend",
    "clip_precision",
    "cpu_flags",
    "cpu_precision",
    "cpuinfo_flags",
    "parse_clip_dtype",
    "resize_crop_box",
    "resolve_precision",
    "token_prefix",
]

#: OpenAI CLIP's normalisation, used when a repo has no preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_IMAGE_SIZE = 224
#: The most images one forward pass takes on a CPU; a larger batch runs as several passes.
#: ViT-B/32 in batches of 64 ran 28% slower an image than in batches of 32 in int8, 16%
#: slower in fp32 (same in bf16): the activations outgrow the caches.
CPU_FORWARD_BATCH = 32

# A word: a run of anything but Unicode White_Space, the characters tokenizers' \s matches.
_WORD = re.compile(r"[^\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")

Vectors = npt.NDArray[np.float32]
TokenIds = list[int]


# -- settings ---------------------------------------------------------------------------------


#: CPU flags of native bf16 arithmetic: AVX512-BF16 (about 1.7x fp32 on the CLIP towers),
#: and AMX tiles, whose bf16 products oneDNN runs several times faster again.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
AMX_FLAGS = frozenset({"amx_bf16"})
#: The CPU flag of 8-bit dot products summed in int32 that fbgemm's int8 kernels use
#: (AVX512-VNNI; the 256-bit AVX-VNNI of client CPUs is not among them).
VNNI_FLAGS = frozenset({"avx512_vnni"})
#: The values of the ``dtype`` setting: limner's common ones plus int8 (CPUs only).
INT8_NAMES = frozenset({"int8", "qint8"})


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's flags from /proc/cpuinfo; empty where there is none (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    return cpuinfo_flags(text)


def cpuinfo_flags(cpuinfo: str) -> frozenset[str]:
    """The flags of the first processor in a /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_precision(flags: Collection[str]) -> str:
    """What ``dtype="auto"`` means for CLIP on a CPU with these flags: the fastest precision
    whose vectors agree with fp32's (centred cosine >= 0.98 on a real-size random-weight
    ViT-B/32; the figures are in the plugin's README).

    bf16 with AMX (its tiles do bf16, not fbgemm's int8); int8 with AVX512-VNNI, which was
    faster than bf16 even where the CPU also does bf16 natively (AVX512-BF16) and agreed as
    well, and several times faster than bf16 emulated; bf16 with AVX512-BF16 alone; fp32
    elsewhere (int8 there gets 7-bit inputs, which do not agree).
    """
    present = frozenset(flags)
    if present & AMX_FLAGS:
        return "bfloat16"
    if present & VNNI_FLAGS:
        return "int8"
    if present & BF16_FLAGS:
        return "bfloat16"
    return "float32"


def clip_precision(device: torch.device, flags: Collection[str] | None = None) -> str:
    """What ``dtype="auto"`` means for CLIP on ``device``: fp16 on accelerators; on a CPU,
    :func:`cpu_precision` of its flags (this CPU's unless given)."""
    if device.type in ("cuda", "mps"):
        return "float16"
    return cpu_precision(cpu_flags() if flags is None else flags)


def parse_clip_dtype(value: str) -> str | None:
    """Validate a dtype setting without torch: ``"int8"``, or limner's common dtypes
    (``parse_dtype``); ``None`` means auto."""
    if value.strip().lower() in INT8_NAMES:
        return "int8"
    try:
        return parse_dtype(value)
    except InvalidInput as error:
        raise InvalidInput(
            "dtype must be 'auto', 'bfloat16' (bf16), 'float16' (fp16), 'float32' (fp32) or "
            f"'int8' (CPUs only), got {value!r}",
            field="dtype",
        ) from error


def resolve_precision(requested: str | None, device: torch.device) -> str:
    """The precision CLIP runs in: as asked, else :func:`clip_precision`. int8 is for CPUs:
    asked for on another device, it is a load error."""
    precision = requested if requested is not None else clip_precision(device)
    if precision == "int8" and device.type != "cpu":
        raise ModelLoadError(
            f"dtype int8 runs on CPUs only, and this model is placed on {device}; set dtype "
            "to 'auto' (float16 there) or set device to 'cpu'"
        )
    return precision


def resize_crop_box(width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """The box of the source image that survives "shortest side to ``size``, then centre crop
    ``size`` x ``size``", in source pixels.

    Resizing just this box to ``size`` x ``size`` samples the same source coordinates with
    the same filter as resizing the whole image and cropping, in one resize of fewer pixels.
    Pillow orders its two 1-D passes by the sizes involved, so the two ways can round their
    intermediate image differently: a few grey levels here and there. The rounding of sizes
    copies ``CLIPImageProcessor``: the longer side is floored, the crop offset floored.
    """
    if width <= height:
        new_width, new_height = size, int(size * height / width)
    else:
        new_width, new_height = int(size * width / height), size
    left = (new_width - size) // 2
    top = (new_height - size) // 2
    x_scale = width / new_width
    y_scale = height / new_height
    return (left * x_scale, top * y_scale, (left + size) * x_scale, (top + size) * y_scale)


def token_prefix(text: str, nonspace_chars: int) -> str:
    """The start of ``text`` up to the end of the word in which its first ``nonspace_chars``
    non-space characters end; ``text`` itself when it is no longer than that.

    A tokenizer that drops whitespace, and whose tokens each cover at most ``c`` characters,
    makes at least ``nonspace_chars / c`` tokens of this prefix, and makes them as it does
    for the whole text, since the prefix ends where a word does. Only the prefix is scanned,
    so a text of megabytes costs what a page costs. A word too long to keep whole (no
    space in sight) is cut ``nonspace_chars`` characters past the mark.
    """
    if len(text) <= nonspace_chars:
        return text
    seen = 0
    for word in _WORD.finditer(text):
        length = word.end() - word.start()
        if seen + length >= nonspace_chars:
            end = min(word.end(), word.start() + (nonspace_chars - seen) + nonspace_chars)
            return text[:end]
        seen += length
    return text


# -- the backend ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Loaded:
    """Everything inference reads; replaced as a whole, never mutated, so concurrent batches
    from several threads share it safely."""

    model: CLIPModel
    device: torch.device
    dtype: torch.dtype  # of the pixels the vision tower takes: float32 for int8
    precision: str  # "float32", "bfloat16", "float16" or "int8"
    scale: torch.Tensor  # (1, 3, 1, 1) float32: 1 / (255 * std)
    shift: torch.Tensor  # (1, 3, 1, 1) float32: -mean / std
    working_mb: float
    packed_mb: float  # int8 or packed bf16 weights, held outside the parameters and buffers
    #: On the CPU one forward pass already uses every core; two at once (the pool runs two
    #: workers) only fight over them, about 20% slower in total, so they take turns.
    forward_lock: threading.Lock | None


@dataclass(frozen=True)
class _TextEncoder:
    """What turns one text into token ids; built on the first text, then only read, by any
    number of threads at once."""

    #: A private copy of the fast tokenizer's Rust tokenizer, its truncation set once: its
    #: ``encode`` changes no state, so threads need no lock.
    rust: tokenizers.Tokenizer
    max_length: int  # tokens the text tower reads
    #: Non-space characters that surely make ``max_length`` tokens: each token covers at
    #: most the longest vocabulary entry (bytes, so characters); doubled for what Unicode
    #: normalisation merges.
    prefix_chars: int
    pad_id: int
    pad_left: bool


class ClipBackend(ImageEmbeddingBackend):
    """OpenAI CLIP (and any ``CLIPModel`` checkpoint): image and text embeddings."""

    def __init__(self, spec: ModelSpec, settings: ModelSettings) -> None:
        super().__init__(spec, settings)
        #: ``None`` for auto, ``"int8"``, or a torch dtype's name.
        self.precision = parse_clip_dtype(settings.dtype)
        float_dtype = None if self.precision in (None, "int8") else self.precision
        self.placement = Placement(parse_device(settings.device), float_dtype)
        size = settings.options.get(
            "image_size", spec.info.default_settings.get("image_size", DEFAULT_IMAGE_SIZE)
        )
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise InvalidInput(
                f"image_size must be a positive integer, got {size!r}", field="image_size"
            )
        self.image_size: int = size
        self._loaded: _Loaded | None = None
        #: The tokenizer, loaded on the first text: image-only users never pay for it.
        self._text_encoder = BuiltOnFirstUse(self._load_text_encoder)

    def __repr__(self) -> str:
        return f"<ClipBackend {self.spec.key} weights={self.settings.weights!r}>"

    # -- loading ------------------------------------------------------------------------------

    @quiet_loading("transformers")
    def load(self) -> None:
        import torch
        from transformers import CLIPConfig, CLIPModel

        device = self.placement.torch_device()
        precision = resolve_precision(self.precision, device)
        if precision == "int8" and self.precision is None and not _int8_available():
            precision = "float32"  # auto on a torch without fbgemm's int8 linear
        # int8 loads the float32 weights, then rounds the encoders' Linear layers.
        dtype: torch.dtype = torch.float32 if precision == "int8" else getattr(torch, precision)
        source = self._locate()
        try:
            # The config and preprocessing first: a mismatch fails before reading the weights.
            config = CLIPConfig.from_pretrained(source.path, **source.kwargs)
            working = self._check_config(config, dtype.itemsize)
            mean, std = _normalisation(source, self.image_size, self._where())
            kwargs = {**source.kwargs, **_dtype_kwarg(dtype)}
            model = CLIPModel.from_pretrained(source.path, config=config, **kwargs)
        except ModelLoadError:
            raise
        except Exception as error:
            raise ModelLoadError(
                f"could not load {self.spec.key} from {self._where()}: {error}"
            ) from error
        _to_inference(model, device, dtype)
        packed_mb = _speed_up(model, precision, device, self._where()) / MIB
        self._loaded = _Loaded(
            model=model,
            device=device,
            dtype=dtype,
            precision=precision,
            scale=torch.tensor([1 / (255 * s) for s in std], device=device).view(1, 3, 1, 1),
            shift=torch.tensor(
                [-m / s for m, s in zip(mean, std, strict=True)], device=device
            ).view(1, 3, 1, 1),
            working_mb=working,
            packed_mb=packed_mb,
            forward_lock=threading.Lock() if device.type == "cpu" else None,
        )

    def unload(self) -> None:
        loaded, self._loaded = self._loaded, None
        self._text_encoder.forget()
        if loaded is not None and loaded.device.type == "cuda":
            import torch

            del loaded
            torch.cuda.empty_cache()

    @property
    def device(self) -> str | None:
        """The device the weights are on (what ``auto`` chose), ``None`` before ``load``."""
        loaded = self._loaded
        return None if loaded is None else str(loaded.device)

    @property
    def dtype(self) -> str | None:
        """The precision the model runs in (what ``auto`` chose): ``"float32"``,
        ``"bfloat16"``, ``"float16"`` or ``"int8"``; ``None`` before ``load``."""
        loaded = self._loaded
        return None if loaded is None else loaded.precision

    def max_concurrent_calls(self) -> int | None:
        """One forward pass at a time on a CPU: each already uses every core, and two at
        once were ~20% slower in total on 2 cores. Told to the pool, this makes it form each
        batch when it can start, so batches are larger."""
        loaded = self._loaded
        return 1 if loaded is not None and loaded.forward_lock is not None else None

    def memory_mb(self) -> float | None:
        """The weights as loaded (parameters and buffers, measured) plus the working memory
        of one full batch, estimated from the config in the loaded dtype: what the pool
        should reserve for this worker."""
        loaded = self._loaded
        if loaded is None:
            return None
        tensors = [*loaded.model.parameters(), *loaded.model.buffers()]
        weights = sum(t.numel() * t.element_size() for t in tensors) / MIB
        return weights + loaded.packed_mb + loaded.working_mb

    def memory_device(self) -> str:
        """``"cpu"`` or ``"cuda:N"``: resolves ``auto`` (imports torch) without loading."""
        return self.placement.memory_device()

    def _where(self) -> str:
        return weights_where(self.settings)

    def _locate(self) -> WeightSource:
        """Where ``from_pretrained`` reads from, failing early with advice when a repo is
        neither cached nor downloadable."""
        return locate_weights(
            self.settings,
            key=self.spec.key,
            marker="config.json",
            source_repo=self.spec.info.source_repo or self.spec.key,
            tiny=TINY,
        )

    def _check_config(self, config: CLIPConfig, activation_bytes: int) -> float:
        """Check the weights take the image size ``prepare`` produces; the working memory of
        a full batch."""
        vision = config.vision_config
        expected, patch, hidden, heads = (
            _int_field(vision, name, self._where())
            for name in ("image_size", "patch_size", "hidden_size", "num_attention_heads")
        )
        if expected != self.image_size:
            raise ModelLoadError(
                f"{self._where()} takes {expected} px images, but {self.spec.key} is set up "
                f"for {self.image_size} px; set the option image_size={expected}"
            )
        dimension = self.spec.info.embedding_dimension
        if (
            dimension is not None
            and _int_field(config, "projection_dim", self._where()) != dimension
        ):
            raise ModelLoadError(
                f"{self._where()} makes {config.projection_dim}-d embeddings, but "
                f"{self.spec.key} serves {dimension}-d ones; use the key of that model"
            )
        working = working_mb(
            image_size=expected,
            patch_size=patch,
            hidden_size=hidden,
            heads=heads,
            batch=self.spec.info.max_batch_size,
            activation_bytes=activation_bytes,
        )
        return working

    def _require_loaded(self) -> _Loaded:
        loaded = self._loaded
        if loaded is None:
            raise ModelError(f"{self.spec.key} is not loaded; call load() first")
        return loaded

    # -- images -------------------------------------------------------------------------------

    def prepare(self, image: Image.Image) -> npt.NDArray[np.uint8]:
        """Shortest side to ``image_size`` and centre crop, as one bicubic resize: a
        ``(S, S, 3)`` uint8 array. Pure, so decode threads run it concurrently."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        size = self.image_size
        box = resize_crop_box(image.width, image.height, size)
        resized = image.resize((size, size), Image.Resampling.BICUBIC, box=box)
        return np.asarray(resized, dtype=np.uint8)

    def embed_prepared(self, items: Sequence[Any]) -> Vectors:
        loaded = self._require_loaded()
        # Bound the working memory whatever the caller sends; on a CPU, also keep each
        # forward pass's activations small enough to stay in cache (see CPU_FORWARD_BATCH).
        limit = self.spec.info.max_batch_size
        if loaded.forward_lock is not None:
            limit = min(limit, CPU_FORWARD_BATCH)
        if len(items) > limit:
            chunks = [items[i : i + limit] for i in range(0, len(items), limit)]
            return np.concatenate([self.embed_prepared(chunk) for chunk in chunks])
        import torch

        batch = np.stack(items)
        size = self.image_size
        if batch.shape[1:] != (size, size, 3) or batch.dtype != np.uint8:
            raise ModelError(
                f"{self.spec.key} expects prepared ({size}, {size}, 3) uint8 images, "
                f"got a batch of {batch.shape} {batch.dtype}"
            )
        with _turn(loaded.forward_lock), torch.inference_mode():
            pixels = torch.from_numpy(batch).to(loaded.device, non_blocking=True)
            pixels = pixels.permute(0, 3, 1, 2)  # NHWC memory seen as NCHW: channels_last
            if loaded.device.type == "cpu":
                # The layout CLIPImageProcessor gives (contiguous NCHW), so the forward pass
                # is the plain transformers one; reordered as uint8, a quarter of the bytes.
                pixels = pixels.contiguous()
            # (x / 255 - mean) / std in one fused op, in fp32 so the only rounding to a
            # 16-bit dtype happens once, on the result.
            pixels = torch.addcmul(loaded.shift, pixels.float(), loaded.scale).to(loaded.dtype)
            features = pooled_features(loaded.model.get_image_features(pixel_values=pixels))
            return unit_rows(features)

    # -- texts --------------------------------------------------------------------------------

    def prepare_text(self, text: str) -> TokenIds:
        """The token ids of ``text`` the text tower reads (``max_position_embeddings``).

        Runs before batching, outside the forward lock and the pool's turn, and takes no
        lock itself. A long text is cut first to a prefix that surely holds those tokens
        (``token_prefix``), so its cost does not grow with its length; a text of normal length
        is tokenized whole.
        """
        encoder = self._text_encoder.get()
        return list(encoder.rust.encode(token_prefix(text, encoder.prefix_chars)).ids)

    def embed_texts(self, texts: Sequence[str | TokenIds]) -> Vectors:
        """Embed ``prepare_text``'d texts (or plain strings, tokenized here)."""
        limit = self.spec.info.max_batch_size
        if len(texts) > limit:
            chunks = [texts[i : i + limit] for i in range(0, len(texts), limit)]
            return np.concatenate([self.embed_texts(chunk) for chunk in chunks])
        import torch

        loaded = self._require_loaded()
        encoder = self._text_encoder.get()
        rows = [self.prepare_text(t) if isinstance(t, str) else t for t in texts]
        input_ids, attention_mask = pad_token_rows(
            rows, pad_id=encoder.pad_id, pad_left=encoder.pad_left
        )
        with _turn(loaded.forward_lock), torch.inference_mode():
            features = loaded.model.get_text_features(
                input_ids=input_ids.to(loaded.device),
                attention_mask=attention_mask.to(loaded.device),
            )
            return unit_rows(pooled_features(features))

    def _load_text_encoder(self) -> _TextEncoder:
        from transformers import AutoTokenizer, CLIPConfig

        source = self._locate()
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.path, **source.kwargs)
            config = CLIPConfig.from_pretrained(source.path, **source.kwargs)
        except Exception as error:
            raise ModelLoadError(
                f"could not load the tokenizer of {self.spec.key} from {self._where()}: {error}"
            ) from error
        max_length = _int_field(config.text_config, "max_position_embeddings", self._where())
        shared = getattr(tokenizer, "backend_tokenizer", None)
        if shared is None:
            raise ModelLoadError(
                f"{self._where()} gave a slow {type(tokenizer).__name__}; limner's CLIP "
                "backend needs a fast one (the tokenizers library's), which transformers "
                "builds from a tokenizer.json or a vocab.json with merges.txt"
            )
        # Its own copy: transformers sets truncation and padding on the shared one per call.
        rust = copy.deepcopy(shared)
        rust.no_padding()
        rust.enable_truncation(
            max_length, strategy="longest_first", direction=tokenizer.truncation_side
        )
        longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
        pad_id = tokenizer.pad_token_id
        return _TextEncoder(
            rust=rust,
            max_length=max_length,
            prefix_chars=2 * max_length * longest,
            pad_id=pad_id if isinstance(pad_id, int) else 0,
            pad_left=tokenizer.padding_side == "left",
        )


def _int_field(config: object, name: str, where: str) -> int:
    value = getattr(config, name, None)
    if not isinstance(value, int):
        raise ModelLoadError(f"{where} does not hold a CLIP config: {name} is {value!r}")
    return value


def _normalisation(
    source: WeightSource, image_size: int, where: str
) -> tuple[Sequence[float], Sequence[float]]:
    """Mean and std from the repo's preprocessor_config.json (CLIP's if it has none),
    after checking it asks for the resize and crop ``prepare`` does."""
    from transformers.utils.hub import cached_file

    path = cached_file(
        source.path,
        "preprocessor_config.json",
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **source.kwargs,
    )
    if path is None:
        return CLIP_MEAN, CLIP_STD
    config = json.loads(Path(path).read_text(encoding="utf-8"))
    problem = _preprocessing_mismatch(config, image_size)
    if problem:
        raise ModelLoadError(
            f"{where} asks for a preprocessing limner's CLIP backend does not do "
            f"({problem}); it resizes the shorter side to {image_size} px and centre "
            f"crops {image_size} x {image_size}"
        )
    mean, std = config.get("image_mean", CLIP_MEAN), config.get("image_std", CLIP_STD)
    if len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std):
        raise ModelLoadError(
            f"{where} has a preprocessor_config.json with image_mean={mean!r} and "
            f"image_std={std!r}; expected three values each, std positive"
        )
    return mean, std


def _turn(lock: threading.Lock | None) -> contextlib.AbstractContextManager[object]:
    return lock if lock is not None else contextlib.nullcontext()


def _preprocessing_mismatch(config: dict[str, Any], size: int) -> str | None:
    """What in a preprocessor_config.json differs from CLIP's resize-and-crop at ``size``."""
    resize = config.get("size")
    if isinstance(resize, dict):
        if set(resize) != {"shortest_edge"}:
            return f"size={resize!r}"
        resize = resize["shortest_edge"]
    if resize is not None and resize != size:
        return f"size={config['size']!r}"
    crop = config.get("crop_size")
    if isinstance(crop, dict):
        crop = crop.get("height") if crop.get("height") == crop.get("width") else crop
    if crop is not None and crop != size:
        return f"crop_size={config['crop_size']!r}"
    for flag in ("do_resize", "do_center_crop"):
        if config.get(flag) is False:
            return f"{flag}=false"
    return None


def _to_inference(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move to the device and dtype (a no-op where from_pretrained already did) for serving."""
    model.to(device=device, dtype=dtype)
    model.eval()


def _speed_up(model: torch.nn.Module, precision: str, device: torch.device, where: str) -> int:
    """The same model, faster, by precision; the bytes of weights moved outside the model's
    parameters and buffers. fp32 and int8: quick_gelu folded into one SiLU pass
    (``limner_clip._fold``; before ``_quantize``, whose per-channel scales absorb the folded
    slope). bf16 on a CPU with native bf16: weights packed for oneDNN (``_packed``). The
    fold is left out of bf16, where it gained 4-6% and moved outputs off plain bf16's."""
    from ._fold import fold_quick_gelu
    from ._layers import bytes_outside_parameters

    if precision in ("float32", "int8"):
        fold_quick_gelu(model)
    if precision == "int8":
        _quantize(model, where)
    elif precision == "bfloat16" and device.type == "cpu":
        from ._packed import pack_encoders, packing_available

        if packing_available(cpu_flags(), BF16_FLAGS):
            pack_encoders(model)
    return bytes_outside_parameters(model)


def _int8_available() -> bool:
    from ._int8 import int8_available

    return int8_available()


def _quantize(model: torch.nn.Module, where: str) -> None:
    """Round the encoders' Linear layers to int8 (``limner_clip._int8``)."""
    import torch

    from ._int8 import int8_available, quantize_encoders

    if not int8_available():
        raise ModelLoadError(
            "dtype int8 needs fbgemm's int8 linear (torch's x86 quantized engine), which this "
            f"torch ({torch.__version__}, engine {torch.backends.quantized.engine!r}) lacks; "
            f"load {where} in float32 or bfloat16 instead"
        )
    # Without VNNI, fbgemm sums 8-bit products in int16 pairs, which can saturate: 7 bits.
    quantize_encoders(model, exact_bytes=bool(cpu_flags() & VNNI_FLAGS))


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, Any]:
    """transformers 4.56 renamed ``torch_dtype`` to ``dtype``; older releases reject it."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}
