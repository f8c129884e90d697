"""One evaluation run: generate the policy's outputs on an eval set with the compiled sampler,
judge each against the reference output (API judge through the feedback client, or a reward
model), and write generations, judgments, metrics and cost to out_dir.

The judging is the feedback package's: its judge templates, verdict parsing, per-instruction
order randomization (a hash of the prompt id and the seed) and un-swapping, client cache,
retries, Batch API and cost accounting. The policy is always response_1 and the reference
response_2, so a verdict "first" is a policy win. A rerun resumes: generation continues at
the next unfinished batch and every judge call already made comes from the cache.

out_dir/
  prompts.jsonl          the eval set's prompts (prompt_id, prompt)
  generations/           the policy's samples (DEMONSTRATIONS records + samples.jsonl)
  generations.json       AlpacaEval-format outputs (instruction, output, generator)
  judgments.jsonl        per instruction: verdict, raw judge text, swapped, p_1, views, error
  metrics.json           win rate +- SE, W/L/T/invalid counts, LC win rate (lc_method says
                         whose: "glm", ours, with lc_bootstrap_standard_error; "alpaca_eval",
                         alpaca_eval's, with its lc_prediction_standard_error), labels, cost_usd
                         (this invocation) and cost_usd_total (every invocation in out_dir)
  api_ledger.jsonl       one line of API accounting per invocation
  operative_config.gin
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from typing import Any, Mapping, Optional, Sequence

import gin
import numpy as np

from rlaif_jax import fileio
from rlaif_jax.data.prompts.readers import read_prompt_source
from rlaif_jax.data.prompts.types import InputError
from rlaif_jax.errors import ConfigError, UserError
from rlaif_jax.eval.alpaca_eval_lc import SOLVERS, AlpacaEvalDataError, alpaca_eval_lc_win_rate, difficulties
from rlaif_jax.eval.length_control import length_controlled_win_rate
from rlaif_jax.eval.reward_score import RewardScorer, reward_protocol_metrics
from rlaif_jax.eval.settings import EvalJudgeSettings, EvalSamplingSettings
from rlaif_jax.feedback import judge as J
from rlaif_jax.feedback.settings import JudgeSettings, SamplingSettings
from rlaif_jax.feedback.stages import (
    judge_asked,
    judge_pairs,
    judged_before,
    load_demonstrations,
    policy_samples_stage,
    task_key,
    write_judged,
)
from rlaif_jax.fileio import save_operative_config, write_json, write_jsonl
from rlaif_jax.winrate import continuous_preferences, preferences_from_verdicts, win_rate

log = logging.getLogger(__name__)
PROTOCOLS = ("judge", "reward_model")
LC_METHODS = ("glm", "alpaca_eval")


class EvalInputError(UserError):
    """A malformed eval set or reference file; the message names the file and record."""


def load_eval_set(path: str, references: Optional[str] = None, reference_generator: Optional[str] = None) -> list[dict]:
    """[{prompt_id, prompt, reference, reference_generator}] from an AlpacaEval JSON (its
    `output` is the reference) or any prompt file the data readers accept; `references`
    (an AlpacaEval-format file) supplies or replaces the reference outputs, joined on the
    instruction text. Every instruction must end with a reference output."""

    try:
        prompts, _, _ = read_prompt_source(path)
    except InputError as e:
        raise EvalInputError(str(e)) from None
    if not prompts:
        raise EvalInputError(f"{path}: no prompts")
    refs: dict[str, tuple] = {}
    if references:
        try:
            ref_rows, _, _ = read_prompt_source(references, format="alpaca")
        except InputError as e:
            raise EvalInputError(str(e)) from None
        for r in ref_rows:
            if r.completion is None:
                raise EvalInputError(f"{references}: record {r.index} has no 'output'")
            refs.setdefault(r.prompt_id, (r.completion, r.completion_model))
    rows, seen = [], set()
    for p in prompts:
        if p.prompt_id in seen:  # the same instruction twice would be judged (and counted) twice
            log.warning("%s: record %d repeats an earlier instruction; skipped", path, p.index)
            continue
        seen.add(p.prompt_id)
        ref, gen = refs.get(p.prompt_id, (p.completion, p.completion_model))
        if ref is None:
            where = f"{references} has no output for it" if references else "and no --references file was given"
            raise EvalInputError(f"{path}: record {p.index} ({p.prompt[:60]!r}) has no reference output, {where}")
        rows.append(
            {
                "prompt_id": p.prompt_id,
                "prompt": p.prompt,
                "reference": ref,
                "reference_generator": reference_generator or gen or "reference",
            }
        )
    return rows


def _add_to_ledger(out_dir: str, api: Mapping[str, Any]) -> float:
    """Appends this invocation's API spend to out_dir/api_ledger.jsonl and returns the run's
    total: a resumed run's own summary counts cache hits as free, so without the ledger the
    money spent before the interruption would vanish from metrics.json."""
    path = fileio.join(out_dir, "api_ledger.jsonl")
    entry = {
        k: api.get(k)
        for k in (
            "requests",
            "cached",
            "ok",
            "errors",
            "prompt_tokens",
            "completion_tokens",
            "cost_usd",
            "unpriced_requests",
        )
    }
    # Rewritten whole, not appended: object stores cannot append.
    entries = fileio.read_jsonl(path) if fileio.exists(path) else []
    entries.append(entry)
    write_jsonl(path, entries)
    return round(sum(e["cost_usd"] or 0.0 for e in entries), 6)


def _write_json(path: str, obj: Any) -> None:
    write_json(path, obj, default=_nan_safe)


def _write_jsonl(path: str, rows) -> None:
    write_jsonl(path, (_clean(r) for r in rows), default=_nan_safe)


def _nan_safe(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return str(x)


def _clean(obj):
    """NaN -> None so metrics.json is strict JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _check_fingerprint(gen_dir: str, spec: dict) -> None:
    """The policy-samples stage resumes by batch index, so samples left in gen_dir by a run
    with other prompts or sampling settings would be reused as if they were this run's."""
    fileio.makedirs(gen_dir)
    path = fileio.join(gen_dir, "eval_spec.json")
    spec = json.loads(json.dumps(spec, default=list))
    if fileio.exists(path):
        old = fileio.read_json(path)
        if old != spec:
            diff = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
            raise ValueError(
                f"{gen_dir} holds generations made with different {diff}; use a new out_dir "
                "(or delete that directory to regenerate)"
            )
        return
    _write_json(path, spec)


def generate_outputs(
    checkpoint: str,
    rows: Sequence[Mapping],
    out_dir: str,
    generator: str,
    sampling: SamplingSettings,
    dtype: str = "float32",
    mesh_shape: Optional[Sequence[int]] = None,
) -> list[str]:
    """The policy's output for each row (resumable: the feedback package's policy-samples
    stage over the compiled sampler).

    Args:
      checkpoint: the policy's HF directory.
      rows: the eval set (prompt_id, prompt).
      out_dir: the run directory; prompts.jsonl and generations/ go there.
      generator: the policy's name in the records.
      sampling, dtype, mesh_shape: how the policy is loaded and sampled.

    Returns:
      The outputs, in the order of rows.
    """

    prompts_path = fileio.join(out_dir, "prompts.jsonl")
    write_jsonl(prompts_path, ({"prompt_id": r["prompt_id"], "prompt": r["prompt"]} for r in rows))
    gen_dir = fileio.join(out_dir, "generations")
    _check_fingerprint(
        gen_dir,
        {
            "checkpoint": fileio.abspath(checkpoint),
            "generator": generator,
            "prompt_ids": [r["prompt_id"] for r in rows],
            **sampling.provenance(),
            "dtype": dtype,
            "mesh_shape": mesh_shape,
        },
    )
    # split=None explicitly: the eval prompts belong to no split, whatever a config binds
    # for the feedback stage's own use of policy_samples_stage.
    policy_samples_stage(
        hf_dir=checkpoint,
        prompts=prompts_path,
        out_dir=gen_dir,
        sampling=sampling,
        source_model=generator,
        split=None,
        limit=None,
        dtype=dtype,
        mesh_shape=mesh_shape,
    )
    by_id = {d["prompt_id"]: d["completion"] for d in load_demonstrations(gen_dir)}
    missing = [r["prompt_id"] for r in rows if r["prompt_id"] not in by_id]
    if missing:
        raise RuntimeError(f"{gen_dir}: no generation for {len(missing)} prompts (first {missing[0]})")
    return [by_id[r["prompt_id"]] for r in rows]


def load_outputs(path: str, rows: Sequence[Mapping]) -> list[str]:
    """Policy outputs from an AlpacaEval-format file (instruction, output), for judging
    outputs generated elsewhere."""

    got, _, _ = read_prompt_source(path, format="alpaca")
    by_id = {}
    for p in got:
        if p.completion is None:
            raise EvalInputError(f"{path}: record {p.index} has no 'output'")
        by_id.setdefault(p.prompt_id, p.completion)
    missing = [r for r in rows if r["prompt_id"] not in by_id]
    if missing:
        raise EvalInputError(f"{path}: no output for {len(missing)} instructions, e.g. {missing[0]['prompt'][:60]!r}")
    return [by_id[r["prompt_id"]] for r in rows]


def judge_metrics(
    comparisons: Sequence[Mapping],
    outputs: Sequence[str],
    references: Sequence[str],
    lc_bootstrap: int = 200,
    seed: int = 0,
    lc_method: str = "glm",
    alpaca_eval_lc: Optional[Mapping[str, Any]] = None,
) -> dict:
    """Win rate +- SE, counts, length-controlled win rate, and the logprob-weighted
    (continuous) win rate where every valid judgment carries one. lc_method "glm" is ours
    (rlaif_jax.eval.length_control, bootstrap SE), "alpaca_eval" alpaca_eval's computation
    (rlaif_jax.eval.alpaca_eval_lc; `alpaca_eval_lc` holds its glm / df_gamed /
    difficulty_file / solver arguments)."""
    if lc_method not in LC_METHODS:
        raise ValueError(f"lc_method must be one of {LC_METHODS}, got {lc_method!r}")
    prefs = preferences_from_verdicts([c["verdict"] for c in comparisons], policy_is="first")
    wr = win_rate(prefs)
    m = wr.as_dict()
    lens = [len(o) for o in outputs], [len(r) for r in references]
    if lc_method == "glm":
        lc = length_controlled_win_rate(prefs, *lens, n_bootstrap=lc_bootstrap, seed=seed)
        m.update(
            lc_method="glm",
            lc_win_rate=lc["lc_win_rate"],
            lc_bootstrap_standard_error=lc["lc_bootstrap_standard_error"],
            lc_coef=lc["coef"],
        )
    else:
        lc = alpaca_eval_lc_win_rate(prefs, *lens, **dict(alpaca_eval_lc or {}))
        m.update(
            lc_method="alpaca_eval",
            lc_win_rate=lc["lc_win_rate"],
            lc_prediction_standard_error=lc["lc_prediction_standard_error"],
            lc_coef=lc["coef"],
            lc_alpaca_eval={"glm": lc["glm"], "C": lc["C"], "solver": lc["solver"]},
        )
    cont = continuous_preferences(comparisons, policy_is="first")
    if cont is not None:
        cw = win_rate(cont)
        m.update(continuous_win_rate=cw.win_rate, continuous_standard_error=cw.standard_error)
    m["n_identical"] = sum(bool(c.get("identical")) for c in comparisons)
    m["n_api_errors"] = sum(bool(c.get("error")) for c in comparisons)
    return m


def check_alpaca_eval_lc(
    glm: str, n: int, df_gamed: Optional[str], difficulty_file: Optional[str], solver: str
) -> None:
    """lc_method='alpaca_eval''s inputs, checked before anything is sampled or judged: the
    GLM's data file exists, parses and covers the n instructions, and the solver can run."""
    if solver not in SOLVERS:
        raise ConfigError(f"evaluate.lc_solver = {solver!r}: must be one of {sorted(SOLVERS)}")
    if solver == "liblinear":
        if importlib.util.find_spec("sklearn") is None:  # the optional alpaca-eval extra
            raise ConfigError(
                "evaluate.lc_solver = 'liblinear' needs scikit-learn: pip install -e \".[alpaca-eval]\", or bind "
                "evaluate.lc_solver = 'newton'"
            )
    try:
        difficulties(glm, n, df_gamed, difficulty_file)
    except AlpacaEvalDataError as e:
        raise ConfigError(f"evaluate.lc_df_gamed / lc_difficulty_file: {e}") from None
    except ValueError as e:
        raise ConfigError(
            f"evaluate.lc_method = 'alpaca_eval' with evaluate.lc_glm = {glm!r}: {e}. Bind evaluate.lc_df_gamed "
            "(or evaluate.lc_difficulty_file for 'length_controlled_noreg'), or evaluate.lc_glm = "
            "'length_controlled_minimal', which needs no file"
        ) from None


@gin.configurable
def evaluate(
    out_dir: str = gin.REQUIRED,
    eval_set: str = gin.REQUIRED,
    checkpoint: Optional[str] = None,
    policy_outputs: Optional[str] = None,
    references: Optional[str] = None,
    protocol: str = "judge",
    generator: Optional[str] = None,
    reference_generator: Optional[str] = None,
    limit: Optional[int] = None,
    sampling: Optional[SamplingSettings] = None,
    dtype: str = "float32",
    mesh_shape: Optional[Sequence[int]] = None,
    client: Any = None,
    judge: Optional[JudgeSettings] = None,
    # reward-model protocol
    reward_model: Optional[str] = None,
    reward_batch_size: int = 16,
    # metrics
    length_control: bool = True,
    lc_bootstrap: int = 200,
    # "glm" (ours) or "alpaca_eval" (its exact computation; see rlaif_jax.eval.alpaca_eval_lc)
    lc_method: str = "glm",
    lc_glm: str = "length_controlled_v1",
    lc_df_gamed: Optional[str] = None,
    lc_difficulty_file: Optional[str] = None,
    lc_solver: str = "newton",
    labels: Optional[Mapping[str, Any]] = None,
) -> dict:
    """Runs one evaluation and returns its metrics (also written to out_dir/metrics.json).
    `labels` (run, base_model, arm, sft_fraction, ...) are copied into the metrics for
    reports. Give `checkpoint` (an HF directory) to generate, or `policy_outputs` to judge
    outputs made elsewhere.

    Args:
      sampling: how the policy's outputs are sampled (its template and lengths also set
        the reward model's input); None builds EvalSamplingSettings from gin in the
        caller's scope (AlpacaEval 1.0 in the paper: T=0.7, top_p 0.9).
      dtype, mesh_shape: how the policy (and reward model) is loaded.
      client: the judge's API client (protocol "judge").
      judge: how the judge is asked (always pairwise, the policy as response_1); None
        builds EvalJudgeSettings from gin in the caller's scope.

    Returns:
      The metrics.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if lc_method not in LC_METHODS:
        raise ValueError(f"evaluate.lc_method must be one of {LC_METHODS}, got {lc_method!r}")
    if (checkpoint is None) == (policy_outputs is None):
        raise ConfigError(
            "give exactly one of evaluate.checkpoint (to generate) and evaluate.policy_outputs (to "
            "judge existing outputs)"
        )
    if protocol == "judge" and client is None:
        raise ValueError("protocol 'judge' needs a client (bind evaluate.client = @FeedbackClient())")
    if protocol == "reward_model" and not reward_model:
        raise ValueError("protocol 'reward_model' needs reward_model (an HF reward model directory)")
    sampling = sampling if sampling is not None else EvalSamplingSettings()
    judge = judge if judge is not None else EvalJudgeSettings()
    if protocol == "judge" and judge.mode != "pairwise":
        raise ConfigError(
            f"{type(judge).__name__}.mode = {judge.mode!r}: the evaluation judges the policy's output "
            "against the reference pairwise; set it to 'pairwise'"
        )
    fileio.makedirs(out_dir)
    rows = load_eval_set(eval_set, references, reference_generator)[:limit]
    if protocol == "judge" and length_control and lc_method == "alpaca_eval":
        # before any sampling or judge request: a missing df_gamed.csv found after the judge
        # calls would leave metrics.json unwritten for a run already paid for
        check_alpaca_eval_lc(lc_glm, len(rows), lc_df_gamed, lc_difficulty_file, lc_solver)
    name = generator or os.path.basename(os.path.normpath(checkpoint or policy_outputs))
    if checkpoint is not None:
        outputs = generate_outputs(checkpoint, rows, out_dir, name, sampling, dtype, mesh_shape)
    else:
        outputs = load_outputs(policy_outputs, rows)
    _write_json(
        fileio.join(out_dir, "generations.json"),
        [{"instruction": r["prompt"], "output": o, "generator": name} for r, o in zip(rows, outputs)],
    )
    refs = [r["reference"] for r in rows]
    metrics: dict = {
        "protocol": protocol,
        "generator": name,
        "eval_set": fileio.abspath(eval_set),
        "checkpoint": fileio.abspath(checkpoint) if checkpoint else None,
        # the fields metrics.json has always carried (reports read them)
        "sampling": {
            k: getattr(sampling, k)
            for k in ("temperature", "top_p", "top_k", "template", "max_length", "max_prompt_length", "seed")
        }
        if checkpoint
        else None,
        "avg_length": float(np.mean([len(o) for o in outputs])) if outputs else None,
        "avg_reference_length": float(np.mean([len(r) for r in refs])) if refs else None,
    }
    if protocol == "judge":
        tmpl = J.load_template(judge.template)
        tasks = [
            J.PairTask(r["prompt_id"], r["prompt"], o, r["reference"], name, r["reference_generator"])
            for r, o in zip(rows, outputs)
        ]
        asked = {"model": client.model, **judge_asked(judge, tmpl)}
        kept = judged_before(out_dir, "judgments.jsonl", asked)
        comps = judge_pairs(client, tasks, judge, tmpl, kept=kept)
        write_judged(out_dir, "judgments.jsonl", comps, asked)
        jm = judge_metrics(
            comps,
            outputs,
            refs,
            lc_bootstrap if length_control else 0,
            judge.seed,
            lc_method=lc_method if length_control else "glm",
            alpaca_eval_lc={
                "glm": lc_glm,
                "df_gamed": lc_df_gamed,
                "difficulty_file": lc_difficulty_file,
                "solver": lc_solver,
            },
        )
        if not length_control:
            jm.update(lc_method=None, lc_win_rate=None, lc_bootstrap_standard_error=None, lc_coef=None)
        api = client.summary.as_dict()
        metrics.update(
            jm,
            judge=judge.name or client.model,
            judge_template=tmpl.id,
            order_seed=judge.seed,
            both_orders=judge.both_orders,
            logprobs=judge.logprobs,
            kept_from_out_dir=sum(task_key(x) in kept for x in tasks),  # judgments not asked again
            api=api,
            cost_usd=api["cost_usd"],
            cost_usd_total=_add_to_ledger(out_dir, api),
            client=client.describe(),
        )
    else:
        scorer = RewardScorer(
            reward_model,
            template=sampling.template,
            max_length=sampling.max_length,
            max_prompt_length=sampling.max_prompt_length,
            batch_size=reward_batch_size,
            dtype=dtype,
        )
        prompts = [r["prompt"] for r in rows]
        r_pol, r_ref = scorer.score(prompts, outputs), scorer.score(prompts, refs)
        _write_jsonl(
            fileio.join(out_dir, "judgments.jsonl"),
            [
                {"prompt_id": r["prompt_id"], "reward_policy": float(a), "reward_reference": float(b)}
                for r, a, b in zip(rows, r_pol, r_ref)
            ],
        )
        metrics.update(
            reward_protocol_metrics(r_pol, r_ref), judge=f"reward_model:{fileio.abspath(reward_model)}", cost_usd=0.0
        )
    metrics["labels"] = dict(labels or {})
    metrics = _clean(metrics)
    _write_json(fileio.join(out_dir, "metrics.json"), metrics)
    save_operative_config(out_dir)
    log.info(
        "%s: win rate %s +- %s (LC %s) -> %s",
        name,
        metrics.get("win_rate"),
        metrics.get("standard_error"),
        metrics.get("lc_win_rate"),
        out_dir,
    )
    return metrics
