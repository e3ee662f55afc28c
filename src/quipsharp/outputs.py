"""Where quipsharp writes, and what it refuses to touch.

quipsharp never deletes or overwrites anything a user did not ask it to replace. The rules:

* **Outputs** (:func:`check_output`): an output directory must not exist, or be an empty
  directory, or be an output of the same kind (a quipsharp model directory) that the caller asked to
  replace (``overwrite=True``). Never a file, never an input or a directory holding an input, never
  the current directory or one of its ancestors. Writability is probed before any work starts.
* **Publishing** (:func:`staging_dir`, :func:`publish_dir`): a directory is written under a hidden
  staging name beside its destination and swapped in whole (``renameat2(RENAME_EXCHANGE)`` where the
  kernel has it, two renames otherwise); the old one is removed only once the new one is in place.
* **Locks** (:func:`locked`): an exclusive ``flock`` on a hidden sibling file ``.NAME.lock`` (holding
  the owner's pid) guards an output or a work directory for a whole run, so two runs never write the
  same place. The kernel drops the lock when its process dies, so a lock left by a killed run is
  free; the file is removed on release.
* **Leftovers** (:func:`recover_leftovers`): staging directories of a crashed save are removed by the
  next run holding the lock (they are incomplete, or the old output a replace had already swapped
  out); a directory an older quipsharp parked as ``.NAME.old`` is put back if the output is missing.
* **Work directories** (:class:`WorkDir`): per-block progress of a quantization run. A directory
  quipsharp creates is removed by quipsharp after success; a directory the user named is never
  removed, and only the files quipsharp wrote in it are. A directory holding other files, or the
  progress of an interrupted run that the caller did not ask to resume, is refused.
* New files and directories get the modes the umask gives (not ``tempfile``'s private 0600/0700).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from quipsharp import faults
from quipsharp.errors import QuipSharpError

logger = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
STAGING_INFIX = ".quipsharp-partial-"
LEGACY_OLD_SUFFIX = ".old"  # where quipsharp ≤ 0.1 parked the previous output while replacing it
WORK_MARKER = "quipsharp-work.json"
WORK_KIND = "quipsharp-work"
PROGRESS_FILE = "progress.json"
BLOCK_FILE = "block_{:05d}.safetensors"
BLOCK_FILE_RE = re.compile(r"block_\d{5}\.safetensors")
SPILL_DIR = "stream-spill"  # the calibration stream on disk (quantize --max-memory)
ATOMIC_TMP_RE = re.compile(r"\..+\.tmp")  # io.atomic_* temporaries of an interrupted write
RENAME_EXCHANGE = 2
AT_FDCWD = -100
DEFAULT_UMASK = 0o022


class OutputError(QuipSharpError, ValueError):
    """An output or work directory cannot be used; the message names the problem."""


class LockedError(OutputError):
    """Another live process holds the lock on an output or work directory."""


# --------------------------------------------------------------------------- modes
def current_umask() -> int:
    """The process umask, read without changing it where ``/proc`` allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(DEFAULT_UMASK)
    os.umask(mask)
    return mask


def normal_file_mode(path: str | os.PathLike) -> None:
    """Give a file made by ``tempfile`` (0600) the mode an ordinary ``open`` would have given it."""
    os.chmod(path, 0o666 & ~current_umask())


def normal_dir_mode(path: str | os.PathLike) -> None:
    """Give a directory made by ``tempfile`` (0700) the mode an ordinary ``mkdir`` would have given it."""
    os.chmod(path, 0o777 & ~current_umask())


# --------------------------------------------------------------------------- checks
def _is_within(path: Path, ancestor: Path) -> bool:
    return path == ancestor or ancestor in path.parents


def overlaps(a: Path, b: Path) -> bool:
    """Whether one of two resolved paths is, or lies inside, the other."""
    return _is_within(a, b) or _is_within(b, a)


def _existing_ancestor(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def probe_writable(directory: Path) -> None:
    """Raise :class:`OutputError` unless a file can be created in ``directory`` (or, if it does not
    exist yet, in its nearest existing ancestor)."""
    where = _existing_ancestor(directory)
    if not where.is_dir():
        raise OutputError(f"cannot create {directory}: {where} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".quipsharp-probe-", dir=where)
    except OSError as err:
        raise OutputError(f"cannot write to {where}: {err.strerror or err}") from err
    os.close(fd)
    os.unlink(probe)


def check_output(
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    inputs: tuple[str | os.PathLike, ...] = (),
    replaceable: Callable[[Path], bool] | None = None,
    kind: str = "quipsharp model directory",
) -> Path:
    """Validate an output directory before any work; returns its absolute path.

    Args:
        out: where the output directory will be.
        overwrite: whether an existing output of the same kind may be replaced.
        inputs: paths the run reads (a model directory or file, calibration text): the output may be
            none of them and may not contain any of them.
        replaceable: tells whether an existing non-empty directory is an output of the same kind
            (default: a quipsharp model directory).
        kind: what the output is, for messages.
    """
    if replaceable is None:
        from quipsharp.format import is_quantized_dir as replaceable

    path = Path(out).expanduser()
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if _is_within(cwd, resolved):
        raise OutputError(f"--out {out} is the current directory or one of its parents: name a new directory")
    for item in inputs:
        source = Path(item).expanduser()
        if not source.exists():
            continue
        source = source.resolve()
        if _is_within(source, resolved):
            what = "is" if source == resolved else "contains"
            raise OutputError(f"--out {out} {what} the input {item}: choose another output directory")
    if resolved.exists() or path.is_symlink():
        if not resolved.is_dir():
            raise OutputError(f"--out {out} exists and is not a directory: refusing to replace it")
        if any(resolved.iterdir()):
            if not replaceable(resolved):
                raise OutputError(f"--out {out} exists and is not a {kind}: refusing to replace it; "
                                  "name a new or empty directory")
            if not overwrite:
                raise OutputError(f"--out {out} already holds a {kind}: pass --overwrite to replace it")
    probe_writable(resolved.parent)
    return resolved


# --------------------------------------------------------------------------- locks
_held: dict[Path, list] = {}  # path -> [fd, depth]: locks this process holds (re-entrant)


def lock_path(path: Path) -> Path:
    """The lock file guarding ``path``: a hidden sibling."""
    return path.parent / f".{path.name}{LOCK_SUFFIX}"


def _owner(fd: int) -> str:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {data.get('pid')} on {data.get('host')}"
    except (OSError, ValueError):
        return "another process"


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on ``path`` (an output or work directory) for the ``with`` block.

    Raises :class:`LockedError` at once if a live process holds it. Re-entrant within a process."""
    path = Path(path).expanduser().resolve()
    if path in _held:
        _held[path][1] += 1
        try:
            yield path
        finally:
            _held[path][1] -= 1
        return
    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner(fd)
            os.close(fd)
            raise LockedError(f"{path} is in use by {owner} (lock {lock}); wait for it to finish") from None
        # the previous holder may have unlinked the file between our open and flock: lock the live one
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
    _held[path] = [fd, 1]
    try:
        yield path
    finally:
        del _held[path]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


# --------------------------------------------------------------------------- staging and publishing
def staging_dir(out: Path) -> Path:
    """A new hidden directory beside ``out`` to write the output into (normal modes)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{STAGING_INFIX}", dir=out.parent))
    normal_dir_mode(tmp)
    return tmp


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish_dir(tmp: Path, out: Path) -> None:
    """Put the complete directory ``tmp`` at ``out``, replacing what is there (an empty directory or a
    previous output the caller checked). The old one is removed only after the new one is in place."""
    if not out.exists():
        tmp.rename(out)
        return
    if out.is_dir() and not any(out.iterdir()):
        os.replace(tmp, out)  # rename(2) replaces an empty directory atomically
        return
    if _rename_exchange(tmp, out):
        faults.point("publish:swapped")
        shutil.rmtree(tmp)  # now holds the old output
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}{STAGING_INFIX}", dir=out.parent))
    old.rmdir()
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old)


def recover_leftovers(out: Path) -> list[str]:
    """Clean what a crashed save of ``out`` left beside it; call with the lock on ``out`` held.

    Returns one message per thing done (also logged as warnings)."""
    done = []
    if not out.parent.is_dir():
        return done
    legacy = out.parent / f".{out.name}{LEGACY_OLD_SUFFIX}"
    if legacy.is_dir() and not out.exists():
        legacy.rename(out)
        done.append(f"restored {out} from {legacy.name}, left by an interrupted replace")
    elif legacy.exists():
        done.append(f"{legacy} is a copy an older quipsharp left while replacing {out}; remove it if unneeded")
    for stale in sorted(out.parent.glob(f".{glob_escape(out.name)}{STAGING_INFIX}*")):
        shutil.rmtree(stale, ignore_errors=True)
        done.append(f"removed {stale.name}, left by an interrupted save of {out.name}")
    for message in done:
        logger.warning("%s", message)
    return done


def glob_escape(name: str) -> str:
    """``name`` with glob metacharacters escaped."""
    return re.sub(r"([*?\[])", r"[\1]", name)


# --------------------------------------------------------------------------- work directories
SPILL_BATCHES_RE = re.compile(r"batches-\w+")
SPILL_FILE_RE = re.compile(r"\d{6}\.pt")


def remove_spill(path: Path) -> None:
    """Remove the calibration stream's files from a work directory's ``stream-spill`` folder
    (``batches-*/NNNNNN.pt``, as ``pipeline.SpilledStream`` writes them), and the folders once empty;
    anything else in it, e.g. a folder of the user's that happens to have this name, stays."""
    if not path.is_dir() or path.is_symlink():
        return
    for sub in path.iterdir():
        if SPILL_BATCHES_RE.fullmatch(sub.name) and sub.is_dir() and not sub.is_symlink():
            for file in sub.iterdir():
                if SPILL_FILE_RE.fullmatch(file.name) and file.is_file():
                    file.unlink()
            with contextlib.suppress(OSError):
                sub.rmdir()
    with contextlib.suppress(OSError):
        path.rmdir()


class WorkDir:
    """The per-block progress directory of one quantization run (see the module docstring).

    Args:
        path: the directory.
        resume: the caller wants to continue the progress it holds.
    """

    def __init__(self, path: str | os.PathLike, resume: bool = False) -> None:
        self.path = Path(path).expanduser().resolve()
        self.resume = resume
        self.created = False
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"work directory {self.path} exists and is not a directory")
        if self.path.is_dir():
            foreign = [p.name for p in self.path.iterdir() if not self._ours(p.name)]
            if foreign:
                raise OutputError(f"work directory {self.path} holds files quipsharp did not write "
                                  f"({', '.join(sorted(foreign)[:3])}): name an empty or new directory")
            if (self.path / PROGRESS_FILE).is_file() and not resume:
                raise OutputError(f"work directory {self.path} holds the progress of an interrupted run: "
                                  "pass --resume to continue it, or remove the directory to start afresh")
        self.marker_existed = (self.path / WORK_MARKER).is_file()

    @staticmethod
    def _ours(name: str) -> bool:
        return (name in (PROGRESS_FILE, WORK_MARKER, SPILL_DIR) or BLOCK_FILE_RE.fullmatch(name) is not None
                or ATOMIC_TMP_RE.fullmatch(name) is not None)

    def create(self) -> Path:
        """Create the directory (if needed) and its marker; returns the path."""
        if not self.path.exists():
            self.path.mkdir(parents=True)
            self.created = True
        marker = self.path / WORK_MARKER
        if not marker.exists():
            marker.write_text(json.dumps({"kind": WORK_KIND, "created": self.created}))
        return self.path

    def owned_by_quipsharp(self) -> bool:
        """Whether quipsharp created this directory (now or in the run it resumes)."""
        if self.created:
            return True
        try:
            return bool(json.loads((self.path / WORK_MARKER).read_text()).get("created"))
        except (OSError, ValueError):
            return False

    def cleanup(self) -> None:
        """Remove the files quipsharp wrote, and the directory itself if quipsharp created it and
        nothing else is in it. Called after the run's output is safely saved."""
        if not self.path.is_dir():
            return
        owned = self.owned_by_quipsharp()
        for item in self.path.iterdir():
            if self._ours(item.name) and item.is_file():
                item.unlink()
            elif item.name == SPILL_DIR:
                remove_spill(item)
        if owned:
            with contextlib.suppress(OSError):
                self.path.rmdir()
