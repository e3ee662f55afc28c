"""Named points where a test can kill the process, to prove that no kill loses or corrupts work.

Every step that changes files calls :func:`point` with a name. Normally that is a dictionary lookup
and nothing happens. Under test, two environment variables act on it:

* ``QUIPSHARP_FAULT_LOG=FILE`` appends each point's name to FILE as it is reached (to list the
  points a run passes through);
* ``QUIPSHARP_FAULT_KILL=N`` sends SIGKILL to the process at the N-th point reached (1-based): no
  cleanup handler, ``finally`` block or buffered write runs, as with a power cut or the OOM killer;
* ``QUIPSHARP_FAULT_KILL_ONCE=NAME=FILE`` sends SIGKILL to the first process, of all that share the
  variable (e.g. a Ray cluster's workers), that reaches point NAME; it claims the kill by creating FILE,
  so a retried task runs through.
"""

from __future__ import annotations

import os
import signal

LOG_ENV = "QUIPSHARP_FAULT_LOG"
KILL_ENV = "QUIPSHARP_FAULT_KILL"
KILL_ONCE_ENV = "QUIPSHARP_FAULT_KILL_ONCE"

_reached = 0


def point(name: str) -> None:
    """A place where the process may be killed under test (see the module docstring)."""
    global _reached
    log, kill, once = os.environ.get(LOG_ENV), os.environ.get(KILL_ENV), os.environ.get(KILL_ONCE_ENV)
    if log is None and kill is None and once is None:
        return
    if once is not None:
        target, _, claim = once.partition("=")
        if name == target and claim:
            try:
                os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass  # another process took this kill
            else:
                os.kill(os.getpid(), signal.SIGKILL)
    _reached += 1
    if log is not None:
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(f"{name}\n")
    if kill is not None and _reached == int(kill):
        os.kill(os.getpid(), signal.SIGKILL)
