"""The package's layers hold, read from its own imports: no import cycle between modules, no
module importing one on a higher layer, and no import inside a function except of an optional
heavy dependency (or in a module still listed below as not yet moved to the top)."""

import ast
import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "rlaif_jax"

# Bottom to top. A module may import its own layer and the ones below, never above.
LAYERS = (
    ("errors", "environment", "interrupt"),
    ("fileio", "sharding", "cli", "bandit"),
    ("outputs", "models", "winrate"),
    ("sampling", "data", "preflight"),
    ("feedback",),  # API clients, judging, the OpenAI-compatible server: no training
    ("train", "lora"),
    ("eval", "aot", "benchmarks", "plan"),
    ("iterative", "sweep", "synthetic"),
    ("pipeline",),  # the one orchestrator
    ("miniature",),  # a campaign of pipeline arms in the synthetic world
    ("commands", "__main__"),  # the `rlaif` command (one module per subcommand); python -m rlaif_jax
)
# Third-party packages a function may import where it needs them: optional extras, or heavy
# ones a light module (the feedback server, the CLI) must not pay for at import.
OPTIONAL_HEAVY = {
    "torch",
    "transformers",
    "tensorboardX",
    "wandb",
    "sklearn",
    "datasets",
    "tokenizers",
    "peft",
    "trl",
    "alpaca_eval",
    "openai",
    "aiohttp",
    "matplotlib",
    "safetensors",
    "tqdm",
    "fsspec",
    "jax",
}
# Modules that still import inside functions what belongs at the top (each a known debt to
# pay down, not to grow): module -> how many such imports it may keep.
NOT_YET_MOVED = {
    "rlaif_jax.aot": 2,
    "rlaif_jax.cli": 1,
    # by design: `rlaif --help` imports neither gin nor jax, so the dispatcher loads lazily
    "rlaif_jax.commands": 3,
    "rlaif_jax.feedback.server.model_backend": 10,  # keeps the server importable without the model stack
    "rlaif_jax.fileio": 1,
}


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = ast.parse(path.read_text(), str(path))
    return out


MODULES = _modules()


def _target(name: str) -> str:
    """The package module an import names (its longest prefix that is a module of ours)."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _imports(tree: ast.Module):
    """(module imported, inside a function?) for each import of ours or not."""
    inner = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inner |= {id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            for a in n.names:
                yield a.name, id(n) in inner
        elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
            if n.module == "rlaif_jax" or n.module.startswith("rlaif_jax."):
                for a in n.names:  # `from rlaif_jax import fileio` imports the module rlaif_jax.fileio
                    yield _target(f"{n.module}.{a.name}"), id(n) in inner
            else:
                yield n.module, id(n) in inner


def _ours(name: str) -> bool:
    return name == "rlaif_jax" or name.startswith("rlaif_jax.")


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: its package {top!r} is on no layer; add it to LAYERS")


def test_every_module_is_on_a_layer_and_imports_none_above_it():
    upward = []
    for module, tree in MODULES.items():
        if module == "rlaif_jax":
            continue
        for name, _ in _imports(tree):
            if _ours(name) and name != "rlaif_jax" and _layer(name) > _layer(module):
                upward.append(f"{module} -> {name}")
    assert not upward, upward


def test_no_import_cycles():
    graph = {m: {_target(n) for n, _ in _imports(t) if _ours(n) and _target(n) != m} for m, t in MODULES.items()}
    # A package's __init__ re-exports its submodules: an edge into a package is an edge into
    # whatever of it the importer uses, which the submodules' own edges already show.
    graph = {m: {n for n in deps if not _is_package(n) or n == "rlaif_jax"} for m, deps in graph.items()}
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, cycles


def _is_package(module: str) -> bool:
    return (PACKAGE.parent / module.replace(".", os.sep) / "__init__.py").exists()


def test_imports_inside_functions_are_optional_heavy_dependencies():
    found = {}
    for module, tree in MODULES.items():
        bad = [n for n, inner in _imports(tree) if inner and (_ours(n) or n.split(".")[0] not in OPTIONAL_HEAVY)]
        if bad:
            found[module] = bad
    over = {m: b for m, b in found.items() if len(b) > NOT_YET_MOVED.get(m, 0)}
    assert not over, f"imports inside functions (move them to the module's top): {over}"
    stale = {m: n for m, n in NOT_YET_MOVED.items() if len(found.get(m, ())) < n}
    assert not stale, f"fewer left than NOT_YET_MOVED allows; lower it: {stale}"
