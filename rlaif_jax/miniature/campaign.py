"""The miniature's campaign: its settings, and the arms of the paper they stand for, each as
one ArmSettings run by the pipeline's own runner and stages (rlaif_jax.pipeline), as
`scripts/run_arm.py` runs a paper arm. RL arms reuse their SFT arm's stage outputs (its SFT
run and its AI feedback, found done). The campaign's training knobs reach the stages as gin
bindings in the scope `miniature`, the way a user's recipe binds a paper arm.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Iterator, Optional

import gin

from rlaif_jax.errors import ConfigError, in_range, non_negative, positive, whole
from rlaif_jax.iterative import IterativeSettings
from rlaif_jax.miniature.world import MAX_PROMPT_TOKENS, Evaluation, World, one_device_mesh, seq, task_accuracy
from rlaif_jax.pipeline import ArmSettings
from rlaif_jax.train.advantages import KLController
from rlaif_jax.train.ppo import PPOConfig
from rlaif_jax.train.run_loop import LoopSettings

SCOPE = "miniature"  # the gin scope the campaign's arms run in, and its bindings live in
ARMS = ("sft_weak_10", "sft_weak_100", "sft_strong_100", "sft_strong_10", "dpo_weak_10", "ppo_weak_10", "dpo_strong_10")
LABELS = {
    "sft_weak_10": "SFT weak 10%",
    "sft_weak_100": "SFT weak 100%",
    "sft_strong_100": "SFT strong 100%",
    "sft_strong_10": "SFT strong 10%",
    "dpo_weak_10": "SFT weak 10% + DPO",
    "ppo_weak_10": "SFT weak 10% + PPO",
    "dpo_strong_10": "SFT strong 10% + DPO",
    "dpo_weak_10_iter": "SFT weak 10% + iterative DPO",
    "kto_weak_10": "SFT weak 10% + KTO (ratings)",
    "orpo_weak_10": "SFT weak 10% + ORPO",
    "dpo_weak_10_lora": "SFT weak 10% + DPO LoRA",
}
# Arms run only when asked for (run_miniature.arms): the default table stays the paper's.
# dpo_weak_10_iter: iterative RLAIF (rlaif_jax.iterative) from SFT weak 10%, one row per round.
# kto_weak_10: KTO from SFT weak 10% on the critic's 1-5 ratings (rating mode) of the same
# samples and teacher replies dpo_weak_10's pairs are judged from; orpo_weak_10: ORPO on
# dpo_weak_10's preference pairs from the same SFT policy (the objective is the only
# difference); dpo_weak_10_lora: dpo_weak_10 as LoRA adapters, the reference the SFT policy
# with the adapters off. Each reuses sft_weak_10's SFT run and samples (and the last two its
# critic's verdicts) and is compared with SFT weak 10% in the report.
OPTIONAL_ARMS = ("dpo_weak_10_iter", "kto_weak_10", "orpo_weak_10", "dpo_weak_10_lora")
ITERATIVE_START = {"dpo_weak_10_iter": ("sft_weak_10", "weak-teacher")}
# Optional one-round arms -> (the SFT arm they start from, the teacher its samples are
# judged or rated against), as RL_START (kept apart: the critic statistic of the report
# reads RL_START's arms' verdicts).
OPTIONAL_START = {
    "kto_weak_10": ("sft_weak_10", "weak-teacher"),
    "orpo_weak_10": ("sft_weak_10", "weak-teacher"),
    "dpo_weak_10_lora": ("sft_weak_10", "weak-teacher"),
}
# RL arm -> (the SFT arm it starts from, the teacher whose completions its samples are judged
# against): the paper pairs the SFT policy's sample with its own teacher's completion.
RL_START = {
    "dpo_weak_10": ("sft_weak_10", "weak-teacher"),
    "ppo_weak_10": ("sft_weak_10", "weak-teacher"),
    "dpo_strong_10": ("sft_strong_10", "strong-teacher"),
}
# SFT arm -> (its teacher, the prompt splits it learns from, the epochs it trains for: the
# 10% arms train longer on their 100 examples).
SFT_DATA = {
    "sft_weak_10": ("weak-teacher", ("sft",), "sft_small_epochs"),
    "sft_strong_10": ("strong-teacher", ("sft",), "sft_small_epochs"),
    "sft_weak_100": ("weak-teacher", ("sft", "feedback"), "sft_epochs"),
    "sft_strong_100": ("strong-teacher", ("sft", "feedback"), "sft_epochs"),
}


@gin.configurable("run_miniature")
@dataclasses.dataclass(frozen=True)
class MiniatureSettings:
    """The miniature's knobs (`run_miniature.*`), checked on construction. The world's knobs
    (teacher strengths, the web corpus's quality, the critic's and the judge's strength /
    noise / position bias) are gin bindings of `synthetic_world`.

    What each setting stands for (how each default was found: docs/experiments/, one page
    per question): num_prompts the paper's ShareGPT prompts, split sft_fraction (the paper's
    10%) for SFT and the rest for feedback; num_pretrain / pretrain_* the base model's
    pretraining on the web corpus (0 starts SFT from random weights); sft_epochs /
    sft_small_epochs SFT on 100% / 10% of the prompts; seq_len the tokens an SFT, DPO or
    reward-model example is padded (and, if longer, truncated) to; feedback_samples policy
    samples per feedback prompt, each judged against the teacher's completion (the paper:
    1); dpo_* / rm_* / ppo_* the RL stages (dpo_rpo_alpha the weight of the SFT term of the
    paper's code's RPO option: 0 is the paper's main runs, 1 its code's option in full);
    rm_sample_pairs: the reward model also learns the critic's verdict between each two
    policy samples of a feedback prompt (InstructGPT's ranking of several samples; the
    paper's reward model learns only the DPO pairs, sample vs teacher); rm_samples: how many
    policy samples per feedback prompt those pairs draw on (all pairs of them), the first
    feedback_samples shared with DPO, any more sampled and judged for the reward model
    alone; ppo_kl_coef the per-token KL penalty to the SFT policy in PPO's reward; ppo_lr /
    ppo_iterations PPO's optimizer's rate and its rollouts of 32 feedback prompts;
    eval_* the paper's evaluation sampling.
    iterative: the rounds of the optional arm dpo_weak_10_iter (add it to `arms`): rounds,
    pairing, DPO reference, samples per prompt (None: gin's IterativeSettings()); its DPO
    steps use dpo_*.
    The other optional arms (OPTIONAL_ARMS; run after the default ones, which they leave
    unchanged): kto_beta / kto_lr / kto_epochs KTO of kto_weak_10 (weights 1, the SFT policy
    as reference) on the critic's ratings, labelled desirable above kto_threshold on the 1-5
    scale and undesirable below it (ties dropped); orpo_beta / orpo_lr (ORPO's lambda and
    rate; its epochs dpo_epochs) of orpo_weak_10; lora_rank / lora_alpha / lora_lr the
    adapters (all seven projections) and rate of dpo_weak_10_lora (its other settings
    dpo_*): adapters start at B = 0 and move a low-rank update, so LoRA takes a higher rate
    than full DPO.
    shared_dir: where the tokenizer, the web corpus and the base model live (default
    out_dir), so that runs differing only in later knobs (a sweep over teacher and critic
    strengths) pretrain once; it refuses settings other than those it was made with."""

    out_dir: str = "runs/miniature"
    num_prompts: int = 6000
    num_eval: int = 1000
    num_pretrain: int = 4000
    sft_fraction: float = 0.1
    arms: tuple[str, ...] = ARMS
    hidden_size: int = 128
    num_layers: int = 2
    pretrain_epochs: int = 8
    pretrain_lr: float = 1e-3
    sft_epochs: int = 3
    sft_small_epochs: int = 10
    sft_lr: float = 1e-3
    batch_size: int = 32
    seq_len: int = 40
    feedback_samples: int = 2
    dpo_epochs: int = 4
    dpo_beta: float = 0.1
    dpo_lr: float = 3e-5
    dpo_rpo_alpha: float = 0.1
    rm_epochs: int = 2
    rm_lr: float = 3e-4
    rm_sample_pairs: bool = True
    rm_samples: int = 4
    ppo_iterations: int = 120
    ppo_lr: float = 1e-4
    ppo_kl_coef: float = 0.2
    eval_temperature: float = 0.7
    eval_top_p: float = 0.9
    seed: int = 0
    shared_dir: Optional[str] = None
    progress: bool = True
    iterative: Optional[IterativeSettings] = None  # the iterative arm's rounds; None: IterativeSettings()
    kto_beta: float = 0.1
    kto_lr: float = 3e-5
    kto_epochs: int = 4
    kto_threshold: float = 3.0
    orpo_beta: float = 0.1
    orpo_lr: float = 3e-5
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_lr: float = 3e-4

    def __post_init__(self):
        object.__setattr__(self, "arms", tuple(self.arms))  # gin hands a list
        unknown = set(self.arms) - set(ARMS) - set(OPTIONAL_ARMS)
        if unknown:
            raise ConfigError(f"unknown arms {sorted(unknown)}; choose from {ARMS + OPTIONAL_ARMS}")
        for name in (
            "num_prompts",
            "num_eval",
            "batch_size",
            "seq_len",
            "feedback_samples",
            "rm_samples",
            "hidden_size",
            "num_layers",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"run_miniature.{name} must be > 0, got {getattr(self, name)}")
        if self.rm_sample_pairs and self.rm_samples < 2 and any(a.startswith("ppo_") for a in self.arms):
            raise ConfigError(
                f"run_miniature.rm_sample_pairs needs two or more samples per prompt to pair, but "
                f"run_miniature.rm_samples = {self.rm_samples}; raise it or set rm_sample_pairs=False"
            )
        if self.seq_len <= MAX_PROMPT_TOKENS:
            raise ConfigError(
                f"run_miniature.seq_len must exceed the prompts' {MAX_PROMPT_TOKENS} tokens to leave room "
                f"for an answer, got {self.seq_len}"
            )
        if self.num_pretrain < 0:
            raise ConfigError(f"run_miniature.num_pretrain must be >= 0 (0: no pretraining), got {self.num_pretrain}")
        # Checked here, before any stage runs: the trainers would catch these only when their
        # stage starts, minutes into the run (and a zero-iteration PPO not at all).
        epochs = ("pretrain_epochs", "sft_epochs", "sft_small_epochs", "dpo_epochs", "rm_epochs", "ppo_iterations")
        for name in epochs + ("kto_epochs", "lora_rank"):
            whole(f"run_miniature.{name}", getattr(self, name), 1)
        rates = ("pretrain_lr", "sft_lr", "dpo_lr", "rm_lr", "ppo_lr", "dpo_beta")
        for name in rates + ("kto_beta", "kto_lr", "orpo_beta", "orpo_lr", "lora_alpha", "lora_lr"):
            positive(f"run_miniature.{name}", getattr(self, name))
        for name in ("dpo_rpo_alpha", "ppo_kl_coef", "eval_temperature"):
            non_negative(f"run_miniature.{name}", getattr(self, name))
        in_range("run_miniature.eval_top_p", self.eval_top_p, 0.0, 1.0, lo_open=True)
        in_range("run_miniature.kto_threshold", self.kto_threshold, 1.0, 5.0)

    def run_order(self) -> tuple[str, ...]:
        """The arms in the order they run: the default ones first (as asked), then the
        optional ones, so an optional arm never changes what a default arm computes."""
        return tuple(a for a in self.arms if a in ARMS) + tuple(a for a in self.arms if a not in ARMS)


def start_of(name: str) -> tuple[str, str]:
    """(the SFT arm an arm starts from, the teacher its samples are judged against)."""
    return {**RL_START, **ITERATIVE_START, **OPTIONAL_START}.get(name, (name, SFT_DATA.get(name, ("",))[0]))


def stages_of(name: str) -> tuple[str, ...]:
    if name in ITERATIVE_START:
        return ("sft", "rounds", "evaluate")
    if name.startswith("sft_"):
        return ("sft", "evaluate")
    if name.startswith("kto_"):
        return ("sft", "samples", "ratings", "kto", "evaluate")
    if name.startswith(("dpo_", "orpo_")):  # orpo: the dpo stage, preference_objective 'orpo'
        return ("sft", "samples", "critic", "preferences", "dpo", "evaluate")
    return ("sft", "samples", "critic", "preferences", "reward_model", "ppo", "evaluate")


def eval_dir(world: World, name: str) -> str:
    return world.path("eval", name)


def arm_settings(s: MiniatureSettings, world: World, name: str) -> ArmSettings:
    """One arm of the campaign as the pipeline runs it. Its outputs live where the table and
    the other arms find them: the SFT run at runs/<sft arm>, the AI feedback at
    data/feedback/<sft arm>/ (shared by the RL arms that start there), the RL run at
    runs/<arm> (the reward model at runs/rm_<...>), the evaluation at eval/<arm>."""
    start, teacher = start_of(name)
    sft_teacher, splits, _ = SFT_DATA[start]
    fb = functools.partial(world.path, "data", "feedback", start)
    policy = "runs/" + name
    return ArmSettings(
        out_dir=world.path("arms", name),
        data_dir=world.path("data"),
        stages=stages_of(name),
        base_model=world.base,
        source_teacher="",
        sft_teacher=sft_teacher,
        sft_splits=splits,
        pair_teacher=teacher,
        preference_objective="orpo" if name.startswith("orpo_") else "dpo",
        feedback_samples=s.feedback_samples,
        rm_sample_pairs=s.rm_sample_pairs,
        rm_samples=s.rm_samples,
        critic=functools.partial(world.client, "critic"),
        evaluator=Evaluation(world, s.eval_temperature, s.eval_top_p),
        eval_scores=task_accuracy,
        truncate_pairs=False,
        stage_dirs={
            "sft": world.path("runs", start),
            "samples": fb("samples"),
            "critic": fb("comparisons"),
            "preferences": fb("preferences"),
            "rm_preferences": fb("preferences_rm"),
            "ratings": fb("ratings"),
            "labelled": fb("labelled"),
            "dpo": world.path(policy),
            "kto": world.path(policy),
            "rounds": world.path(policy, "rounds"),
            "reward_model": world.path("runs", "rm_" + name.split("_", 1)[1]),
            "ppo": world.path(policy),
            "evaluate": eval_dir(world, name),
        },
        seed=s.seed,
        num_shards=1,
        cache_dir=world.path("cache"),
        iterative=(s.iterative or IterativeSettings()) if name in ITERATIVE_START else None,
    )


def bindings(s: MiniatureSettings, world: Optional[World], name: str) -> dict[str, tuple[Any, str]]:
    """The campaign's gin bindings for arm `name` (under scope SCOPE): key -> (value, the
    run_miniature knob it comes from, or '' for what the miniature fixes). Without a world
    (not made yet) the keys alone, the world's values None."""
    epochs = SFT_DATA[start_of(name)[0]][2]
    out: dict[str, tuple[Any, str]] = {}

    def bind(key: str, value: Any, knob: str = "") -> None:
        out[key] = (value, knob)

    # Every arm binds the same keys (the optional arms' with neutral values elsewhere): gin
    # keeps a binding after its arm, so each arm sets what the one before it may have set.
    loops = {"sft": 20, "dpo": 10, "reward_model": 10, "kto": 10}
    dpo_lr = {"orpo_weak_10": "orpo_lr", "dpo_weak_10_lora": "lora_lr"}.get(name, "dpo_lr")
    lrs = {"sft": "sft_lr", "dpo": dpo_lr, "reward_model": "rm_lr", "kto": "kto_lr"}
    for scope, log_every in loops.items():
        bind(f"{scope}/train.num_steps", None)
        bind(f"{scope}/train.mesh", one_device_mesh)
        bind(f"{scope}/train.loop", LoopSettings(log_every=log_every, async_checkpoint=False))
        bind(f"{scope}/make_optimizer.learning_rate", getattr(s, lrs[scope]), lrs[scope])
        bind(f"{scope}/make_optimizer.clip_norm", 10.0)
    bind("sft/train.tokenizer", world and world.tokenizer)
    if not s.num_pretrain:  # SFT starts from random weights of the world's shape
        bind("sft/train.model_config", world and world.model_config, "num_pretrain")
    data = {"sft": ("sft_pipeline", epochs), "dpo": ("preference_pipeline", "dpo_epochs")}
    data["reward_model"] = ("preference_pipeline", "rm_epochs")
    data["kto"] = ("labelled_pipeline", "kto_epochs")
    for scope, (pipeline, knob) in data.items():
        bind(f"{scope}/{pipeline}.num_epochs", getattr(s, knob), knob)
        bind(f"{scope}/{pipeline}.seed", s.seed, "seed")
        for k, v in seq(s.seq_len, s.batch_size).items():
            bind(f"{scope}/{pipeline}.{k}", v, k if k in ("seq_len", "batch_size") else "")
    bind("dpo/DPO.beta", s.dpo_beta, "dpo_beta")
    bind("dpo/DPO.rpo_alpha", s.dpo_rpo_alpha, "dpo_rpo_alpha")
    bind("dpo/ORPO.beta", s.orpo_beta, "orpo_beta")
    lora = name == "dpo_weak_10_lora"
    bind("dpo/LoraSettings.rank", s.lora_rank if lora else 0, "lora_rank")
    bind("dpo/LoraSettings.alpha", s.lora_alpha, "lora_alpha")
    bind("kto/KTO.beta", s.kto_beta, "kto_beta")
    for k, v in (("mode", "rating"), ("template", "rating_v1")):
        bind(f"ratings/JudgeSettings.{k}", v)
    bind("ratings/rating_labels_stage.threshold", s.kto_threshold, "kto_threshold")
    bind("ppo/train_ppo.num_iterations", s.ppo_iterations, "ppo_iterations")
    bind(
        "ppo/train_ppo.config",
        PPOConfig(
            rollout_batch_size=32,
            mini_batch_size=16,
            ppo_epochs=2,
            max_new_tokens=16,
            max_prompt_length=MAX_PROMPT_TOKENS,
            missing_eos_penalty=1.0,
        ),
    )
    bind("ppo/train_ppo.kl", KLController(init_coef=s.ppo_kl_coef), "ppo_kl_coef")
    bind("ppo/make_optimizer.learning_rate", s.ppo_lr, "ppo_lr")
    bind("ppo/train_ppo.mesh", one_device_mesh)
    bind("ppo/train_ppo.loop", LoopSettings(log_every=5))
    for k, v in (("max_length", 64), ("max_prompt_length", MAX_PROMPT_TOKENS), ("temperature", 1.0), ("top_p", 0.9)):
        bind(f"samples/SamplingSettings.{k}", v)
    return out


def check_no_user_binding(keys) -> None:
    """A knob the campaign sets is refused as a user's binding too (unscoped or in the stage's
    scope), rather than silently overridden: one door per knob."""
    for key in keys:
        scope, _, selector = key.rpartition("/")
        for user in (selector, key):
            try:
                gin.query_parameter(user)
            except ValueError:
                continue
            raise ConfigError(
                f"{user} is set by the miniature for its arms (scope {SCOPE}/{scope}); bind the "
                f"run_miniature knob instead, or leave it to the miniature"
            )


@contextlib.contextmanager
def bound(values: dict[str, tuple[Any, str]]) -> Iterator[None]:
    """The campaign's bindings under scope SCOPE, and the arm run inside that scope."""
    with gin.unlock_config():
        for key, (value, _) in values.items():
            gin.bind_parameter(f"{SCOPE}/{key}", value)
    with gin.config_scope(SCOPE):
        yield
