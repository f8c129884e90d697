"""What a result was computed with: package versions and the JAX backend, recorded beside
every summary so a table can be traced to (and reproduced on) the same install."""

from __future__ import annotations

import importlib.metadata
import platform

# The packages whose versions decide the numbers of a training run.
PACKAGES = (
    "rlaif_jax",
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "numpy",
    "ml_dtypes",
    "transformers",
    "tokenizers",
    "safetensors",
)


def package_versions(packages=PACKAGES) -> dict:
    out = {}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def describe() -> dict:
    """{python, platform, backend, devices, packages}: flat enough for summary.json."""
    import jax

    devs = jax.devices()
    return {
        "python": platform.python_version(),
        "platform": f"{platform.system()}-{platform.machine()}",
        "backend": jax.default_backend(),
        "devices": f"{len(devs)} x {devs[0].device_kind}",
        "packages": package_versions(),
    }


def one_line(env: dict) -> str:
    pk = ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v)
    return f"backend {env['backend']} ({env['devices']}), Python {env['python']} on {env['platform']}; {pk}"
