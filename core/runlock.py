"""One live writer per run directory: an exclusive lock on ``RUN/.lock``.

``with RunLock(run_dir):`` holds the folder for the block. The lock is an advisory
``flock(LOCK_EX | LOCK_NB)`` on ``RUN/.lock``, which the kernel drops when its holder dies, so a
lock file left behind by a killed process is simply taken over (with a notice naming that
process). A folder held by a live process raises :class:`RunLockedError` naming the folder, the
holder's pid and start time, and what to do.

The lock file holds the holder's pid, hostname and start time (JSON), written once the lock is
taken, and is removed when the lock is released. Where ``fcntl`` is not available the lock is
the lock file itself, made with ``O_CREAT | O_EXCL``; a file naming a process of this host that
is no longer running is taken over.

Within one process a folder is held once: a second ``RunLock`` on it raises, unless the first
was made with ``nested=True``, in which case the inner ones share it (a sweep worker holds a
run while the trainer inside it takes the lock too).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import threading
import time
import weakref
from pathlib import Path

from .errors import RunLockedError, VsdError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_NAME = ".lock"
DEFAULT_HINT = "wait for it to finish, or choose another --out"
_POLL_S = 0.2
_UNWRITTEN_STALE_S = 30.0  # a lock file still empty after this long (exclusive-create mode) was abandoned
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}

_held: "weakref.WeakValueDictionary[str, RunLock]" = weakref.WeakValueDictionary()
_guard = threading.Lock()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host is running (a zombie counts as running)."""
    if pid <= 0:
        return False
    if os.name == "nt":
        import ctypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.get_last_error() == 5  # access denied: it exists
        try:
            code = ctypes.c_ulong()
            kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
            return code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _when(info: dict) -> str:
    started = info.get("started")
    if isinstance(started, (int, float)):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
    return "an unknown time"


def _parse(text: str) -> dict | None:
    try:
        info = json.loads(text)
    except ValueError:
        return None
    return info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None


def read_holder(run_dir: str | Path) -> dict | None:
    """What the lock file of ``run_dir`` says about its writer (pid, host, started), or None.

    It does not say whether that writer still holds the lock: see :func:`is_locked`."""
    try:
        return _parse((Path(run_dir) / LOCK_NAME).read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return None


def is_locked(run_dir: str | Path) -> bool:
    """Whether a live process (this one included) holds ``run_dir`` now."""
    run_dir = Path(run_dir)
    path = run_dir / LOCK_NAME
    if not path.exists():
        return False
    with _guard:
        if os.path.realpath(run_dir) in _held:
            return True
    if fcntl is None:
        info = read_holder(run_dir)
        return info is None or info.get("host") != socket.gethostname() or pid_alive(info["pid"])
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


class RunLock:
    """Exclusive hold on a run directory (see the module docstring).

    ``RunLock(run_dir).acquire()`` or ``with RunLock(run_dir):``. ``wait``: block until the
    holder lets go instead of raising. ``hint``: what the error tells the user to do.
    ``quiet``: do not print the notice of a lock taken over (it stays in :attr:`notice`).
    """

    def __init__(self, run_dir: str | Path, *, wait: bool = False, nested: bool = False, hint: str = DEFAULT_HINT, quiet: bool = False):
        self.dir = Path(run_dir)
        self.path = self.dir / LOCK_NAME
        self.wait, self.nested, self.hint, self.quiet = wait, nested, hint, quiet
        self.notice: str | None = None  # "taking over the lock left by process N, ..." when that happened
        self.held = False
        self._fd: int | None = None
        self._key: str | None = None
        self._outer: RunLock | None = None
        self._created_dir = False
        self._exclusive_file = False  # the lock is the file itself (no flock)
        self._info: dict = {}
        self._pid = os.getpid()  # a forked child inherits the object but must not let go for its parent

    # ---- taking and releasing ---------------------------------------------------------------
    def acquire(self) -> "RunLock":
        if self.held:
            return self
        if self.dir.exists() and not self.dir.is_dir():
            raise VsdError(f"{self.dir} is a file, not a folder; choose another --out")
        created = not self.dir.exists()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise VsdError(f"cannot write to {self.dir}: {exc.strerror or exc}; choose another --out") from None
        key = os.path.realpath(self.dir)
        with _guard:
            outer = _held.get(key)
            if outer is not None and outer.held:
                if not outer.nested:
                    raise self._locked(outer._info, this_process=True)
                self._outer, self.held = outer, True
                return self
        try:
            if fcntl is None or not self._acquire_flock():
                self._acquire_exclusive_file()
        except BaseException as exc:
            if self._fd is not None:  # taken, but its file could not be written
                os.close(self._fd)
                self._fd = None
            self._forget_dir(created)
            if isinstance(exc, OSError):
                raise VsdError(f"cannot write to {self.path}: {exc.strerror or exc}; choose another --out") from None
            raise
        self._key, self._created_dir, self.held, self._pid = key, created, True, os.getpid()
        with _guard:
            _held[key] = self
        if self.notice and not self.quiet:
            print(self.notice, file=sys.stderr, flush=True)
        return self

    def release(self) -> None:
        """Let go (idempotent). The lock file is removed, and the folder too when this lock
        made it and nothing else was written there."""
        if not self.held:
            return
        self.held = False
        if os.getpid() != self._pid:
            return
        if self._outer is not None:
            self._outer = None
            return
        with _guard:
            if self._key is not None and _held.get(self._key) is self:
                del _held[self._key]
        try:
            if self._exclusive_file:
                if _parse(self._read_path() or "") == self._info:  # still ours
                    self.path.unlink(missing_ok=True)
            elif self._fd is not None:
                # removed while still locked: a process that opened it meanwhile finds it gone
                # after its flock (see _acquire_flock) and starts over on a fresh file
                self.path.unlink(missing_ok=True)
        except OSError:
            pass
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        self._forget_dir(self._created_dir)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        try:
            self.release()
        except Exception:
            pass

    # ---- the two mechanisms -----------------------------------------------------------------
    def _acquire_flock(self) -> bool:
        """Take the flock; False when this file system does not support flock."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
            except BlockingIOError:
                info = _parse(_read_fd(fd))
                os.close(fd)
                raise self._locked(info) from None
            except OSError as exc:
                os.close(fd)
                if exc.errno in _NO_FLOCK:
                    return False
                raise
            try:  # the file locked must still be the one at the path (a releasing holder removes it)
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._fd = fd
        self._take_over(_parse(_read_fd(fd)))
        self._info = self._new_info()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(self._info).encode())
        return True

    def _acquire_exclusive_file(self) -> None:
        while True:
            self._info = self._new_info()
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                text = self._read_path()
                if text is None:  # removed meanwhile
                    continue
                info = _parse(text)
                if info is None:
                    stale = _age(self.path) > _UNWRITTEN_STALE_S
                else:
                    stale = info.get("host") == socket.gethostname() and not pid_alive(info["pid"])
                if stale:
                    self._take_over(info)
                    try:
                        self.path.unlink()
                    except FileNotFoundError:
                        pass
                    continue
                if self.wait:
                    time.sleep(_POLL_S)
                    continue
                raise self._locked(info) from None
            try:
                os.write(fd, json.dumps(self._info).encode())
            except OSError:
                os.close(fd)
                self.path.unlink(missing_ok=True)
                raise
            os.close(fd)
            self._exclusive_file = True
            return

    # ---- helpers ----------------------------------------------------------------------------
    def _new_info(self) -> dict:
        now = time.time()
        return {"pid": os.getpid(), "host": socket.gethostname(), "started": now,
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now))}  # fmt: skip

    def _take_over(self, info: dict | None) -> None:
        """Note the lock file of a writer that no longer holds the folder."""
        if not info:
            return
        pid, host = info["pid"], info.get("host")
        here = host == socket.gethostname()
        if here and not pid_alive(pid):
            why = "which is no longer running"
        else:
            why = "which no longer holds it" + ("" if here else f" (it ran on {host})")
        self.notice = f"{self.dir}: taking over the lock left by process {pid}, {why} (it started writing there at {_when(info)})"

    def _locked(self, info: dict | None, *, this_process: bool = False) -> RunLockedError:
        if info:
            who = f"process {info['pid']}" + (" (this process)" if this_process else "")
            host = info.get("host")
            if host and host != socket.gethostname():
                who += f" on {host}"
            msg = f"{self.dir} is in use: {who} has been writing to it since {_when(info)} (lock file {self.path}); {self.hint}"
        else:
            msg = f"{self.dir} is in use by another process, which has just started (lock file {self.path}); {self.hint}"
        exc = RunLockedError(msg)
        exc.run_dir, exc.holder = self.dir, info
        return exc

    def _read_path(self) -> str | None:
        try:
            return self.path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return None

    def _forget_dir(self, created: bool) -> None:
        """Remove the folder this lock made, if nothing else was written into it."""
        if created:
            try:
                self.dir.rmdir()
            except OSError:
                pass


def _read_fd(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0
