"""The docs hold together: every relative link and #anchor in README.md and docs/ resolves
(GitHub's anchors), every command in README.md's code blocks names a subcommand, script,
tool or config that exists, and every `rlaif <command>` in the docs is one. Text only: fast."""

import glob
import os
import re
import shlex

import pytest

from rlaif_jax import cli
from rlaif_jax.commands import COMMANDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)
)
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _read(page: str) -> str:
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code, where links are links."""
    text = FENCE.sub("", text)
    return re.sub(r"(`+)(?:(?!\1).)+\1", "", text, flags=re.S)


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation other than '-'
    and '_' removed, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: str) -> set:
    seen: dict = {}
    out = set()
    for m in re.finditer(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", FENCE.sub("", _read(page)), flags=re.M):
        a = github_anchor(m.group(1))
        n = seen.get(a, 0)
        seen[a] = n + 1
        out.add(a if n == 0 else f"{a}-{n}")
    return out


def test_github_anchor():
    assert github_anchor("What batch 8 means on a multi-host slice") == "what-batch-8-means-on-a-multi-host-slice"
    assert github_anchor("Today's table") == "todays-table"
    assert github_anchor("Seed 2 at 3,000 prompts") == "seed-2-at-3000-prompts"
    assert github_anchor("The `rlaif` command: SFT -> DPO") == "the-rlaif-command-sft---dpo"


@pytest.mark.parametrize("page", PAGES)
def test_links_resolve(page):
    bad = []
    here = os.path.dirname(os.path.join(ROOT, page))
    for target in LINK.findall(_prose(_read(page))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(here, path)) if path else os.path.join(ROOT, page)
        if not os.path.exists(full):
            bad.append(f"{target}: no such file")
        elif anchor and full.endswith(".md") and anchor not in anchors(os.path.relpath(full, ROOT)):
            bad.append(f"{target}: no heading with that anchor")
    assert not bad, f"{page}: " + "; ".join(bad)


def _commands(block: str):
    """Simple commands of a shell block: continuations joined, comments dropped, split at
    && || ; | &."""
    for line in block.replace("\\\n", " ").splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        for part in re.split(r"&&|\|\||;|\||&(?!\S)", line):
            try:
                words = shlex.split(part)
            except ValueError:
                words = part.split()
            while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):  # FOO=bar cmd
                words = words[1:]
            if words:
                yield words


def _missing(words):
    """What a command names that does not exist."""
    out = []
    if "/" in words[0] and not os.path.exists(os.path.join(ROOT, words[0])):
        out.append(f"no program {words[0]}")
    if words[0] == "rlaif" and len(words) > 1 and words[1] not in COMMANDS:
        out.append(f"no subcommand `rlaif {words[1]}`")
    if words[0] in ("python", "python3") and len(words) > 1 and words[1].endswith(".py"):
        if not os.path.isfile(os.path.join(ROOT, words[1])):
            out.append(f"no script {words[1]}")
    for w in words[1:]:
        value = w.split("=", 1)[1] if w.startswith("--gin_file=") else w
        if w.startswith("--gin_file="):
            old = os.getcwd()
            try:
                os.chdir(ROOT)
                if not os.path.isfile(cli.resolve_gin_file(value)):
                    out.append(f"no recipe {value}")
            finally:
                os.chdir(old)
        elif re.match(r"^(configs|tools|scripts|tpu|docs)/[\w./-]+$", value) and "*" not in value:
            if not os.path.exists(os.path.join(ROOT, value)):
                out.append(f"no file {value}")
    return out


def test_readme_commands_name_what_exists():
    text = _read("README.md")
    shell = []
    for m in FENCE.finditer(text):
        first, *body = m.group(0).split("\n")[:-1]  # the fences dropped
        if re.match(r"^```(bash|sh|shell)\s*$", first):
            shell.append("\n".join(body))
    assert shell, "README.md has no shell blocks"
    bad = [f"{' '.join(w)}: {m}" for b in shell for w in _commands(b) for m in _missing(w)]
    assert not bad, bad


def test_readme_names_its_two_commands_in_the_first_screen():
    """Set up + the main job, set up + the tests: in the first 40 lines, before any timing prose,
    and the test command is the one CI runs (.ci/run installs as the README says)."""
    head = "\n".join(_read("README.md").splitlines()[:40])
    assert re.search(r"pip install -c constraints\.txt -e \S* && rlaif miniature", head)
    test_cmd = re.search(r"pip install -c constraints\.txt -e \"(\.\[[\w,-]+\])\" && pytest -q", head)
    assert test_cmd, "the set-up + tests command"
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    assert f'pip install -c constraints.txt -e "{test_cmd.group(1)}"' in ci and "\npytest -q" in ci


@pytest.mark.parametrize("page", PAGES)
def test_rlaif_commands_in_the_docs_exist(page):
    text = _read(page)
    code = "\n".join(m.group(0) for m in FENCE.finditer(text)) + "\n".join(re.findall(r"`([^`\n]+)`", text))
    named = set(re.findall(r"(?:^|[\s`(])rlaif ([a-z][a-z-]*)", code, flags=re.M))
    assert named <= set(COMMANDS), f"{page}: {sorted(named - set(COMMANDS))}"
