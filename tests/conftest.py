"""Test-session setup: 8 fake CPU devices so sharding tests see a real mesh.

XLA reads the flag when the backend starts, so it is set here, before any test imports jax.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402  (after the environment above, which must precede jax)


@pytest.fixture
def clean_gin():
    """gin's config is process-global: a test that parses bindings starts and ends clean."""
    import gin

    from rlaif_jax.cli import import_configurables

    import_configurables()
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.fixture
def memfs():
    """fsspec's in-process memory:// filesystem (the stand-in for gs://), empty before and
    after the test: it is process-global."""
    import fsspec

    fs = fsspec.filesystem("memory")

    def clear():
        fs.store.clear()
        fs.pseudo_dirs[:] = [""]

    clear()
    yield fs
    clear()


@pytest.fixture
def memory_checkpoints(tmp_path, monkeypatch):
    """Orbax writes through etils.epath, which has no memory://: checkpoints of a memory://
    run_dir go to a local directory instead (everything else the run writes stays remote)."""
    from rlaif_jax.train import checkpoint as checkpoint_lib
    from rlaif_jax.train import run_loop

    root = tmp_path / "orbax"

    def make(directory, *a, **kw):
        if directory.startswith("memory://"):
            directory = str(root / directory[len("memory://") :])
        return checkpoint_lib.Checkpointer(directory, *a, **kw)

    monkeypatch.setattr(run_loop, "Checkpointer", make)  # train's and train_ppo's
    return root
