"""Load through a real server: 500 concurrent requests against a small queue (each answered,
200 or 429, none lost), and three models that fit one at a time under a cycling load (200,
or 429/503 with Retry-After, never a 500)."""

from __future__ import annotations

import base64
import functools
import io
import threading
from collections import Counter
from typing import TYPE_CHECKING

import anyio
import httpx
import pytest
from PIL import Image

from limner import ModelSpec, PoolOptions
from limner.testing import FakeMemory, fake_embedding_spec

if TYPE_CHECKING:
    from tests.server.conftest import Served, ServerFactory, WaitFor

pytestmark = pytest.mark.anyio

REQUESTS = 500
MAX_QUEUE = 4
WORKERS = 2


def image_data_url() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (9, 99, 199)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


async def test_concurrent_requests_get_200_or_429_and_none_is_lost(
    make_server: ServerFactory, wait_for: WaitFor
) -> None:
    gate = threading.Event()  # holds every batch while clear
    gate.set()
    served: Served = make_server(
        # One image per batch: exactly WORKERS batches run while the gate is shut.
        fake_embedding_spec("fake/gated", max_batch_size=1, options={"gate": gate}),
        pool_options={
            "max_queue": MAX_QUEUE,
            "max_workers": WORKERS,
            "memory": FakeMemory(total_mb=10_000),
        },
    )
    body = {"model": "fake/gated", "input": image_data_url()}
    statuses: list[int] = []
    lost: list[str] = []
    retry_after: set[str] = set()
    limits = httpx.Limits(max_connections=REQUESTS, max_keepalive_connections=REQUESTS)
    async with httpx.AsyncClient(base_url=served.url, limits=limits, timeout=60) as client:
        assert (await client.post("/v1/embeddings", json=body)).status_code == 200  # loaded
        gate.clear()

        refused_all_it_could = anyio.Event()

        async def one() -> None:
            try:
                response = await client.post("/v1/embeddings", json=body)
            except httpx.TransportError as error:  # a lost request: reported, not raised
                lost.append(f"{type(error).__name__} after {len(statuses)} answers: {error!r}")
            else:
                statuses.append(response.status_code)
                if response.status_code == 429:
                    retry_after.add(response.headers["retry-after"])
                    assert response.json()["error"]["code"] == "pool_busy"
            if len(statuses) + len(lost) == REQUESTS - (WORKERS + MAX_QUEUE):
                refused_all_it_could.set()

        async def release_when_only_the_held_remain() -> None:
            # Every request the pool cannot hold is answered 429 while the gate is shut.
            await refused_all_it_could.wait()
            await anyio.sleep(0.2)  # a straggler would show up as a wrong count below
            gate.set()

        try:
            with anyio.fail_after(120):
                async with anyio.create_task_group() as group:
                    group.start_soon(release_when_only_the_held_remain)
                    for _ in range(REQUESTS):
                        group.start_soon(one)
        finally:
            gate.set()  # a failure above must not leave the held batches waiting
    counts = Counter(statuses)
    assert lost == []
    assert len(statuses) == REQUESTS  # every request answered
    assert set(counts) == {200, 429}, counts
    assert counts[200] == WORKERS + MAX_QUEUE, counts
    assert counts[429] == REQUESTS - WORKERS - MAX_QUEUE
    assert retry_after == {"1"}
    await anyio.to_thread.run_sync(
        lambda: wait_for(lambda: served.pool("fake/gated")["in_flight"] == 0)
    )
    stats = await anyio.to_thread.run_sync(served.pool, "fake/gated")
    assert stats["queue_depth"] == 0


def embed_body(key: str) -> dict[str, str]:
    return {"model": key, "input": image_data_url()}


def one_at_a_time_specs(memory: FakeMemory) -> list[ModelSpec]:
    """Three fake models of 600 MB, charged to ``memory``: one fits a 1000 MB budget. Their
    loads and batches take real (short) time, as a model's would."""
    options = {"memory": memory, "load_seconds": 0.05, "batch_seconds": 0.02}
    return [
        fake_embedding_spec(f"fake/turn-{name}", memory_mb=600, options=options)
        for name in ("a", "b", "c")
    ]


@pytest.mark.slow  # three models taking turns under 30 clients for a while
async def test_mixed_load_over_http_gets_answers_or_refusals_with_retry_after(
    make_server: ServerFactory,
) -> None:
    """The issue's load, shorter, through a real server: 30 clients cycling through three
    models that fit one at a time, a small queue. Each request is answered 200, or refused
    429/503 with Retry-After (and retried after it); none is lost, none is a 500."""
    memory = FakeMemory(total_mb=100_000)
    specs = one_at_a_time_specs(memory)
    served = make_server(
        *specs,
        pool_options=PoolOptions(memory_budget_mb=1000, max_queue=4, max_wait=1.0),
    )
    keys = [spec.key for spec in specs]
    statuses: list[int] = []
    lost: list[str] = []
    without_retry_after: list[int] = []
    answered_by: Counter[str] = Counter()
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    stop_at = anyio.current_time() + 10.0

    async def client(index: int, http: httpx.AsyncClient) -> None:
        turn = 0
        while anyio.current_time() < stop_at:
            key = keys[(index + turn) % len(keys)]
            try:
                response = await http.post("/v1/embeddings", json=embed_body(key))
            except httpx.TransportError as error:
                lost.append(repr(error))
                return
            statuses.append(response.status_code)
            if response.status_code == 200:
                answered_by[key] += 1
                turn += 1
            elif response.status_code in (429, 503):
                retry_after = response.headers.get("retry-after")
                if retry_after is None or int(retry_after) < 1:
                    without_retry_after.append(response.status_code)
                code = response.json()["error"]["code"]
                assert code == ("pool_busy" if response.status_code == 429 else "wait_timeout")
                await anyio.sleep(min(float(retry_after or 1), 1.0))

    async with httpx.AsyncClient(base_url=served.url, limits=limits, timeout=60) as http:
        with anyio.fail_after(120):
            async with anyio.create_task_group() as group:
                for index in range(30):
                    group.start_soon(client, index, http)
    counts = Counter(statuses)
    refused = counts[429] + counts[503]
    print(
        f"\nover HTTP: {len(statuses)} requests, {counts[200]} answered, {counts[429]} 429, "
        f"{counts[503]} 503 ({refused / max(1, len(statuses)):.1%} refused)"
    )
    assert lost == []
    assert set(counts) <= {200, 429, 503}, counts
    assert without_retry_after == []
    assert set(answered_by) == set(keys)  # every model answered
    stats = await anyio.to_thread.run_sync(served.pool, keys[0])
    assert stats["swaps"] > 0 and "oldest_wait_seconds" in stats and "waiting" in stats


async def test_a_request_that_waits_past_max_wait_is_503_with_retry_after(
    make_server: ServerFactory, wait_for: WaitFor
) -> None:
    gate = threading.Event()  # holds fake/held's batches while clear
    gate.set()
    memory = FakeMemory(total_mb=100_000)
    served = make_server(
        fake_embedding_spec("fake/held", memory_mb=600, options={"memory": memory, "gate": gate}),
        fake_embedding_spec("fake/other", memory_mb=600, options={"memory": memory}),
        pool_options={"memory_budget_mb": 1000, "max_wait": 0.3, "min_turn": 60},
    )
    async with httpx.AsyncClient(base_url=served.url, timeout=60) as http:
        assert (await http.post("/v1/embeddings", json=embed_body("fake/held"))).status_code == 200
        gate.clear()
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(
                    functools.partial(http.post, "/v1/embeddings", json=embed_body("fake/held"))
                )
                await anyio.to_thread.run_sync(
                    lambda: wait_for(lambda: served.pool("fake/held")["in_flight"] == 1)
                )
                response = await http.post("/v1/embeddings", json=embed_body("fake/other"))
                gate.set()
        finally:
            gate.set()
        text = (await http.get("/metrics")).text
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "wait_timeout"
    assert int(response.headers["retry-after"]) >= 1
    assert 'limner_wait_timeouts_total{model="fake/other"} 1.0' in text
    assert 'limner_waiting_callers{model="fake/other"} 0.0' in text
