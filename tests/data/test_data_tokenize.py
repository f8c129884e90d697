import numpy as np
import pytest

from rlaif_jax.data.tokenize import Encoder, ModelTemplate, build_test_tokenizer, load_tokenizer


def ids(tok, pieces):
    out = tok.convert_tokens_to_ids(pieces)
    assert tok.unk_token_id not in out, pieces
    return out


PROMPT_PIECES = ["Human", ":", " ", "hello", " ", "world", "\n\n", "Assistant", ":", " "]
RESPONSE_PIECES = ["The", " ", "sea", " ", "is", " ", "blue"]


def test_paper_template_tokens(tokenizer):
    enc = Encoder(tokenizer, "paper")
    (ex,) = enc.encode_sft(["hello world"], ["The sea is blue"])
    assert ex.prompt.tolist() == [tokenizer.bos_token_id] + ids(tokenizer, PROMPT_PIECES)
    assert ex.response.tolist() == ids(tokenizer, RESPONSE_PIECES) + [tokenizer.eos_token_id]
    assert ex.prompt.dtype == np.int32
    full = tokenizer.decode(np.concatenate([ex.prompt, ex.response]).tolist())
    assert full == "<s>Human: hello world\n\nAssistant: The sea is blue</s>"


def test_exactly_one_bos_and_user_special_strings_stay_text(tokenizer):
    enc = Encoder(tokenizer, "paper")
    (ex,) = enc.encode_sft(["<s>hello</s>"], ["is </s> blue"])
    seq = np.concatenate([ex.prompt, ex.response]).tolist()
    assert seq.count(tokenizer.bos_token_id) == 1 and seq[0] == tokenizer.bos_token_id
    assert seq.count(tokenizer.eos_token_id) == 1 and seq[-1] == tokenizer.eos_token_id
    (p,) = enc.encode_prompts(["hello"])
    assert p.tolist() == [tokenizer.bos_token_id] + ids(
        tokenizer, ["Human", ":", " ", "hello", "\n\n", "Assistant", ":", " "]
    )


def test_model_template(tokenizer):
    enc = Encoder(tokenizer, "model")
    (ex,) = enc.encode_sft(["hello world"], ["The sea is blue"])
    user = ["<", "|", "user", "|", ">"]
    asst = ["<", "|", "assistant", "|", ">"]
    # The template renders BOS itself; the encoder must not add a second one.
    assert ex.prompt.tolist() == [tokenizer.bos_token_id] + ids(tokenizer, user + ["hello", " ", "world"] + asst)
    assert ex.response.tolist() == ids(tokenizer, RESPONSE_PIECES) + [tokenizer.eos_token_id]


def test_model_template_without_bos_or_eos_gets_them(tmp_path):
    tok = build_test_tokenizer(
        tmp_path,
        chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}:{% endif %}",
    )
    with pytest.raises(ValueError, match="prefix-stable"):
        Encoder(tok, "model").encode_sft(["hello"], ["blue"])
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    (ex,) = Encoder(tok, ModelTemplate(tok)).encode_sft(["hello"], ["blue"])
    assert ex.prompt.tolist() == [tok.bos_token_id] + ids(tok, ["hello", " "])
    assert ex.response.tolist() == ids(tok, ["blue", " "]) + [tok.eos_token_id]


def test_truncation_keep_end_and_keep_start(tokenizer):
    long_prompt = " ".join(["hello"] * 20)  # 39 tokens of text
    long_resp = " ".join(["blue"] * 20)
    # prompt = BOS + 3 + 39 + 4 = 47 tokens; response = 39 + EOS = 40
    enc = Encoder(tokenizer, "paper", max_length=64, max_prompt_length=16, truncation_mode="keep_end")
    (ex,) = enc.encode_sft([long_prompt], [long_resp])
    full_prompt = Encoder(tokenizer, "paper").encode_prompts([long_prompt])[0].tolist()
    assert ex.prompt.tolist() == [tokenizer.bos_token_id] + full_prompt[-15:]
    assert tokenizer.decode(ex.prompt[-4:].tolist()) == "\n\nAssistant: "
    assert len(ex.response) == 40  # 16 + 40 <= 64: the response is untouched
    enc = Encoder(tokenizer, "paper", max_length=32, max_prompt_length=16, truncation_mode="keep_start")
    (ex,) = enc.encode_sft([long_prompt], [long_resp])
    assert ex.prompt.tolist() == full_prompt[:16]
    assert len(ex.response) == 16 and ex.response[-1] != tokenizer.eos_token_id  # EOS cut, as in the paper
    assert ex.length <= 32
    (short,) = enc.encode_sft(["hello"], ["blue"])
    assert short.length == 11  # 9 prompt + 2 response: nothing cut when it fits


def test_pairs_share_prompt_truncated_by_longer_response(tokenizer):
    long_prompt = " ".join(["hello"] * 20)
    enc = Encoder(tokenizer, "paper", max_length=64, max_prompt_length=16)
    ((c, r),) = enc.encode_pairs([long_prompt], ["blue"], [" ".join(["blue"] * 20)])
    assert c.prompt.tolist() == r.prompt.tolist() and len(c.prompt) == 16
    assert c.response.tolist() == ids(tokenizer, ["blue"]) + [tokenizer.eos_token_id]
    ((c, r),) = enc.encode_pairs(["hello"], ["blue"], ["is"])
    assert len(c.prompt) == 9


def test_bpe_builder_round_trips_and_loads(tmp_path):
    tok = build_test_tokenizer(tmp_path, kind="bpe", vocab_size=300)
    again = load_tokenizer(str(tmp_path))
    text = "Human: Ünïcode and unseen words zqxj\n\nAssistant: "
    assert again.decode(again(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.get_vocab() == again.get_vocab()
    with pytest.raises(FileNotFoundError, match="hub ids are not fetched"):
        load_tokenizer("meta-llama/Llama-2-7b-hf")
