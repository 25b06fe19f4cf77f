"""Fault injection for the crash tests (tests/test_faults.py): ``HITTER_CRASH_AT=point[:n]``
kills the process with SIGKILL (nothing cleaned up, nothing flushed) the n-th time (default 1)
it reaches ``crash_point("point")``. Without the variable a crash point costs one dictionary
look-up. The points: ``train-step`` (between backward and the optimizer step, both stages),
``checkpoint-write`` (a checkpoint complete in its temporary directory, not yet swapped in),
``checkpoint-swap`` (between the two renames of the swap: only ``.old`` exists), ``evaluate``
(inside link-prediction ranking), ``predict`` (inside QA prediction), ``metrics-log`` (half of
a metrics line written)."""

import os
import signal

ENV = "HITTER_CRASH_AT"
_reached: dict[str, int] = {}


def crash_point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec or spec.partition(":")[0] != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == int(spec.partition(":")[2] or 1):
        os.kill(os.getpid(), signal.SIGKILL)
