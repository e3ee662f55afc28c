"""Named points where a test can kill the process, to prove that no kill loses or corrupts work.

Every step that changes files calls :func:`point` with a name. Normally that is a dictionary lookup
and nothing happens. Under test, two environment variables act on it:

* ``QUIPSHARP_FAULT_LOG=FILE`` appends each point's name to FILE as it is reached (to list the
  points a run passes through);
* ``QUIPSHARP_FAULT_KILL=N`` sends SIGKILL to the process at the N-th point reached (1-based): no
  cleanup handler, ``finally`` block or buffered write runs, as with a power cut or the OOM killer.
"""

from __future__ import annotations

import os
import signal

LOG_ENV = "QUIPSHARP_FAULT_LOG"
KILL_ENV = "QUIPSHARP_FAULT_KILL"

_reached = 0


def point(name: str) -> None:
    """A place where the process may be killed under test (see the module docstring)."""
    global _reached
    log, kill = os.environ.get(LOG_ENV), os.environ.get(KILL_ENV)
    if log is None and kill is None:
        return
    _reached += 1
    if log is not None:
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(f"{name}\n")
    if kill is not None and _reached == int(kill):
        os.kill(os.getpid(), signal.SIGKILL)
