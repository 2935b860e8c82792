"""Test-wide setup: 4 fake CPU devices so mesh/sharding code runs for real, float32 matmuls."""

import atexit
import os
import pathlib
import shutil
import tempfile

# Must happen before JAX initialises its backends.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA's concurrency-optimised CPU scheduler lets the 4 fake devices issue independent
# collectives in different orders; their rendezvous then deadlock and XLA aborts the process
# after 40 s (seen on the ring-attention + accumulation train step). The plain scheduler keeps
# one order; it changes no numbers.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4 "
                      "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# One persistent compilation cache per test session: the trainer tests build the same train
# step several times (straight / interrupted / resumed runs, one device / meshes), and each new
# Trainer's jit would compile it again. Keyed on the HLO and flags, so it changes no numbers.
_CACHE = tempfile.mkdtemp(prefix="longvid_jax_xla_cache_")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

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
