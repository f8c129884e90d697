"""Shared command-line handling for gin-configured scripts (t5x style): repeatable
--gin_file and --gin_param, with every configurable module imported first so a typo in a
binding is an error at start-up. `run(main)` is every script's entry point: an error the user
can fix (rlaif_jax.errors) ends the script with one line, not a traceback."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Callable, Optional, Sequence

import gin

from rlaif_jax.errors import ConfigError, StorageError, UserError

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
    "rlaif_jax.arm",
    "rlaif_jax.iterative",
    "rlaif_jax.lora.settings",
)


def import_configurables(extra: Sequence[str] = ()) -> None:
    for name in tuple(CONFIGURABLE_MODULES) + tuple(extra):
        importlib.import_module(name)


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
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # orbax logs every checkpoint step at INFO through absl; keep the console readable.
    logging.getLogger("absl").setLevel(logging.WARNING)
    import_configurables(extra_modules)
    if os.environ.get("RLAIF_DISTRIBUTED") == "1":
        # Multi-host (tpu/run.sh sets this): must precede any use of the devices.
        from rlaif_jax.sharding import initialize_distributed

        initialize_distributed()
    for path in args.gin_search_path or ["."]:
        gin.add_config_file_search_path(path)
    if not args.gin_file and not args.gin_param:
        raise SystemExit("give at least one --gin_file (see configs/)")
    try:
        gin.parse_config_files_and_bindings(args.gin_file, args.gin_param, finalize_config=False)
        gin.finalize()
    except (ValueError, KeyError, TypeError, IOError) as e:
        # A typo'd configurable or parameter, a bad value, an unreadable file: gin's own
        # message names the binding and where it was given.
        raise ConfigError(f"gin config: {_one_line(e)}") from None


def main_with_gin(description: str, fn, argv: Optional[Sequence[str]] = None, extra_modules=()) -> object:
    args = gin_arg_parser(description).parse_args(argv)
    parse_gin(args, extra_modules)
    return fn()


def _one_line(e: BaseException) -> str:
    return " ".join(part.strip() for part in str(e).strip().splitlines() if part.strip())


def user_error_line(e: BaseException) -> Optional[str]:
    """The one line to print for an error the user can fix, or None for a bug (traceback)."""
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
        return f"{e.filename}: {e.strerror or e}"
    return None


def run(main: Callable[..., Optional[int]], argv: Optional[Sequence[str]] = None) -> int:
    """A script's exit status: main's, or 2 after one `error: ...` line on stderr for an
    error the user can fix. RLAIF_TRACEBACK=1 shows the traceback as well."""
    try:
        return main(argv) or 0
    except Exception as e:
        line = user_error_line(e)
        if line is None or os.environ.get("RLAIF_TRACEBACK") == "1":
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2
