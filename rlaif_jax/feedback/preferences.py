"""Comparisons -> preference pairs, with the report that says how much to trust them.

Ties and invalid verdicts are dropped and counted (never "second wins"), as are pairs whose
responses are identical, so chosen == rejected cannot happen. The report gives counts,
the position-bias rate (how often the response shown first won, over judge calls with a
decided answer: 0.5 for an unbiased judge under random order), the both-orders agreement
rate, how often each source won, and the agreement between critics on the same pairs.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
from typing import Any, Iterable, Mapping, Optional, Sequence


def pair_key(c: Mapping[str, Any]) -> str:
    """Identity of a judged pair, independent of the judge."""
    h = hashlib.sha256()
    for part in (c["prompt_id"], c["response_1"], c["response_2"]):
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:24]


def _rate(num: int, den: int) -> Optional[float]:
    return round(num / den, 6) if den else None


def critic_report(comparisons: Sequence[Mapping[str, Any]]) -> dict:
    """Statistics per judge and between judges (no filtering)."""
    by_judge: dict[str, list] = collections.defaultdict(list)
    for c in comparisons:
        by_judge[c["judge"]].append(c)
    judges = {}
    for judge, cs in sorted(by_judge.items()):
        verdicts = collections.Counter(c["verdict"] for c in cs)
        views = [v for c in cs for v in c.get("views") or []]
        decided_views = [v for v in views if v["presented"] in ("first", "second")]
        both = [c for c in cs if c.get("orders_agree") is not None]
        decided = verdicts["first"] + verdicts["second"]
        wins = collections.Counter()
        for c in cs:
            if c["verdict"] == "first":
                wins[c.get("model_1") or "response_1"] += 1
            elif c["verdict"] == "second":
                wins[c.get("model_2") or "response_2"] += 1
        judges[judge] = {
            "comparisons": len(cs),
            "verdicts": {k: verdicts.get(k, 0) for k in ("first", "second", "tie", "invalid")},
            # invalid because no answer came back, vs an answer that could not be parsed
            "api_errors": sum(1 for c in cs if c["verdict"] == "invalid" and c.get("error")),
            "unparsed_answers": sum(1 for c in cs if c["verdict"] == "invalid" and not c.get("error")),
            "identical_pairs": sum(1 for c in cs if c.get("identical")),
            "swapped_rate": _rate(sum(int(v["swapped"]) for v in views), len(views)),
            "position_bias_rate": _rate(sum(v["presented"] == "first" for v in decided_views), len(decided_views)),
            "both_orders_pairs": len(both),
            "both_orders_agreement": _rate(sum(bool(c["orders_agree"]) for c in both), len(both)),
            "win_rate_by_model": {m: _rate(n, decided) for m, n in sorted(wins.items())},
        }
    agreement = {}
    keyed = {j: {pair_key(c): c["verdict"] for c in cs} for j, cs in by_judge.items()}
    for a, b in itertools.combinations(sorted(keyed), 2):
        common = [
            k
            for k in keyed[a]
            if k in keyed[b] and keyed[a][k] in ("first", "second") and keyed[b][k] in ("first", "second")
        ]
        same = sum(keyed[a][k] == keyed[b][k] for k in common)
        agreement[f"{a} vs {b}"] = {"pairs_both_decided": len(common), "agreement": _rate(same, len(common))}
    return {"judges": judges, "critic_agreement": agreement}


def build_preference_pairs(
    comparisons: Iterable[Mapping[str, Any]],
    judge: Optional[str] = None,
    require_agreement: bool = False,
    min_confidence: float = 0.0,
) -> tuple[list[dict], dict]:
    """(PREFERENCES-schema records, report).

    judge: which critic's labels become pairs; required when several are present, unless
    require_agreement, which keeps a pair only when every critic that judged it decided it
    the same way (and then the pair's provenance names them all).
    min_confidence: with logprob-weighted comparisons, drop those whose |p_1 - 0.5| * 2 is
    below it (comparisons without p_1 are kept).
    """
    comparisons = list(comparisons)
    judges = sorted({c["judge"] for c in comparisons})
    if judge is not None and judge not in judges:
        raise ValueError(f"judge {judge!r} not among the comparisons' judges {judges}")
    if judge is None and len(judges) > 1 and not require_agreement:
        raise ValueError(f"comparisons come from several judges {judges}: pass judge= or require_agreement=True")
    report = critic_report(comparisons)
    dropped = collections.Counter()
    pairs = []
    if require_agreement:
        groups: dict[str, list] = collections.defaultdict(list)
        for c in comparisons:
            groups[pair_key(c)].append(c)
        candidates = []
        for cs in groups.values():
            vs = {c["verdict"] for c in cs}
            if len(vs) > 1:
                dropped["critics_disagree"] += 1
                continue
            candidates.append((cs[0], "+".join(sorted({c["judge"] for c in cs}))))
    else:
        candidates = [(c, c["judge"]) for c in comparisons if judge is None or c["judge"] == judge]
    seen = set()
    for c, who in candidates:
        v = c["verdict"]
        if v not in ("first", "second", "tie", "invalid"):
            raise ValueError(f"prompt {c['prompt_id']}: unknown verdict {v!r}")
        if v == "invalid":
            dropped["api_error" if c.get("error") else "invalid"] += 1
            continue
        if v == "tie":
            dropped["tie"] += 1
            continue
        if c["response_1"] == c["response_2"]:
            dropped["identical_responses"] += 1
            continue
        if min_confidence and c.get("p_1") is not None and abs(c["p_1"] - 0.5) * 2 < min_confidence:
            dropped["low_confidence"] += 1
            continue
        k = (pair_key(c), who)
        if k in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(k)
        first = v == "first"
        chosen, rejected = (c["response_1"], c["response_2"]) if first else (c["response_2"], c["response_1"])
        src = (c.get("model_1"), c.get("model_2")) if first else (c.get("model_2"), c.get("model_1"))
        pairs.append(
            {
                "prompt_id": c["prompt_id"],
                "prompt": c["prompt"],
                "chosen": chosen,
                "rejected": rejected,
                "provenance": f"judge={who};chosen={src[0] or '?'};rejected={src[1] or '?'}",
            }
        )
    report.update(
        {
            "input_comparisons": len(comparisons),
            "pairs": len(pairs),
            "dropped": dict(sorted(dropped.items())),
            "selected_judge": judge if not require_agreement else "agreement:" + "+".join(judges),
        }
    )
    return pairs, report
