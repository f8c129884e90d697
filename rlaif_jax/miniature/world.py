"""The miniature's synthetic world: checkable instructions, the teachers' completions, the
tokenizer, a tiny pretrained base model, served over the OpenAI-compatible API on 127.0.0.1;
and how a policy is evaluated in it (sampled on held-out prompts, judged pairwise against the
reference model's answers by a separate judge, scored by the task the world knows).

out_dir/
  prompts.jsonl, eval_prompts.jsonl      the paper's prompts and the held-out evaluation set
  data/prompts/{sft,feedback}            split by order into 10% SFT / 90% feedback
  data/teachers/<model>/demonstrations/<split>   weak- and strong-teacher completions
  data/reference/eval                    the reference model's answers to the eval prompts
  cache/<model>.jsonl                    the API answers (critic, judge, teachers)
  (shared_dir or out_dir)/tokenizer, data/web/pretrain, runs/base   the base model and its corpus
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional, Sequence

import jax

from rlaif_jax import fileio
from rlaif_jax import sharding as shd
from rlaif_jax.data.pipeline.batches import as_document_stream
from rlaif_jax.data.pipeline.builders import sft_pipeline
from rlaif_jax.data.prompts.prepare import prepare_prompts
from rlaif_jax.data.records import read_records
from rlaif_jax.data.tokenize.tokenizer import build_test_tokenizer, load_tokenizer
from rlaif_jax.errors import ConfigError
from rlaif_jax.feedback.client import FeedbackClient
from rlaif_jax.feedback.settings import JudgeSettings, SamplingSettings
from rlaif_jax.feedback.stages import critic_stage, load_comparisons, policy_samples_stage, teacher_stage
from rlaif_jax.fileio import write_jsonl
from rlaif_jax.models import DecoderConfig
from rlaif_jax.pipeline.runner import is_complete
from rlaif_jax.synthetic.tasks import make_instructions, parse_instruction, score, vocabulary
from rlaif_jax.train import SFT, make_optimizer
from rlaif_jax.train.loop import train
from rlaif_jax.train.run_loop import LoopSettings
from rlaif_jax.winrate import preferences_from_verdicts, verdict_win_rate
from rlaif_jax.winrate import win_rate as score_win_rate  # win_rate here takes comparisons

MAX_PROMPT_TOKENS = 32  # a prompt's tokens in every stage (longer ones keep their end)
PRETRAIN_SEQ_LEN = 64  # the web corpus is packed into windows of this many tokens
REFERENCE = ("data", "reference", "eval")


def teacher_dir(out_dir: str, model: str, split: str) -> str:
    """Where a teacher's completions live: an arm's layout (rlaif_jax.pipeline.context)."""
    return os.path.join(out_dir, "data", "teachers", model, "demonstrations", split)


@dataclasses.dataclass(frozen=True)
class World:
    """What every arm of the miniature shares: its directories, the tokenizer, the model's
    shape, the base model and the synthetic world's API address."""

    out_dir: str
    shared_dir: str
    tokenizer: str
    model_config: DecoderConfig
    base: Optional[str]
    url: str
    seed: int
    progress: bool

    def path(self, *parts: str) -> str:
        return os.path.join(self.out_dir, *parts)

    def shared(self, *parts: str) -> str:
        return os.path.join(self.shared_dir, *parts)

    def client(self, model: str, cache_path: Optional[str] = None) -> FeedbackClient:
        # The web corpus lives beside the base model it pretrains, so its answers are cached there.
        default = (self.shared if model == "web" else self.path)("cache", f"{model}.jsonl")
        return FeedbackClient(
            model=model,
            cache_path=cache_path or default,
            base_url=self.url,
            api_key_env="RLAIF_MINIATURE_NO_KEY",
            max_concurrency=32,
            progress=self.progress,
        )


def seq(seq_len: int, batch_size: int) -> dict:
    """A data pipeline's lengths and batch: rows of seq_len tokens, prompts of at most
    MAX_PROMPT_TOKENS (longer ones keep their end)."""
    return dict(
        seq_len=seq_len, max_length=seq_len, max_prompt_length=MAX_PROMPT_TOKENS, batch_size=batch_size, prefetch=0
    )


def one_device_mesh():
    """One device: the miniature's models are tiny, and one device is what every reader has.
    (A function, not a partial over the devices: gin copies what it binds.)"""
    return shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def claim_shared(shared_dir: Optional[str], settings: dict) -> None:
    """Records what a shared directory's base model was made with; refuses other settings
    (a base pretrained with other knobs would silently change every arm)."""
    if not shared_dir:
        return
    os.makedirs(shared_dir, exist_ok=True)
    path = os.path.join(shared_dir, "settings.json")
    if os.path.exists(path):
        made = fileio.read_json(path)
        diff = {k: (made.get(k), v) for k, v in settings.items() if made.get(k) != v}
        if diff:
            raise ConfigError(
                f"run_miniature.shared_dir={shared_dir!r} holds a base made with other settings "
                f"(was, now): {diff}; use another shared_dir or the same settings"
            )
        return
    fileio.write_json(path, settings)


def make_world(
    out_dir: str,
    shared_dir: Optional[str],
    url: str,
    *,
    seed: int,
    num_prompts: int,
    num_eval: int,
    num_pretrain: int,
    sft_fraction: float,
    hidden_size: int,
    num_layers: int,
    pretrain_epochs: int,
    pretrain_lr: float,
    batch_size: int,
    progress: bool,
) -> World:
    """The world the arms share: the prompts, the teachers' completions, the tokenizer and
    the pretrained base model (each made once, then found on disk)."""
    p = functools.partial(os.path.join, out_dir)
    shared = functools.partial(os.path.join, shared_dir or out_dir)
    # The web corpus comes last so that the paper's prompts and the eval set are the same for
    # any num_pretrain; all are distinct instructions.
    texts = make_instructions(num_prompts + num_eval + num_pretrain, seed=seed)
    if not is_complete(p("data", "prompts", "feedback")):
        write_jsonl(p("prompts.jsonl"), ({"prompt": t} for t in texts[:num_prompts]))
        write_jsonl(p("eval_prompts.jsonl"), ({"prompt": t} for t in texts[num_prompts : num_prompts + num_eval]))
        prepare_prompts(p("prompts.jsonl"), p("data"), format="plain", sft_fraction=sft_fraction)
    if not os.path.exists(shared("pretrain_prompts.jsonl")):
        write_jsonl(shared("pretrain_prompts.jsonl"), ({"prompt": t} for t in texts[num_prompts + num_eval :]))
    tok_dir = shared("tokenizer")
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        build_test_tokenizer(tok_dir, texts=texts + [" ".join(vocabulary()), "Human: Assistant:"], vocab_size=1000)
    cfg = DecoderConfig(
        vocab_size=len(load_tokenizer(tok_dir)),
        hidden_size=hidden_size,
        intermediate_size=int(hidden_size * 8 / 3) // 8 * 8,
        num_layers=num_layers,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    world = World(
        out_dir=out_dir,
        shared_dir=shared_dir or out_dir,
        tokenizer=tok_dir,
        model_config=cfg,
        base=shared("runs", "base", "hf") if num_pretrain else None,
        url=url,
        seed=seed,
        progress=progress,
    )

    def ask_teacher(model, prompts, out):
        if not is_complete(out):
            teacher_stage(prompts=prompts, out_dir=out, client=world.client(model), temperature=0.0)

    for teacher in ("weak-teacher", "strong-teacher"):
        for split in ("sft", "feedback"):
            ask_teacher(teacher, p("data", "prompts", split), teacher_dir(out_dir, teacher, split))
    ask_teacher("reference", p("eval_prompts.jsonl"), p(*REFERENCE))
    if num_pretrain:
        ask_teacher("web", shared("pretrain_prompts.jsonl"), shared("data", "web", "pretrain"))
        # The base model: a tiny Llama pretrained on the web corpus. It reads transcripts as
        # one stream separated by EOS (packed rows; see as_document_stream), so EOS is a
        # trained input where the reward model reads.
        if not is_complete(shared("runs", "base")):
            train(
                run_dir=shared("runs", "base"),
                objective=SFT(),
                num_steps=None,
                model_config=cfg,
                tokenizer=tok_dir,
                train_data=functools.partial(
                    sft_pipeline,
                    [shared("data", "web", "pretrain")],
                    num_epochs=pretrain_epochs,
                    seed=seed,
                    packing=True,
                    transform=as_document_stream,
                    **seq(PRETRAIN_SEQ_LEN, batch_size),
                ),
                optimizer=functools.partial(make_optimizer, learning_rate=pretrain_lr, clip_norm=10.0),
                mesh=one_device_mesh,
                seed=seed,
                loop=LoopSettings(log_every=20, async_checkpoint=False),
            )
    return world


# -- evaluation in the world -------------------------------------------------------------


def sample(hf_dir: str, prompts: str, out: str, temperature: float, top_p: float, seed: int, source: str) -> None:
    policy_samples_stage(
        hf_dir=hf_dir,
        prompts=prompts,
        out_dir=out,
        source_model=source,
        sampling=SamplingSettings(
            max_length=64, max_prompt_length=MAX_PROMPT_TOKENS, temperature=temperature, top_p=top_p, seed=seed
        ),
    )


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """The miniature's evaluation of a policy, as an arm's evaluator (run_arm.evaluator): sampled
    on the held-out prompts (the paper's T=0.7, top_p 0.9), judged pairwise against the
    reference model's answers by the evaluation judge; out_dir/metrics.json (written last)
    holds the win rate +- SE and the W / L / T / invalid counts (the world's task score is the
    arm's eval_scores: task_accuracy)."""

    world: World
    temperature: float
    top_p: float

    def __call__(self, out_dir: str, policy: str, name: str) -> None:
        w = self.world
        gen, judged = os.path.join(out_dir, "generations"), os.path.join(out_dir, "judgments")
        if not is_complete(gen):
            sample(policy, w.path("eval_prompts.jsonl"), gen, self.temperature, self.top_p, w.seed, name)
        if not is_complete(judged):
            critic_stage(
                responses_1=gen,
                responses_2=w.path(*REFERENCE),
                out_dir=judged,
                client=w.client("judge"),
                judge=JudgeSettings(seed=w.seed + 1),
            )
        fileio.write_json(os.path.join(out_dir, "metrics.json"), win_rate(load_comparisons(judged)))


def win_rate(comparisons: Sequence[dict]) -> dict:
    """The policy (response_1) against the reference (response_2), as AlpacaEval scores it
    (rlaif_jax.winrate): ties 0.5, invalid judgments counted apart, never scored."""
    return _win_row(verdict_win_rate([c["verdict"] for c in comparisons], policy_is="first"))


def _win_row(wr) -> dict:
    return {
        "win_rate": wr.win_rate,
        "se": wr.standard_error,
        "n": wr.n_scored,
        "wins": wr.n_wins,
        "losses": wr.n_losses,
        "ties": wr.n_ties,
        "invalid": wr.n_invalid,
    }


def task_scores(samples: Sequence[dict]) -> dict:
    """prompt_id -> the world's true score of the sample, in [0, 1]."""
    return {s["prompt_id"]: score(parse_instruction(s["prompt"]), s["completion"]) for s in samples}


def task_accuracy(samples: Sequence[dict]) -> dict:
    scores = list(task_scores(samples).values())
    return {
        "task_score": 100 * sum(scores) / len(scores),
        "task_exact": 100 * sum(s == 1.0 for s in scores) / len(scores),
    }


def evaluation_row(out_dir: str) -> tuple[dict, dict]:
    """An evaluation's numbers (win rate and task score) and its per-prompt win and task
    scores (the findings pair them across arms)."""
    comps = load_comparisons(os.path.join(out_dir, "judgments"))
    samples = list(read_records(os.path.join(out_dir, "generations")))
    prefs = preferences_from_verdicts([c["verdict"] for c in comps], policy_is="first")
    per_prompt = {"win": {c["prompt_id"]: float(x) for c, x in zip(comps, prefs)}, "task": task_scores(samples)}
    return {**_win_row(score_win_rate(prefs)), **task_accuracy(samples)}, per_prompt


def reference_accuracy(world: World) -> dict:
    return task_accuracy(list(read_records(world.path(*REFERENCE))))
