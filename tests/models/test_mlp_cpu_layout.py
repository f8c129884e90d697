"""The MLP's CPU form (tokens flattened to one dim, for XLA:CPU's backward) is bit-identical to
the 3-D form the other platforms run, forward and gradients, in float32."""

import jax
import jax.numpy as jnp
import numpy as np

from rlaif_jax.models import decoder
from rlaif_jax.models.config import DecoderConfig


def _value_and_grads(cfg, x, ct):
    mlp = decoder.MLP(cfg)
    params = mlp.init(jax.random.key(0), x)["params"]

    def loss(p, x):
        y = mlp.apply({"params": p}, x)
        return (y * ct).sum(), y

    (_, y), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return y, g


def test_flat_mlp_equals_3d_mlp(monkeypatch):
    cfg = DecoderConfig(vocab_size=64, hidden_size=64, intermediate_size=176, num_layers=1, num_heads=4, num_kv_heads=2)
    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.randn(3, 17, 64).astype(np.float32))
    ct = jnp.asarray(rs.randn(3, 17, 64).astype(np.float32))
    y_flat, g_flat = _value_and_grads(cfg, x, ct)
    monkeypatch.setattr(decoder, "platform", lambda layout=None: "tpu")  # the 3-D form
    y_3d, g_3d = _value_and_grads(cfg, x, ct)
    assert y_flat.shape == y_3d.shape == x.shape
    np.testing.assert_array_equal(np.asarray(y_flat), np.asarray(y_3d))
    for a, b in zip(jax.tree.leaves(g_flat), jax.tree.leaves(g_3d)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
