#!/usr/bin/env python
"""Write a tiny random-weight Llama-family (or Mixtral MoE) checkpoint in HF format (safetensors + config +
a locally trained byte-level BPE tokenizer), for smoke runs and tests with no hub access.

  python tools/make_tiny_checkpoint.py runs/tiny-llama --family mistral
"""

from __future__ import annotations

import argparse

FAMILY_OVERRIDES = {
    "llama": dict(model_type="llama"),
    "mistral": dict(model_type="mistral", sliding_window=64),
    "mixtral": dict(model_type="mixtral", num_experts=4, num_experts_per_tok=2),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--family", choices=sorted(FAMILY_OVERRIDES), default="llama")
    ap.add_argument("--hidden_size", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv_heads", type=int, default=2)
    ap.add_argument("--vocab_size", type=int, default=512, help="tokenizer vocabulary (BPE merges)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import jax

    from rlaif_jax.data.tokenize.tokenizer import build_test_tokenizer
    from rlaif_jax.models import DecoderConfig, build_model, init_params
    from rlaif_jax.models.hf_io import save_hf

    tok = build_test_tokenizer(args.out_dir, kind="bpe", vocab_size=args.vocab_size)
    cfg = DecoderConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden_size,
        intermediate_size=int(args.hidden_size * 8 / 3) // 8 * 8,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **FAMILY_OVERRIDES[args.family],
    )
    params = init_params(build_model(cfg), jax.random.key(args.seed))
    save_hf(args.out_dir, cfg, params, tokenizer=tok)
    print(f"wrote a {cfg.num_params() / 1e6:.2f}M-param {args.family} checkpoint to {args.out_dir}")


if __name__ == "__main__":
    main()
