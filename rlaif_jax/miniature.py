"""The paper in miniature on one CPU: every stage of the RLAIF pipeline, through the real
code paths, against a synthetic world served over the OpenAI-compatible API on 127.0.0.1.

Stages (each writes records under out_dir and is skipped when its output exists, so a
killed run resumes; API answers are cached, so nothing is asked twice):
  prompts       checkable instructions: a pretraining corpus, the paper's prompts split by
                order into 10% SFT / 90% feedback, and a held-out evaluation set
  teachers      web-corpus, weak- and strong-teacher completions (teacher stage, real client)
  pretrain      the base model: a tiny Llama trained on the web corpus, as the paper's base
                models come pretrained (without it the 100-example SFT policy cannot do the
                tasks at all, and RL has nothing to reweight: see the bandit experiment)
  sft           SFT from the base on weak 10%, weak 100%, strong 100%, strong 10%
  feedback      for each RL starting point (SFT weak 10%, SFT strong 10%): policy samples on
                the feedback prompts vs that teacher's completions, judged by the critic
                (order randomised, invalid kept apart), turned into preference pairs
  rl            DPO from SFT weak 10% (finding 1) and SFT strong 10% (finding 3); a
                Bradley-Terry reward model + PPO from SFT weak 10%
  evaluate      every arm sampled on the held-out prompts (T=0.7, top_p 0.9, as the paper),
                judged pairwise against the reference model's answers by a separate judge;
                win rate +- SE, and the task score the synthetic world knows
  report        the table, the paper's three findings as paired differences on the same eval
                prompts, results.md / results.csv / results.png / summary.json
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import os
from typing import Optional, Sequence

import gin
import jax

from rlaif_jax import environment
from rlaif_jax import sharding as shd
from rlaif_jax.data.prompts.prepare import prepare_prompts
from rlaif_jax.data.records import read_records
from rlaif_jax.data.tokenize.tokenizer import build_test_tokenizer, load_tokenizer
from rlaif_jax.eval.winrate import preferences_from_verdicts, verdict_win_rate
from rlaif_jax.eval.winrate import win_rate as score_win_rate  # this module's win_rate takes comparisons
from rlaif_jax.feedback.client import FeedbackClient
from rlaif_jax.feedback.server import ServerThread, make_app
from rlaif_jax.feedback.settings import JudgeSettings, SamplingSettings
from rlaif_jax.feedback.stages import critic_stage, load_comparisons, policy_samples_stage, preferences_stage, teacher_stage
from rlaif_jax.fileio import write_jsonl
from rlaif_jax.models import DecoderConfig
from rlaif_jax.synthetic import findings as F
from rlaif_jax.synthetic.backend import synthetic_world
from rlaif_jax.synthetic.tasks import make_instructions, parse_instruction, score, vocabulary
from rlaif_jax.train import DPO, SFT, RewardModel, make_optimizer
from rlaif_jax.train.advantages import KLController
from rlaif_jax.train.loop import train
from rlaif_jax.train.ppo import PPOConfig, train_ppo

log = logging.getLogger(__name__)

ARMS = ("sft_weak_10", "sft_weak_100", "sft_strong_100", "sft_strong_10", "dpo_weak_10", "ppo_weak_10",
        "dpo_strong_10")
LABELS = {
    "sft_weak_10": "SFT weak 10%", "sft_weak_100": "SFT weak 100%", "sft_strong_100": "SFT strong 100%",
    "sft_strong_10": "SFT strong 10%", "dpo_weak_10": "SFT weak 10% + DPO", "ppo_weak_10": "SFT weak 10% + PPO",
    "dpo_strong_10": "SFT strong 10% + DPO",
}
# RL arm -> (the SFT arm it starts from, the teacher whose completions its samples are judged
# against): the paper pairs the SFT policy's sample with its own teacher's completion.
RL_START = {"dpo_weak_10": ("sft_weak_10", "weak-teacher"), "ppo_weak_10": ("sft_weak_10", "weak-teacher"),
            "dpo_strong_10": ("sft_strong_10", "strong-teacher")}


def _done(path: str) -> bool:
    return os.path.exists(os.path.join(path, "manifest.json")) or os.path.exists(os.path.join(path, "summary.json"))


def _claim_shared(shared_dir: Optional[str], settings: dict) -> None:
    """Records what a shared directory's base model was made with; refuses other settings
    (a base pretrained with other knobs would silently change every arm)."""
    if not shared_dir:
        return
    os.makedirs(shared_dir, exist_ok=True)
    path = os.path.join(shared_dir, "settings.json")
    if os.path.exists(path):
        with open(path) as f:
            made = json.load(f)
        diff = {k: (made.get(k), v) for k, v in settings.items() if made.get(k) != v}
        if diff:
            raise ValueError(f"run_miniature.shared_dir={shared_dir!r} holds a base made with other settings "
                             f"(was, now): {diff}; use another shared_dir or the same settings")
        return
    with open(path, "w") as f:
        json.dump(settings, f, indent=2)


def win_rate(comparisons: Sequence[dict]) -> dict:
    """The policy (response_1) against the reference (response_2), as AlpacaEval scores it
    (rlaif_jax.eval.winrate): ties 0.5, invalid judgments counted apart, never scored."""
    return _win_row(verdict_win_rate([c["verdict"] for c in comparisons], policy_is="first"))


def _win_row(wr) -> dict:
    return {"win_rate": wr.win_rate, "se": wr.standard_error, "n": wr.n_scored, "wins": wr.n_wins,
            "losses": wr.n_losses, "ties": wr.n_ties, "invalid": wr.n_invalid}


def task_scores(samples: Sequence[dict]) -> dict:
    """prompt_id -> the world's true score of the sample, in [0, 1]."""
    return {s["prompt_id"]: score(parse_instruction(s["prompt"]), s["completion"]) for s in samples}


def task_accuracy(samples: Sequence[dict]) -> dict:
    scores = list(task_scores(samples).values())
    return {"task_score": 100 * sum(scores) / len(scores), "task_exact": 100 * sum(s == 1.0 for s in scores) / len(scores)}


def critic_policy_preferred(comparisons: Sequence[dict]) -> dict:
    """How often the critic preferred the policy sample (response_1) over the teacher's
    completion, over decided verdicts: the paper's "GPT-4 preferred the SFT sample 14.3%"."""
    decided = [c["verdict"] for c in comparisons if c["verdict"] in ("first", "second")]
    return {"policy_preferred": 100 * sum(v == "first" for v in decided) / max(len(decided), 1),
            "decided": len(decided), "judged": len(comparisons)}


@gin.configurable
def run_miniature(
    out_dir: str = "runs/miniature",
    num_prompts: int = 1000,
    num_eval: int = 1000,
    num_pretrain: int = 4000,
    sft_fraction: float = 0.1,
    arms: Sequence[str] = ARMS,
    hidden_size: int = 128,
    num_layers: int = 2,
    pretrain_epochs: int = 8,
    pretrain_lr: float = 3e-3,
    sft_epochs: int = 3,
    sft_small_epochs: int = 10,
    sft_lr: float = 1e-3,
    batch_size: int = 32,
    feedback_samples: int = 2,
    dpo_epochs: int = 4,
    dpo_beta: float = 0.1,
    dpo_lr: float = 3e-4,
    dpo_rpo_alpha: float = 1.0,
    rm_epochs: int = 2,
    rm_lr: float = 3e-4,
    ppo_iterations: int = 60,
    ppo_lr: float = 3e-5,
    ppo_kl_coef: float = 0.1,
    eval_temperature: float = 0.7,
    eval_top_p: float = 0.9,
    seed: int = 0,
    shared_dir: Optional[str] = None,
    progress: bool = True,
) -> list:
    """Runs (or resumes) the miniature; returns the result rows. The world's knobs
    (teacher strengths, the web corpus's quality, the critic's and the judge's strength /
    noise / position bias) are gin bindings of `synthetic_world`.

    What each setting stands for: num_pretrain / pretrain_* the base model's pretraining
    (0 starts SFT from random weights); sft_fraction the paper's 10% split; sft_epochs /
    sft_small_epochs SFT on 100% / 10% of the prompts; feedback_samples policy samples per
    feedback prompt, each judged against the teacher's completion (the paper: 1);
    dpo_* / rm_* / ppo_* the RL stages; eval_* the paper's evaluation sampling.
    shared_dir: where the tokenizer, the web corpus and the base model live (default
    out_dir), so that runs differing only in later knobs (a sweep over teacher and critic
    strengths) pretrain once; it refuses settings other than those it was made with."""
    unknown = set(arms) - set(ARMS)
    if unknown:
        raise ValueError(f"unknown arms {sorted(unknown)}; choose from {ARMS}")
    for name, v in (("num_prompts", num_prompts), ("num_eval", num_eval), ("batch_size", batch_size),
                    ("feedback_samples", feedback_samples), ("hidden_size", hidden_size), ("num_layers", num_layers)):
        if v <= 0:
            raise ValueError(f"run_miniature.{name} must be > 0, got {v}")
    if num_pretrain < 0:
        raise ValueError(f"run_miniature.num_pretrain must be >= 0 (0: no pretraining), got {num_pretrain}")
    os.makedirs(out_dir, exist_ok=True)
    p = functools.partial(os.path.join, out_dir)
    shared = functools.partial(os.path.join, shared_dir or out_dir)
    world = synthetic_world()
    _claim_shared(shared_dir, {"seed": seed, "num_prompts": num_prompts, "num_eval": num_eval,
                               "num_pretrain": num_pretrain, "hidden_size": hidden_size, "num_layers": num_layers,
                               "pretrain_epochs": pretrain_epochs, "pretrain_lr": pretrain_lr,
                               "batch_size": batch_size, "web_quality": world.models["web"].strength})
    one_device = functools.partial(shd.make_mesh, 1, 1, 1, devices=jax.devices()[:1])

    # -- prompts and tokenizer. The web corpus comes last so that the paper's prompts and the
    # eval set are the same for any num_pretrain; all are distinct instructions.
    texts = make_instructions(num_prompts + num_eval + num_pretrain, seed=seed)
    if not _done(p("data", "prompts", "feedback")):
        write_jsonl(p("prompts.jsonl"), ({"prompt": t} for t in texts[:num_prompts]))
        write_jsonl(p("eval_prompts.jsonl"), ({"prompt": t} for t in texts[num_prompts:num_prompts + num_eval]))
        prepare_prompts(p("prompts.jsonl"), p("data"), format="plain", sft_fraction=sft_fraction)
    if not os.path.exists(shared("pretrain_prompts.jsonl")):
        write_jsonl(shared("pretrain_prompts.jsonl"), ({"prompt": t} for t in texts[num_prompts + num_eval:]))
    tok_dir = shared("tokenizer")
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        build_test_tokenizer(tok_dir, texts=texts + [" ".join(vocabulary()), "Human: Assistant:"], vocab_size=1000)

    rl_arms = [a for a in arms if a in RL_START]
    starts = dict(RL_START[a] for a in rl_arms)  # SFT arm an RL arm starts from -> its teacher
    with ServerThread(make_app(world)) as srv:
        def client(model):
            return FeedbackClient(model=model, cache_path=(shared if model == "web" else p)("cache", f"{model}.jsonl"),
                                  base_url=srv.url,
                                  api_key_env="RLAIF_MINIATURE_NO_KEY", max_concurrency=32, progress=progress)

        def ask_teacher(model, prompts, out):
            if not _done(out):
                teacher_stage(prompts=prompts, out_dir=out, client=client(model), temperature=0.0)

        # -- teachers
        for teacher in ("weak-teacher", "strong-teacher"):
            for split in ("sft", "feedback"):
                ask_teacher(teacher, p("data", "prompts", split), p("data", teacher, split))
        ref_out = p("data", "reference", "eval")
        ask_teacher("reference", p("eval_prompts.jsonl"), ref_out)
        if num_pretrain:
            ask_teacher("web", shared("pretrain_prompts.jsonl"), shared("data", "web", "pretrain"))

        # -- the base model, then the SFT arms from it
        from rlaif_jax.data.pipeline.batches import as_document_stream
        from rlaif_jax.data.pipeline.builders import preference_pipeline, sft_pipeline

        vocab = len(load_tokenizer(tok_dir))
        cfg = DecoderConfig(vocab_size=vocab, hidden_size=hidden_size, intermediate_size=int(hidden_size * 8 / 3) // 8 * 8,
                            num_layers=num_layers, num_heads=4, num_kv_heads=2, max_position_embeddings=256,
                            bos_token_id=1, eos_token_id=2, pad_token_id=0)
        seq = dict(seq_len=64, max_length=64, max_prompt_length=32, batch_size=batch_size, prefetch=0)

        def sft(run, dirs, epochs, lr, init_from, pretrain=False):
            run_dir = (shared if pretrain else p)("runs", run)
            if _done(run_dir):
                return
            # Pretraining reads transcripts as one stream separated by EOS (packed rows; see
            # as_document_stream), so EOS is a trained input where the reward model reads.
            data = (dict(packing=True, transform=as_document_stream) if pretrain else {})
            train(run_dir=run_dir, objective=SFT(), num_steps=None,
                  model_config=None if init_from else cfg, init_from=init_from, tokenizer=tok_dir,
                  train_data=functools.partial(sft_pipeline, dirs, num_epochs=epochs, seed=seed, **seq, **data),
                  optimizer=functools.partial(make_optimizer, learning_rate=lr, clip_norm=10.0),
                  mesh=one_device, log_every=20, seed=seed, async_checkpoint=False)

        base = None
        if num_pretrain:
            sft("base", [shared("data", "web", "pretrain")], pretrain_epochs, pretrain_lr, None, pretrain=True)
            base = shared("runs", "base", "hf")
        sft_data = {
            "sft_weak_10": (["weak-teacher"], ["sft"], sft_small_epochs),
            "sft_strong_10": (["strong-teacher"], ["sft"], sft_small_epochs),
            "sft_weak_100": (["weak-teacher"], ["sft", "feedback"], sft_epochs),
            "sft_strong_100": (["strong-teacher"], ["sft", "feedback"], sft_epochs),
        }
        needed_sft = {a for a in arms if a in sft_data} | set(starts)
        for arm in sorted(needed_sft):
            (teacher,), splits, epochs = sft_data[arm]
            sft(arm, [p("data", teacher, s) for s in splits], epochs, sft_lr, base)

        # -- AI feedback on the 90%: policy samples vs the SFT teacher's completions
        for start, teacher in sorted(starts.items()):
            fb = functools.partial(p, "data", "feedback", start)
            comps = []
            for k in range(feedback_samples):
                samples, judged = fb("samples", str(k)), fb("comparisons", str(k))
                if not _done(samples):
                    policy_samples_stage(hf_dir=p("runs", start, "hf"), prompts=p("data", "prompts", "feedback"),
                                         out_dir=samples, source_model=start,
                                         sampling=SamplingSettings(max_length=64, max_prompt_length=32, temperature=1.0,
                                                                   top_p=0.9, seed=seed + 1000 * k))
                if not _done(judged):
                    critic_stage(responses_1=samples, responses_2=p("data", teacher, "feedback"), out_dir=judged,
                                 client=client("critic"), judge=JudgeSettings(seed=seed + 1000 * k))
                comps.append(judged)
            if not _done(fb("preferences")):
                preferences_stage(comparisons=comps, out_dir=fb("preferences"))

        # -- RL
        def rl_train(run, objective, prefs, epochs, lr, init_from):
            if not _done(p("runs", run)):
                train(run_dir=p("runs", run), objective=objective, num_steps=None, init_from=init_from,
                      train_data=functools.partial(preference_pipeline, prefs, seed=seed, num_epochs=epochs, **seq),
                      optimizer=functools.partial(make_optimizer, learning_rate=lr, clip_norm=10.0),
                      mesh=one_device, log_every=10, seed=seed, async_checkpoint=False)

        for arm in rl_arms:
            start = RL_START[arm][0]
            prefs, start_hf = p("data", "feedback", start, "preferences"), p("runs", start, "hf")
            if arm.startswith("dpo_"):
                rl_train(arm, DPO(beta=dpo_beta, rpo_alpha=dpo_rpo_alpha), prefs, dpo_epochs, dpo_lr, start_hf)
                continue
            rm = "rm_" + arm.split("_", 1)[1]
            rl_train(rm, RewardModel(), prefs, rm_epochs, rm_lr, start_hf)
            if not _done(p("runs", arm)):
                train_ppo(run_dir=p("runs", arm), policy=start_hf, reward_model=p("runs", rm, "hf"),
                          prompts=p("data", "prompts", "feedback"), num_iterations=ppo_iterations,
                          config=PPOConfig(rollout_batch_size=32, mini_batch_size=16, ppo_epochs=2,
                                           max_new_tokens=16, max_prompt_length=32, missing_eos_penalty=1.0),
                          kl=KLController(init_coef=ppo_kl_coef),
                          optimizer=functools.partial(make_optimizer, learning_rate=ppo_lr),
                          mesh=one_device, seed=seed, log_every=5)

        # -- evaluation against the reference, judged by the evaluation judge
        rows, per_prompt = [], {}
        for arm in arms:
            gen, judged = p("eval", arm, "generations"), p("eval", arm, "judgments")
            if not _done(gen):
                policy_samples_stage(hf_dir=p("runs", arm, "hf"), prompts=p("eval_prompts.jsonl"), out_dir=gen,
                                     source_model=arm,
                                     sampling=SamplingSettings(max_length=64, max_prompt_length=32,
                                                               temperature=eval_temperature, top_p=eval_top_p, seed=seed))
            if not _done(judged):
                critic_stage(responses_1=gen, responses_2=ref_out, out_dir=judged, client=client("judge"),
                             judge=JudgeSettings(seed=seed + 1))
            comps = load_comparisons(judged)
            samples = list(read_records(gen))
            prefs = preferences_from_verdicts([c["verdict"] for c in comps], policy_is="first")
            per_prompt[arm] = {"win": {c["prompt_id"]: float(x) for c, x in zip(comps, prefs)},
                               "task": task_scores(samples)}
            row = {"arm": arm, "label": LABELS[arm], **_win_row(score_win_rate(prefs)), **task_accuracy(samples)}
            rows.append(row)
            with open(p("eval", arm, "metrics.json"), "w") as f:
                json.dump(row, f, indent=2)
        critic = {start: critic_policy_preferred([c for k in range(feedback_samples)
                                                  for c in load_comparisons(p("data", "feedback", start, "comparisons", str(k)))])
                  for start in sorted(starts)}
    ref_samples = [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "completion": r["completion"]}
                   for r in read_records(ref_out)]
    found = F.findings(per_prompt)
    env = environment.describe()
    write_report(out_dir, rows, task_accuracy(ref_samples), found, critic, env)
    # One flat summary per miniature, so sweeps (rlaif_jax.sweep) can tabulate runs.
    summary = {f"{r['arm']}/{k}": r[k] for r in rows for k in ("win_rate", "se", "task_score", "task_exact")}
    summary.update(F.flatten(found))
    summary.update({f"critic/{start}/policy_preferred": c["policy_preferred"] for start, c in critic.items()})
    summary["environment"] = env
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return rows


def write_report(out_dir: str, rows: list, reference: dict, found: list, critic: dict, env: dict) -> None:
    cols = ["label", "win_rate", "se", "task_score", "task_exact", "wins", "losses", "ties", "invalid", "n"]
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["arm"] + cols)
        w.writeheader()
        w.writerows([{k: r[k] for k in ["arm"] + cols} for r in rows])
    lines = [
        "| arm | win rate vs reference (%) | task score (%) | exact (%) | W / L / T / invalid |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['label']} | {r['win_rate']:.1f} +- {r['se']:.1f} | {r['task_score']:.1f} | "
                     f"{r['task_exact']:.1f} | {r['wins']} / {r['losses']} / {r['ties']} / {r['invalid']} |")
    lines.append(f"\nReference model: task score {reference['task_score']:.1f}%, exact {reference['task_exact']:.1f}%.")
    for start, c in critic.items():
        lines.append(f"Critic preferred the {LABELS[start]} policy's sample over its teacher's completion "
                     f"{c['policy_preferred']:.1f}% of {c['decided']} decided pairs (paper, GPT-4 critic on "
                     "Llama-7B SFT vs ChatGPT: 14.3%).")
    if found:
        lines += ["", F.markdown(found)]
    lines += ["", f"Computed with {environment.one_line(env)}."]
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    labels = [r["label"] for r in rows]
    axes[0].bar(range(len(rows)), [r["win_rate"] for r in rows], yerr=[r["se"] for r in rows], capsize=4,
                color="tab:blue")
    axes[0].axhline(50, color="grey", lw=0.8, ls="--")
    axes[0].set_ylabel("win rate vs reference (%)")
    axes[1].bar(range(len(rows)), [r["task_score"] for r in rows], color="tab:green")
    axes[1].axhline(reference["task_score"], color="grey", lw=0.8, ls="--", label="reference")
    axes[1].set_ylabel("true task score (%)")
    axes[1].legend()
    for ax in axes:
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, rotation=25, ha="right", fontsize=8)
    fig.suptitle("RLAIF in miniature: win rate judged by the AI judge, and true task score")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "results.png"), dpi=120)
    plt.close(fig)
