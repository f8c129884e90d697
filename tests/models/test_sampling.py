"""The compiled sampler against HF generate and against full forward passes."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from rlaif_jax.models import apply, build_model  # noqa: E402
from rlaif_jax.models.hf_io import load_hf  # noqa: E402
from rlaif_jax.sampling import SamplingParams, filter_logits, generate, left_pad  # noqa: E402
from tests.models.hf_fixtures import make_hf_model, save_hf_model  # noqa: E402

PROMPTS = [[1, 10, 20, 30], [1, 7], [1, 3, 4, 5, 6, 8, 9, 11, 12, 13, 14, 15, 16, 17, 18, 19, 21]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    hf = make_hf_model("mistral_window")
    save_hf_model(hf, d)
    cfg, params = load_hf(str(d))
    return hf, build_model(cfg), params


def _hf_greedy(hf, prompt, n, eos):
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )
    return out[0, len(prompt) :].numpy()


def test_greedy_equals_hf_generate(tiny):
    hf, model, params = tiny
    out = generate(model, params, PROMPTS, jax.random.key(0), SamplingParams(max_new_tokens=10, temperature=0.0))
    for i, p in enumerate(PROMPTS):
        np.testing.assert_array_equal(out.tokens[i], _hf_greedy(hf, p, 10, eos=None))
    assert list(out.lengths) == [10, 10, 10]


def test_eos_stops_each_row_on_its_own(tiny):
    hf, model, params = tiny
    free = generate(model, params, PROMPTS, jax.random.key(0), SamplingParams(max_new_tokens=10, temperature=0.0))
    # As EOS, a token row 0 first emits at step s >= 2 (so row 0 stops mid-way).
    row = list(free.tokens[0])
    s = next(j for j in range(2, 10) if row[j] not in row[:j])
    eos = int(row[s])
    out = generate(
        model,
        params,
        PROMPTS,
        jax.random.key(0),
        SamplingParams(max_new_tokens=10, temperature=0.0, eos_ids=(eos,), pad_id=0),
    )
    for i, p in enumerate(PROMPTS):
        ref = _hf_greedy(hf, p, 10, eos=eos)
        n = out.lengths[i]
        np.testing.assert_array_equal(out.tokens[i, :n], ref[:n])
        stop = np.where(free.tokens[i] == eos)[0]
        assert n == (stop[0] + 1 if len(stop) else 10)
        assert (out.tokens[i, n:] == 0).all() and (out.logprobs[i, n:] == 0).all()
    assert out.lengths[0] == s + 1


@pytest.mark.parametrize(
    "sp",
    [
        SamplingParams(max_new_tokens=8, temperature=0.0),
        SamplingParams(max_new_tokens=8, temperature=0.7, top_p=0.9, top_k=20),
        SamplingParams(max_new_tokens=8, temperature=1.0),
    ],
)
def test_logprobs_equal_forward_pass(tiny, sp):
    _, model, params = tiny
    out = generate(model, params, PROMPTS, jax.random.key(3), sp)
    t = sp.temperature or 1.0
    for i, p in enumerate(PROMPTS):
        n = out.lengths[i]
        seq = np.array(p + list(out.tokens[i, :n]), np.int32)[None]
        logits = np.asarray(apply(model, params, seq)["logits"])[0] / t
        logp = jax.nn.log_softmax(logits, -1)
        ref = np.asarray(logp)[len(p) - 1 : -1][np.arange(n), seq[0, len(p) :]]
        np.testing.assert_allclose(out.logprobs[i, :n], ref, atol=1e-4)


def test_sampling_is_deterministic_per_key_and_varies_across_keys(tiny):
    _, model, params = tiny
    sp = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.95)
    a = generate(model, params, PROMPTS, jax.random.key(7), sp)
    b = generate(model, params, PROMPTS, jax.random.key(7), sp)
    c = generate(model, params, PROMPTS, jax.random.key(8), sp)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.tokens != c.tokens).any()


def test_row_output_does_not_depend_on_batch_neighbours(tiny):
    _, model, params = tiny
    sp = SamplingParams(max_new_tokens=6, temperature=0.0)
    together = generate(model, params, PROMPTS, jax.random.key(0), sp)
    alone = generate(model, params, PROMPTS[1:2], jax.random.key(0), sp)
    np.testing.assert_array_equal(together.tokens[1], alone.tokens[0])
    np.testing.assert_allclose(together.logprobs[1], alone.logprobs[0], atol=1e-5)


def test_top_k_one_is_greedy_and_filters_are_exact():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]], np.float32))
    kept = np.isfinite(np.asarray(filter_logits(logits, 0, 0.75))) & (
        np.asarray(filter_logits(logits, 0, 0.75)) > -1e30
    )
    # Nucleus 0.75: row 0 keeps {0.5, 0.3}; row 1 keeps {0.4, 0.3, 0.2}.
    np.testing.assert_array_equal(kept, [[1, 1, 0, 0], [0, 1, 1, 1]])
    k2 = np.asarray(filter_logits(logits, 2, 1.0)) > -1e30
    np.testing.assert_array_equal(k2, [[1, 1, 0, 0], [0, 0, 1, 1]])
    from rlaif_jax.sampling import sample_step

    sp = SamplingParams(max_new_tokens=1, temperature=1.0, top_k=1)
    for seed in range(5):
        tok, _ = sample_step(logits, jax.random.key(seed), sp)
        np.testing.assert_array_equal(np.asarray(tok), [0, 3])


def test_bad_sampling_input_is_rejected():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="empty"):
        left_pad([[1, 2], []], 0, 8)
    toks, pos, segs = left_pad([[5, 6, 7], [9]], 0, 4)
    np.testing.assert_array_equal(toks, [[0, 5, 6, 7], [0, 0, 0, 9]])
    np.testing.assert_array_equal(pos, [[0, 0, 1, 2], [0, 0, 0, 0]])
    np.testing.assert_array_equal(segs, [[0, 1, 1, 1], [0, 0, 0, 1]])
