"""Fixtures shared by the metric tests."""

import json

import pytest

from longvid_jax.metrics.common import COMPAT_MODES


@pytest.fixture(scope="session")
def metric_case(fixtures_dir):
    """Loader of a metric fixture: `metric_case(name) -> (input.json, expected.json)` contents.

    Each call parses the files again, so a test may modify what it gets.
    """

    def load(name: str) -> tuple[dict, dict]:
        folder = fixtures_dir / "metrics" / name
        return (
            json.loads((folder / "input.json").read_text()),
            json.loads((folder / "expected.json").read_text()),
        )

    return load


@pytest.fixture(scope="session")
def both_modes():
    """`both_modes(fn, *args, **kw) -> {compat: fn(*args, compat=compat, **kw)}`, both modes."""

    def run(fn, *args, **kwargs):
        return {mode: fn(*args, compat=mode, **kwargs) for mode in COMPAT_MODES}

    return run
