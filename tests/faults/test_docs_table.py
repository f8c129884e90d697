"""docs/reliability.md's "Bad input" table stays true: every test it names exists in
tests/faults/, and every bad-input and signal test there is in the table."""

import ast
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
DOC = os.path.join(os.path.dirname(os.path.dirname(HERE)), "docs", "reliability.md")


def _tests(name: str) -> set[str]:
    tree = ast.parse(open(os.path.join(HERE, name)).read())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_the_bad_input_table_names_every_test_and_only_real_ones():
    text = open(DOC).read()
    section = text.split("## Bad input: what each failure does now", 1)[1].split("\n## ", 1)[0]
    named = {m for row in section.splitlines() if row.startswith("| ") for m in re.findall(r"`(test_\w+)`", row)}
    tests = _tests("test_bad_input.py") | _tests("test_signals.py")
    assert named == tests, (sorted(named - tests), sorted(tests - named))
