"""Weights that cannot be had fail first, fast and in one line: before the pool speaks of
memory, and without huggingface_hub's half-minute of retries when the hub is unreachable."""

from __future__ import annotations

import dataclasses
import socket
import time
from pathlib import Path

import pytest

from limner import ModelLoadError, ModelSettings, ModelSpec, Pool, Registry
from limner.plugin._weights import check_weights_reachable, is_cached
from limner.testing import FakeClock, FakeMemory, fake_embedding_spec

REPO = "acme/vision-small"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def real_spec(key: str = REPO) -> ModelSpec:
    """A fake embedder dressed as a real model whose weights live in a Hugging Face repo."""
    spec = fake_embedding_spec(key, memory_mb=50_000)
    info = dataclasses.replace(spec.info, tiny=False, source_repo=REPO)
    return dataclasses.replace(spec, info=info)


def settings(**changes: object) -> ModelSettings:
    return dataclasses.replace(ModelSettings(weights=REPO), **changes)  # type: ignore[arg-type]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    # huggingface_hub read HF_HUB_OFFLINE when it was imported (`make test` sets it for the
    # whole run), and limner honours its constant too: online here means both.
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return tmp_path


def cache_snapshot(cache: Path, *, ref: str = "main") -> None:
    repo = cache / ("models--" + REPO.replace("/", "--"))
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / ref).write_text(COMMIT)


def closed_port() -> int:
    """A loopback port nothing listens on: connecting is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_offline_and_not_cached_says_how_to_get_the_weights(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as caught:
        check_weights_reachable(real_spec(), settings(revision="v2"))
    message = str(caught.value)
    assert f"{REPO}@v2 is not in the Hugging Face cache ({cache})" in message
    assert "HF_HUB_OFFLINE is set" in message
    assert f"hf download {REPO} --revision v2" in message
    assert "LIMNER_MODELS_DIR" in message
    assert "\n" not in message


def test_a_gated_repo_says_to_accept_its_licence_first(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = real_spec()
    gated = dataclasses.replace(spec, info=dataclasses.replace(spec.info, gated=True))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as caught:
        check_weights_reachable(gated, settings())
    message = str(caught.value)
    assert f"hf download {REPO}" in message
    assert f"{REPO} is gated: accept its licence on huggingface.co" in message
    assert "\n" not in message
    with pytest.raises(ModelLoadError) as plain:
        check_weights_reachable(spec, settings())
    assert "licence" not in str(plain.value)


def test_a_cached_snapshot_passes_by_branch_and_by_commit(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache_snapshot(cache)
    check_weights_reachable(real_spec(), settings())
    check_weights_reachable(real_spec(), settings(revision="main"))
    check_weights_reachable(real_spec(), settings(revision=COMMIT))
    assert not is_cached(REPO, "v2", cache_dir=cache)
    assert not is_cached("acme/other", None, cache_dir=cache)


def test_what_the_plugin_checks_itself_is_left_to_it(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny = fake_embedding_spec()  # tiny: written by limner, never downloaded
    check_weights_reachable(tiny, ModelSettings(weights=tiny.key))
    check_weights_reachable(real_spec(), settings(weights="/models/acme", local_dir=True))
    check_weights_reachable(real_spec(), settings(weights="acme/a-fork"))  # not source_repo
    check_weights_reachable(real_spec(), None)


def test_an_unreachable_hub_fails_in_a_moment_not_after_retries(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    started = time.monotonic()
    with pytest.raises(ModelLoadError) as caught:
        check_weights_reachable(real_spec(), settings())
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert f"{REPO} is not in the Hugging Face cache" in message
    assert f"{endpoint} cannot be reached" in message
    assert f"hf download {REPO}" in message
    assert "\n" not in message


def test_a_hub_that_answers_lets_the_download_go_ahead(
    cache: Path, monkeypatch: pytest.MonkeyPatch, http_server: object
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", http_server.url(""))  # type: ignore[attr-defined]
    check_weights_reachable(real_spec(), settings())  # any answer, a 404 too, is an answer


@pytest.mark.anyio
async def test_missing_weights_are_said_before_memory(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model too large for the budget and not downloaded: the weights are what to fix
    first, so that is what the caller hears."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    registry = Registry(entry_points=False)
    registry.register(real_spec())
    model = registry.embedder(REPO)
    async with Pool(memory=FakeMemory(total_mb=1000), clock=FakeClock()):
        with pytest.raises(ModelLoadError, match="not in the Hugging Face cache"):
            await model.embed_text("a fox")
    assert model.backend.loads == 0  # type: ignore[attr-defined]
