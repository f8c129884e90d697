"""Shared command-line handling for gin-configured scripts (t5x style): repeatable
--gin_file and --gin_param, with every configurable module imported first so a typo in a
binding is an error at start-up. `run(main)` is every script's entry point: an error the user
can fix (rlaif_jax.errors) ends the script with one line, not a traceback."""

from __future__ import annotations

import argparse
import difflib
import errno
import importlib
import logging
import os
import re
import sys
from typing import Callable, Optional, Sequence

import gin

from rlaif_jax.errors import ConfigError, StorageError, UserError
from rlaif_jax.interrupt import Interrupted

# Modules whose @gin.configurable functions a config may bind.
CONFIGURABLE_MODULES = (
    "rlaif_jax.sharding",
    "rlaif_jax.models.config",
    "rlaif_jax.sampling",
    "rlaif_jax.train.sft",
    "rlaif_jax.train.dpo",
    "rlaif_jax.train.reward",
    "rlaif_jax.train.optim",
    "rlaif_jax.train.loop",
    "rlaif_jax.train.ppo",
    "rlaif_jax.train.advantages",
    "rlaif_jax.train.reference",
    "rlaif_jax.data.pipeline.builders",
    "rlaif_jax.data.prompts.prepare",
    "rlaif_jax.data.prompts.imports",
    "rlaif_jax.feedback.client",
    "rlaif_jax.feedback.stages",
    "rlaif_jax.feedback.audit",
    "rlaif_jax.eval.evaluate",
    "rlaif_jax.synthetic.backend",
    "rlaif_jax.synthetic.models",
    "rlaif_jax.pipeline.settings",
    "rlaif_jax.iterative",
    "rlaif_jax.train.kto",
    "rlaif_jax.train.orpo",
    "rlaif_jax.train.cpo",
    "rlaif_jax.feedback.ratings",
    "rlaif_jax.preflight",
    "rlaif_jax.lora.settings",
)


def import_configurables(extra: Sequence[str] = ()) -> None:
    for name in tuple(CONFIGURABLE_MODULES) + tuple(extra):
        importlib.import_module(name)


def configs_root() -> Optional[str]:
    """The directory that holds the recipes' `configs/`: the installed package itself (a wheel
    ships configs/ as rlaif_jax/configs) or, in a clone or an editable install, the
    repository root. None when neither has one."""
    package = os.path.dirname(os.path.abspath(__file__))
    for root in (package, os.path.dirname(package)):
        if os.path.isdir(os.path.join(root, "configs")):
            return root
    return None


def resolve_gin_file(path: str) -> str:
    """A --gin_file as given when it exists, else the packaged recipe it names: `tiny_sft`,
    `paper/arms/dpo_gpt4_on_sft_gpt35_10pct`, `models/llama2_7b.gin` or
    `configs/experiments/tiny_sft.gin` from any directory. Unmatched, it is returned as given
    and gin reports it."""
    root = configs_root()
    if os.path.exists(path) or "://" in path or root is None:
        return path
    rel = path[len("configs/") :] if path.startswith("configs/") else path
    for base in ("configs", os.path.join("configs", "experiments")):
        for name in (rel, rel + ".gin"):
            full = os.path.join(root, base, name)
            if os.path.isfile(full):
                return full
    return path


def gin_arg_parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gin_file", action="append", default=[], help="gin config file (repeatable)")
    ap.add_argument(
        "--gin_param",
        action="append",
        default=[],
        help="a gin binding overriding the files, e.g. --gin_param=train.num_steps=100 (repeatable)",
    )
    ap.add_argument(
        "--gin_search_path",
        action="append",
        default=[],
        help="directory to resolve relative gin includes against (repeatable)",
    )
    ap.add_argument("--log_level", default="INFO")
    return ap


def parse_gin(args: argparse.Namespace, extra_modules: Sequence[str] = ()) -> None:
    level = getattr(logging, args.log_level.upper(), logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # A library imported with the command may already have configured the root logger (a
    # root-level log call at import does, at WARNING), making basicConfig a no-op: our own
    # loggers still log at --log_level through whatever handler is there.
    logging.getLogger("rlaif_jax").setLevel(level)
    # orbax logs every checkpoint step at INFO through absl; keep the console readable.
    logging.getLogger("absl").setLevel(logging.WARNING)
    import_configurables(extra_modules)
    if os.environ.get("RLAIF_DISTRIBUTED") == "1":
        # Multi-host (tpu/run.sh sets this): must precede any use of the devices.
        from rlaif_jax.sharding import initialize_distributed

        initialize_distributed()
    for path in args.gin_search_path or (["."] if os.path.isdir("configs") else []):
        gin.add_config_file_search_path(path)
    root = configs_root()
    if root and root not in gin.config._LOCATION_PREFIXES:
        # The package's recipes first, so they run from any directory and their `include
        # 'configs/...'` lines resolve: after gin's '' prefix, gin would hand 'configs/models/x.gin'
        # to its Python-package reader, which fails on `configs` as a namespace package when the
        # clone is on sys.path. In a clone root is the clone: the same files as "./configs".
        gin.config._LOCATION_PREFIXES.insert(0, root)
    args.gin_file = [resolve_gin_file(f) for f in args.gin_file]
    for f in args.gin_file:
        if "://" not in f and not any(os.path.exists(os.path.join(d, f)) for d in ["", *args.gin_search_path]):
            raise ConfigError(
                f"--gin_file={f}: no such file, nor a recipe of that name among the package's "
                "(`rlaif recipes` lists them)"
            )
    if not args.gin_file and not args.gin_param:
        raise SystemExit("give at least one --gin_file (see configs/)")
    try:
        gin.parse_config_files_and_bindings(args.gin_file, args.gin_param, finalize_config=False)
        gin.finalize()
    except (ValueError, KeyError, TypeError, IOError) as e:
        # A typo'd configurable or parameter, a bad value, an unreadable file: gin's own
        # message names the binding and where it was given.
        raise ConfigError(f"gin config: {_config_problem(e)}") from None
    check_scopes()


# gin's messages can quote the whole config; the one line we print stays readable.
_MAX_LINE = 280


def _bindings():
    """(binding as written, value) of every parsed gin binding, macros included."""
    for (scope, selector), params in gin.config._CONFIG.items():
        name = selector.rsplit(".", 1)[-1]
        for param, value in params.items():
            yield f"{scope + '/' if scope else ''}{name}.{param}", value


def _references(value):
    return [v for v in gin.config._iterate_flattened_values(value) if isinstance(v, gin.config.ConfigurableReference)]


def _macros() -> list[str]:
    return sorted(scope for scope, selector in gin.config._CONFIG if selector == "gin.macro")


def _config_problem(e: BaseException) -> str:
    """gin's error as one line: an undefined macro names the bindings using it and the
    macros that are defined; anything else is cut before gin's dump of the config."""
    text = _one_line(e)
    m = re.match(r"No bindings specified for '(.+?)/gin\.macro'", str(e))
    if m:
        name = m.group(1)
        users = [b for b, v in _bindings() if any(r.scoped_selector == f"{name}/gin.macro" for r in _references(v))]
        near = difflib.get_close_matches(name, _macros(), n=1)
        hint = f" (did you mean %{near[0]}?)" if near else ""
        used = f"{', '.join(users[:3])} uses" if users else "the config uses"
        text = f"{used} macro %{name}, which is never defined{hint}; define {name} = ... or fix the spelling"
    text = text.split(" in config string:")[0]
    return text if len(text) <= _MAX_LINE else text[: _MAX_LINE - 3] + "..."


def check_scopes() -> None:
    """A reference under a scope that no binding uses, where a bound scope is spelled almost
    the same (`@evl/sft_pipeline` beside `eval/...` bindings), is a typo: the configurable would
    silently run with the unscoped bindings (the training data, repeated forever)."""
    # A macro is stored as a binding under its name as the scope (MACRO/gin.macro): not a scope.
    bound = {part for scope, sel in gin.config._CONFIG if sel != "gin.macro" for part in scope.split("/") if part}
    for name, value in _bindings():
        for ref in _references(value):
            if ref.selector == "gin.macro":
                continue
            for scope in ref.scopes:
                near = difflib.get_close_matches(scope, sorted(bound), n=1, cutoff=0.8)
                if scope not in bound and near:
                    raise ConfigError(
                        f"gin config: {name} = @{ref.scoped_selector}: no binding is under the scope "
                        f"'{scope}' (did you mean @{near[0]}/{ref.selector}?); fix the scope"
                    )


def main_with_gin(description: str, fn, argv: Optional[Sequence[str]] = None, extra_modules=()) -> object:
    args = gin_arg_parser(description).parse_args(argv)
    parse_gin(args, extra_modules)
    return fn()


def _one_line(e: BaseException) -> str:
    return " ".join(part.strip() for part in str(e).strip().splitlines() if part.strip())


def _unwrapped(e: BaseException) -> BaseException:
    """The exception gin re-raised: gin wraps an error inside a configurable in a proxy of its
    class that adds "In call to configurable ..." to the message but loses its attributes
    (an OSError's filename)."""
    while (
        e.__context__ is not None
        and type(e) is not type(e.__context__)
        and isinstance(e, type(e.__context__))
        and type(e).__name__ == type(e.__context__).__name__
    ):
        e = e.__context__
    return e


def user_error_line(e: BaseException) -> Optional[str]:
    """The one line to print for an error the user can fix, or None for a bug (traceback)."""
    e = _unwrapped(e)
    if isinstance(e, Interrupted):
        return str(e)
    if isinstance(e, UserError):
        # gin appends "In call to configurable ..." lines to errors raised inside a
        # configurable; our messages are one line and say everything already.
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, StorageError):
        return str(e).strip().splitlines()[0]
    if isinstance(e, RuntimeError) and str(e).startswith("Required bindings for"):
        # gin's own message names the configurable and the missing parameters.
        return f"gin config: {_one_line(e)}; bind them with --gin_param (see the config's header)"
    if isinstance(e, OSError) and e.filename is not None and not isinstance(e, (BrokenPipeError, ConnectionError)):
        fix = (
            "; make it writable or choose another directory"
            if isinstance(e, PermissionError) or e.errno == errno.EROFS
            else ""
        )
        return f"{e.filename}: {e.strerror or e}{fix}"
    return None


def run(main: Callable[..., Optional[int]], argv: Optional[Sequence[str]] = None) -> int:
    """A script's exit status: main's, or 2 after one `error: ...` line on stderr for an
    error the user can fix. RLAIF_TRACEBACK=1 shows the traceback as well."""
    try:
        return main(argv) or 0
    except KeyboardInterrupt:
        # Ctrl-C outside the work that saves what it has (rlaif_jax.interrupt): nothing was
        # paid for or trained since the last save, which a rerun resumes from.
        if os.environ.get("RLAIF_TRACEBACK") == "1":
            raise
        print(
            "error: stopped at once (Ctrl-C, or a second signal); what was saved is kept: rerun the same command",
            file=sys.stderr,
        )
        return 130
    except Exception as e:
        line = user_error_line(e)
        if line is None or os.environ.get("RLAIF_TRACEBACK") == "1":
            raise
        inner = _unwrapped(e)
        # The run preflight reports every problem it found, one line each.
        for problem in getattr(inner, "problems", None) or [line]:
            print(f"error: {problem}", file=sys.stderr)
        return inner.exit_status if isinstance(inner, Interrupted) else 2
