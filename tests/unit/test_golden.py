"""The single-process math, pinned: tests/golden/tiny.json (see tests/golden/reference.py for
what it holds and how to regenerate it deliberately)."""

from __future__ import annotations

import json

import pytest

from tests.golden.reference import GOLDEN, compute


@pytest.fixture(scope="module")
def got():
    return compute()


@pytest.fixture(scope="module")
def expected():
    return json.loads(GOLDEN.read_text())


def test_initial_logits_checksum(got, expected):
    for key, value in expected["initial_logits"].items():
        assert got["initial_logits"][key] == pytest.approx(value, rel=1e-6, abs=1e-6), key


@pytest.mark.parametrize("key", ["losses", "grad_norms", "lrs"])
def test_five_steps(got, expected, key):
    assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-6)
