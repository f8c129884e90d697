"""Small files in exactly the shapes and names of the paper's released data (the authors'
data repository), for tests and the tiny released-data arm
(configs/experiments/paper/released/tiny.gin) instead of a download:

- ShareGPT_V3_unfiltered_cleaned_split_no_imsorry.json: a JSON array of conversations
  ({"id", "conversations": [{"from": "human" | "gpt" | "system", "value"}]}).
- sharegpt1turn_df1.0_ff0_gpt4_completions.json: ONE JSON object, instruction -> list of
  completions (json.dump(..., indent=2), as the paper's ai_completions.py writes it).
- comparisons_gpt4/mistral7bsft_vs_chatgpt/annotations.json: a JSON array of alpaca_eval
  annotation records (indent 2; preference 1.0 / 2.0 / 1.5 / 0.0 / null, a NaN literal).

Besides the prompts given, they hold the cases the paper's loader and prepare_prompts treat
differently (a system turn first, two human turns, special tokens, a repeated prompt,
whitespace, an unknown instruction), so an import shows every count it reports.
"""

from __future__ import annotations

import json
import os

from rlaif_jax.data.released import ANNOTATIONS_FILE, GPT4_COMPLETIONS_FILE, SHAREGPT_FILE
from rlaif_jax.synthetic.arm_inputs import write_arm_inputs

LONG = " ".join(["word"] * 30)  # over a max_words=20 bound on prepare_prompts, not over the paper's 2000


def conv(i, *turns):
    return {"id": str(i), "conversations": [{"from": f, "value": v} for f, v in turns]}


def sharegpt_rows(prompts, replies):
    """Conversations for `prompts` (ChatGPT's replies `replies`), with the cases the paper's
    loader and prepare_prompts treat differently mixed in."""
    rows = [conv(i, ("human", p), ("gpt", r)) for i, (p, r) in enumerate(zip(prompts, replies))]
    rows[3:3] = [
        conv("dup", ("human", prompts[0]), ("gpt", "a second reply to a repeated prompt")),
        conv("tok", ("human", "hi </s> there"), ("gpt", "x")),
        conv("sys", ("system", "be nice"), ("human", "sys question"), ("gpt", "sys answer")),
    ]
    rows += [
        conv("two", ("human", "part one"), ("human", "part two"), ("gpt", "reply")),
        conv("asst", ("gpt", "I start"), ("human", "q")),
        conv("long", ("human", LONG), ("gpt", "long answer")),
    ]
    return rows


def gpt4_completions(prompts):
    """The GPT-4 file's object: every prompt but the 8th (the paper kept finish_reason "stop"
    only), one with an extra sample, and the instructions that match no prepared prompt."""
    out = {p: [f"GPT-4 on {p}"] for i, p in enumerate(prompts) if i != 7}
    out[prompts[2]].append("a second GPT-4 sample")
    out[" " + prompts[3] + " "] = ["whitespace"]
    out["sys question"] = ["GPT-4 sys"]
    out["part one\n\nAssistant: part two"] = ["GPT-4 merged"]
    out["a prompt from elsewhere"] = ["GPT-4 elsewhere"]
    out[LONG] = ["GPT-4 long"]
    return out


def annotation(instruction, out1, out2, preference, raw="Output (a)"):
    return {
        "instruction": instruction,
        "output_1": out1,
        "generator_1": "chatgpt",
        "dataset": "sharegpt",
        "output_2": out2,
        "generator_2": "mistral7bsft",
        "annotator": "gpt4_1",
        "preference": preference,
        "price_per_example": 0.013,
        "time_per_example": 1.2,
        "raw_completion": raw,
    }


def annotations(prompts):
    """alpaca_eval's records for the prompts: output_1 ChatGPT's reply (its reference),
    output_2 the SFT sample; every preference value the released files hold."""
    cycle = [1.0, 2.0, 1.5, None, 2.0, 1.0]
    rows = [
        annotation(p, f"chatgpt {i}", f"sft sample {i}", cycle[i % len(cycle)], "Output (b)" if i % 2 else "Output (a)")
        for i, p in enumerate(prompts)
    ]
    rows += [
        annotation(prompts[4], "same", "same", 0.0, None),  # alpaca_eval's identical outputs
        annotation(prompts[5], "chatgpt again", "sft again", 1.0),  # a repeated instruction
        annotation(prompts[6], "chatgpt 6", "sft says </s>", 1.0),  # the paper's loader skips it
        annotation(prompts[8], "c", "s", float("nan")),  # NaN as a JSON literal
        annotation("a prompt from elsewhere", "c", "s", 2.0, {"ordered_models": [{"model": "m", "rank": 1}]}),
    ]
    return rows


def write_released(root, prompts, replies) -> dict:
    """The three released files under root, by their released names; returns their paths."""
    paths = {
        "sharegpt": os.path.join(root, SHAREGPT_FILE),
        "gpt4": os.path.join(root, GPT4_COMPLETIONS_FILE),
        "annotations": os.path.join(root, ANNOTATIONS_FILE),
    }
    os.makedirs(os.path.dirname(paths["annotations"]), exist_ok=True)
    for key, value in (
        ("sharegpt", sharegpt_rows(prompts, replies)),
        ("gpt4", gpt4_completions(prompts)),
        ("annotations", annotations(prompts)),
    ):
        with open(paths[key], "w") as f:
            json.dump(value, f, indent=2)  # NaN stays a NaN literal, as Python's json writes it
    return paths


def write_released_inputs(root: str, num_prompts: int = 80, num_eval: int = 16, **model) -> dict:
    """The synthetic world's inputs (rlaif_jax.synthetic.arm_inputs: eval set, tiny base
    model) and released-shape files built from its prompts and weak-teacher replies under
    root/released; returns every path. `model`: write_arm_inputs' hidden_size, num_layers."""

    paths = write_arm_inputs(root, num_prompts=num_prompts, num_eval=num_eval, **model)
    with open(paths["prompts"]) as f:
        rows = json.load(f)
    released = write_released(
        os.path.join(root, "released"), [r["instruction"] for r in rows], [r["output"] for r in rows]
    )
    return {**paths, **released}
