"""Judge templates (versioned files), verdict parsing, order randomization and un-swapping,
both-orders judging, logprob-weighted preferences, and 1-5 ratings.

Vocabulary. A comparison has a canonical order (response_1, response_2), fixed by the
caller (e.g. 1 = policy sample, 2 = teacher). The judge sees them in a presented order,
swapped or not per prompt. Verdicts are one of VERDICTS, always stated in canonical order
once un-swapped: "first" means response_1 wins. "invalid" keeps the judge's raw text and is
never turned into a preference; "tie" only when the judge says so or the two responses are
identical (then no request is sent at all).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
from typing import Any, Mapping, Optional, Sequence

VERDICTS = ("first", "second", "tie", "invalid")
TEMPLATE_DIR = os.path.join(os.path.dirname(__file__), "templates")
_SWAP = {"first": "second", "second": "first", "tie": "tie", "invalid": "invalid"}


# -- templates -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class JudgeTemplate:
    name: str
    version: int
    system: str
    user: str
    sha256: str
    path: str

    @property
    def id(self) -> str:
        """What goes into cache keys and manifests: editing the file changes it."""
        return f"{self.name}_v{self.version}@{self.sha256[:16]}"

    def placeholders(self) -> set[str]:
        return set(re.findall(r"\{(\w+)\}", self.system + self.user))

    def render(self, **values: str) -> list[dict]:
        missing = self.placeholders() - set(values)
        if missing:
            raise KeyError(f"template {self.id}: no value for {sorted(missing)}")
        pat = re.compile(r"\{(" + "|".join(map(re.escape, values)) + r")\}")
        # One pass, so a "{output_b}" typed inside an instruction is left as text.
        sub = lambda s: pat.sub(lambda m: values[m.group(1)], s)
        msgs = [{"role": "system", "content": sub(self.system)}] if self.system else []
        return msgs + [{"role": "user", "content": sub(self.user)}]


def load_template(name_or_path: str) -> JudgeTemplate:
    """A template file: '# name: X' / '# version: N' header comments, then '=== system' and
    '=== user' sections. `name_or_path` is a path or a file name in feedback/templates
    ("pairwise_v1")."""
    path = name_or_path
    if not os.path.exists(path):
        path = os.path.join(TEMPLATE_DIR, name_or_path if name_or_path.endswith(".txt") else name_or_path + ".txt")
    if not os.path.exists(path):
        known = sorted(f[:-4] for f in os.listdir(TEMPLATE_DIR) if f.endswith(".txt"))
        raise FileNotFoundError(f"judge template {name_or_path!r} not found (built-in: {known})")
    with open(path, "rb") as f:
        raw = f.read()
    text = raw.decode("utf-8")
    header, sections, current = {}, {}, None
    for line in text.split("\n"):
        m = re.match(r"^=== (\w+)\s*$", line)
        if m:
            current = m.group(1)
            sections[current] = []
            continue
        if current is None:
            h = re.match(r"^#\s*(\w+):\s*(.*?)\s*$", line)
            if h:
                header[h.group(1)] = h.group(2)
            continue
        sections[current].append(line)
    if "user" not in sections or "name" not in header or "version" not in header:
        raise ValueError(f"{path}: needs '# name:' and '# version:' headers and a '=== user' section")
    body = {k: "\n".join(v).strip("\n") for k, v in sections.items()}
    return JudgeTemplate(
        header["name"],
        int(header["version"]),
        body.get("system", ""),
        body["user"],
        hashlib.sha256(raw).hexdigest(),
        os.path.abspath(path),
    )


# -- order ---------------------------------------------------------------------------------


def is_swapped(prompt_id: str, seed: int, salt: str = "") -> bool:
    """Whether the judge sees response_2 first for this prompt. A hash, not an RNG stream, so
    the decision for a prompt never depends on which other prompts are in the run."""
    h = hashlib.sha256(f"{seed}:{salt}:{prompt_id}".encode()).digest()
    return bool(h[0] & 1)


def unswap(verdict: str, swapped: bool) -> str:
    return _SWAP[verdict] if swapped else verdict


# -- parsing -------------------------------------------------------------------------------

_LABEL = re.compile(r"output\s*\(?\s*([ab])\s*\)?(?![a-z])")


def parse_pairwise(text: Optional[str]) -> str:
    """Presented-order verdict from a judge's answer: "first" for (a), "second" for (b),
    "tie", or "invalid". Accepts the label alone ("Output (a)", "(b)", "a") or an answer
    that starts with / mentions exactly one label; anything ambiguous is invalid."""
    if not text:
        return "invalid"
    t = text.strip().lower()
    t = re.sub(r"[*_`\"'#]", "", t).strip().rstrip(".!").strip()
    if t in ("a", "(a)", "output a", "output (a)"):
        return "first"
    if t in ("b", "(b)", "output b", "output (b)"):
        return "second"
    if t in ("tie", "a tie", "it's a tie", "its a tie", "equal", "both are equal"):
        return "tie"
    head = _LABEL.match(t)
    if head:
        return "first" if head.group(1) == "a" else "second"
    labels = set(_LABEL.findall(t))
    if len(labels) == 1:
        return "first" if labels == {"a"} else "second"
    if not labels and re.fullmatch(r"(the answer is\s*)?tie\b.*", t):
        return "tie"
    return "invalid"


def parse_rating(text: Optional[str], lo: int = 1, hi: int = 5) -> Optional[int]:
    """The integer rating of "Rating: N" (or a lone number); None when absent or out of range."""
    if not text:
        return None
    t = text.strip()
    m = re.search(r"rating\s*[:=]?\s*\**\s*(\d+)", t, re.IGNORECASE) or re.fullmatch(r"\**(\d+)\**\.?", t)
    if not m:
        return None
    r = int(m.group(1))
    return r if lo <= r <= hi else None


def _norm_token(tok: str) -> str:
    return tok.strip().strip("()[]*\"'.:").lower()


def _position_tokens(logprobs: Optional[Mapping[str, Any]]) -> list[dict]:
    if not isinstance(logprobs, Mapping):
        return []
    content = logprobs.get("content")
    return content if isinstance(content, list) else []


def label_probability(logprobs: Optional[Mapping[str, Any]]) -> Optional[float]:
    """P(presented first output wins) from the token logprobs of a pairwise answer: at the
    first token that is the bare label "a" or "b" (the "a" of "Output (a)"), the normalized
    mass of "a" against "b" among that position's top_logprobs. None if the API returned no
    top_logprobs there or neither label is among them."""
    for pos in _position_tokens(logprobs):
        if _norm_token(str(pos.get("token", ""))) not in ("a", "b"):
            continue
        # Without alternatives the sampled token alone says nothing about the other label.
        alts = pos.get("top_logprobs")
        if not alts:
            return None
        mass = {"a": 0.0, "b": 0.0}
        for alt in alts:
            k = _norm_token(str(alt.get("token", "")))
            if k in mass and alt.get("logprob") is not None:
                mass[k] += math.exp(float(alt["logprob"]))
        total = mass["a"] + mass["b"]
        return mass["a"] / total if total > 0 else None
    return None


def expected_rating(logprobs: Optional[Mapping[str, Any]], lo: int = 1, hi: int = 5) -> Optional[float]:
    """Probability-weighted rating at the first token that is a digit in [lo, hi]."""
    for pos in _position_tokens(logprobs):
        if not str(pos.get("token", "")).strip().isdigit():
            continue
        alts = pos.get("top_logprobs")
        if not alts:
            return None
        num = den = 0.0
        for alt in alts:
            k = str(alt.get("token", "")).strip()
            if k.isdigit() and lo <= int(k) <= hi and alt.get("logprob") is not None:
                p = math.exp(float(alt["logprob"]))
                num += p * int(k)
                den += p
        return num / den if den > 0 else None
    return None


# -- one comparison, end to end ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PairTask:
    prompt_id: str
    prompt: str
    response_1: str
    response_2: str
    model_1: str = ""
    model_2: str = ""


def pairwise_messages(template: JudgeTemplate, task: PairTask, swapped: bool) -> list[dict]:
    a, b = (task.response_2, task.response_1) if swapped else (task.response_1, task.response_2)
    return template.render(instruction=task.prompt, output_a=a, output_b=b)


def rating_messages(template: JudgeTemplate, prompt: str, response: str) -> list[dict]:
    return template.render(instruction=prompt, output=response)


def answer_of(result: Mapping[str, Any]) -> tuple[Optional[str], Optional[dict]]:
    """(text, logprobs) of the first choice of an ok result."""
    ch = result["response"]["choices"][0]
    return ch.get("content"), ch.get("logprobs")


def read_presentation(result: Mapping[str, Any], swapped: bool) -> dict:
    """One judge call -> its verdict in canonical order (and as presented), raw text, p_1
    (probability that response_1 wins, from logprobs), or the API error."""
    if result["status"] != "ok":
        err = result["error"]
        return {
            "swapped": int(swapped),
            "presented": "invalid",
            "verdict": "invalid",
            "raw": "",
            "p_1": None,
            "error": f"{err['kind']}: {err['message']}"[:500],
        }
    text, lps = answer_of(result)
    presented = parse_pairwise(text)
    p_first = label_probability(lps)
    p_1 = None if p_first is None else (1.0 - p_first if swapped else p_first)
    return {
        "swapped": int(swapped),
        "presented": presented,
        "verdict": unswap(presented, swapped),
        "raw": text or "",
        "p_1": p_1,
        "error": None,
    }


def combine_orders(views: Sequence[Mapping[str, Any]], on_disagreement: str = "tie") -> dict:
    """Merge one or two presentations of the same pair. Two decided views that disagree mean
    the judge followed the position, not the content: by default that is a tie (it said
    each response wins once); on_disagreement="invalid" drops it instead."""
    if on_disagreement not in ("tie", "invalid"):
        raise ValueError(f"on_disagreement must be 'tie' or 'invalid', got {on_disagreement!r}")
    decided = [v for v in views if v["verdict"] != "invalid"]
    ps = [v["p_1"] for v in views if v.get("p_1") is not None]
    p_1 = sum(ps) / len(ps) if ps else None
    if not decided:
        verdict, agree = "invalid", None
    elif len(decided) == 1:
        verdict, agree = decided[0]["verdict"], None
    else:
        agree = all(v["verdict"] == decided[0]["verdict"] for v in decided)
        verdict = decided[0]["verdict"] if agree else on_disagreement
    return {"verdict": verdict, "orders_agree": agree, "p_1": p_1}


def comparison_from_views(
    task: PairTask, judge: str, views: Sequence[Mapping[str, Any]], on_disagreement: str = "tie", mode: str = "pairwise"
) -> dict:
    merged = combine_orders(views, on_disagreement)
    first = views[0]
    errors = [v["error"] for v in views if v.get("error")]
    return {
        "prompt_id": task.prompt_id,
        "prompt": task.prompt,
        "response_1": task.response_1,
        "response_2": task.response_2,
        "model_1": task.model_1,
        "model_2": task.model_2,
        "judge": judge,
        "mode": mode,
        "verdict": merged["verdict"],
        "orders_agree": merged["orders_agree"],
        "p_1": merged["p_1"],
        "raw_judge_text": first["raw"],
        "swapped": first["swapped"],
        "views": [dict(v) for v in views],
        "error": "; ".join(errors) if errors and merged["verdict"] == "invalid" else None,
    }


def identical_comparison(task: PairTask, judge: str, mode: str = "pairwise") -> dict:
    """Identical responses: a tie by definition, and no money spent asking."""
    return {
        "prompt_id": task.prompt_id,
        "prompt": task.prompt,
        "response_1": task.response_1,
        "response_2": task.response_2,
        "model_1": task.model_1,
        "model_2": task.model_2,
        "judge": judge,
        "mode": mode,
        "verdict": "tie",
        "orders_agree": None,
        "p_1": 0.5,
        "raw_judge_text": "",
        "swapped": 0,
        "views": [],
        "error": None,
        "identical": True,
    }


def read_rating(result: Mapping[str, Any]) -> dict:
    if result["status"] != "ok":
        err = result["error"]
        return {"rating": None, "expected": None, "raw": "", "error": f"{err['kind']}: {err['message']}"[:500]}
    text, lps = answer_of(result)
    return {"rating": parse_rating(text), "expected": expected_rating(lps), "raw": text or "", "error": None}


def comparison_from_ratings(task: PairTask, judge: str, r1: Mapping[str, Any], r2: Mapping[str, Any]) -> dict:
    """UltraFeedback-style: the higher rating wins, equal ratings tie, a missing rating is
    invalid. p_1 compares the expected ratings when logprobs gave them (a logistic of their
    difference), else None."""
    a, b = r1["rating"], r2["rating"]
    if a is None or b is None:
        verdict = "invalid"
    else:
        verdict = "first" if a > b else "second" if b > a else "tie"
    p_1 = None
    if r1.get("expected") is not None and r2.get("expected") is not None:
        p_1 = 1.0 / (1.0 + math.exp(-(r1["expected"] - r2["expected"])))
    errors = [r["error"] for r in (r1, r2) if r.get("error")]
    return {
        "prompt_id": task.prompt_id,
        "prompt": task.prompt,
        "response_1": task.response_1,
        "response_2": task.response_2,
        "model_1": task.model_1,
        "model_2": task.model_2,
        "judge": judge,
        "mode": "rating",
        "verdict": verdict,
        "orders_agree": None,
        "p_1": p_1,
        "raw_judge_text": f"response_1: {r1['raw']}\nresponse_2: {r2['raw']}",
        "swapped": 0,
        "ratings": [a, b],
        "expected_ratings": [r1.get("expected"), r2.get("expected")],
        "views": [],
        "error": "; ".join(errors) or None,
    }
