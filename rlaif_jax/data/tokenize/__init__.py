"""Tokenizers (local HF directories), chat templates, and encoding with truncation."""

from rlaif_jax.data.tokenize.encode import TRUNCATION_MODES, Encoded, Encoder
from rlaif_jax.data.tokenize.templates import (
    PAPER_TEMPLATE,
    ChatTemplate,
    ModelTemplate,
    PaperTemplate,
    get_template,
)
from rlaif_jax.data.tokenize.tokenizer import (
    DEFAULT_CORPUS,
    TEST_CHAT_TEMPLATE,
    build_test_tokenizer,
    load_tokenizer,
)

__all__ = [
    "DEFAULT_CORPUS",
    "PAPER_TEMPLATE",
    "TEST_CHAT_TEMPLATE",
    "TRUNCATION_MODES",
    "ChatTemplate",
    "Encoded",
    "Encoder",
    "ModelTemplate",
    "PaperTemplate",
    "build_test_tokenizer",
    "get_template",
    "load_tokenizer",
]
