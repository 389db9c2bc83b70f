"""Every plugin declares what its real keys' tokenizers need.

A tiny model's tokenizer is limner's own file-less one, so the conformance suite never meets
the tokenizer a real key ships: a SigLIP plugin without SentencePiece embeds images and fails
on its first text. Here each real key's tokenizer class loads from a random stand-in of the
files its repo ships; the packages the class needs are found by taking each of transformers'
optional backends away in turn; and each plugin, example plugin and scaffold template must
declare them.
"""

from __future__ import annotations

import io
import json
import random
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import sentencepiece
import tomllib
import transformers
from transformers.utils import import_utils

from limner.plugin import tiny_clip_tokenizer, tiny_t5_tokenizer

ROOT = Path(__file__).resolve().parent.parent

#: Each project, a real key it serves, and the tokenizer classes of that key's repo (the
#: ``tokenizer_class`` of each tokenizer folder's tokenizer_config.json on the Hub).
REAL_TOKENIZERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "plugins/clip": ("openai/clip-vit-base-patch32", ("CLIPTokenizer",)),
    "plugins/flux": ("black-forest-labs/FLUX.1-schnell", ("CLIPTokenizer", "T5Tokenizer")),
    "plugins/sd35": (
        "stabilityai/stable-diffusion-3.5-large-turbo",
        ("CLIPTokenizer", "CLIPTokenizer", "T5Tokenizer"),
    ),
    "examples/plugins/limner-acme": ("google/siglip-base-patch16-224", ("SiglipTokenizer",)),
    "examples/plugins/limner-acme-diffusion": (
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        ("CLIPTokenizer",),
    ),
}
#: What `limner new-plugin` writes serves the example plugins' keys.
TEMPLATE_OF = {
    "image-embedding": "examples/plugins/limner-acme",
    "text-to-image": "examples/plugins/limner-acme-diffusion",
}

#: The packages beyond transformers' own dependencies that each class needs, as pip names;
#: ``test_the_needs_are_what_transformers_asks_for`` keeps this honest.
NEEDS = {
    "CLIPTokenizer": frozenset[str](),  # tokenizer.json, read by tokenizers
    "T5Tokenizer": frozenset[str](),  # FLUX's and SD3.5's repos ship tokenizer.json too
    "SiglipTokenizer": frozenset({"sentencepiece", "protobuf"}),
}


def _words(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [
        " ".join(
            "".join(rng.choice(letters) for _ in range(rng.randint(2, 8)))
            for _ in range(rng.randint(3, 12))
        )
        for _ in range(count)
    ]


def _siglip_stand_in(folder: Path) -> None:
    """A random SentencePiece model where SigLIP's repo has spiece.model, and no
    tokenizer.json (the repo has none either)."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_words(2000, seed=1)),
        model_writer=model,
        vocab_size=200,
        model_type="unigram",
        eos_id=1,
        unk_id=2,
        pad_id=0,
        bos_id=-1,
        minloglevel=2,
    )
    (folder / "spiece.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "SiglipTokenizer", "model_max_length": 64}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def _saved(make: Callable[[], object]) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        make().save_pretrained(folder)  # type: ignore[attr-defined]

    return write


STAND_INS: dict[str, Callable[[Path], None]] = {
    "CLIPTokenizer": _saved(tiny_clip_tokenizer),
    "T5Tokenizer": _saved(tiny_t5_tokenizer),
    "SiglipTokenizer": _siglip_stand_in,
}


def load_stand_in(name: str, folder: Path) -> object:
    STAND_INS[name](folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == name  # the class the real repo names
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert isinstance(tokenizer, getattr(transformers, name))
    assert tokenizer("a lighthouse at dusk")["input_ids"]  # it tokenizes
    return tokenizer


@pytest.mark.parametrize("name", sorted(NEEDS))
def test_each_real_tokenizer_class_loads_from_a_stand_in(name: str, tmp_path: Path) -> None:
    load_stand_in(name, tmp_path)


@pytest.mark.parametrize("name", sorted(NEEDS))
def test_the_needs_are_what_transformers_asks_for(name: str, tmp_path: Path) -> None:
    """With one of the optional backends taken away, the class still loads exactly when it
    is not among its NEEDS: the table names all it needs, and nothing it does not."""
    for backend in ("sentencepiece", "protobuf"):
        folder = tmp_path / backend
        folder.mkdir()
        with pytest.MonkeyPatch.context() as patch:
            _, message = import_utils.BACKENDS_MAPPING[backend]
            patch.setitem(import_utils.BACKENDS_MAPPING, backend, (lambda: False, message))
            try:
                load_stand_in(name, folder)
                loaded = True
            except ImportError:
                loaded = False
        assert loaded is (backend not in NEEDS[name]), f"{name} without {backend}"


def declared(project: Path) -> set[str]:
    """The requirement names a pyproject declares (templates: the same file with ${...})."""
    pyproject = project / "pyproject.toml"
    if not pyproject.exists():
        pyproject = project / "pyproject.toml.tmpl"
    text = re.sub(r"\$\{\w+\}", "placeholder", pyproject.read_text())
    requirements = tomllib.loads(text)["project"]["dependencies"]
    return {re.split(r"[<>=!~\[; ]", requirement)[0].lower() for requirement in requirements}


PROJECTS = [
    *((path, *facts) for path, facts in REAL_TOKENIZERS.items()),
    *(
        (f"core/limner/_scaffold/templates/{template}", *REAL_TOKENIZERS[example])
        for template, example in TEMPLATE_OF.items()
    ),
]


@pytest.mark.parametrize(("project", "key", "classes"), PROJECTS, ids=lambda p: str(p))
def test_every_project_declares_what_its_real_tokenizers_need(
    project: str, key: str, classes: tuple[str, ...]
) -> None:
    needs = set().union(*(NEEDS[name] for name in classes))
    missing = needs - declared(ROOT / project)
    assert not missing, f"{project} serves {key}, whose tokenizer needs {sorted(missing)}"
