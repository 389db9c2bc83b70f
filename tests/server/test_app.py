"""Probes, models, pool stats, metrics and the schema, over a real server."""

from __future__ import annotations

import dataclasses
import math
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from limner import ImageGenerationConfig, InvalidInput, Pool, PoolOptions, Registry
from limner.server import ServerSettings, create_app
from limner.server._limits import generation_limits
from limner.testing import fake_embedding_spec, fake_generation_spec

if TYPE_CHECKING:
    from tests.server.conftest import ErrorOf, Served, ServerFactory

TINY_CLIP = "limner/tiny-clip"


def test_probes_answer_and_preloads_make_the_server_ready(main: Served) -> None:
    with main.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").json() == {"status": "ready"}
    stats = main.pool(TINY_CLIP)
    assert stats["state"] == "ready"
    assert stats["loads"] == 1


def test_readyz_is_503_until_preloads_load(make_server: ServerFactory, error_of: ErrorOf) -> None:
    gate = threading.Event()
    served = make_server(
        fake_embedding_spec("fake/slow-load", options={"gate": gate}), preload=["fake/slow-load"]
    )
    with served.client() as client:
        not_ready = client.get("/readyz")
        assert not_ready.status_code == 503
        assert error_of(not_ready)["code"] == "not_ready"
        assert "fake/slow-load" in error_of(not_ready)["message"]
        assert client.get("/healthz").status_code == 200  # alive while loading
        gate.set()
        served_ready = _poll(client, "/readyz", 200)
        assert served_ready.json() == {"status": "ready"}


def test_readyz_names_a_failed_preload(make_server: ServerFactory, error_of: ErrorOf) -> None:
    served = make_server(
        fake_embedding_spec("fake/broken", options={"fail_loads": 100}), preload=["fake/broken"]
    )
    with served.client() as client:
        answer = _poll(client, "/readyz", 503, lambda r: "failed" in r.text)
        error = error_of(answer)
        assert "preloading failed" in error["message"]
        assert "injected load failure" in error["message"]


def _poll(
    client: httpx.Client,
    path: str,
    status: int,
    accept: Callable[[httpx.Response], bool] = lambda response: True,
) -> httpx.Response:
    """GET ``path`` until it answers ``status`` (and ``accept``s the answer), for 10 s."""
    deadline = time.monotonic() + 10
    while True:
        response = client.get(path)
        if response.status_code == status and accept(response):
            return response
        assert time.monotonic() < deadline, f"{path} still answers {response.status_code}"
        time.sleep(0.02)


def test_models_lists_exactly_the_served_models(main: Served) -> None:
    with main.client() as client:
        body = client.get("/v1/models").json()
    assert body["object"] == "list"
    cards = {card["id"]: card for card in body["data"]}
    assert set(cards) == {
        TINY_CLIP,
        "fake/embedder",
        "fake/images-only",
        "fake/generator",
        "fake/failing",
    }  # fake/hidden is registered but not on the allow-list
    clip = cards[TINY_CLIP]
    assert clip["object"] == "model"
    assert clip["capability"] == "image-embedding"
    assert clip["embedding_dimension"] == 64
    assert clip["tiny"] is True
    assert clip["owned_by"] == "limner_clip"  # the plugin module, registered directly
    assert isinstance(clip["created"], int) and clip["created"] > 1_600_000_000
    generator = cards["fake/generator"]
    assert generator["capability"] == "text-to-image"
    assert generator["embedding_dimension"] is None
    assert generator["owned_by"] == "host"
    assert clip["limits"] is None and cards["fake/embedder"]["limits"] is None


def test_a_generators_limits_are_what_its_resolve_config_takes(main: Served) -> None:
    """A plugin not built on limner.diffusion: its steps and n bounds found by asking its
    resolve_config (the fake takes 1..50 steps), its sides' bounds unknown."""
    with main.client() as client:
        limits = client.get("/v1/models/fake/generator").json()["limits"]
        too_many = client.post(
            "/v1/images/generations",
            json={"model": "fake/generator", "prompt": "x", "steps": limits["steps"]["max"] + 1},
        )
    assert limits["steps"] == {"default": 4, "min": 1, "max": 50, "multiple": None}
    assert limits["n"] == {"default": 1, "min": 1, "max": 10, "multiple": None}
    assert limits["width"] == {"default": 16, "min": None, "max": None, "multiple": None}
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "steps"


def test_a_diffusion_checkpoints_limits_are_its_own(hf_cache: Path) -> None:
    """A limner.diffusion model: the checkpoint's bounds, each the last value its
    resolve_config takes; the schema's caps where they are lower."""
    limner_flux = pytest.importorskip("limner_flux")
    registry = Registry(entry_points=False)
    registry.register_plugin(limner_flux)
    model = registry.generator("limner/tiny-flux")
    limits = generation_limits(model)
    checkpoint = model.backend.variant  # type: ignore[attr-defined]
    assert limits.width.model_dump() == {
        "default": checkpoint.default_size,
        "min": checkpoint.min_size,
        "max": checkpoint.max_size,
        "multiple": checkpoint.size_multiple,
    }
    assert (limits.steps.default, limits.steps.min, limits.steps.max) == (
        checkpoint.default_steps,
        1,
        checkpoint.max_steps,
    )
    assert limits.n.max == 4 and limits.guidance.max == 0  # tiny FLUX is guidance-distilled
    for field, bounds in (
        ("width", limits.width),
        ("steps", limits.steps),
        ("num_images", limits.n),
    ):
        last, step = int(bounds.max or 0), bounds.multiple or 1
        taken: dict[str, Any] = {field: last}
        model.resolve_config(dataclasses.replace(ImageGenerationConfig(), **taken))
        with pytest.raises(InvalidInput) as refused:
            past: dict[str, Any] = {field: last + step}
            model.resolve_config(dataclasses.replace(ImageGenerationConfig(), **past))
        assert refused.value.field == field


def test_retrieve_one_model_and_unknown_models_are_404_with_suggestions(
    main: Served, error_of: ErrorOf
) -> None:
    with main.client() as client:
        assert client.get(f"/v1/models/{TINY_CLIP}").json()["id"] == TINY_CLIP
        missing = client.get("/v1/models/limner/tiny-clp")
        hidden = client.get("/v1/models/fake/hidden")
        near_hidden = client.get("/v1/models/fake/hidde")
    assert missing.status_code == 404
    error = error_of(missing)
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"
    assert "Did you mean: limner/tiny-clip" in error["message"]
    assert hidden.status_code == 404  # registered, but not on the allow-list
    assert near_hidden.status_code == 404
    assert "fake/hidden" not in error_of(near_hidden)["message"]  # not even suggested


def test_unknown_routes_and_methods_answer_in_the_error_shape(
    main: Served, error_of: ErrorOf
) -> None:
    with main.client() as client:
        missing = client.get("/v2/nothing")
        wrong_method = client.get("/v1/embeddings")
    assert missing.status_code == 404
    assert error_of(missing)["code"] == "not_found"
    assert wrong_method.status_code == 405
    assert error_of(wrong_method)["code"] == "method_not_allowed"


def test_pool_stats_report_each_model(main: Served) -> None:
    with main.client() as client:
        client.post("/v1/embeddings", json={"model": "fake/embedder", "input": "hello pool"})
        body = client.get("/v1/pool").json()
    assert body["object"] == "pool"
    assert body["ready"] is True
    stats = {model["key"]: model for model in body["models"]}
    fake = stats["fake/embedder"]
    assert fake["state"] == "ready"
    assert fake["workers"] >= 1
    assert fake["in_flight"] == 0
    assert fake["queue_depth"] == 0
    assert set(fake) >= {"batches", "loads", "evictions", "memory_mb", "device", "last_used"}
    # who waits for the model, for how long, and how often it made room for another
    assert (fake["waiting"], fake["oldest_wait_seconds"], fake["swaps"]) == (0, 0.0, 0)
    assert (fake["draining"], fake["wait_timeouts"]) == (False, 0)


def test_metrics_count_requests_by_route_and_status_and_read_the_pool(main: Served) -> None:
    with main.client() as client:
        for _ in range(3):
            client.post("/v1/embeddings", json={"model": "fake/embedder", "input": "counted"})
        client.post("/v1/embeddings", json={"model": "no/such-model", "input": "x"})
        client.get("/v1/nowhere")
        text = client.get("/metrics").text

    def value(pattern: str) -> float:
        match = re.search(rf"^{pattern} (\S+)$", text, flags=re.MULTILINE)
        assert match is not None, f"{pattern} not in metrics"
        return float(match.group(1))

    route = 'method="POST",route="/v1/embeddings"'
    assert value(rf"limner_http_requests_total\{{{route},status=\"200\"\}}") >= 3
    assert value(rf"limner_http_requests_total\{{{route},status=\"404\"\}}") >= 1
    unmatched = r'limner_http_requests_total\{method="GET",route="unmatched",status="404"\}'
    assert value(unmatched) >= 1
    assert value(rf"limner_http_request_duration_seconds_count\{{{route}\}}") >= 4
    assert value(r'limner_model_loaded\{model="limner/tiny-clip"\}') == 1.0
    assert value(r'limner_queue_depth\{model="fake/embedder"\}') == 0.0
    assert value(r'limner_evictions_total\{model="fake/embedder"\}') == 0.0
    assert value(r'limner_swaps_total\{model="fake/embedder"\}') == 0.0
    assert value(r'limner_waiting_callers\{model="fake/embedder"\}') == 0.0
    assert value(r'limner_oldest_wait_seconds\{model="fake/embedder"\}') == 0.0
    assert value(r'limner_wait_timeouts_total\{model="fake/embedder"\}') == 0.0
    assert value(r'limner_model_loads_total\{model="limner/tiny-clip"\}') == 1.0
    assert value("limner_models_loaded") >= 2
    assert value("limner_ready") == 1.0
    # No *_created series (a counter's creation time): noise in every scrape.
    assert "_created" not in text


def test_openapi_schema_documents_every_route_with_400_not_422(main: Served) -> None:
    with main.client() as client:
        schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for path in (
        "/v1/models",
        "/v1/embeddings",
        "/v1/images/generations",
        "/v1/pool",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert path in paths, path
    embeddings = paths["/v1/embeddings"]["post"]["responses"]
    assert {"200", "400", "404", "413", "429", "503", "504"} <= set(embeddings)
    assert "422" not in embeddings


def test_settings_are_validated_and_typos_fail_at_create_app() -> None:
    with pytest.raises(ValueError, match="max_body_bytes"):
        ServerSettings(max_body_bytes=0)
    with pytest.raises(ValueError, match="pool_options"):
        ServerSettings(pool_options={"max_queeu": 3})
    with pytest.raises(InvalidInput, match="memory_budget_mb") as bad_budget:
        ServerSettings(pool_options={"memory_budget_mb": 0})
    assert bad_budget.value.field == "pool_options"
    with pytest.raises(ValueError, match="models"):
        ServerSettings(models="fake/embedder")
    with pytest.raises(ValueError, match="max_text_chars"):
        ServerSettings(max_text_chars=0)
    for key, problem in ((" k3y", "whitespace"), ("k3y\n", "whitespace"), ("k\x003y", "control")):
        with pytest.raises(InvalidInput, match=problem) as caught:
            ServerSettings(api_key=key)
        assert caught.value.field == "api_key"
    registry = _registry()
    with pytest.raises(KeyError, match="Did you mean: fake/embedder"):
        create_app(registry=registry, settings=ServerSettings(models=["fake/embeder"]))
    with pytest.raises(ValueError, match="fake/generator is preloaded but not among"):
        create_app(
            registry=registry,
            settings=ServerSettings(models=["fake/embedder"], preload=["fake/generator"]),
        )


def test_pool_options_come_as_one_object_or_as_keywords() -> None:
    options = PoolOptions(max_queue=3, memory_budget_mb=2048, keep_alive_per_key={"a": 5})
    arguments = ServerSettings(pool_options=options).pool_arguments(["b"])
    assert Pool(**arguments).options == dataclasses.replace(
        options, keep_alive_per_key={"a": 5, "b": math.inf}
    )
    mapping = ServerSettings(pool_options={"max_queue": 3}).pool_arguments([])
    assert mapping == {"max_queue": 3}


def _registry() -> Registry:
    registry = Registry(entry_points=False)
    registry.register(fake_embedding_spec("fake/embedder"))
    registry.register(fake_generation_spec("fake/generator"))
    return registry
