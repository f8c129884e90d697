"""`plan`: what a run (an arm, or a single train / train_ppo recipe) will cost before it
runs: per stage the tokens processed, the model's FLOPs, the wall time predicted on a slice
from FLOPs and HBM traffic at a stated efficiency, chip-hours and dollars; and the API
requests, tokens and dollars of its teacher / critic / judge stages at the feedback client's
prices, less what the answer caches already hold.

  rlaif plan --gin_file=configs/models/mistral_7b.gin \\
    --gin_file=configs/experiments/paper/arms/dpo_gpt4_on_sft_gpt35_10pct.gin --slice=v4-32

The model is a roofline: a stage's time is the larger of FLOPs / (chips x peak x mfu) and
bytes / (chips x HBM bandwidth x hbm_efficiency), summed over its programs (compute-bound
training and prefill, memory-bound decode: each decode step reads the sampler's weights).
Token counts come from the workload (the paper's ShareGPT sizes by default) and the config's
sequence settings; every assumption is printed with the table.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from typing import Mapping, Optional, Sequence

import gin

from rlaif_jax import benchmarks
from rlaif_jax.cli import gin_arg_parser, parse_gin
from rlaif_jax.errors import ConfigError
from rlaif_jax.feedback import pricing


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip: bf16 peak, HBM bandwidth, on-demand USD per chip-hour."""

    name: str
    peak_tflops: float
    hbm_gbps: float
    usd_per_chip_hour: float
    # Cloud names v4 / v5p slices by TensorCores (two per chip), v5e by chips.
    cores_per_chip: int = 1


# Public list prices (us-central, on demand) at the time of writing; --prices overrides.
CHIPS = {
    "v4": Chip("v4", 275.0, 1228.0, 3.22, 2),
    "v5e": Chip("v5e", 197.0, 819.0, 1.20, 1),
    "v5p": Chip("v5p", 459.0, 2765.0, 4.20, 2),
}


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str
    chip: Chip
    chips: int
    chips_per_host: int

    @property
    def hosts(self) -> int:
        return max(1, self.chips // self.chips_per_host)


def parse_slice(name: str, chip_override: Optional[Chip] = None) -> Slice:
    """'v4-32' (32 TensorCores = 16 chips), 'v5e-16', 'v5p-64', or 'cpu-1' / 'gpu-1' (needs the
    peak and bandwidth given: --peak_tflops / --hbm_gbps or --device_json)."""
    kind, _, n = name.partition("-")
    if not n.isdigit() or int(n) < 1:
        raise ConfigError(f"--slice={name}: expected <kind>-<N>, e.g. v4-32, v5e-16, cpu-1")
    if chip_override is not None:
        return Slice(name, chip_override, int(n), int(n))
    if kind not in CHIPS:
        raise ConfigError(
            f"--slice={name}: unknown chip {kind!r}; known: {', '.join(CHIPS)} (or give --peak_tflops and --hbm_gbps)"
        )
    chip = CHIPS[kind]
    chips = max(1, int(n) // chip.cores_per_chip)
    return Slice(name, chip, chips, min(chips, 4))


@dataclasses.dataclass(frozen=True)
class Efficiency:
    """The fraction of peak FLOPs a training / prefill program reaches (MFU) and of HBM
    bandwidth a decode step reaches."""

    mfu: float = 0.35
    hbm_efficiency: float = 0.6

    @staticmethod
    def from_device_json(path: str, default: "Efficiency") -> "Efficiency":
        """From a device benchmark's JSON (scripts/device_bench.py --json): the median MFU of
        its train rows, the HBM efficiency if it reports one."""
        with open(path) as f:
            doc = json.load(f)
        rows = doc.get("rows") or doc.get("results") or []
        mfus = sorted(r["mfu"] for r in rows if isinstance(r, dict) and r.get("mfu"))
        if not mfus and doc.get("mfu") is None:
            raise ConfigError(f"--device_json={path}: no 'mfu' in it; give --mfu instead")
        mfu = mfus[len(mfus) // 2] if mfus else float(doc["mfu"])
        return Efficiency(mfu=mfu, hbm_efficiency=float(doc.get("hbm_efficiency", default.hbm_efficiency)))


@dataclasses.dataclass(frozen=True)
class Workload:
    """Data sizes a config does not hold (the paper's ShareGPT by default)."""

    num_prompts: int = 71_894  # single-turn ShareGPT prompts (PAPER.md)
    eval_prompts: int = 805  # AlpacaEval
    mean_prompt_tokens: int = 120
    mean_completion_tokens: int = 300
    # A judge / critic request: template and the two outputs besides the prompt.
    judge_template_tokens: int = 150
    judge_output_tokens: int = 2


@dataclasses.dataclass
class StagePlan:
    stage: str
    tokens: float = 0.0
    flops: float = 0.0
    hbm_bytes: float = 0.0
    seconds: float = 0.0
    chip_hours: float = 0.0
    usd: float = 0.0
    api_model: str = ""
    api_requests: int = 0
    api_cached: int = 0
    api_in_tokens: float = 0.0
    api_out_tokens: float = 0.0
    api_usd: Optional[float] = 0.0
    note: str = ""


def roofline_seconds(flops: float, hbm_bytes: float, sl: Slice, eff: Efficiency) -> float:
    compute = flops / (sl.chips * sl.chip.peak_tflops * 1e12 * eff.mfu)
    memory = hbm_bytes / (sl.chips * sl.chip.hbm_gbps * 1e9 * eff.hbm_efficiency)
    return max(compute, memory)


def training_flops(cfg, sequences: float, seq_len: int, kind: str) -> float:
    """Forward+backward of `sequences` rows of seq_len (the pipelines pad to it): 6N per token
    plus causal attention (DecoderConfig.flops_per_token); DPO adds the reference model's
    forward (a third) unless its log-probs were precomputed."""
    f = sequences * seq_len * cfg.flops_per_token(seq_len)
    return f * (4 / 3 if kind == "dpo" else 1.0)


def sampling_cost(cfg, prompts: float, prompt_len: int, new_tokens: int, batch: int, param_bytes: int, sl: Slice):
    """(tokens, FLOPs, HBM bytes per chip-set) of sampling `prompts`: prefill + decode FLOPs
    (benchmarks.generate_flops), and every decode step of every batch reading the weights
    (each host samples its share of the prompts on its own chips)."""
    flops = benchmarks.generate_flops(cfg, prompts, prompt_len, new_tokens)
    batches_per_host = math.ceil(prompts / sl.hosts / batch)
    # Weights read once per step on each host: in slice-wide terms, hosts x that.
    hbm = batches_per_host * new_tokens * param_bytes * sl.hosts
    return prompts * (prompt_len + new_tokens), flops, hbm


def stage_plan(stage: str, tokens: float, flops: float, hbm: float, sl: Slice, eff: Efficiency, price: float, note=""):
    """One compute stage's StagePlan: roofline seconds, chip-hours and dollars."""
    s = roofline_seconds(flops, hbm, sl, eff)
    ch = s / 3600 * sl.chips
    return StagePlan(stage, tokens, flops, hbm, s, ch, ch * price, note=note)


def train_stage(stage: str, cfg, sequences: float, seq_len: int, kind: str, sl, eff, price, note="") -> StagePlan:
    """A training stage (sft / dpo / reward_model / kto): `sequences` rows of seq_len."""
    flops = training_flops(cfg, sequences, seq_len, kind)
    return stage_plan(stage, sequences * seq_len, flops, 0.0, sl, eff, price, note)


def sample_stage(stage: str, cfg, prompts: float, prompt_len: int, new: int, batch: int, sl, eff, price, note=""):
    """A sampling stage (policy samples, evaluation generations) of the static sampler."""
    tokens, flops, hbm = sampling_cost(cfg, prompts, prompt_len, new, batch, _param_bytes(cfg), sl)
    return stage_plan(stage, tokens, flops, hbm, sl, eff, price, note)


def ppo_stage(cfg, config, iters: int, sl: Slice, eff: Efficiency, price: float) -> StagePlan:
    """PPO: per iteration a rollout (prefill + R decode steps, each reading the weights) then
    scoring and `ppo_epochs` updates (compute); the two kinds of program are priced apart
    and summed, not one roofline over their total."""
    rows = config.rollout_batch_size * config.samples_per_prompt * sl.hosts
    P, R = config.max_prompt_length, config.max_new_tokens
    total = iters * benchmarks.ppo_flops(cfg, rows, P, R, config.ppo_epochs)
    rollout = iters * benchmarks.generate_flops(cfg, rows, P, R)
    hbm = iters * R * _param_bytes(cfg) * sl.hosts
    s = roofline_seconds(rollout, hbm, sl, eff) + roofline_seconds(total - rollout, 0.0, sl, eff)
    ch = s / 3600 * sl.chips
    note = f"{iters} iterations x {rows} rollouts of {P}+{R} tokens, {config.ppo_epochs} epochs"
    return StagePlan("ppo", iters * rows * (P + R), total, hbm, s, ch, ch * price, note=note)


def api_cost(
    stage: str,
    model: str,
    requests: int,
    in_tokens: float,
    out_tokens: float,
    cached: int,
    prices: Optional[Mapping] = None,
) -> StagePlan:
    """An API stage's requests less the cached ones, their tokens and dollars (None: the
    model has no price in the table)."""
    paid = max(0, requests - cached)
    usage = {"prompt_tokens": paid * in_tokens, "completion_tokens": paid * out_tokens}
    usd = pricing.cost_usd(usage, pricing.price_for(model, prices))
    return StagePlan(
        stage,
        api_model=model,
        api_requests=paid,
        api_cached=min(cached, requests),
        api_in_tokens=usage["prompt_tokens"],
        api_out_tokens=usage["completion_tokens"],
        api_usd=usd,
    )


def cached_answers(path: Optional[str]) -> int:
    """The paid-for ("ok") answers of one JSONL answer cache (later lines win per key)."""
    if not path or not os.path.exists(path):
        return 0
    status = {}
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
                status[rec["key"]] = rec.get("status")
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line
    return sum(s == "ok" for s in status.values())


# -- reading the config --------------------------------------------------------------------

_UNSET = object()


def setting(name: str, param: str, scope: str = "", default=_UNSET):
    """A gin binding as a call in `scope` would see it: scoped, then unscoped, else default."""
    for key in ([f"{scope}/{name}.{param}"] if scope else []) + [f"{name}.{param}"]:
        try:
            return copy.deepcopy(gin.query_parameter(key))  # deepcopy evaluates @refs and %macros
        except ValueError:
            continue
    if default is _UNSET:
        raise ConfigError(f"{name}.{param} is unbound; plan needs it from the config")
    return default


def _model_config(scope: str):
    cfg = setting("train", "model_config", scope, None)
    if cfg is None:
        raise ConfigError("train.model_config is unset: add a model file (--gin_file=configs/models/<name>.gin)")
    return cfg


def _param_bytes(cfg, dtype_bytes: int = 2) -> int:
    """The sampler's weights (bfloat16 by default, as the paper arms sample)."""
    return cfg.num_params() * dtype_bytes


def plan_arm(sl: Slice, eff: Efficiency, work: Workload, prices=None, chip_price=None, cache_dir=None):
    """[StagePlan] for the arm the parsed gin config describes (run_arm.*)."""
    stages = list(setting("run_arm", "stages"))
    sft_fraction_split = float(setting("prepare_prompts", "sft_fraction", "prompts", 0.1))
    n_sft = int(work.num_prompts * sft_fraction_split)
    n_fb = work.num_prompts - n_sft
    sft_splits = list(setting("run_arm", "sft_splits", "", ["sft"]))
    sft_fraction = setting("run_arm", "sft_fraction", "", None)
    teachers = dict(setting("run_arm", "teachers", "", {}) or {})
    imports = dict(setting("run_arm", "teacher_imports", "", {}) or {})
    out = []
    price = chip_price if chip_price is not None else sl.chip.usd_per_chip_hour
    P, C = work.mean_prompt_tokens, work.mean_completion_tokens

    cache = lambda role: os.path.join(cache_dir, f"{role}.jsonl") if cache_dir else None  # noqa: E731

    def rounds():
        """The iterative arm: k rounds of samples, critic, preferences and DPO, each round as
        the one-round arm's stages (IterativeSettings' samples per prompt; its pairing's
        comparisons per prompt; one DPO pair per feedback prompt), the k rounds summed."""
        k = int(setting("IterativeSettings", "rounds", "", 3))
        m = int(setting("IterativeSettings", "samples", "", 2))
        pairing = str(setting("IterativeSettings", "pairing", "", "teacher"))
        per_prompt = {"teacher": m, "best_worst": m * (m - 1) // 2}.get(pairing, m + m * (m - 1) // 2)
        start = len(out)
        for sub in ("samples", "critic", "preferences", "dpo"):
            one(sub)
        for p in out[start:]:
            f = k * (m if p.stage == "samples" else per_prompt if p.stage == "critic" else 1)
            for name in (
                "tokens",
                "flops",
                "hbm_bytes",
                "seconds",
                "chip_hours",
                "usd",
                "api_in_tokens",
                "api_out_tokens",
            ):
                setattr(p, name, getattr(p, name) * f)
            p.api_requests *= f
            p.api_usd = None if p.api_usd is None else p.api_usd * f
            p.note = f"{k} rounds x ({p.note or p.stage})" + (f", x{f // k} per prompt" if f > k else "")
            p.stage = f"rounds/{p.stage}"

    def one(stage):
        if stage == "rounds":
            rounds()
        elif stage in ("prompts", "preferences"):
            out.append(StagePlan(stage, note="negligible (data preparation on the host)"))
        elif stage == "audit":
            model = str(setting("FeedbackClient", "model", "critic", "gpt-4-0314"))  # run_arm.critic asks
            n = int(setting("AuditSettings", "sample_size", "audit", 200))
            need = P + 2 * C + work.judge_template_tokens
            out.append(
                api_cost("audit", model, n, need, work.judge_output_tokens, cached_answers(cache("audit")), prices)
            )
        elif stage == "teacher":
            for model in teachers:
                if model in imports:
                    continue
                want = 0
                if setting("run_arm", "sft_teacher", "", None) == model:
                    want += n_sft + (n_fb if "feedback" in sft_splits else 0)
                if setting("run_arm", "pair_teacher", "", None) == model and "feedback" not in sft_splits:
                    want += n_fb
                if want:
                    p = api_cost("teacher", model, want, P + 10, C, cached_answers(cache(f"teacher-{model}")), prices)
                    out.append(p)
        elif stage == "sft" and sft_fraction != 0.0:
            examples = (
                work.num_prompts * sft_fraction
                if sft_fraction is not None
                else n_sft + (n_fb if "feedback" in sft_splits else 0)
            )
            epochs = setting("sft_pipeline", "num_epochs", "sft", 1)
            seq = setting("sft_pipeline", "seq_len", "sft", 512)
            cfg = _model_config("sft")
            note = f"{examples:.0f} x {epochs} epochs"
            out.append(train_stage("sft", cfg, examples * epochs, seq, "sft", sl, eff, price, note))
        elif stage in ("samples", "evaluate"):
            scope = stage
            name = "SamplingSettings" if stage == "samples" else "EvalSamplingSettings"
            max_len = setting(name, "max_length", scope, 512 if stage == "samples" else 1024)
            max_prompt = setting(name, "max_prompt_length", scope, 256 if stage == "samples" else 512)
            batch = setting(name, "batch_size", scope, 32)
            cfg = _model_config(scope)
            prompts = (
                n_fb
                if stage == "samples"
                else work.eval_prompts * (2 if setting("run_arm", "evaluate_sft", "", False) else 1)
            )
            if stage == "evaluate" and "rounds" in stages and setting("IterativeSettings", "evaluate_rounds", "", True):
                prompts += work.eval_prompts * (int(setting("IterativeSettings", "rounds", "", 3)) - 1)  # each round's
            prompt_len = min(P, max_prompt)
            new = max_len - prompt_len
            note = f"{prompts} prompts, batch {batch}, {new} decode steps"
            out.append(sample_stage(stage, cfg, prompts, prompt_len, new, batch, sl, eff, price, note))
            if stage == "evaluate":
                model = str(setting("FeedbackClient", "model", "judge", "gpt-4-0314"))
                out.append(
                    api_cost(
                        "judge",
                        model,
                        prompts,
                        P + 2 * C + work.judge_template_tokens,
                        work.judge_output_tokens,
                        cached_answers(cache("judge")),
                        prices,
                    )
                )
        elif stage == "critic":
            model = str(setting("FeedbackClient", "model", "critic", "gpt-4-0314"))
            out.append(
                api_cost(
                    "critic",
                    model,
                    n_fb,
                    P + 2 * C + work.judge_template_tokens,
                    work.judge_output_tokens,
                    cached_answers(cache("critic")),
                    prices,
                )
            )
        elif stage in ("dpo", "reward_model"):
            epochs = setting("preference_pipeline", "num_epochs", stage, 1)
            seq = setting("preference_pipeline", "seq_len", stage, 512)
            cfg = _model_config(stage)
            seqs = 2 * n_fb * epochs  # chosen and rejected
            kind = "dpo" if stage == "dpo" else "reward_model"
            out.append(train_stage(stage, cfg, seqs, seq, kind, sl, eff, price, f"{n_fb} pairs x {epochs} epochs"))
        elif stage == "ppo":
            out.append(_ppo(sl, eff, price, "ppo"))
        elif stage != "sft":  # an sft stage of fraction 0 trains nothing
            out.append(StagePlan(stage, note="no compute or API cost estimated"))

    for stage in stages:
        one(stage)
    return out


def _ppo(sl: Slice, eff: Efficiency, price: float, scope: str) -> StagePlan:
    config = setting("train_ppo", "config", scope)
    iters = setting("train_ppo", "num_iterations", scope, 1)
    return ppo_stage(_model_config(scope), config, iters, sl, eff, price)


def plan_config(
    sl: Slice, eff: Efficiency, work: Workload, prices=None, chip_price=None, cache_dir=None, examples=None
):
    """[StagePlan] for the parsed config: an arm, or a single train / train_ppo recipe."""
    config = gin.config_str()
    try:
        gin.query_parameter("run_arm.stages")
        return plan_arm(sl, eff, work, prices, chip_price, cache_dir)
    except ValueError:
        pass
    price = chip_price if chip_price is not None else sl.chip.usd_per_chip_hour
    if "train_ppo." in config:
        return [_ppo(sl, eff, price, "")]
    if "train.objective" in config:
        objective = setting("train", "objective")
        kind = type(objective).__name__.lower()
        pipe = "sft_pipeline" if kind == "sft" else "preference_pipeline"
        epochs = setting(pipe, "num_epochs", "", 1)
        seq = setting(pipe, "seq_len", "", 512)
        n = examples or work.num_prompts
        seqs = n * epochs * (1 if kind == "sft" else 2)
        cfg = _model_config("")
        flops = training_flops(cfg, seqs, seq, "dpo" if kind == "dpo" else kind)
        s = roofline_seconds(flops, 0.0, sl, eff)
        ch = s / 3600 * sl.chips
        return [StagePlan(kind, seqs * seq, flops, 0.0, s, ch, ch * price, note=f"{n} examples x {epochs} epochs")]
    raise ConfigError("the config runs nothing to plan: give an arm (run_arm.stages) or train / train_ppo")


# -- the miniature on this CPU: plan's estimates against a finished run's stage times ------------

# A nominal 2-core CPU as a "chip" (peak: 2 cores x 3 GHz x 32 float32 FLOP/cycle; memory: one
# DDR4 channel's share): the efficiencies calibrated against it are what the run reached.
CPU_2CORE = Chip("cpu", 0.192, 20.0, 0.0)


@dataclasses.dataclass(frozen=True)
class CpuCalibration:
    """One measured number per program kind, from a finished miniature run: the train step's
    efficiency (mfu, from the base model's pretraining: its steady step time); the sampler's
    (hbm_efficiency: a decode step's time as weight-streaming at that fraction of the nominal
    bandwidth, from one samples stage); the synthetic critic / judge's seconds per request
    (from one critic stage); and one compile time charged to the first stage that runs each
    distinct program (from the base's first logged steps, which include its compile)."""

    mfu: float
    hbm_efficiency: float
    request_seconds: float
    compile_seconds: float

    @property
    def efficiency(self) -> Efficiency:
        return Efficiency(self.mfu, self.hbm_efficiency)


def _read_json(*parts):
    with open(os.path.join(*parts)) as f:
        return json.load(f)


def _metrics(path: str) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _miniature_settings(run_dir: str):
    """MiniatureSettings as the run bound them (run_miniature.* in an arm's operative config)."""
    import ast
    import glob

    from rlaif_jax.miniature.campaign import MiniatureSettings

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
    from rlaif_jax.miniature.world import PRETRAIN_SEQ_LEN

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
    from rlaif_jax.models.config import DecoderConfig

    return DecoderConfig.from_hf(_read_json(run_dir, "runs", "base", "hf", "config.json"))


def _stage_owners(s) -> dict:
    """(arm, stage) -> the sample indices / comparison dirs it made first, in the run's order
    (later arms reuse what an earlier one made)."""
    from rlaif_jax.miniature.campaign import stages_of, start_of

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
    from rlaif_jax.miniature.campaign import SFT_DATA, bindings, stages_of, start_of
    from rlaif_jax.miniature.world import MAX_PROMPT_TOKENS

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


def format_plan(rows: Sequence[StagePlan], sl: Slice, eff: Efficiency) -> str:
    head = (
        f"slice {sl.name}: {sl.chips} x {sl.chip.name} chips ({sl.chip.peak_tflops:g} TFLOP/s, "
        f"{sl.chip.hbm_gbps:g} GB/s each), {sl.hosts} host(s); mfu {eff.mfu:.0%}, HBM efficiency "
        f"{eff.hbm_efficiency:.0%}"
    )
    lines = [
        head,
        f"{'stage':14s} {'tokens':>10s} {'PFLOPs':>10s} {'hours':>8s} {'chip-h':>9s} {'USD':>9s}   "
        f"{'API model':18s} {'requests':>9s} {'cached':>7s} {'Mtok in':>8s} {'Mtok out':>8s} {'API USD':>9s}",
    ]
    tot = StagePlan("total")
    for r in rows:
        api = r.api_model != ""
        usd = "unpriced" if api and r.api_usd is None else f"{r.api_usd or 0:9.2f}"
        lines.append(
            f"{r.stage:14s} {r.tokens:10.3g} {r.flops / 1e15:10.3g} {r.seconds / 3600:8.2f} {r.chip_hours:9.1f} "
            f"{r.usd:9.2f}   {r.api_model:18s} {r.api_requests if api else '':>9} {r.api_cached if api else '':>7} "
            f"{r.api_in_tokens / 1e6 if api else 0:8.2f} {r.api_out_tokens / 1e6 if api else 0:8.2f} {usd:>9s}"
            + (f"   ({r.note})" if r.note else "")
        )
        for f in ("tokens", "flops", "seconds", "chip_hours", "usd", "api_requests", "api_in_tokens", "api_out_tokens"):
            setattr(tot, f, getattr(tot, f) + getattr(r, f))
        tot.api_usd = (tot.api_usd or 0) + (r.api_usd or 0)
    lines.append(
        f"{'total':14s} {tot.tokens:10.3g} {tot.flops / 1e15:10.3g} {tot.seconds / 3600:8.2f} {tot.chip_hours:9.1f} "
        f"{tot.usd:9.2f}   {'':18s} {tot.api_requests:>9} {'':>7} {tot.api_in_tokens / 1e6:8.2f} "
        f"{tot.api_out_tokens / 1e6:8.2f} {tot.api_usd:9.2f}"
    )
    return "\n".join(lines)


def main(argv=None) -> int:

    ap = gin_arg_parser(__doc__)
    ap.add_argument("--slice", help="v4-32 | v5e-16 | v5p-64 | ... | cpu-1 (with --peak_tflops/--hbm_gbps)")
    ap.add_argument(
        "--miniature_run",
        help="a finished miniature run's out_dir: print plan's prediction of each of its stages on this CPU "
        "(calibrated on the run itself, see CpuCalibration) beside the measured seconds, and nothing else",
    )
    ap.add_argument("--mfu", type=float, default=None, help="fraction of peak FLOPs reached (default 0.35)")
    ap.add_argument("--hbm_efficiency", type=float, default=None, help="fraction of HBM bandwidth (default 0.6)")
    ap.add_argument("--device_json", help="a device benchmark's JSON: its median MFU replaces --mfu's default")
    ap.add_argument("--peak_tflops", type=float, help="per-chip peak (a slice kind not in the table, e.g. cpu)")
    ap.add_argument("--hbm_gbps", type=float, help="per-chip memory bandwidth in GB/s (with --peak_tflops)")
    ap.add_argument("--chip_usd_per_hour", type=float, help="override the chip-hour price")
    ap.add_argument("--prices", help="JSON file {model: [usd_in, usd_out] per 1M tokens} overriding the API prices")
    ap.add_argument("--cache_dir", help="API answer caches (default: run_arm.data_dir/api_cache when it exists)")
    ap.add_argument("--num_prompts", type=int, default=Workload.num_prompts)
    ap.add_argument("--mean_prompt_tokens", type=int, default=Workload.mean_prompt_tokens)
    ap.add_argument("--mean_completion_tokens", type=int, default=Workload.mean_completion_tokens)
    ap.add_argument("--json", action="store_true", help="one JSON document instead of the table")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.miniature_run:
        print(miniature_table(args.miniature_run))
        return 0
    if not args.slice:
        raise ConfigError("--slice is required (e.g. --slice=v4-32)")
    parse_gin(args)
    chip = None
    if args.peak_tflops or args.hbm_gbps:
        if not (args.peak_tflops and args.hbm_gbps):
            raise ConfigError("--peak_tflops and --hbm_gbps go together")
        chip = Chip(args.slice.partition("-")[0], args.peak_tflops, args.hbm_gbps, args.chip_usd_per_hour or 0.0)
    sl = parse_slice(args.slice, chip)
    eff = Efficiency()
    if args.device_json:
        eff = Efficiency.from_device_json(args.device_json, eff)
    eff = Efficiency(args.mfu or eff.mfu, args.hbm_efficiency or eff.hbm_efficiency)
    prices = None
    if args.prices:
        with open(args.prices) as f:
            prices = {**pricing.DEFAULT_PRICES, **{k: tuple(v) for k, v in json.load(f).items()}}
    cache_dir = args.cache_dir
    if cache_dir is None:
        data_dir = setting("run_arm", "data_dir", "", None)
        if data_dir and os.path.isdir(os.path.join(str(data_dir), "api_cache")):
            cache_dir = os.path.join(str(data_dir), "api_cache")
    work = Workload(
        num_prompts=args.num_prompts,
        mean_prompt_tokens=args.mean_prompt_tokens,
        mean_completion_tokens=args.mean_completion_tokens,
    )
    rows = plan_config(sl, eff, work, prices, args.chip_usd_per_hour, cache_dir)
    if args.json:
        print(
            json.dumps(
                {
                    "slice": sl.name,
                    "efficiency": dataclasses.asdict(eff),
                    "stages": [dataclasses.asdict(r) for r in rows],
                },
                indent=1,
            )
        )
    else:
        print(format_plan(rows, sl, eff))
        print(
            f"  workload: {work.num_prompts} prompts ({work.mean_prompt_tokens} prompt / {work.mean_completion_tokens} "
            f"completion tokens on average), {work.eval_prompts} evaluation prompts; API answers already cached "
            f"({cache_dir or 'no cache dir'}) are not counted"
        )
    return 0
