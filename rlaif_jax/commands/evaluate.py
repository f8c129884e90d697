"""Evaluate a checkpoint AlpacaEval-style: generate on an eval set, judge against reference
outputs (API judge or reward model), write generations, judgments, metrics and cost.

  OPENAI_API_KEY=... rlaif evaluate --checkpoint runs/dpo/hf \\
      --eval_set data/alpaca_eval.json --out_dir runs/eval/dpo_gpt4 \\
      --gin_file=configs/eval/alpaca_eval_gpt4.gin \\
      --label base_model=llama1_7b --label arm=sft_gpt35_10pct+dpo --label sft_fraction=0.1

The protocol (judge model, template, sampling, logprob weighting, reward model) is the gin
file; --gin_param overrides any binding: the judge is EvalJudgeSettings (template,
both_orders, seed, logprobs, temperature, max_tokens, batch_api, ...), the policy's sampling
EvalSamplingSettings (template, max_length, max_prompt_length, temperature, top_p, top_k,
seed, batch_size), e.g. --gin_param=EvalJudgeSettings.both_orders=True. --policy_outputs
judges an AlpacaEval-format file of outputs made elsewhere instead of generating.
"""

from __future__ import annotations

import sys

from rlaif_jax.cli import gin_arg_parser, parse_gin
from rlaif_jax.eval.evaluate import evaluate


def _label_value(v: str):
    try:
        return float(v) if any(c in v for c in ".e") else int(v)
    except ValueError:
        return v


def main(argv=None):

    ap = gin_arg_parser(__doc__)
    ap.add_argument("--checkpoint", help="HF-format policy directory")
    ap.add_argument("--policy_outputs", help="AlpacaEval-format outputs to judge instead of generating")
    ap.add_argument("--eval_set", help="AlpacaEval JSON (instruction, output = reference) or any prompt file")
    ap.add_argument("--references", help="AlpacaEval-format reference outputs (when the eval set has none)")
    ap.add_argument("--out_dir")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--label", action="append", default=[], help="KEY=VALUE copied into metrics.json (repeatable)")
    args = ap.parse_args(argv)
    parse_gin(args, extra_modules=("rlaif_jax.eval.evaluate",))

    kw = {
        k: getattr(args, k)
        for k in ("checkpoint", "policy_outputs", "eval_set", "references", "out_dir", "limit")
        if getattr(args, k) is not None
    }
    if args.label:
        labels = {}
        for item in args.label:
            k, sep, v = item.partition("=")
            if not sep:
                raise SystemExit(f"--label {item!r}: expected KEY=VALUE")
            labels[k] = _label_value(v)
        kw["labels"] = labels
    m = evaluate(**kw)
    keys = (
        "win_rate",
        "standard_error",
        "lc_win_rate",
        "continuous_win_rate",
        "mean_reward",
        "n_wins",
        "n_losses",
        "n_ties",
        "n_invalid",
        "cost_usd",
    )
    print(" ".join(f"{k}={m[k]:.4g}" if isinstance(m.get(k), float) else f"{k}={m.get(k)}" for k in keys if k in m))
    return 0


if __name__ == "__main__":
    from rlaif_jax.cli import run

    sys.exit(run(main))
