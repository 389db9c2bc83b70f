"""Where a model's weights come from: the Hugging Face cache, a pinned revision, a local dir.

No torch here: this module only decides paths and revisions. Plugins load with their
libraries' own ``from_pretrained``, which honours ``HF_HUB_OFFLINE`` and ``HF_HOME``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["hf_cache_dir", "materialize_in_hf_cache", "models_dir_override", "tiny_revision"]


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache (``HF_HUB_CACHE``, else ``HF_HOME``/hub, else ~/.cache)."""
    if cache := os.environ.get("HF_HUB_CACHE"):
        return Path(cache)
    if home := os.environ.get("HF_HOME"):
        return Path(home) / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "huggingface" / "hub"


def models_dir_override(key: str) -> Path | None:
    """``$LIMNER_MODELS_DIR/<key>`` when that directory exists: a local copy of the weights."""
    root = os.environ.get("LIMNER_MODELS_DIR")
    if not root:
        return None
    candidate = Path(root).expanduser() / key
    return candidate if candidate.is_dir() else None


def tiny_revision(recipe: str) -> str:
    """A stable 40-hex revision for a generated tiny model, derived from its recipe name.

    Bump the recipe string whenever the tiny model's architecture or seed changes, so old
    caches are not reused for a different model.
    """
    return hashlib.sha1(recipe.encode("utf-8")).hexdigest()


def materialize_in_hf_cache(
    repo_id: str,
    revision: str,
    write: Callable[[Path], None],
    *,
    cache_dir: Path | None = None,
) -> Path:
    """Make sure ``repo_id`` at ``revision`` exists in the Hugging Face cache layout.

    If the snapshot is missing, ``write(directory)`` fills a temporary directory (for example
    with ``save_pretrained``), which is then moved into place atomically, so concurrent
    processes never see half a snapshot. ``from_pretrained(repo_id, revision=revision)`` then
    finds it exactly as it finds downloaded weights. Returns the snapshot directory.
    """
    cache = cache_dir or hf_cache_dir()
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / revision
    if not snapshot.is_dir():
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{revision}.", dir=snapshot.parent))
        try:
            write(staging)
            try:
                staging.rename(snapshot)
            except OSError:
                if not snapshot.is_dir():  # lost a race only if the winner left a snapshot
                    raise
        finally:
            if staging.exists():
                shutil.rmtree(staging)
    refs = repo_dir / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    ref = refs / "main"
    if not ref.exists() or ref.read_text().strip() != revision:
        temp = refs / f".main.{os.getpid()}"
        temp.write_text(revision)
        temp.replace(ref)
    return snapshot
