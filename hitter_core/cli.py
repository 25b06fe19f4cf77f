"""The command line shared by both stages (STYLE.md habit 14): ``--preset`` and positional
``section.key=value`` overrides (:mod:`hitter_core.sections`), the run flags, and one clear line
instead of a traceback when the user made a mistake (habit 15)."""

import argparse
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from hitter_core.data import DataFormatError
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
    Started by a recipe, the command stops when the recipe is gone (:func:`stop_with_recipe`)."""
    stop_with_recipe()
    try:
        status = main(argv)
    except USER_ERRORS + tuple(user_errors) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return status if isinstance(status, int) else 0


# Set by recipes/*.sh: "pid@host" of each recipe in the chain that started this process,
# comma-separated (a recipe started by another adds itself).
RECIPE_PIDS_ENV = "HITTER_RECIPE_PIDS"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process its parent has not reaped yet is a zombie: gone all the same
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return True


def stop_with_recipe(interval: float = 1.0) -> None:
    """When a recipe that started this process (:data:`RECIPE_PIDS_ENV`) is gone, even killed
    with SIGKILL, which no trap sees, this process sends itself SIGTERM: no worker trains on
    as an orphan that a later ``--resume`` would collide with. Checkpoints are written
    atomically, so stopping at any moment loses nothing. A watch thread, checked every
    ``interval`` seconds; nothing when the variable is unset. Processes on other hosts (a
    multi-node launch) do not watch: the ids are this host's."""
    here = socket.gethostname()
    pids = [int(pid) for pid, _, host in (e.strip().partition("@") for e in
                                          os.environ.get(RECIPE_PIDS_ENV, "").split(","))
            if pid and host == here]
    if not pids:
        return

    def watch() -> None:
        while all(map(_alive, pids)):
            time.sleep(interval)
        print(f"the recipe that started this process is gone ({RECIPE_PIDS_ENV}="
              f"{os.environ[RECIPE_PIDS_ENV]}): stopping", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="stop-with-recipe", daemon=True).start()
