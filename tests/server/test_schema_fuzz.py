"""Schemathesis against the served OpenAPI schema: generated requests, valid and invalid, get
answers that match the schema (server-sent events included), and never a 5xx.

A dedicated server serves only fakes and fetches no URL (``fetch_hosts=()``), so generated
URLs are refused before any lookup and nothing leaves the machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from limner import Registry
from limner.server import ServerSettings, create_app
from limner.testing import fake_embedding_spec, fake_generation_spec

if TYPE_CHECKING:
    from tests.server.conftest import Serve, Served

pytest.importorskip("schemathesis")

import hypothesis
import hypothesis.errors
import schemathesis
from schemathesis import checks
from schemathesis.core.result import Ok
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi import checks as openapi_checks


@pytest.fixture(scope="module")
def fuzzed(serve: Serve) -> Iterator[Served]:
    registry = Registry(entry_points=False)
    registry.register(fake_embedding_spec("fake/embedder"))
    registry.register(fake_generation_spec("fake/generator"))
    # No API key: the auth tests cover it, and here every request should reach the routes.
    settings = ServerSettings(fetch_hosts=(), request_timeout=10, max_body_bytes=256 * 1024)
    with serve(create_app(registry=registry, settings=settings), registry) as served:
        yield served


MODES = ("positive", "negative")
# Every check but "schema-valid data is accepted": the schema cannot say that a size must be a
# multiple of 8 for this model, so such requests are rightly answered 400.
CHECKS = [
    checks.not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_schema_conformance,
    openapi_checks.negative_data_rejection,
]


@pytest.mark.parametrize("mode", MODES)
def test_generated_requests_get_conforming_answers_and_no_server_error(
    fuzzed: Served, mode: str
) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzzed.url}/openapi.json")
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result.err()  # the served schema is valid OpenAPI
        operations.append(result.ok())
    assert len(operations) >= 8
    statuses: list[int] = []
    for operation in operations:

        @hypothesis.given(case=operation.as_strategy(GenerationMode(mode)))
        @hypothesis.settings(
            max_examples=40,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(hypothesis.HealthCheck),
        )
        def call(case: Any) -> None:
            response = case.call(timeout=30)
            statuses.append(response.status_code)
            assert response.status_code < 500, (case.method, case.path, response.text)
            case.validate_response(response, checks=CHECKS)

        try:
            call()
        except hypothesis.errors.Unsatisfiable:
            # No invalid request exists for an operation without inputs (GET /healthz).
            assert mode == "negative" and operation.method == "get", operation.label
    if mode == "positive":
        assert any(status == 200 for status in statuses)
    else:
        assert any(status == 400 for status in statuses)
