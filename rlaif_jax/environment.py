"""What a result was computed with: package versions, the JAX backend and, on a CPU, the
processor, recorded beside every summary so a table can be traced to (and reproduced on)
the same install and hardware."""

from __future__ import annotations

import importlib.metadata
import os
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


# Widest first: the vector instruction set a CPU offers decides which kernels XLA:CPU's
# libraries (YNNPACK's dots) pick at run time, and so the float rounding of a training run.
_ISAS = (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"), ("sse4_2", "SSE4.2"), ("asimd", "NEON"))


def cpu(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The processor's model name and widest vector instruction set, e.g. "Intel(R) Xeon(R)
    Processor, AVX-512" (from /proc/cpuinfo; elsewhere, what `platform` knows)."""
    try:
        with open(cpuinfo) as f:
            text = f.read()
    except OSError:
        return platform.processor() or platform.machine()
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or fields.get("Model") or fields.get("CPU part") or platform.machine()
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    isa = next((label for flag, label in _ISAS if flag in flags), None)
    return f"{name}, {isa}" if isa else name


def describe() -> dict:
    """{python, platform, backend, devices, cpu, xla_flags, packages}: flat enough for
    summary.json. On the CPU backend the numbers also depend on the processor (see `cpu`)."""
    import jax

    devs = jax.devices()
    backend = jax.default_backend()
    return {
        "python": platform.python_version(),
        "platform": f"{platform.system()}-{platform.machine()}",
        "backend": backend,
        "devices": f"{len(devs)} x {devs[0].device_kind}",
        "cpu": cpu() if backend == "cpu" else None,
        "xla_flags": os.environ.get("XLA_FLAGS") or None,
        "packages": package_versions(),
    }


def one_line(env: dict) -> str:
    pk = ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v)
    hw = f"{env['devices']}" + (f"; {env['cpu']}" if env.get("cpu") else "")
    flags = f", XLA_FLAGS={env['xla_flags']!r}" if env.get("xla_flags") else ""
    return f"backend {env['backend']} ({hw}{flags}), Python {env['python']} on {env['platform']}; {pk}"
