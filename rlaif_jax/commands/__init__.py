"""The `rlaif` command: one installed entry point ([project.scripts] in pyproject.toml) whose
subcommands are the project's user-facing programs.

  rlaif --help                     every subcommand with one line
  rlaif train --gin_file=configs/experiments/tiny_sft.gin
  rlaif arm --gin_file=paper/arms/dpo_gpt4_on_sft_gpt35_10pct --gin_param="ARM_DIR='runs/arm'"

COMMANDS maps each name to "module:function" and is imported lazily, so `rlaif --help`
imports neither jax nor any stage. Each function is `main(argv) -> exit status` and keeps
the flags its script had (--gin_file / --gin_param for the gin-configured ones). A
--gin_file that is not a file on disk is looked up among the recipes shipped with the
package (`rlaif recipes` lists them; rlaif_jax.cli.resolve_gin_file).
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

# name -> ("module:function", one line for `rlaif --help`). In the order a user meets them.
COMMANDS: dict[str, tuple[str, str]] = {
    "miniature": (
        "rlaif_jax.miniature.command:main",
        "the paper in miniature on one CPU: synthetic world, seven arms, the findings",
    ),
    "train": ("rlaif_jax.commands.train:main", "train an SFT, DPO-family or reward-model objective"),
    "ppo": ("rlaif_jax.commands.ppo:main", "PPO / RLOO / GRPO against a reward model"),
    "arm": (
        "rlaif_jax.pipeline.command:main",
        "one arm of the paper, every stage chained and resumable",
    ),
    "teacher": ("rlaif_jax.commands.teacher:main", "teacher completions through an OpenAI-compatible API"),
    "samples": ("rlaif_jax.commands.samples:main", "sample an SFT policy on the feedback prompts"),
    "critic": ("rlaif_jax.commands.critic:main", "the critic's pairwise judgments of two response sets"),
    "preferences": ("rlaif_jax.commands.preferences:main", "comparisons -> preference pairs and a report"),
    "labels": ("rlaif_jax.commands.labels:main", "critic ratings (or unpaired pairs) -> KTO's labelled completions"),
    "audit": ("rlaif_jax.commands.audit:main", "the teacher-critic gap audit, before any training"),
    "evaluate": ("rlaif_jax.commands.evaluate:main", "AlpacaEval-style win rates of a checkpoint or outputs"),
    "report": ("rlaif_jax.commands.report:main", "tables and plots across evaluation runs"),
    "sweep": ("rlaif_jax.commands.sweep:main", "expand a grid of bindings into runs; run, print or tabulate"),
    "plan": ("rlaif_jax.plan:main", "price a run before it runs: FLOPs, time, chip-hours, API dollars per stage"),
    "aot": ("rlaif_jax.commands.aot:main", "compile a run for a TPU slice you do not have; memory per chip"),
    "serve": ("rlaif_jax.commands.serve:main", "an OpenAI-compatible server over a checkpoint or the synthetic world"),
    "prepare": ("rlaif_jax.commands.prepare:main", "prompt sources and the paper's released data -> records"),
    "ref-logps": ("rlaif_jax.commands.ref_logps:main", "score preference pairs under the reference once"),
    "sample": ("rlaif_jax.commands.sample:main", "sample from a local HF checkpoint"),
    "bandit": ("rlaif_jax.commands.bandit:main", "the paper's bandit experiment"),
    "toy-data": ("rlaif_jax.commands.toy_data:main", "the toy world the tiny_* recipes train on"),
    "recipes": ("rlaif_jax.commands.recipes:main", "list the gin recipes shipped with the package"),
}


def usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [
        "usage: rlaif COMMAND [--help] [ARGS...]",
        "",
        "JAX-native RLAIF: SFT, DPO-family, reward-model and PPO training on AI feedback.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {line}" for name, (_, line) in COMMANDS.items()]
    lines += ["", "`rlaif COMMAND --help` shows a command's flags. Docs: README.md and docs/ in the repository."]
    return "\n".join(lines)


def load(name: str):
    """The function behind a subcommand (imports its module)."""
    module, _, fn = COMMANDS[name][0].partition(":")
    return getattr(importlib.import_module(module), fn)


def run_command(name: str, argv: Sequence[str]) -> int:
    """Runs one subcommand as its script ran: an error the user can fix is one `error:` line
    and exit status 2 (rlaif_jax.cli.run). Commands that return a result rather than a
    status (bandit) exit 0."""
    from rlaif_jax.cli import run

    fn = load(name)
    # argparse names the program after argv[0]: `rlaif train --help` says "usage: rlaif train"
    prog, sys.argv[0] = sys.argv[0], f"rlaif {name}"
    try:
        status = run(fn, list(argv))
    finally:
        sys.argv[0] = prog
    return status if isinstance(status, int) else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from rlaif_jax import __version__

        print(f"rlaif_jax {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        near = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" (did you mean `rlaif {near[0]}`?)" if near else ""
        print(f"error: no command {name!r}{hint}; `rlaif --help` lists them", file=sys.stderr)
        return 2
    return run_command(name, rest)
