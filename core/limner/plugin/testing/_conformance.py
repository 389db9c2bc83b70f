"""Collected by ``pytest --limner-conformance KEY``: a conformance class for each key."""

from __future__ import annotations

from limner.plugin.testing import contract_for
from limner.plugin.testing._pytest_plugin import conformance_keys

for _key in conformance_keys():
    _contract = contract_for(_key)
    globals()[_contract.__name__] = _contract
