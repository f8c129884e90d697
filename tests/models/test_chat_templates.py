"""The families' own chat templates (tests/models/chat_templates, verbatim from the model repos)
with small local byte-level BPE tokenizers holding each family's special tokens: a multi-turn
conversation's ids equal tokenizer.apply_chat_template's and the assistant mask covers exactly
each assistant message and its turn end; the single-turn SFT / DPO encoding (ModelTemplate)
splits at the generation prompt, with Qwen3's thinking off unless asked."""

import os

import numpy as np
import pytest

pytest.importorskip("tokenizers")
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from rlaif_jax.data.tokenize import Encoder  # noqa: E402
from rlaif_jax.data.tokenize.templates import ModelTemplate, encode_conversation, get_template, turn_end  # noqa: E402

HERE = os.path.join(os.path.dirname(__file__), "chat_templates")

# family -> (template file, special tokens, bos, eos, pad, non-special added tokens, turn end)
FAMILIES = {
    "llama3": (
        "llama3_1",
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|end_of_text|>",
        [],
        "<|eot_id|>",
    ),
    "qwen2_5": (
        "qwen2_5",
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        None,
        "<|im_end|>",
        "<|endoftext|>",
        [],
        "<|im_end|>\n",
    ),
    "qwen3": (
        "qwen3",
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        None,
        "<|im_end|>",
        "<|endoftext|>",
        ["<think>", "</think>"],
        "<|im_end|>\n",
    ),
    "gemma2": (
        "gemma",
        ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
        "<bos>",
        "<eos>",
        "<pad>",
        [],
        "<end_of_turn>\n",
    ),
    "gemma3": (
        "gemma3",
        ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
        "<bos>",
        "<eos>",
        "<pad>",
        [],
        "<end_of_turn>\n",
    ),
}

CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Name a prime number. Seven is prime, and so is eleven.",
    "system user assistant model Cutting Knowledge Date: December 2023 Today 26 Jul 2024 think",
]
CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "Name a prime number."},
    {"role": "assistant", "content": "Seven is prime."},
]


def _tokenizer(family):
    tmpl, specials, bos, eos, pad, added, _ = FAMILIES[family]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad)
    with open(os.path.join(HERE, f"{tmpl}.jinja")) as f:
        hf.chat_template = f.read()
    return hf


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param, _tokenizer(request.param)


def test_multi_turn_ids_and_assistant_mask(family):
    name, tok = family
    messages = CONVERSATION
    if name != "gemma2":  # Gemma (2) templates refuse a system turn
        messages = [{"role": "system", "content": "Be brief."}] + CONVERSATION
    ids, mask = encode_conversation(tok, messages)
    ref = tok.apply_chat_template(messages, tokenize=True, enable_thinking=False)
    ref = ref["input_ids"] if hasattr(ref, "keys") else ref
    np.testing.assert_array_equal(ids, np.asarray(ref))
    # The masked tokens, run by run, decode to each assistant message plus its turn end.
    end = FAMILIES[name][-1]
    runs, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(int(t))
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    want = [m["content"] + end for m in messages if m["role"] == "assistant"]
    assert [tok.decode(r) for r in runs] == want
    assert turn_end(ModelTemplate(tok)) == end


def test_single_turn_encoding_splits_at_the_generation_prompt(family):
    """SFT / DPO data (Encoder with the model template): prompt + response ids are the
    two-message conversation's ids, one BOS, the response exactly the assistant's tokens."""
    name, tok = family
    enc = Encoder(tok, template="model", max_length=256, max_prompt_length=128)
    (ex,) = enc.encode_sft([CONVERSATION[0]["content"]], [CONVERSATION[1]["content"]])
    ids, mask = encode_conversation(tok, CONVERSATION[:2])
    got = np.concatenate([ex.prompt, ex.response])
    extra = [] if FAMILIES[name][-1].startswith(tok.eos_token) else [tok.eos_token_id]
    np.testing.assert_array_equal(got, np.concatenate([ids, np.asarray(extra, np.int32)]).astype(np.int32))
    if name.startswith("qwen"):
        assert mask[len(ex.prompt) :].all() and not mask[: len(ex.prompt)].any()
    else:  # response == masked tokens, plus the EOS the encoder appends after the turn end
        assert mask[len(ex.prompt) :].all() and mask.sum() == len(ids) - len(ex.prompt)
    if tok.bos_token_id is not None:
        assert (got == tok.bos_token_id).sum() == 1


def test_qwen3_thinking_is_off_unless_asked():
    tok = _tokenizer("qwen3")
    off, on = get_template("model", tok), get_template("model_thinking", tok)
    assert off.prompt_text("hi").endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert on.prompt_text("hi").endswith("<|im_start|>assistant\n")
    assert off.response_text("hi", "Paris.") == "Paris.<|im_end|>\n"
    # thinking on: the empty think block is part of what the model is trained to write
    assert on.response_text("hi", "Paris.") == "<think>\n\n</think>\n\nParis.<|im_end|>\n"
    ids, mask = encode_conversation(tok, CONVERSATION)
    text = tok.decode(ids[mask == 0])
    assert text.count("<think>") == 1  # the last turn's empty block: prompt, not response
