"""Process plumbing that both trainers need and no reader of a training loop should have to
follow: the environment of a training process, the stale-build-lock check, the recipe
watchdog and the fault points of the crash tests.

* :func:`prepare_process`: the environment a training process needs before DeepSpeed is
  imported (its accelerator, where it builds its ops, the rank variables of a world of one)
  and the stale-lock check; :func:`hitter_core.distributed.init_distributed` calls it once.
* :func:`stop_with_recipe`: a worker started by a recipe stops when the recipe is gone
  (:func:`hitter_core.cli.run_cli` starts it once per command).
* :func:`crash_point`: ``HITTER_CRASH_AT=point[:n]`` kills the process with SIGKILL (nothing
  cleaned up, nothing flushed) the n-th time (default 1) it reaches ``crash_point("point")``;
  without the variable a crash point costs one dictionary look-up. The points: ``train-step``
  (between backward and the optimizer step, both stages), ``checkpoint-write`` (a checkpoint
  complete in its temporary directory, not yet swapped in), ``checkpoint-swap`` (between the
  two renames of the swap: only ``.old`` exists), ``evaluate`` (inside link-prediction
  ranking), ``predict`` (inside QA prediction), ``metrics-log`` (half of a metrics line
  written). ``tests/test_faults.py`` kills both stages at each.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- the process


def prepare_process(device: str = "auto") -> bool:
    """Set what a training process needs before ``import deepspeed``: ``DS_ACCELERATOR=cpu``
    for ``device="cpu"``, ``TORCH_EXTENSIONS_DIR`` (:func:`extensions_dir`), and, without a
    launcher, the rank variables of a world of one and a free ``MASTER_PORT`` (DeepSpeed's CPU
    op names its shared memory after it). Variables already set are kept. Returns whether the
    process is alone (no launcher)."""
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))
    alone = "WORLD_SIZE" not in os.environ
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    return alone


def extensions_dir() -> Path:
    """Where DeepSpeed builds its ops unless ``$TORCH_EXTENSIONS_DIR`` says: inside a virtual
    environment, its own ``torch_extensions`` folder (torch's default, ~/.cache/torch_extensions,
    is shared by every environment of one Python, and an op built by another environment's
    torch or ninja is rebuilt, 1-2 minutes, each time the environment changes); else torch's."""
    venv = Path(sys.prefix)
    if sys.prefix != sys.base_prefix and os.access(venv, os.W_OK):
        return venv / "torch_extensions"
    from torch._appdirs import user_cache_dir

    return Path(user_cache_dir(appname="torch_extensions"))


STALE_LOCK_SECONDS = 600  # building DeepSpeed's CPU communication op takes 1-2 minutes


class StaleBuildLock(FileExistsError):
    """A build lock left by an interrupted build of a DeepSpeed op."""


def check_build_locks(now: float | None = None) -> None:
    """Raise :class:`StaleBuildLock` if a DeepSpeed op build in the torch extensions cache
    (``$TORCH_EXTENSIONS_DIR``) left its ``lock`` file more than :data:`STALE_LOCK_SECONDS`
    ago: torch waits on such a lock forever, without a word."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or extensions_dir()
    now = time.time() if now is None else now
    for lock in (*Path(root).glob("deepspeed_*/lock"), *Path(root).glob("*/deepspeed_*/lock")):
        age = now - lock.stat().st_mtime
        if age > STALE_LOCK_SECONDS:
            raise StaleBuildLock(
                f"{lock}: left by a build of a DeepSpeed op interrupted {age / 60:.0f} minutes "
                f"ago; every run would wait on it forever. Remove the file and run again")
        logger.warning("%s: another process is building a DeepSpeed op (for %.0f s); waiting "
                       "for it. If none is, an interrupted build left the file: remove it",
                       lock, age)


# ---------------------------------------------------------------------------- the recipe watchdog

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


# ---------------------------------------------------------------------------- fault points

CRASH_ENV = "HITTER_CRASH_AT"
_reached: dict[str, int] = {}


def crash_point(name: str) -> None:
    """SIGKILL this process here if ``$HITTER_CRASH_AT`` names this point (module docstring)."""
    spec = os.environ.get(CRASH_ENV)
    if not spec or spec.partition(":")[0] != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == int(spec.partition(":")[2] or 1):
        os.kill(os.getpid(), signal.SIGKILL)
