"""Loading HF tokenizers from local directories, and building small ones for tests.

`build_test_tokenizer` makes a real `PreTrainedTokenizerFast` (saved like any hub
tokenizer) from a few sentences, so tests and the CPU miniature exercise the same loading
and chat-template code as a real model without any download.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

from rlaif_jax.models.tokenizer_fingerprint import (  # noqa: F401 (handed on)
    FINGERPRINT_FILE,
    save_fingerprint,
    saved_fingerprint,
    tokenizer_hash,
)

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"

# A minimal chat template in the HF (Jinja) convention: BOS once, role markers, EOS after
# each assistant turn. Deliberately unlike the paper's "Human:/Assistant:" template so
# tests can tell which one was applied.
TEST_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

DEFAULT_CORPUS = (
    "Human: What is the capital of France?\n\nAssistant: The capital of France is Paris.",
    "Human: Write a short poem about the sea.\n\nAssistant: The sea is blue and wide.",
    "Human: How do I sort a list in Python?\n\nAssistant: Use sorted(my_list) or my_list.sort().",
    "Human: Tell me a joke.\n\nAssistant: Why did the chicken cross the road? To get to the other side!",
    "hello world the a an is are was of to in and or not yes no user assistant system",
    "0 1 2 3 4 5 6 7 8 9 <|user|> <|assistant|>",
)

# Words, runs of whitespace, and single punctuation marks each become one token, so a
# word-level vocabulary keeps "\n\n" and " " and decodes back to the exact text.
_SPLIT_PATTERN = r"\s+|\w+|[^\w\s]"


def build_test_tokenizer(
    out_dir: str | os.PathLike,
    texts: Optional[Sequence[str]] = None,
    kind: str = "wordlevel",
    vocab_size: int = 512,
    chat_template: Optional[str] = TEST_CHAT_TEMPLATE,
) -> Any:
    """Trains a tiny tokenizer on `texts`, saves it to `out_dir`, returns the HF tokenizer.

    kind="wordlevel": every word / whitespace run / punctuation mark is one token (easy to
    predict in tests; unseen words map to <unk>). kind="bpe": byte-level BPE (no <unk>,
    closer to real models). Special tokens: <pad>=0, <s>=1, </s>=2, <unk>=3.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts or DEFAULT_CORPUS)
    specials = [PAD, BOS, EOS, UNK]
    if kind == "wordlevel":
        tok = Tokenizer(models.WordLevel(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated")
        tok.decoder = decoders.Fuse()
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=specials)
    elif kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    else:
        raise ValueError(f"kind must be 'wordlevel' or 'bpe', got {kind!r}")
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK)
    if chat_template is not None:
        hf.chat_template = chat_template
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(os.fspath(out_dir))
    return load_tokenizer(out_dir)


def load_tokenizer(path_or_tokenizer: Any) -> Any:
    """A local HF tokenizer directory (never the hub), or an already-loaded tokenizer."""
    if not isinstance(path_or_tokenizer, (str, os.PathLike)):
        return path_or_tokenizer
    from transformers import AutoTokenizer

    path = os.fspath(path_or_tokenizer)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a local tokenizer directory (hub ids are not fetched)")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)
