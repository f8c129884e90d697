"""Packaging beyond pyproject.toml: the recipes ship with the package. configs/ stays at the
repository root beside the code (where a clone runs it and every engineer adds files) and
is mapped into the wheel as rlaif_jax/configs, so `pip install` alone runs
`rlaif arm --gin_file=<recipe>`; rlaif_jax.cli.configs_root finds either place."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["rlaif_jax*"]) + ["rlaif_jax.configs"],
    package_dir={"rlaif_jax.configs": "configs"},
    package_data={
        "rlaif_jax": ["**/*.txt", "**/*.json", "**/*.gin"],
        "rlaif_jax.configs": ["**/*.gin", "**/*.yaml", "**/*.json", "**/*.md"],
    },
)
