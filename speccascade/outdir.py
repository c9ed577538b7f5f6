"""One writer per output directory, and a record of what wrote it.

Every command that writes under ``--out`` (log-traces, train-deferral, evaluate, compare, bench, and demo, whose
steps have their own directories below its own) goes through :class:`OutputDir` (``finetune``, which records its own
recipe, takes the same lock with :func:`locked`; :func:`writable` is the path check alone):

- :meth:`OutputDir.check` (while settings are resolved, before anything is written) refuses a
  path that is a file or cannot be written, a directory another command wrote, one written with
  other settings (naming them), and an earlier run of the same settings unless ``--resume``
  (continue it) or ``--overwrite`` (replace it) is given;
- :meth:`OutputDir.claim` takes the directory's lock file ``.speccascade.lock`` (an exclusive
  ``flock``, released by the kernel whatever ends the process; the file records the owner's pid,
  host and start time), writes the marker ``.speccascade.json`` (command, settings, version, whether
  the run completed), and, when the run fails, removes a directory it created that holds no
  completed work.

A lock whose owner has died (``kill -9``, a crash) is stale: the next run reports it and takes it
over. Processes started by a launcher for ranks other than 0 (Lightning's DDP) neither check
nor lock: rank 0 does both for them.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Callable, Iterator

from .errors import SpeccascadeError
from .report import json_text, read_json, write_json
from .version import __version__

MARKER = ".speccascade.json"
LOCK = ".speccascade.lock"
NAME_MAX, PATH_MAX = 255, 4096  # bytes: the longest file name, and PATH_MAX (the longest path and its NUL) of Linux
ROOM = 255  # bytes of a path kept for the files a command writes under --out


def changed(old: dict, new: dict) -> str:
    """``limit=6 (now 5), task='gsm8k' (now 'qa')``: the settings that differ between two configurations."""
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}={old.get(k)!r} (now {new.get(k)!r})" for k in keys)


def launched_child() -> bool:
    """Whether this process is a non-zero rank started by a launcher (it shares rank 0's directory)."""
    return any(os.environ.get(name, "0") not in ("", "0") for name in ("LOCAL_RANK", "NODE_RANK", "RANK"))


def _writable_parent(path: Path) -> Path:
    """The nearest existing ancestor of ``path``, checked to be a writable directory."""
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise SpeccascadeError(f"--out {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SpeccascadeError(f"--out {path}: {parent} is not writable")
    return parent


def fits(path: str | Path, what: str, room: int = 0) -> Path:
    """Refuse a path the file system cannot hold, naming ``what`` it is (``--out``, ``--data-file``): a name over
    ``NAME_MAX`` bytes, or a path that leaves less than ``room`` bytes of ``PATH_MAX`` for the files written in it."""
    path = Path(path)
    shown = str(path) if len(str(path)) <= 60 else f"{str(path)[:60]}..."
    name = max(path.parts, key=lambda part: len(os.fsencode(part)), default="")
    if len(os.fsencode(name)) > NAME_MAX:
        raise SpeccascadeError(f"{what} {shown}: a name of {len(os.fsencode(name))} bytes; the file system takes at most {NAME_MAX}")
    size = len(os.fsencode(path.absolute()))
    if size > PATH_MAX - 1 - room:
        raise SpeccascadeError(f"{what} {shown}: the path is {size} bytes long; keep it to {PATH_MAX - 1 - room} (the file "
                               f"system takes {PATH_MAX - 1}{', and the files written in it need room' if room else ''})")
    return path


def writable(path: str | Path) -> Path:
    """Refuse an output path that is too long, is a file, or lies below no writable directory; writes nothing."""
    path = fits(path, "--out", ROOM)
    if path.exists() and not path.is_dir():
        raise SpeccascadeError(f"--out {path} is a file, not a directory")
    _writable_parent(path)
    return path


class OutputDir:
    """The output directory of one run of ``command`` with settings ``config`` (JSON values).

    ``progress`` are glob patterns of files that hold completed work (shards, points, checkpoints):
    a failed run that created the directory removes it unless one of them exists.
    """

    def __init__(self, path: str | Path, command: str, config: dict, resume: bool = False, overwrite: bool = False,
                 progress: tuple[str, ...] = (), legacy: Callable[[Path], dict | None] | None = None) -> None:
        self.path, self.command, self.config = Path(path), command, config
        self.resume, self.overwrite, self.progress = resume, overwrite, progress
        self.legacy = legacy  # reads the marker of a directory written before markers existed (None: not one)
        self.previous: dict | None = None  # the marker of an earlier run of these settings
        self._checked = False

    # -- before anything is written ----------------------------------------------------------
    def check(self) -> "OutputDir":
        """Refuse an unusable directory (see the module docstring); writes nothing."""
        self._checked = True
        if launched_child():
            return self
        path = writable(self.path)
        if not path.exists() or not any(path.iterdir()):
            return self
        marker = read_marker(path) or (self.legacy(path) if self.legacy else None)
        if marker is None:
            raise SpeccascadeError(f"--out {path} is not empty and was not written by speccascade {self.command}; "
                                   "choose a new or empty directory")
        if marker.get("command") != self.command:
            raise SpeccascadeError(f"--out {path} holds the output of `speccascade {marker.get('command')}`, not of "
                                   f"{self.command}; choose another directory")
        difference = changed(marker.get("config", {}), self.config)
        if difference and not self.overwrite:
            raise SpeccascadeError(f"{path} was written with a different configuration: {difference}; choose another "
                                   "directory, or pass --overwrite to replace it")
        if not difference and self.resume:
            self.previous = marker
        elif not self.overwrite:
            state = "a finished run" if marker.get("complete") else "an interrupted run"
            raise SpeccascadeError(f"{path} already holds {state} of these settings; pass --resume to continue, "
                                   "--overwrite to start again, or choose another directory")
        return self

    @property
    def complete(self) -> bool:
        """Whether the earlier run being resumed had finished."""
        return bool(self.previous and self.previous.get("complete"))

    # -- while the run writes ----------------------------------------------------------------
    @contextmanager
    def claim(self) -> Iterator["OutputDir"]:
        """Hold the lock while the body runs; mark the run complete with :meth:`finish`."""
        if launched_child():
            yield self
            return
        if not self._checked:
            self.check()
        created = _create(self.path)
        handle = _lock(self.path, self.command, created)
        fresh = created or self.previous is None  # nothing of an earlier run is kept
        try:
            if self.previous is None:
                _clear(self.path)  # empty already, or the earlier run --overwrite replaces
            self._write_marker(complete=self.complete)
            yield self
        except BaseException:
            if fresh and not self._has_progress():
                _clear(self.path)
                if created:
                    shutil.rmtree(self.path, ignore_errors=True)
            raise
        finally:
            _unlock(self.path, handle)

    def reopen(self) -> None:
        """Record that the run being resumed is unfinished again (it redoes work found damaged)."""
        if self.previous:
            self.previous["complete"] = False
            self._write_marker(complete=False)

    def finish(self) -> None:
        """Record that the run completed."""
        if not launched_child():
            self._write_marker(complete=True)

    def _has_progress(self) -> bool:
        return any(any(self.path.glob(pattern)) for pattern in self.progress)

    def _write_marker(self, complete: bool) -> None:
        marker = {"command": self.command, "config": self.config, "speccascade_version": __version__,
                  "complete": complete, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_json(self.path / MARKER, marker)


@contextmanager
def locked(directory: Path, command: str) -> Iterator[None]:
    """Hold ``directory``'s lock (created if missing) while the body runs, for a command that keeps its own
    record of what it wrote (``finetune``); a directory this created and the body left empty is removed."""
    created = _create(directory)
    handle = _lock(directory, command, created)
    try:
        yield
    finally:
        _unlock(directory, handle)
        if created and not any(directory.iterdir()):
            directory.rmdir()


def _create(directory: Path) -> bool:
    """Create ``--out`` (and its parents) if missing; whether this call created it."""
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SpeccascadeError(f"cannot create --out {directory}: {err.strerror}") from None
    return created


def read_marker(path: Path) -> dict | None:
    """The marker of a directory, or None when it has none (a damaged one is a :class:`SpeccascadeError`)."""
    return read_json(path / MARKER) if (path / MARKER).is_file() else None


def _clear(path: Path) -> None:
    """Empty a directory before an --overwrite run (its lock file stays: this run holds it)."""
    for child in path.iterdir():
        if child.name == LOCK:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner(text: str) -> dict:
    try:
        owner = json.loads(text)
    except ValueError:
        return {}
    return owner if isinstance(owner, dict) else {}


def _describe(owner: dict) -> str:
    return (f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')} "
            f"(speccascade {owner.get('command', '?')}, since {owner.get('started', '?')})")


def _lock(directory: Path, command: str, created: bool) -> int:
    """Take the directory's lock or refuse, naming the owner; report and take over a stale lock. A lock that cannot
    be taken or recorded (a busy directory, a full disk) leaves no lock file of this run's behind, nor a directory
    this run ``created`` and left empty, so the next run finds nothing in its way."""
    try:
        return _take(directory, command)
    except BaseException:
        if created:
            with suppress(OSError):
                directory.rmdir()  # only if empty: a busy directory holds its owner's lock file
        raise


def _take(directory: Path, command: str) -> int:
    path = directory / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            owner = _owner(path.read_text() if path.exists() else "")
            raise SpeccascadeError(f"{directory} is being written by {_describe(owner)}; wait for it to finish, "
                                   "or choose another --out") from None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:  # else the previous owner removed the file between our open and flock: try again
            break
        os.close(fd)
    try:
        _record_owner(directory, fd, command)
    except BaseException:
        _unlock(directory, fd)  # the lock file goes with the failed start (a full disk): the next run takes it afresh
        raise
    return fd


def _record_owner(directory: Path, fd: int, command: str) -> None:
    """Report a stale owner in the held lock file, then write this process's record into it (no rename)."""
    previous = _owner(os.pread(fd, 1 << 16, 0).decode(errors="replace"))
    if previous:
        dead = previous.get("host") == socket.gethostname() and isinstance(previous.get("pid"), int) and not _alive(previous["pid"])
        print(f"{directory}: taking over a stale lock of {_describe(previous)}, which ended without releasing it"
              f"{' (that process no longer exists)' if dead else ''}", file=sys.stderr)
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json_text(owner, indent=None).encode(), 0)


def _unlock(directory: Path, fd: int) -> None:
    """Remove the lock file, then release it (a process that opened it meanwhile notices and retries)."""
    try:
        (directory / LOCK).unlink(missing_ok=True)
    finally:
        os.close(fd)
