"""A request larger than the model's batch is split inside the pool; over HTTP it is still one
request: one status, never a 500 from one of its chunks."""

from __future__ import annotations

import base64
import io
import threading
from typing import TYPE_CHECKING

import httpx
from PIL import Image

from limner.testing import fake_embedding_spec

if TYPE_CHECKING:
    from tests.server.conftest import ErrorOf, ServerFactory, WaitFor


def data_url(shade: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (shade, 0, 0)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def test_a_request_larger_than_the_queue_is_served_whole(make_server: ServerFactory) -> None:
    served = make_server(
        fake_embedding_spec("fake/a", max_batch_size=4), pool_options={"max_queue": 4}
    )
    texts = [f"text number {i}" for i in range(200)]  # fifty chunks, a queue of four
    with served.client() as client:
        response = client.post("/v1/embeddings", json={"model": "fake/a", "input": texts})
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 200


def test_a_split_request_meeting_a_full_queue_is_429_with_retry_after(
    make_server: ServerFactory, error_of: ErrorOf, wait_for: WaitFor
) -> None:
    gate = threading.Event()
    gate.set()
    served = make_server(
        fake_embedding_spec("fake/a", max_batch_size=4, options={"gate": gate}),
        pool_options={"max_queue": 2, "max_workers": 1},
    )
    body = {"model": "fake/a", "input": "warm up"}  # texts pass the gate; images wait at it
    with served.client() as client:
        assert client.post("/v1/embeddings", json=body).status_code == 200
    gate.clear()
    held: list[httpx.Response] = []

    def post(shade: int) -> None:
        with served.client() as client:
            image = data_url(shade)
            held.append(client.post("/v1/embeddings", json={"model": "fake/a", "input": image}))

    threads = [threading.Thread(target=post, args=(shade,)) for shade in range(3)]
    try:
        threads[0].start()  # runs, held by the gate
        wait_for(lambda: served.pool("fake/a").get("in_flight") == 1, what="a running batch")
        for thread in threads[1:]:  # fill the queue
            thread.start()
        wait_for(lambda: served.pool("fake/a").get("queue_depth") == 2, what="a full queue")
        with served.client() as client:
            texts = [f"text {i}" for i in range(40)]
            response = client.post("/v1/embeddings", json={"model": "fake/a", "input": texts})
    finally:
        gate.set()
        for thread in threads:
            thread.join(timeout=30)
    assert response.status_code == 429, response.text
    assert error_of(response)["code"] == "pool_busy"
    assert float(response.headers["Retry-After"]) > 0
    assert [r.status_code for r in held] == [200, 200, 200]
