"""The environment record names the processor and its widest vector instruction set: on a
CPU they decide which kernels XLA's libraries pick, and so a run's float rounding."""

from rlaif_jax import environment

INTEL = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512bw
processor\t: 1
model name\t: Intel(R) Xeon(R) Processor
"""
AMD = "model name\t: AMD EPYC 7B13\nflags\t\t: fpu sse4_2 avx avx2 fma\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm\nCPU part\t: 0xd0c\n"


def test_cpu_names_model_and_widest_isa(tmp_path):
    def cpu(text):
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        return environment.cpu(str(path))

    assert cpu(INTEL) == "Intel(R) Xeon(R) Processor, AVX-512"
    assert cpu(AMD) == "AMD EPYC 7B13, AVX2"
    assert cpu(ARM) == "0xd0c, NEON"
    assert environment.cpu(str(tmp_path / "missing"))  # elsewhere: what `platform` knows


def test_one_line_carries_cpu_and_xla_flags():
    env = {
        "backend": "cpu",
        "devices": "1 x cpu",
        "cpu": "AMD EPYC 7B13, AVX2",
        "xla_flags": "--xla_cpu_max_isa=AVX2",
        "python": "3.11.7",
        "platform": "Linux-x86_64",
        "packages": {"jax": "0.10.2", "flax": None},
    }
    line = environment.one_line(env)
    assert line.startswith("backend cpu (1 x cpu; AMD EPYC 7B13, AVX2, XLA_FLAGS='--xla_cpu_max_isa=AVX2')")
    assert "jax 0.10.2" in line and "flax" not in line
    assert environment.one_line({**env, "cpu": None, "xla_flags": None}).startswith("backend cpu (1 x cpu), Python")
