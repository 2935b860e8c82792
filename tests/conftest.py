"""Test-wide setup: 4 fake CPU devices so mesh/sharding code runs for real, float32 matmuls."""

import os
import pathlib

# Must happen before JAX initialises its backends.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MEDIA = SHARED / "media"
FIXTURES = SHARED / "fixtures"


@pytest.fixture(scope="session")
def media_dir() -> pathlib.Path:
    if not MEDIA.is_dir():
        pytest.fail(f"shared media not found at {MEDIA}; clone the project beside shared/")
    return MEDIA


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"shared fixtures not found at {FIXTURES}")
    return FIXTURES
