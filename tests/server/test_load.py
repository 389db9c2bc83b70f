"""500 concurrent requests against a small queue: each answered, 200 or 429, none lost."""

from __future__ import annotations

import base64
import io
import threading
from collections import Counter
from typing import TYPE_CHECKING

import anyio
import httpx
import pytest
from PIL import Image

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
