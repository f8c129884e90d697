"""rlaif_jax: a JAX-native training stack for aligning language models with AI feedback."""

__version__ = "0.1.0"
