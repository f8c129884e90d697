"""Sample completions from a local HF-format checkpoint with the compiled sampler.

  rlaif sample --hf_dir runs/tiny-llama --prompt "What is 2+3?" --temperature 0.7 --top_p 0.9
  rlaif sample --hf_dir /ckpt/Llama-2-7b-hf --prompts_file prompts.txt --mesh 1,-1,1 --dtype bfloat16

Prompts are wrapped in the paper's "Human: ...\\n\\nAssistant: " template unless
--template none (or --template model for the tokenizer's own chat template).
"""

from __future__ import annotations

import argparse
import json

from rlaif_jax import sharding as shd
from rlaif_jax.data.tokenize.encode import Encoder
from rlaif_jax.errors import existing_dir
from rlaif_jax.models import build_model
from rlaif_jax.models.hf_io import load_hf
from rlaif_jax.sampling import SamplingParams, generate


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf_dir", required=True, help="local HF model directory (safetensors + tokenizer)")
    ap.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    ap.add_argument("--prompts_file", help="one prompt per line")
    ap.add_argument("--template", choices=["paper", "model", "none"], default="paper")
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    ap.add_argument("--top_p", type=float, default=0.9)
    ap.add_argument("--top_k", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--mesh", default=None, help="data,fsdp,tensor sizes, e.g. 1,-1,1 (default: one device)")
    ap.add_argument("--jsonl", action="store_true", help="print one JSON object per completion")
    args = ap.parse_args(argv)

    import jax

    prompts = list(args.prompt)
    if args.prompts_file:
        with open(args.prompts_file) as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        ap.error("give at least one --prompt or a --prompts_file")

    from transformers import AutoTokenizer

    existing_dir("--hf_dir", args.hf_dir, "HF model directory", must_contain="config.json")
    tok = AutoTokenizer.from_pretrained(args.hf_dir, local_files_only=True)
    mesh = shd.make_mesh(*[int(x) for x in args.mesh.split(",")]) if args.mesh else None
    layout = shd.Layout(mesh, shd.logical_rules()) if mesh else None
    cfg, params = load_hf(args.hf_dir, layout=layout, dtype=args.dtype, param_dtype=args.dtype)

    if args.template == "none":
        ids = [
            [tok.bos_token_id] * (tok.bos_token_id is not None) + tok(p, add_special_tokens=False)["input_ids"]
            for p in prompts
        ]
    else:
        # The same prompt encoding the trainers and the feedback stages use (one BOS, template).
        enc = Encoder(
            tok,
            args.template,
            max_length=cfg.max_position_embeddings,
            max_prompt_length=cfg.max_position_embeddings - args.max_new_tokens,
        )
        ids = [list(map(int, x)) for x in enc.encode_prompts(prompts)]
    eos = tuple(cfg.eos_token_ids) or ((tok.eos_token_id,) if tok.eos_token_id is not None else ())
    sp = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        eos_ids=eos,
        pad_id=tok.pad_token_id or 0,
    )
    out = generate(build_model(cfg, layout=layout), params, ids, jax.random.key(args.seed), sp)
    for p, toks, n in zip(prompts, out.tokens, out.lengths):
        stopped = bool(n and toks[n - 1] in eos)
        text = tok.decode(toks[: n - 1 if stopped else n], skip_special_tokens=False)
        if args.jsonl:
            print(json.dumps({"prompt": p, "completion": text, "tokens": int(n), "stopped": stopped}))
        else:
            print(f"### {p}\n{text}\n[{n} tokens, {'EOS' if stopped else 'length limit'}]\n")
    return 0
