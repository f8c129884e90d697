"""The checks a record set must pass before anything trains on it, and the small values every
preflight check is made of (rlaif_jax.preflight builds the model / tokenizer checks on them):

  Finding / Check / run_preflight   one problem (fatal or a warning); a named check that yields
                                    findings; running checks, logging the warnings and raising
                                    one PreflightError listing every problem
  record_findings(...)              a record set already in memory: non-empty, no prompt_id
                                    given to two prompts, and for preference pairs the share
                                    with chosen == rejected (preference_findings)

They live with the data so the input pipelines, which check the records they load, need
nothing from a higher layer.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Iterable, Mapping, Optional, Sequence

import gin

from rlaif_jax.data.ids import id_conflicts
from rlaif_jax.errors import UserError, in_range

log = logging.getLogger("rlaif_jax.preflight")


@dataclasses.dataclass(frozen=True)
class Finding:
    message: str  # one line naming the file / binding / model pair and what to do
    fatal: bool = True


@dataclasses.dataclass(frozen=True)
class Check:
    what: str  # for logs: "policy runs/sft/hf / tokenizer runs/toy/tokenizer"
    run: Callable[[], Sequence[Finding]]


class PreflightError(UserError):
    """Every problem the preflight found; str() is the first, `problems` all of them."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        more = f" (+{len(problems) - 1} more problem(s), each on its own line)" if len(problems) > 1 else ""
        super().__init__(problems[0] + more)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PreflightSettings:
    """Thresholds of the record-set checks. A preference pair whose chosen and rejected are
    the same (text or token ids) gives DPO and the reward model zero gradient: an all-tied
    set trains at loss log 2 and exports an unchanged model."""

    max_identical_share: float = 0.2  # refuse a preference set with more tied pairs than this
    warn_identical_share: float = 0.01  # warn above this

    def __post_init__(self):
        in_range("PreflightSettings.max_identical_share", self.max_identical_share, 0.0, 1.0)
        in_range("PreflightSettings.warn_identical_share", self.warn_identical_share, 0.0, self.max_identical_share)


def run_preflight(checks: Iterable[Check]) -> None:
    """Runs every check; logs the warnings and raises one PreflightError listing every problem."""
    problems = []
    for c in checks:
        for f in c.run():
            if f.fatal:
                problems.append(f.message)
            else:
                log.warning("preflight: %s", f.message)
    if problems:
        raise PreflightError(problems)


def preference_findings(
    where: str,
    records: Sequence[Mapping],
    token_pairs: Optional[Sequence[tuple[Sequence[int], Sequence[int]]]] = None,
    settings: Optional[PreflightSettings] = None,
) -> list[Finding]:
    """Tied pairs (chosen == rejected, as text or, with `token_pairs`, as the token ids the
    trainer sees) above the thresholds."""
    settings = settings or PreflightSettings()
    if not records:
        return []
    tied = sum(
        r["chosen"] == r["rejected"] or (token_pairs is not None and list(token_pairs[i][0]) == list(token_pairs[i][1]))
        for i, r in enumerate(records)
    )
    share = tied / len(records)
    if share <= settings.warn_identical_share:
        return []
    fatal = share > settings.max_identical_share
    limit = settings.max_identical_share if fatal else settings.warn_identical_share
    return [
        Finding(
            f"{where}: {tied} of {len(records)} preference pairs ({share:.0%}) have chosen == rejected (or "
            f"the same tokens), above {limit:.0%}"
            + ("; they train nothing: rebuild the pairs (see PreflightSettings.max_identical_share)" if fatal else ""),
            fatal=fatal,
        )
    ]


def record_findings(
    where: str,
    records: Sequence[Mapping],
    preferences: bool,
    token_pairs=None,
    settings: Optional[PreflightSettings] = None,
) -> list[Finding]:
    """A record set's sanity: non-empty, no prompt_id shared by two prompts, tied pairs."""
    if not records:
        return [Finding(f"{where}: holds no records; give a non-empty record set")]
    out = []
    conflicts = id_conflicts(records) if records and "prompt_id" in records[0] else {}
    if conflicts:
        pid, idx = next(iter(conflicts.items()))
        out.append(
            Finding(
                f"{where}: prompt_id {pid!r} is given to {len(idx)} different prompts (records "
                f"{', '.join(map(str, idx[:3]))}; {len(conflicts)} such id(s)); rebuild the set with one id per prompt"
            )
        )
    if preferences:
        out.extend(preference_findings(where, records, token_pairs, settings))
    return out
