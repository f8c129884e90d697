"""The paper in miniature on one CPU: every stage of the RLAIF pipeline, through the real
code paths, against a synthetic world served over the OpenAI-compatible API on 127.0.0.1.

Stages (each writes records under out_dir and is skipped when its output exists, so a
killed run resumes; API answers are cached, so nothing is asked twice):
  prompts       checkable instructions, split by order into 10% SFT / 90% feedback, plus a
                held-out evaluation set
  teachers      weak- and strong-teacher completions (teacher stage, real client)
  sft           SFT on weak 10%, weak 100%, strong 100% (and strong 10% if asked)
  feedback      samples of SFT(weak 10%) on the feedback prompts vs the weak teacher's
                completions, judged by the critic (order randomised, invalid kept apart),
                turned into preference pairs
  rl            DPO, and a Bradley-Terry reward model + PPO, both from SFT(weak 10%)
  evaluate      every arm sampled on the held-out prompts (T=0.7, top_p 0.9, as the paper),
                judged pairwise against the reference model's answers by the critic;
                win rate +- SE, and the task accuracy the synthetic world knows
  report        results.md / results.csv / results.png
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import os
from typing import Sequence

import gin
import jax

from rlaif_jax import sharding as shd
from rlaif_jax.data.prompts.prepare import prepare_prompts
from rlaif_jax.data.records import read_records
from rlaif_jax.data.tokenize.tokenizer import build_test_tokenizer, load_tokenizer
from rlaif_jax.eval.winrate import verdict_win_rate
from rlaif_jax.feedback.client import FeedbackClient
from rlaif_jax.feedback.server import ServerThread, make_app
from rlaif_jax.feedback.stages import critic_stage, load_comparisons, policy_samples_stage, preferences_stage, teacher_stage
from rlaif_jax.fileio import write_jsonl
from rlaif_jax.models import DecoderConfig
from rlaif_jax.synthetic.backend import synthetic_world
from rlaif_jax.synthetic.tasks import make_instructions, parse_instruction, score, vocabulary
from rlaif_jax.train import DPO, SFT, RewardModel, make_optimizer
from rlaif_jax.train.advantages import KLController
from rlaif_jax.train.loop import train
from rlaif_jax.train.ppo import PPOConfig, train_ppo

log = logging.getLogger(__name__)

ARMS = ("sft_weak_10", "sft_weak_100", "sft_strong_100", "sft_strong_10", "dpo_weak_10", "ppo_weak_10")
LABELS = {
    "sft_weak_10": "SFT weak 10%", "sft_weak_100": "SFT weak 100%", "sft_strong_100": "SFT strong 100%",
    "sft_strong_10": "SFT strong 10%", "dpo_weak_10": "SFT weak 10% + DPO", "ppo_weak_10": "SFT weak 10% + PPO",
}


def _done(path: str) -> bool:
    return os.path.exists(os.path.join(path, "manifest.json")) or os.path.exists(os.path.join(path, "summary.json"))


def win_rate(comparisons: Sequence[dict]) -> dict:
    """The policy (response_1) against the reference (response_2), as AlpacaEval scores it
    (rlaif_jax.eval.winrate): ties 0.5, invalid judgments counted apart, never scored."""
    wr = verdict_win_rate([c["verdict"] for c in comparisons], policy_is="first")
    return {"win_rate": wr.win_rate, "se": wr.standard_error, "n": wr.n_scored, "wins": wr.n_wins,
            "losses": wr.n_losses, "ties": wr.n_ties, "invalid": wr.n_invalid}


def task_accuracy(samples: Sequence[dict]) -> dict:
    scores = [score(parse_instruction(s["prompt"]), s["completion"]) for s in samples]
    return {"task_score": 100 * sum(scores) / len(scores), "task_exact": 100 * sum(s == 1.0 for s in scores) / len(scores)}


@gin.configurable
def run_miniature(
    out_dir: str = "runs/miniature",
    num_prompts: int = 1000,
    num_eval: int = 200,
    sft_fraction: float = 0.1,
    arms: Sequence[str] = ("sft_weak_10", "sft_weak_100", "sft_strong_100", "dpo_weak_10", "ppo_weak_10"),
    hidden_size: int = 128,
    num_layers: int = 2,
    sft_epochs: int = 20,
    sft_small_epochs: int = 60,
    sft_lr: float = 3e-3,
    batch_size: int = 32,
    dpo_epochs: int = 3,
    dpo_beta: float = 0.1,
    dpo_lr: float = 3e-4,
    rm_epochs: int = 2,
    ppo_iterations: int = 60,
    ppo_lr: float = 3e-4,
    ppo_kl_coef: float = 0.05,
    eval_temperature: float = 0.7,
    eval_top_p: float = 0.9,
    seed: int = 0,
    progress: bool = True,
) -> list:
    """Runs (or resumes) the miniature; returns the result rows. The world's knobs
    (teacher strengths, critic strength / noise / position bias) are gin bindings of
    `synthetic_world`."""
    unknown = set(arms) - set(ARMS)
    if unknown:
        raise ValueError(f"unknown arms {sorted(unknown)}; choose from {ARMS}")
    os.makedirs(out_dir, exist_ok=True)
    p = functools.partial(os.path.join, out_dir)
    one_device = functools.partial(shd.make_mesh, 1, 1, 1, devices=jax.devices()[:1])

    # -- prompts and tokenizer
    texts = make_instructions(num_prompts + num_eval, seed=seed)
    if not _done(p("data", "prompts", "feedback")):
        write_jsonl(p("prompts.jsonl"), ({"prompt": t} for t in texts[:num_prompts]))
        write_jsonl(p("eval_prompts.jsonl"), ({"prompt": t} for t in texts[num_prompts:]))
        prepare_prompts(p("prompts.jsonl"), p("data"), format="plain", sft_fraction=sft_fraction)
    tok_dir = p("tokenizer")
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        build_test_tokenizer(tok_dir, texts=texts + [" ".join(vocabulary()), "Human: Assistant:"], vocab_size=1000)

    world = synthetic_world()
    with ServerThread(make_app(world)) as srv:
        def client(model):
            return FeedbackClient(model=model, cache_path=p("cache", f"{model}.jsonl"), base_url=srv.url,
                                  api_key_env="RLAIF_MINIATURE_NO_KEY", max_concurrency=32, progress=progress)

        # -- teachers
        for teacher in ("weak-teacher", "strong-teacher"):
            for split in ("sft", "feedback"):
                out = p("data", teacher, split)
                if not _done(out):
                    teacher_stage(prompts=p("data", "prompts", split), out_dir=out, client=client(teacher),
                                  temperature=0.0)
        ref_out = p("data", "reference", "eval")
        if not _done(ref_out):
            teacher_stage(prompts=p("eval_prompts.jsonl"), out_dir=ref_out, client=client("reference"),
                          temperature=0.0)

        # -- SFT arms
        from rlaif_jax.data.pipeline.builders import preference_pipeline, sft_pipeline

        vocab = len(load_tokenizer(tok_dir))
        cfg = DecoderConfig(vocab_size=vocab, hidden_size=hidden_size, intermediate_size=int(hidden_size * 8 / 3) // 8 * 8,
                            num_layers=num_layers, num_heads=4, num_kv_heads=2, max_position_embeddings=256,
                            bos_token_id=1, eos_token_id=2, pad_token_id=0)
        seq = dict(seq_len=64, max_length=64, max_prompt_length=32, batch_size=batch_size, prefetch=0)
        sft_data = {
            "sft_weak_10": ([p("data", "weak-teacher", "sft")], sft_small_epochs),
            "sft_strong_10": ([p("data", "strong-teacher", "sft")], sft_small_epochs),
            "sft_weak_100": ([p("data", "weak-teacher", "sft"), p("data", "weak-teacher", "feedback")], sft_epochs),
            "sft_strong_100": ([p("data", "strong-teacher", "sft"), p("data", "strong-teacher", "feedback")], sft_epochs),
        }
        needed_sft = {a for a in arms if a.startswith("sft_")} | ({"sft_weak_10"} if {"dpo_weak_10", "ppo_weak_10"} & set(arms) else set())
        for arm in sorted(needed_sft):
            dirs, epochs = sft_data[arm]
            if _done(p("runs", arm)):
                continue
            train(run_dir=p("runs", arm), objective=SFT(), num_steps=None, model_config=cfg, tokenizer=tok_dir,
                  train_data=functools.partial(sft_pipeline, dirs, num_epochs=epochs, seed=seed, **seq),
                  optimizer=functools.partial(make_optimizer, learning_rate=sft_lr, clip_norm=10.0),
                  mesh=one_device, log_every=20, seed=seed, async_checkpoint=False)

        # -- AI feedback on the 90%: policy samples vs weak-teacher completions
        base = p("runs", "sft_weak_10", "hf")
        if {"dpo_weak_10", "ppo_weak_10"} & set(arms):
            samples = p("data", "policy_samples")
            if not _done(samples):
                policy_samples_stage(hf_dir=base, prompts=p("data", "prompts", "feedback"), out_dir=samples,
                                     max_length=64, max_prompt_length=32, temperature=1.0, top_p=0.9, seed=seed,
                                     source_model="sft_weak_10")
            comps = p("data", "comparisons")
            if not _done(comps):
                critic_stage(responses_1=samples, responses_2=p("data", "weak-teacher", "feedback"), out_dir=comps,
                             client=client("critic"), seed=seed)
            prefs = p("data", "preferences")
            if not _done(prefs):
                preferences_stage(comparisons=[comps], out_dir=prefs)
            pref_data = functools.partial(preference_pipeline, prefs, seed=seed, **seq)
            if "dpo_weak_10" in arms and not _done(p("runs", "dpo_weak_10")):
                train(run_dir=p("runs", "dpo_weak_10"), objective=DPO(beta=dpo_beta), num_steps=None, init_from=base,
                      train_data=functools.partial(pref_data, num_epochs=dpo_epochs),
                      optimizer=functools.partial(make_optimizer, learning_rate=dpo_lr, clip_norm=10.0),
                      mesh=one_device, log_every=10, seed=seed, async_checkpoint=False)
            if "ppo_weak_10" in arms:
                if not _done(p("runs", "rm_weak_10")):
                    train(run_dir=p("runs", "rm_weak_10"), objective=RewardModel(), num_steps=None, init_from=base,
                          train_data=functools.partial(pref_data, num_epochs=rm_epochs),
                          optimizer=functools.partial(make_optimizer, learning_rate=dpo_lr, clip_norm=10.0),
                          mesh=one_device, log_every=10, seed=seed, async_checkpoint=False)
                if not _done(p("runs", "ppo_weak_10")):
                    train_ppo(run_dir=p("runs", "ppo_weak_10"), policy=base, reward_model=p("runs", "rm_weak_10", "hf"),
                              prompts=p("data", "prompts", "feedback"), num_iterations=ppo_iterations,
                              config=PPOConfig(rollout_batch_size=32, mini_batch_size=16, ppo_epochs=2,
                                               max_new_tokens=16, max_prompt_length=32, missing_eos_penalty=1.0),
                              kl=KLController(init_coef=ppo_kl_coef),
                              optimizer=functools.partial(make_optimizer, learning_rate=ppo_lr),
                              mesh=one_device, seed=seed, log_every=5)

        # -- evaluation against the reference, judged by the critic
        rows = []
        for arm in arms:
            hf = p("runs", arm, "hf")
            gen = p("eval", arm, "generations")
            if not _done(gen):
                policy_samples_stage(hf_dir=hf, prompts=p("eval_prompts.jsonl"), out_dir=gen, max_length=64,
                                     max_prompt_length=32, temperature=eval_temperature, top_p=eval_top_p,
                                     seed=seed, source_model=arm)
            judged = p("eval", arm, "judgments")
            if not _done(judged):
                critic_stage(responses_1=gen, responses_2=ref_out, out_dir=judged, client=client("critic"),
                             seed=seed + 1)
            comps = load_comparisons(judged)
            samples = list(read_records(gen))
            row = {"arm": arm, "label": LABELS[arm], **win_rate(comps), **task_accuracy(samples)}
            rows.append(row)
            with open(p("eval", arm, "metrics.json"), "w") as f:
                json.dump(row, f, indent=2)
    ref_samples = [{"prompt": r["prompt"], "completion": r["completion"]} for r in read_records(ref_out)]
    write_report(out_dir, rows, task_accuracy(ref_samples))
    # One flat summary per miniature, so sweeps (rlaif_jax.sweep) can tabulate runs.
    summary = {f"{r['arm']}/{k}": r[k] for r in rows for k in ("win_rate", "se", "task_score", "task_exact")}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return rows


def write_report(out_dir: str, rows: list, reference: dict) -> None:
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
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
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
    fig.suptitle("RLAIF in miniature: win rate judged by the AI critic, and true task score")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "results.png"), dpi=120)
    plt.close(fig)
