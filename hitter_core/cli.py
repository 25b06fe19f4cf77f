"""The command line shared by both stages (STYLE.md habit 14): ``--preset`` and positional
``section.key=value`` overrides (:mod:`hitter_core.sections`), the run flags, and one clear line
instead of a traceback when the user made a mistake (habit 15)."""

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from hitter_core.data import DataFormatError
from hitter_core.runtime import stop_with_recipe
from hitter_core.sections import PRESET_DIR, RUN_CONFIG_NAME, ConfigError


def add_config_arguments(parser: argparse.ArgumentParser, default_preset: str | None) -> None:
    """``--preset NAME|FILE`` and the positional ``section.key=value`` overrides. Parse with
    ``parser.parse_intermixed_args`` so that flags may follow overrides."""
    names = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
    parser.add_argument("--preset", default=default_preset,
                        help=f"preset in recipes/configs ({names}) or a YAML file such as a "
                             f"run's {RUN_CONFIG_NAME} (default: {default_preset})")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override one setting, e.g. train.lr=5e-3 (YAML scalar)")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of a training run, alike in both stages: ``--data-dir``, ``--output-dir``
    (shorthands of ``train.data_dir`` / ``train.output_dir``), ``--ds-config``, ``--resume``,
    ``--overwrite``,
    and the launcher's hidden ``--local_rank`` (LOCAL_RANK in the environment is used)."""
    parser.add_argument("--data-dir", help="data root (default: $KGQA_DATA_DIR)")
    parser.add_argument("--output-dir", help="run directory (default: the preset's)")
    parser.add_argument("--ds-config", help="DeepSpeed JSON config (default: ds_config.json)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUTPUT_DIR/last if it exists (else start afresh)")
    parser.add_argument("--overwrite", action="store_true",
                        help="remove the run already in OUTPUT_DIR first (else it is an error)")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)


def apply_run_arguments(train_config: Any, args: argparse.Namespace) -> None:
    """``--data-dir`` / ``--output-dir``, when given, win over the preset and overrides."""
    if args.data_dir:
        train_config.data_dir = str(args.data_dir)
    if args.output_dir:
        train_config.output_dir = str(args.output_dir)


USER_ERRORS = (ConfigError, DataFormatError, FileNotFoundError, FileExistsError)


def run_cli(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None,
            user_errors: tuple[type[BaseException], ...] = ()) -> int:
    """``main(argv)``'s status (0 for a non-int result); a user's mistake (:data:`USER_ERRORS`,
    ``user_errors``) ends in one line ``error: ...`` on stderr and status 2, no traceback.
    Started by a recipe, the command stops when the recipe is gone
    (:func:`hitter_core.runtime.stop_with_recipe`)."""
    stop_with_recipe()
    try:
        status = main(argv)
    except USER_ERRORS + tuple(user_errors) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return status if isinstance(status, int) else 0
