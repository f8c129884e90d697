"""The inputs a chained arm (rlaif_jax.pipeline) starts from, in the synthetic world: a prompt
source carrying the weak teacher's replies (as ShareGPT carries GPT-3.5's), an
AlpacaEval-format evaluation set with the reference model's outputs, and a tiny random base
model with its tokenizer. Serve the world's models with `scripts/serve_openai.py --synthetic`."""

from __future__ import annotations

import json
import os
import random

from rlaif_jax.data.tokenize.tokenizer import build_test_tokenizer
from rlaif_jax.models import DecoderConfig, build_model, init_params
from rlaif_jax.models.hf_io import save_hf
from rlaif_jax.synthetic.backend import synthetic_world
from rlaif_jax.synthetic.tasks import make_instructions, vocabulary


def write_arm_inputs(
    root: str, num_prompts: int = 200, num_eval: int = 40, hidden_size: int = 64, num_layers: int = 2, seed: int = 0
) -> dict:
    """Writes root/{prompts.json, eval.json, base/}; returns their paths. The replies come
    from the same Teacher models (and knobs) the synthetic server answers with."""
    import jax

    os.makedirs(root, exist_ok=True)
    world = synthetic_world()
    texts = make_instructions(num_prompts + num_eval, seed=seed)
    rng = random.Random(seed)
    paths = {
        "prompts": os.path.join(root, "prompts.json"),
        "eval_set": os.path.join(root, "eval.json"),
        "base_model": os.path.join(root, "base"),
    }
    for path, part, model in (
        (paths["prompts"], texts[:num_prompts], "weak-teacher"),
        (paths["eval_set"], texts[num_prompts:], "reference"),
    ):
        teacher = world.models[model]
        rows = [{"instruction": t, "output": teacher.answer(t, rng), "generator": model} for t in part]
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)
    tok = build_test_tokenizer(
        paths["base_model"], texts=texts + [" ".join(vocabulary()), "Human: Assistant:"], vocab_size=1000
    )
    cfg = DecoderConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=int(hidden_size * 8 / 3) // 8 * 8,
        num_layers=num_layers,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    save_hf(paths["base_model"], cfg, init_params(build_model(cfg), jax.random.key(seed)), tokenizer=tok)
    return paths
