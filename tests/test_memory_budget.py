"""The memory budget as people write it, for the commands, the server and the default pool."""

from __future__ import annotations

import pytest

from limner import InvalidInput
from limner._fronts._default_pool import _DefaultPool
from limner._pool._budget import memory_budget_from_env, parse_memory_budget


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.9", {"memory_budget_fraction": 0.9}),
        ("1", {"memory_budget_fraction": 1.0}),
        ("90%", {"memory_budget_fraction": 0.9}),
        (" 50 % ", {"memory_budget_fraction": 0.5}),
        ("20000", {"memory_budget_mb": 20000.0}),
        ("20000MB", {"memory_budget_mb": 20000.0}),
        ("1.5gb", {"memory_budget_mb": 1536.0}),
        ("20 GiB", {"memory_budget_mb": 20480.0}),
    ],
)
def test_budgets_people_write(text: str, expected: dict[str, float]) -> None:
    assert parse_memory_budget(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "0", "-5", "150%", "20TB", "1e9", "nan"])
def test_nonsense_is_refused_naming_the_field(text: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_memory_budget(text, field="--memory-budget")
    assert caught.value.field == "--memory-budget"


def test_the_environment_variable_sets_the_default_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIMNER_MEMORY_BUDGET", "12GB")
    assert memory_budget_from_env() == {"memory_budget_mb": 12288.0}
    default = _DefaultPool()  # a pool of its own: the process-wide one is left alone
    try:
        _, pool = default.start()
        assert pool.memory_budget_mb == 12288.0
    finally:
        default.stop()


def test_a_bad_environment_variable_fails_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIMNER_MEMORY_BUDGET", "lots")
    with pytest.raises(InvalidInput, match="LIMNER_MEMORY_BUDGET"):
        _DefaultPool().start()
    monkeypatch.setenv("LIMNER_MEMORY_BUDGET", "")
    assert memory_budget_from_env() == {}
