"""`plan` against a finished miniature run: every stage of the run predicted on its CPU with
plan's own stage helpers (`plan.train_stage`, `sample_stage`, `ppo_stage`: the ones
`plan.plan_arm` prices an arm with), the run's settings (MiniatureSettings as its operative
config bound them, `campaign.bindings` per arm) and the counts its data manifests hold, from a
calibration of one measured number per program kind (`plan.CpuCalibration`); printed beside the
measured stage seconds (arms/<arm>/status.json).

  python -m rlaif_jax.miniature.plan_check runs/miniature
"""

from __future__ import annotations

import ast
import dataclasses
import glob
import json
import os
import sys
from typing import Optional

from rlaif_jax.miniature.campaign import SFT_DATA, MiniatureSettings, bindings, stages_of, start_of
from rlaif_jax.miniature.world import MAX_PROMPT_TOKENS, PRETRAIN_SEQ_LEN
from rlaif_jax.models.config import DecoderConfig
from rlaif_jax.plan import (
    CPU_2CORE,
    CpuCalibration,
    Efficiency,
    Slice,
    StagePlan,
    ppo_stage,
    sample_stage,
    train_stage,
    training_flops,
)


def _read_json(*parts):
    with open(os.path.join(*parts)) as f:
        return json.load(f)


def _metrics(path: str) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _miniature_settings(run_dir: str):
    """MiniatureSettings as the run bound them (run_miniature.* in an arm's operative config)."""
    fields = {f.name for f in dataclasses.fields(MiniatureSettings)} - {"out_dir", "shared_dir", "iterative"}
    kw = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "runs", "*", "operative_config.gin")))[:1]:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(" = ")
                if key.startswith("run_miniature.") and key[14:] in fields:
                    try:
                        kw[key[14:]] = ast.literal_eval(value.strip())
                    except (ValueError, SyntaxError):
                        pass
    return MiniatureSettings(**kw)


def _samples(run_dir: str, start: str, i: int) -> int:
    return _read_json(run_dir, "data", "feedback", start, "samples", str(i), "manifest.json")["num_records"]


def _requests(*report) -> int:
    """Requests a critic / judge stage sent: its comparisons less the identical pairs (decided
    without asking)."""
    return int(_read_json(*report, "report.json")["pairs"])


def miniature_calibration(run_dir: str, samples_arm: str = "dpo_strong_10", critic_arm: str = "ppo_weak_10"):
    """CpuCalibration from a finished default miniature run (see CpuCalibration): the base's
    pretraining for the train step and the compile time, `samples_arm`'s samples stage for the
    sampler, `critic_arm`'s critic stage for the seconds per request."""
    s = _miniature_settings(run_dir)
    cfg = _miniature_model(run_dir)
    logs = _metrics(os.path.join(run_dir, "runs", "base", "metrics.jsonl"))
    steady = sorted(m["step_time"] for m in logs[1:])[len(logs[1:]) // 2]
    flops = training_flops(cfg, s.batch_size, PRETRAIN_SEQ_LEN, "sft")
    mfu = flops / steady / (CPU_2CORE.peak_tflops * 1e12)
    first_steps = logs[0]["step"]
    compile_s = max(0.0, (logs[0]["step_time"] - steady) * first_steps)
    sl = Slice("cpu-1", CPU_2CORE, 1, 1)
    # The sampler: the samples stage's seconds (the arm's second samples stage: no compile) as
    # its decode steps streaming the weights, hbm_bytes / (bandwidth x efficiency) = seconds
    # (the roofline's memory term; its compute term is below it at this size).
    measured = _read_json(run_dir, "arms", samples_arm, "status.json")["stages"]["samples"]["seconds"]
    p = next(r for r in _plan_rows(run_dir, s, cfg, sl, Efficiency(mfu), 0.0, 0.0, samples_arm) if r.stage == "samples")
    hbm_eff = p.hbm_bytes / (CPU_2CORE.hbm_gbps * 1e9 * measured)
    crit = _read_json(run_dir, "arms", critic_arm, "status.json")["stages"]["critic"]["seconds"]
    n = _critic_requests(run_dir, s, critic_arm)
    return CpuCalibration(mfu, min(hbm_eff, 1.0), crit / max(n, 1), compile_s)


def _miniature_model(run_dir: str):
    return DecoderConfig.from_hf(_read_json(run_dir, "runs", "base", "hf", "config.json"))


def _stage_owners(s) -> dict:
    """(arm, stage) -> the sample indices / comparison dirs it made first, in the run's order
    (later arms reuse what an earlier one made)."""
    made, owners = set(), {}
    for arm in s.run_order():
        start, _ = start_of(arm)
        st = stages_of(arm)
        if "samples" not in st:
            continue
        k = s.rm_samples if "reward_model" in st else s.feedback_samples
        idx = [i for i in range(k) if (start, "s", i) not in made]
        dirs = [f"teacher-{i}" for i in range(s.feedback_samples)]
        if "reward_model" in st and s.rm_sample_pairs:
            dirs += [f"samples-{i}-{j}" for i in range(k) for j in range(i + 1, k)]
        dirs = [d for d in dirs if (start, "c", d) not in made]
        made |= {(start, "s", i) for i in idx} | {(start, "c", d) for d in dirs}
        owners[arm] = (start, idx, dirs)
    return owners


def _critic_requests(run_dir: str, s, arm: str) -> int:
    start, _, dirs = _stage_owners(s)[arm]
    return sum(_requests(run_dir, "data", "feedback", start, "comparisons", d) for d in dirs)


def _plan_rows(run_dir: str, s, cfg, sl: Slice, eff: Efficiency, request_s: float, compile_s: float, arm: str):
    """plan's StagePlans for one arm of the miniature run (its settings, the counts its data
    manifests hold), with the stage helpers plan_arm uses; API stages priced in seconds per
    request, the first stage of each distinct program given one compile time."""
    b = {k: v for k, (v, _) in bindings(s, None, arm).items()}
    start, _ = start_of(arm)
    out = []

    def api(stage, requests, note):
        out.append(StagePlan(stage, seconds=requests * request_s, api_requests=requests, note=note))

    for stage in stages_of(arm):
        if stage == "sft":
            if arm != start:
                out.append(StagePlan("sft", note="reused"))
                continue
            teacher, splits, _ = SFT_DATA[arm]
            n = sum(
                _read_json(run_dir, "data", "teachers", teacher, "demonstrations", sp, "manifest.json")["num_records"]
                for sp in splits
            )
            epochs, seq = b["sft/sft_pipeline.num_epochs"], b["sft/sft_pipeline.seq_len"]
            rows = n * epochs // s.batch_size * s.batch_size  # whole batches
            out.append(train_stage("sft", cfg, rows, seq, "sft", sl, eff, 0.0, f"{n} x {epochs} epochs"))
        elif stage == "samples":
            _, idx, _ = _stage_owners(s)[arm]
            n = sum(_samples(run_dir, start, i) for i in idx)
            batch = 32  # SamplingSettings.batch_size (the miniature leaves it)
            new = 64 - MAX_PROMPT_TOKENS  # max_length 64
            note = f"{len(idx)} samples of {n // max(len(idx), 1)} prompts"
            out.append(sample_stage("samples", cfg, n, MAX_PROMPT_TOKENS, new, batch, sl, eff, 0.0, note))
        elif stage == "critic":
            api("critic", _critic_requests(run_dir, s, arm), "synthetic critic, identical pairs not asked")
        elif stage == "preferences":
            out.append(StagePlan("preferences", note="negligible (records only)"))
        elif stage in ("dpo", "reward_model"):
            name = "preferences" if stage == "dpo" else "preferences_rm"
            pairs = _read_json(run_dir, "data", "feedback", start, name, "manifest.json")["num_records"]
            epochs = b[f"{stage}/preference_pipeline.num_epochs"]
            seq = b[f"{stage}/preference_pipeline.seq_len"]
            rows = 2 * (pairs * epochs // s.batch_size * s.batch_size)
            out.append(train_stage(stage, cfg, rows, seq, stage, sl, eff, 0.0, f"{pairs} pairs x {epochs} epochs"))
        elif stage == "ppo":
            out.append(ppo_stage(cfg, b["ppo/train_ppo.config"], b["ppo/train_ppo.num_iterations"], sl, eff, 0.0))
        elif stage == "evaluate":
            ev = os.path.join(run_dir, "eval", arm)
            n = _read_json(ev, "generations", "manifest.json")["num_records"]
            p = sample_stage("evaluate", cfg, n, MAX_PROMPT_TOKENS, 64 - MAX_PROMPT_TOKENS, 32, sl, eff, 0.0)
            judge = _requests(ev, "judgments")
            p.seconds += judge * request_s
            p.api_requests, p.note = judge, f"{n} generations + {judge} judge requests"
            out.append(p)
        else:
            out.append(StagePlan(stage, note="not estimated"))
    return out


# The programs a stage compiles (the miniature's shapes): a stage pays one compile per program
# no earlier stage of the run compiled.
_PROGRAMS = {
    "sft": ("train:sft",),
    "dpo": ("train:dpo",),
    "reward_model": ("train:reward_model",),
    "ppo": ("ppo:rollout", "ppo:score", "ppo:update"),
    "samples": ("sample:t1.0",),
    "evaluate": ("sample:t0.7",),
}


def plan_miniature(run_dir: str, cal: Optional[CpuCalibration] = None) -> list[tuple[str, StagePlan]]:
    """[(arm, StagePlan)] predicting every stage of a finished miniature run on its CPU from
    the calibration (default: `miniature_calibration(run_dir)`), in the run's order."""
    cal = cal or miniature_calibration(run_dir)
    s = _miniature_settings(run_dir)
    cfg = _miniature_model(run_dir)
    sl = Slice("cpu-1", CPU_2CORE, 1, 1)
    compiled, out = set(), []
    for arm in s.run_order():
        for p in _plan_rows(run_dir, s, cfg, sl, cal.efficiency, cal.request_seconds, cal.compile_seconds, arm):
            if p.note != "reused":
                new = [k for k in _PROGRAMS.get(p.stage, ()) if k not in compiled]
                compiled |= set(new)
                if new:
                    p.seconds += len(new) * cal.compile_seconds
                    p.note += f"; +{len(new)} compile"
            out.append((arm, p))
    return out


def miniature_table(run_dir: str, cal: Optional[CpuCalibration] = None) -> str:
    """Markdown: stage, predicted s, measured s, error % for every stage of the run."""
    cal = cal or miniature_calibration(run_dir)
    lines = [
        f"calibration: mfu {cal.mfu:.3f} of {CPU_2CORE.peak_tflops * 1e3:.0f} GFLOP/s, sampler HBM efficiency "
        f"{cal.hbm_efficiency:.4f} of {CPU_2CORE.hbm_gbps:g} GB/s, {cal.request_seconds * 1e3:.2f} ms per critic "
        f"request, {cal.compile_seconds:.1f} s per compiled program",
        "",
        "| arm | stage | predicted s | measured s | error % | note |",
        "|---|---|---|---|---|---|",
    ]
    for arm, p in plan_miniature(run_dir, cal):
        st = _read_json(run_dir, "arms", arm, "status.json")["stages"].get(p.stage, {})
        m = st.get("seconds")
        if p.note == "reused" or m is None:
            continue
        err = f"{100 * (p.seconds - m) / m:+.0f}" if m else ""
        lines.append(f"| {arm} | {p.stage} | {p.seconds:.1f} | {m:.1f} | {err} | {p.note} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__)
        return 2
    print(miniature_table(argv[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
