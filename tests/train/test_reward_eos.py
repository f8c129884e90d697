"""Regression: a reward model reads its score at each sequence's EOS, and SFT never trains
EOS as an input (its own target is masked), so on a model trained only by SFT the score
position starts content-blind: in the miniature the reward model stayed at chance
(accuracy 0.41-0.56 after 2 epochs) and PPO optimised noise. Pretraining on a document
stream (rlaif_jax.data.pipeline.as_document_stream) trains EOS as an input."""

import jax
import jax.numpy as jnp
import numpy as np

from rlaif_jax.data.pipeline import as_document_stream, pack_batch
from rlaif_jax.data.tokenize.encode import Encoded
from rlaif_jax.models import build_model, init_params
from rlaif_jax.train import SFT

from .fixtures import tiny_config

EOS = 2


def _eos_embedding_grad(batch: dict) -> float:
    cfg = tiny_config(vocab_size=32)
    model = build_model(cfg)
    params = init_params(model, jax.random.key(0))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}

    def loss(p):
        total, weight, _ = SFT().loss(model, p, batch, None, jax.random.key(1))
        return total / weight

    grads = jax.grad(loss)(params)
    return float(jnp.abs(grads["embed"]["embedding"][EOS]).sum())


def test_sft_never_trains_eos_as_an_input_and_the_document_stream_does():
    rng = np.random.default_rng(0)
    exs = [
        Encoded(np.r_[1, rng.integers(5, 30, 4)].astype(np.int32), np.r_[rng.integers(5, 30, 2), EOS].astype(np.int32))
        for _ in range(8)
    ]
    packed, left = pack_batch(exs, batch_size=2, seq_len=32)
    assert not left
    assert _eos_embedding_grad(packed) == 0.0
    assert _eos_embedding_grad(as_document_stream(packed)) > 0.0
