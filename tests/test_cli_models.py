"""`limner models`, run in-process: a broken plugin is said on stderr whether the listing is a
table or JSON, so a script reading only stdout still sees it in its log."""

from __future__ import annotations

import json
import types

import pytest
from click.testing import CliRunner

import limner
from limner._cli import cli
from limner.plugin import hookimpl
from limner.testing import fake_embedding_spec


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> limner.Registry:
    registry = limner.Registry(entry_points=False)
    registry.register(fake_embedding_spec("fake/embedder"))

    @hookimpl
    def limner_register_models(register: object) -> None:
        raise RuntimeError("its hook failed")

    broken = types.SimpleNamespace(limner_register_models=limner_register_models)
    registry.register_plugin(broken, name="acme-broken")
    monkeypatch.setattr("limner._cli._models.default_registry", lambda: registry)
    return registry


@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_a_broken_plugin_is_said_on_stderr(registry: limner.Registry, as_json: bool) -> None:
    result = CliRunner().invoke(cli, ["models", *(["--json"] if as_json else [])])
    assert result.exit_code == 0, result.output
    assert "Broken plugin acme-broken" in result.stderr
    assert "its hook failed" in result.stderr
    assert "Broken plugin" not in result.stdout
    if as_json:
        document = json.loads(result.stdout)  # stdout stays one JSON document
        assert [model["key"] for model in document["models"]] == ["fake/embedder"]
        broken = next(p for p in document["plugins"] if p["name"] == "acme-broken")
        assert "its hook failed" in broken["error"]
    else:
        assert "fake/embedder" in result.stdout
