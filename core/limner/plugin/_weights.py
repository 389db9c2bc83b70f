"""Where a model's weights come from: the Hugging Face cache, a pinned revision, a local dir.

No torch here: this module only decides paths and revisions. Plugins load with their
libraries' own ``from_pretrained``, which honours ``HF_HUB_OFFLINE`` and ``HF_HOME``;
:func:`locate_weights` tells them what to pass it, and fails early, with advice, when the
weights are neither cached nor downloadable; :func:`check_weights_reachable` is the pool's
cheap look before a cold start, so such weights fail in one line before any memory is
reserved and without huggingface_hub's half-minute of retries.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from limner._registry._spec import ModelInfo
from limner.errors import ModelLoadError
from limner.plugin._devices import TRUE_STRINGS

if TYPE_CHECKING:
    from limner._registry._spec import ModelSettings, ModelSpec

__all__ = [
    "HUB_PROBE_TIMEOUT",
    "TinyModel",
    "WeightSource",
    "check_weights_reachable",
    "download_advice",
    "hf_cache_dir",
    "hf_offline",
    "is_cached",
    "locate_weights",
    "materialize_in_hf_cache",
    "models_dir_override",
    "tiny_revision",
    "weights_where",
]


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


@dataclass(frozen=True)
class TinyModel:
    """A generated tiny model: the repo id it is served under, the one revision limner
    writes of it (see :func:`tiny_revision`), and ``ensure(cache_dir)``, which writes it into
    that Hugging Face cache when missing (with :func:`materialize_in_hf_cache`)."""

    key: str
    revision: str
    ensure: Callable[[Path], object]

    def info(self, *, family: str, memory_mb: float = 64.0, **fields: Any) -> ModelInfo:
        """The :class:`~limner.plugin.ModelInfo` of the tiny key: pinned at the one revision
        limner writes (without it, loading would look for another), marked ``tiny``, and
        described as a TINY random-weight ``family``; ``fields`` sets the others, such as
        ``embedding_dimension``."""
        return ModelInfo(
            memory_mb=memory_mb,
            source_repo=self.key,
            revision=self.revision,
            tiny=True,
            description=(
                f"TINY random-weight {family} for tests and offline demos; its outputs mean nothing"
            ),
            **{"license": "apache-2.0", **fields},
        )


@dataclass(frozen=True)
class WeightSource:
    """What ``from_pretrained`` reads: ``path``, a repo id or a directory, and ``kwargs``
    (``revision``, ``cache_dir`` and ``local_files_only`` for a repo; none for a directory)."""

    path: str
    kwargs: dict[str, Any]


def hf_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) forbids downloads."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(flag.strip().lower() in TRUE_STRINGS for flag in flags) or bool(
        constants.HF_HUB_OFFLINE
    )


def weights_where(settings: ModelSettings) -> str:
    """Where ``settings`` point, for messages: the directory, or the repo and its revision."""
    if settings.local_dir:
        return settings.weights
    revision = f"@{settings.revision}" if settings.revision else ""
    return f"the Hugging Face repo {settings.weights}{revision}"


def download_advice(
    repo: str,
    *,
    key: str,
    revision: str | None = None,
    size: str | None = None,
    gated: bool = False,
) -> str:
    """How to get the weights of ``key`` from ``repo``: download, or a local copy."""
    pinned = f" --revision {revision}" if revision else ""
    about = f" (about {size})" if size else ""
    advice = (
        f"Download it with `hf download {repo}{pinned}`{about}, or point LIMNER_MODELS_DIR at "
        f"a directory holding a copy as {key}/."
    )
    if gated:
        advice += (
            f" {repo} is gated: accept its licence on huggingface.co and log in with "
            "`hf auth login` first."
        )
    return advice


def locate_weights(
    settings: ModelSettings,
    *,
    key: str,
    marker: str,
    source_repo: str,
    writer: str = "save_pretrained",
    tiny: TinyModel | None = None,
    size: str | None = None,
    gated: bool = False,
) -> WeightSource:
    """What ``from_pretrained`` should read for ``settings``, failing early with advice.

    A local directory (``settings.local_dir``, or ``weights`` naming a directory) must hold
    ``marker`` (``config.json``, ``model_index.json``), else the error says to fill it with
    ``writer``. A repo is read from the Hugging Face cache at ``settings.revision``, without
    network round trips when ``marker`` is cached there; when it is not and
    ``HF_HUB_OFFLINE`` is set, the error says how to download it (``size``, and whether the
    repo is ``gated``, go into that advice). The ``tiny`` model's key is written into the
    cache first, at the one revision limner writes, which an unset revision means.
    """
    path = Path(settings.weights).expanduser()
    if settings.local_dir or path.is_dir():
        if not (path / marker).is_file():
            raise ModelLoadError(
                f"{path} holds no {marker}; point the local dir of {key} at a directory "
                f"written by {writer} (or downloaded with `hf download {source_repo}`)"
            )
        return WeightSource(str(path), {})
    cache = hf_cache_dir()
    kwargs: dict[str, Any] = {"cache_dir": str(cache), "revision": settings.revision}
    if tiny is not None and settings.weights == tiny.key:
        if settings.revision not in (None, tiny.revision):
            raise ModelLoadError(
                f"{tiny.key} exists only at revision {tiny.revision}, which limner writes into "
                "the Hugging Face cache itself, so leave the revision unset; got revision "
                f"{settings.revision!r}: leave it unset or set it to {tiny.revision}"
            )
        tiny.ensure(cache)
        # local_files_only: it is not on the hub.
        kwargs.update(revision=tiny.revision, local_files_only=True)
        return WeightSource(settings.weights, kwargs)
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(
            settings.weights, marker, cache_dir=cache, revision=settings.revision
        )
    except ValueError as error:  # not a valid repo id
        raise ModelLoadError(
            f"{settings.weights!r} is neither a directory nor a Hugging Face repo id: {error}"
        ) from error
    if isinstance(cached, str):
        kwargs["local_files_only"] = True  # cached: no network round trips
    elif hf_offline():
        at = f"@{settings.revision}" if settings.revision else ""
        raise ModelLoadError(
            f"{settings.weights}{at} is not in the Hugging Face cache ({cache}) and "
            "HF_HUB_OFFLINE is set. "
            + download_advice(
                settings.weights, key=key, revision=settings.revision, size=size, gated=gated
            )
        )
    return WeightSource(settings.weights, kwargs)


HUB_PROBE_TIMEOUT = 5.0
"""Seconds the hub may take to answer the probe before limner calls it unreachable."""

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def is_cached(repo_id: str, revision: str | None, *, cache_dir: Path | None = None) -> bool:
    """Whether the Hugging Face cache holds a snapshot of ``repo_id`` at ``revision`` (a
    commit, or a branch or tag the cache has resolved; ``None`` is ``main``).

    A snapshot may still lack a file a plugin needs; this only rules out the case where
    nothing was ever downloaded.
    """
    repo_dir = (cache_dir or hf_cache_dir()) / ("models--" + repo_id.replace("/", "--"))
    name = revision or "main"
    if _COMMIT.match(name):
        return (repo_dir / "snapshots" / name).is_dir()
    try:
        commit = (repo_dir / "refs" / name).read_text().strip()
    except (OSError, ValueError):
        return False
    return bool(commit) and (repo_dir / "snapshots" / commit).is_dir()


def check_weights_reachable(
    spec: ModelSpec, settings: ModelSettings | None, *, timeout: float = HUB_PROBE_TIMEOUT
) -> None:
    """Raise :class:`ModelLoadError` when a model's Hugging Face weights are not cached and
    cannot be downloaded: ``HF_HUB_OFFLINE`` is set, or the hub does not answer.

    Applies to models whose weights are their spec's ``source_repo`` (not a local directory,
    not a tiny model limner writes itself); anything else is the plugin's to check. Cheap when
    the weights are cached or offline (a few file checks); otherwise one HTTP request to the
    hub (``HF_ENDPOINT``, proxies from the environment honoured) with a short timeout, where
    huggingface_hub would retry for half a minute.
    """
    repo = spec.info.source_repo
    if settings is None or settings.local_dir or spec.info.tiny or repo is None:
        return
    if settings.weights != repo:
        return
    cache = hf_cache_dir()
    if is_cached(repo, settings.revision, cache_dir=cache):
        return
    revision = settings.revision
    at = f"@{revision}" if revision else ""
    # The advice a plugin's own load error gives: the download, the local copy, and for a
    # gated repo the licence to accept first.
    advice = download_advice(repo, key=spec.key, revision=revision, gated=spec.info.gated)
    if hf_offline():
        raise ModelLoadError(
            f"{repo}{at} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is "
            f"set. {advice}"
        )
    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    problem = _unreachable(endpoint, timeout)
    if problem is not None:
        raise ModelLoadError(
            f"{repo}{at} is not in the Hugging Face cache ({cache}) and {endpoint} cannot be "
            f"reached ({problem}); connect to the network and try again. {advice}"
        )


def _unreachable(endpoint: str, timeout: float) -> str | None:
    """Why ``endpoint`` gives no HTTP answer within ``timeout``; None when it answers at all."""
    import httpx

    try:
        with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=True) as client:
            client.head(endpoint)
    except httpx.TimeoutException:
        return f"no answer in {timeout:g} s"
    except (httpx.HTTPError, OSError, ValueError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        return reason
    return None
