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


# -- a CPU as a chip: plan's estimates against a finished miniature run's stage times
# (miniature/plan_check.py reads the run; plan knows nothing of the miniature) -----------------

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
    ap.add_argument(
        "--slice", required=True, help="v4-32 | v5e-16 | v5p-64 | ... | cpu-1 (with --peak_tflops/--hbm_gbps)"
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
