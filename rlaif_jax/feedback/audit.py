"""The teacher-critic gap audit: before anything is trained, does the critic prefer the
strongest available model's completions over the candidate SFT teacher's?

The paper (Sharma et al. 2024) finds that RLAIF's gains over SFT come mostly from the SFT
teacher (GPT-3.5) being weaker than the critic (GPT-4): SFT on the critic-class model's own
completions matches or beats SFT(weak) + DPO(critic). So the question worth a few dollars
before a run is whether that gap exists for the teacher and critic at hand. The audit
samples prompts both completion sets answer (seeded), asks the critic in both presented
orders (a position-biased critic then cancels out instead of deciding the result), and
reports the critic's preference rate for the strong model with a confidence interval and
the paper's reading of it.

It is a small wrapper over the critic stage's own parts: the same FeedbackClient (cache,
retries, Batch API), judge_pairs and JudgeSettings, and the evaluation's win-rate and
standard error (rlaif_jax.winrate). The cost of the requests not yet cached is priced
and printed before any is sent, and refused above AuditSettings.max_cost_usd.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import statistics
from typing import Any, Mapping, Optional, Sequence

import gin

from rlaif_jax import fileio as fio
from rlaif_jax.environment import PACKAGES, package_versions
from rlaif_jax.errors import ConfigError, UserError, binding, existing_path, in_range, non_negative, whole
from rlaif_jax.feedback import judge as J
from rlaif_jax.feedback.client import FeedbackClient
from rlaif_jax.feedback.pricing import BATCH_DISCOUNT, price_for
from rlaif_jax.feedback.settings import JudgeSettings
from rlaif_jax.feedback.stages import (
    judge_asked,
    judge_pairs,
    judge_requests,
    judged_before,
    load_demonstrations,
    pair_tasks,
    task_key,
    write_judged,
)
from rlaif_jax.fileio import write_json
from rlaif_jax.outputs import writer_lock
from rlaif_jax.winrate import verdict_win_rate

log = logging.getLogger(__name__)
AUDIT_VERSION = 1
# The report's numbers an arm copies into its summary (as audit/<key>).
SUMMARY_KEYS = ("strong_preferred", "standard_error", "ci_low", "ci_high", "n_scored", "reading", "cost_usd")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class AuditSettings:
    """What the audit samples and how it reads the result.

    Attributes:
      sample_size: prompts judged (fewer when the two sets share fewer); 200 gives a 95%
        interval of about +-7 points around a rate near 50%.
      seed: which prompts are sampled (the order of presentation is JudgeSettings.seed's).
      confidence: the interval's coverage (normal approximation on the standard error).
      max_cost_usd: refuse to send when the priced estimate of the uncached requests is
        above this (None: no limit); an unpriced model cannot be held to it and is refused.
      split: in a chained arm, the prompt split whose completions are compared (the SFT
        teacher's training split by default: the data a distillation would replace).
    """

    sample_size: int = 200
    seed: int = 0
    confidence: float = 0.95
    max_cost_usd: Optional[float] = None
    split: str = "sft"

    def __post_init__(self):
        at = lambda field: binding(f"{type(self).__name__}.{field}")
        whole(at("sample_size"), self.sample_size, 1)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"{at('seed')} = {self.seed!r}: must be a whole number")
        in_range(at("confidence"), self.confidence, 0.5, 1.0, hi_open=True)
        non_negative(at("max_cost_usd"), self.max_cost_usd, "None for no limit")
        if not isinstance(self.split, str) or not self.split:
            raise ConfigError(f"{at('split')} = {self.split!r}: must name a prompt split ('sft' or 'feedback')")


def sample_tasks(
    teacher: Sequence[Mapping], strong: Sequence[Mapping], n: int, seed: int
) -> tuple[list[J.PairTask], dict]:
    """Pairs the two sets on prompt_id (teacher first) and draws n of the shared prompts.

    Args:
      teacher: the candidate SFT teacher's demonstrations.
      strong: the strong model's demonstrations.
      n: how many prompts to draw (all of them when fewer are shared).
      seed: the draw's seed.

    Returns:
      (tasks, join): the drawn pairs, sorted by prompt_id, and the join's counts.
    """
    tasks, join = pair_tasks(teacher, strong)
    # Sorted first, so the draw depends on the prompts and the seed, not on file order.
    tasks = sorted(tasks, key=lambda t: t.prompt_id)
    drawn = sorted(random.Random(seed).sample(tasks, min(n, len(tasks))), key=lambda t: t.prompt_id)
    return drawn, {**join, "sampled": len(drawn)}


def estimate_cost(client: FeedbackClient, requests: Sequence[Any], batch_api: bool) -> dict:
    """What sending `requests` would cost at most: those already in the client's cache are
    free; the rest are priced at the client's price for its model, with the prompt at the
    client's token estimate and the completion at its full max_tokens (an upper bound).

    Args:
      client: the client that would send them (cache and prices).
      requests: ChatRequests (duplicates are sent once, as the client does).
      batch_api: priced at the Batch API's discount.

    Returns:
      {requests, cached, to_send, prompt_tokens, completion_tokens, usd_max}; usd_max is
      None when the model has no price.
    """
    unique = {r.key: r for r in requests}
    todo = [r for k, r in unique.items() if client.cache.get(k) is None]
    out_tokens = sum(int(r.param_dict.get("max_tokens") or 0) for r in todo)
    in_tokens = sum(r.estimated_tokens() for r in todo) - out_tokens
    price = price_for(client.model, client.prices)
    usd = None
    if price is not None:
        usd = (BATCH_DISCOUNT if batch_api else 1.0) * (in_tokens * price[0] + out_tokens * price[1]) / 1e6
    return {
        "requests": len(unique),
        "cached": len(unique) - len(todo),
        "to_send": len(todo),
        "prompt_tokens": in_tokens,
        "completion_tokens": out_tokens,
        "usd_max": usd,
    }


def gap_statistics(comparisons: Sequence[Mapping], confidence: float = 0.95) -> dict:
    """The critic's preference rate for the strong model (response_2) with its interval.

    Args:
      comparisons: judge_pairs' output, teacher as response_1 and strong as response_2.
      confidence: the interval's coverage.

    Returns:
      strong_preferred (percent; ties count half, invalid answers are left out, as the
      evaluation scores a win rate), its standard error, the interval (ci_low, ci_high,
      clipped to [0, 100]), counts, and how often the two orders agreed.
    """
    wr = verdict_win_rate([c["verdict"] for c in comparisons], policy_is="second")
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    se = wr.standard_error if not math.isnan(wr.standard_error) else math.inf
    agree = [c["orders_agree"] for c in comparisons if c.get("orders_agree") is not None]
    return {
        "strong_preferred": wr.win_rate,
        "standard_error": wr.standard_error,
        "confidence": confidence,
        "ci_low": max(0.0, wr.win_rate - z * se),
        "ci_high": min(100.0, wr.win_rate + z * se),
        "n_strong": wr.n_wins,
        "n_teacher": wr.n_losses,
        "n_ties": wr.n_ties,
        "n_invalid": wr.n_invalid,
        "n_scored": wr.n_scored,
        "n_identical": sum(bool(c.get("identical")) for c in comparisons),
        "orders_agree": 100.0 * sum(agree) / len(agree) if agree else None,
    }


def reading(stats: Mapping[str, Any]) -> tuple[str, str]:
    """The paper's reading of a gap: (one word, one paragraph).

    Args:
      stats: gap_statistics' output.

    Returns:
      ("gap" | "no_gap" | "reversed" | "undecided", the text).
    """
    lo, hi, n = stats["ci_low"], stats["ci_high"], stats["n_scored"]
    ci = f"{stats['confidence']:.0%} interval {lo:.1f}-{hi:.1f}%"
    if n < 2 or math.isnan(stats["strong_preferred"]):
        return "undecided", (
            f"Too few scored comparisons ({n}) to read anything; raise the sample size or fix the invalid answers."
        )
    if lo > 50.0:
        return "gap", (
            f"The critic prefers the strong model's completions to the SFT teacher's ({ci}, above 50%). This is "
            "the setting in which the paper found RLAIF's gains over SFT to be largely an artefact of a weak SFT "
            "teacher: SFT on the strong model's completions matched or beat SFT on the weaker teacher followed by "
            "DPO on the critic's preferences. Distil the strong model first (SFT on its completions), and credit "
            "RLAIF only with what it adds on top of that baseline."
        )
    if hi < 50.0:
        return "reversed", (
            f"The critic prefers the SFT teacher's completions to the 'strong' model's ({ci}, below 50%): by this "
            "critic the named model is not the stronger one. Audit against the strongest model available (or "
            "the critic's own completions) before reading RLAIF results."
        )
    return "no_gap", (
        f"No significant preference ({ci} contains 50%; gaps outside it are unlikely at this sample size, smaller "
        "ones are not ruled out). The paper's main explanation of RLAIF's gains, a teacher weaker than the "
        "critic, does not show here. Where the paper's teacher was as strong as the critic (GPT-4 SFT on 10%, "
        "then GPT-4 DPO), RL's gains were small and varied by base model, and SFT on all of GPT-4's completions "
        "matched or beat them in most cases: expect little from RLAIF beyond SFT with this critic, and compare "
        "against SFT on the strong model's completions before crediting RL."
    )


def markdown(report: Mapping[str, Any]) -> str:
    """report.md: the numbers, the reading and what produced them."""
    s, c = report["statistics"], report["cost"]
    usd = "unpriced" if c["estimate"]["usd_max"] is None else f"at most ${c['estimate']['usd_max']:.4f}"
    lines = [
        "# Teacher-critic gap audit",
        "",
        f"Critic `{report['critic']}` compared the SFT teacher `{report['teacher_model']}` with the strong model "
        f"`{report['strong_model']}` on {report['join']['sampled']} sampled prompts (of {report['join']['paired']} "
        "both answer), each in both presented orders.",
        "",
        "| strong preferred (%) | SE | interval | strong / teacher / tie / invalid | orders agree (%) |",
        "|---|---|---|---|---|",
        f"| {s['strong_preferred']:.1f} | {s['standard_error']:.1f} | {s['ci_low']:.1f}-{s['ci_high']:.1f} "
        f"({s['confidence']:.0%}) | {s['n_strong']} / {s['n_teacher']} / {s['n_ties']} / {s['n_invalid']} | "
        f"{'-' if s['orders_agree'] is None else format(s['orders_agree'], '.1f')} |",
        "",
        f"**Reading: {report['reading']}.** {report['reading_text']}",
        "",
        f"Cost: estimated {usd} for {c['estimate']['to_send']} uncached requests ({c['estimate']['cached']} "
        f"cached); spent ${c['api']['cost_usd']:.4f} ({c['api']['requests']} requests, {c['api']['cached']} "
        "cached).",
        # The split is the arm's choice of directories; here the directories are named above.
        f"Settings: { {k: v for k, v in report['settings'].items() if k != 'split'} }; judge {report['judge']}.",
        f"Completions: teacher `{report['teacher']}`, strong `{report['strong']}`.",
        "Packages: " + ", ".join(f"{k} {v}" for k, v in report["packages"].items() if v) + ".",
    ]
    return "\n".join(lines) + "\n"


@gin.configurable
def audit_gap(
    teacher: str = gin.REQUIRED,
    strong: str = gin.REQUIRED,
    out_dir: str = gin.REQUIRED,
    client: FeedbackClient = gin.REQUIRED,
    judge: Optional[JudgeSettings] = None,
    settings: Optional[AuditSettings] = None,
) -> dict:
    """Audits the gap between the SFT teacher's completions and the strong model's.

    Writes out_dir/comparisons.jsonl (every judgment, both views), report.md and, last,
    metrics.json (the report: its presence marks the audit done).

    Args:
      teacher: the candidate SFT teacher's demonstrations (record set or JSONL).
      strong: the strongest available model's (or the critic's own) on the same prompts.
      out_dir: where the report goes.
      client: the critic's client (its cache makes a rerun free).
      judge: how the critic is asked; None builds JudgeSettings from gin in the caller's
        scope. Always asked in both orders; pairwise only.
      settings: the sample and its reading; None builds AuditSettings from gin.

    Returns:
      The report (metrics.json's content).
    """
    judge = judge if judge is not None else JudgeSettings()
    settings = settings if settings is not None else AuditSettings()
    if judge.mode != "pairwise":
        raise ConfigError(
            f"{binding('JudgeSettings.mode')} = {judge.mode!r}: the audit asks for a preference "
            "between two completions; use 'pairwise'"
        )
    # Both orders: a critic that favours one position would otherwise decide the rate.
    judge = dataclasses.replace(judge, both_orders=True)
    existing_path(binding("audit_gap.teacher"), teacher, "demonstration set (the SFT teacher's completions)")
    existing_path(binding("audit_gap.strong"), strong, "demonstration set (the strong model's completions)")
    with writer_lock(out_dir, "audit_gap.out_dir"):
        fio.makedirs(out_dir)
        first = load_demonstrations(teacher, binding("audit_gap.teacher"))
        second = load_demonstrations(strong, binding("audit_gap.strong"))
        tasks, join = sample_tasks(first, second, settings.sample_size, settings.seed)
        if not tasks:
            raise UserError(
                f"audit_gap.teacher = {teacher!r} ({len(first)} completions) and audit_gap.strong = "
                f"{strong!r} ({len(second)}) share no prompt_id; give two sets answering the same "
                "prompts (nothing was sent or written)"
            )
        template = J.load_template(judge.template)
        # Judgments an earlier audit in out_dir wrote, asked the same way: not asked (or paid) again.
        asked = {"model": client.model, **judge_asked(judge, template)}
        kept = judged_before(out_dir, "comparisons.jsonl", asked)
        _, requests = judge_requests(client, [t for t in tasks if task_key(t) not in kept], judge, template)
        estimate = estimate_cost(client, requests, judge.batch_api)
        usd = "unpriced model" if estimate["usd_max"] is None else f"at most ${estimate['usd_max']:.4f}"
        print(
            f"audit: {len(tasks)} prompts, {estimate['requests']} critic requests ({client.model}), "
            f"{estimate['cached']} cached, {estimate['to_send']} to send: {usd}",
            flush=True,
        )
        limit = settings.max_cost_usd
        if limit is not None and estimate["to_send"]:
            if estimate["usd_max"] is None:
                raise UserError(
                    f"{binding('AuditSettings.max_cost_usd')} = {limit}: the critic {client.model!r} has "
                    "no price, so the audit cannot be held to the limit; set FeedbackClient.prices for "
                    "it, or the limit to None (nothing was sent)"
                )
            if estimate["usd_max"] > limit:
                raise UserError(
                    f"{binding('AuditSettings.max_cost_usd')} = {limit}: the audit would cost {usd}; "
                    "raise the limit or lower AuditSettings.sample_size (nothing was sent)"
                )
        comps = judge_pairs(client, tasks, judge, template, kept=kept)
        stats = gap_statistics(comps, settings.confidence)
        word, text = reading(stats)
        report = {
            "audit_version": AUDIT_VERSION,
            "critic": judge.name or client.model,
            "teacher_model": _source(first, teacher),
            "strong_model": _source(second, strong),
            "teacher": fio.abspath(teacher),
            "strong": fio.abspath(strong),
            **{k: stats[k] for k in SUMMARY_KEYS if k in stats},
            "reading": word,
            "reading_text": text,
            "statistics": stats,
            "join": join,
            "cost": {"estimate": estimate, "api": client.summary.as_dict()},
            "cost_usd": client.summary.as_dict()["cost_usd"],
            "api_errors": sum(bool(c.get("error")) for c in comps),
            "settings": dataclasses.asdict(settings),
            "judge": dataclasses.asdict(judge),
            "kept_from_out_dir": sum(task_key(t) in kept for t in tasks),
            "client": client.describe(),
            "packages": package_versions(PACKAGES + ("openai",)),
        }
        write_judged(out_dir, "comparisons.jsonl", comps, asked)
        with fio.atomic_write(fio.join(out_dir, "report.md")) as f:
            f.write(markdown(report))
        write_json(fio.join(out_dir, "metrics.json"), report)
        log.info(
            "audit: strong preferred %.1f%% (%.1f-%.1f), %s -> %s",
            stats["strong_preferred"],
            stats["ci_low"],
            stats["ci_high"],
            word,
            out_dir,
        )
        return report


def _source(rows: Sequence[Mapping], path: str) -> str:
    names = sorted({r.get("source_model") or "" for r in rows} - {""})
    return ", ".join(names) if names else fio.abspath(path)
