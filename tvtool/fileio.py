"""Safe file access for every command: inputs that cannot hang, outputs that never clobber or leak temp files.

- Inputs are checked with ``os.stat`` before they are opened: a FIFO or a device would block or stream forever,
  so anything but a regular file is refused at once (``open_input`` also opens non-blocking and re-checks with
  ``fstat``, so a path swapped between the two calls cannot hang us either).
- Outputs are written to a temp file beside the target and published with ``renameat2(RENAME_NOREPLACE)`` (or
  ``link`` + ``unlink`` where that is missing), so of two writers racing for one output exactly one wins; ``force``
  replaces an existing *regular* file (never a device, FIFO, socket or directory).
- Temp names carry the writer's host, boot and pid (+ the process start time, against pid reuse), so a temp left
  by a killed writer is recognised and removed by the next write to the same output. SIGTERM and SIGHUP during a
  write remove the temp like Ctrl-C does, then end the process by that signal (exit status 128 + signum).

This module does not import torch: it is used by every command, including ones that never touch a tensor.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import threading
from pathlib import Path

from .errors import TVToolError, spell


class OutputError(TVToolError, OSError):
    """Writing an output failed (disk full, permission denied, ...): a user-facing one-line error that is still an
    OSError, so callers that tolerate unwritable caches (``except OSError``) keep doing so."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


# --------------------------------------------------------------------------------------------------- inputs
def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_input(path: str | os.PathLike, what: str = "an input file") -> os.stat_result:
    """Stat ``path`` (following links) and refuse anything but an existing regular file, without opening it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise TVToolError(f"{path}: no such file") from None
    except OSError as exc:
        raise TVToolError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise TVToolError(f"{path}: is {_kind(st.st_mode)}, not a regular file; expected {what}")
    return st


def open_input(path: str | os.PathLike, what: str = "an input file"):
    """Open a regular file for binary reading, refusing FIFOs, devices and folders without blocking on them."""
    check_input(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise TVToolError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # swapped since the stat above
            raise TVToolError(f"{path}: is {_kind(st.st_mode)}, not a regular file; expected {what}")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


# --------------------------------------------------------------------------------------------------- outputs
def check_output(path: str | os.PathLike, force: bool, *, directory: bool = False) -> Path:
    """Refuse to overwrite unless ``force``, and never replace anything but a regular file (or, for a ``directory``
    output such as a transformers folder, a directory); fail early on a missing output folder."""
    path = Path(path)
    try:
        lst = os.lstat(path)
    except FileNotFoundError:
        lst = None
    except OSError as exc:
        raise TVToolError(f"{path}: cannot check the output path ({exc.strerror or exc})") from None
    if lst is not None:
        try:
            mode = os.stat(path).st_mode
        except OSError:
            mode = None  # a dangling symlink
        if mode is not None and stat.S_ISDIR(mode) and not directory:
            raise TVToolError(f"{path}: is a directory; give a file name for the output")
        if not force:
            raise TVToolError(f"{path}: already exists; pass {spell('--force', 'force=True')} to overwrite")
        folder = directory and mode is not None and stat.S_ISDIR(mode) and not stat.S_ISLNK(lst.st_mode)
        if mode is None or not (stat.S_ISREG(mode) or folder):
            what = "a dangling symlink" if mode is None else _kind(mode)
            only = "regular files and folders" if directory else "regular files"
            raise TVToolError(f"{path}: is {what}; {spell('--force', 'force=True')} replaces {only} only")
    parent = path.parent
    if not parent.is_dir():
        raise TVToolError(f"{parent}: output folder does not exist")
    return path


_TEMP_TAG = "tvtmp"


def _identity() -> tuple[str, str]:
    """(host, boot) tags for temp names: a pid means something only on the same host (and pid namespace: containers
    share a kernel) since the same boot."""
    try:
        pid_ns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        pid_ns = ""
    host = hashlib.sha256(f"{socket.gethostname()}/{pid_ns}".encode()).hexdigest()[:8]
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip().replace("-", "")[:8]
    except OSError:
        boot = "0"
    return host, boot


def _start_time(pid: int) -> str:
    """The process start time in clock ticks since boot (Linux), "0" where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data[data.rindex(b")") + 2:].split()[19].decode()
    except (OSError, ValueError, IndexError):
        return "0"


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{_TEMP_TAG}-"


_TEMP_RE = re.compile(r"(?P<host>[0-9a-f]+)-(?P<boot>[0-9a-z]+)-(?P<pid>\d+)-(?P<start>\d+)-[0-9a-f]+\.tmp$")


def _is_dead(host: str, boot: str, pid: int, start: str) -> bool:
    my_host, my_boot = _identity()
    if host != my_host:
        return False  # another machine on a shared filesystem: we cannot tell
    if boot != my_boot:
        return boot != "0" and my_boot != "0"  # written before this machine's last reboot
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    return start != "0" and _start_time(pid) not in ("0", start)  # pid reused by a newer process


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove temp files of ``path`` left by writers that are no longer running; returns what was removed."""
    path = Path(path)
    prefix = _temp_prefix(path)
    removed = []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(prefix):
            continue
        m = _TEMP_RE.fullmatch(name[len(prefix):])
        if m and _is_dead(m["host"], m["boot"], int(m["pid"]), m["start"]):
            with contextlib.suppress(OSError):
                _remove(path.parent / name)
                removed.append(path.parent / name)
    return removed


def _remove(path: Path) -> None:
    """Remove a temp file or temp folder (not following a symlink)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _temp_name(path: Path) -> Path:
    host, boot = _identity()
    pid = os.getpid()
    return path.parent / f"{_temp_prefix(path)}{host}-{boot}-{pid}-{_start_time(pid)}-{secrets.token_hex(4)}.tmp"


_RENAME_NOREPLACE = 1


def _renameat2_noreplace(src: Path, dst: Path) -> bool:
    """Rename without replacing; False where the kernel or libc lacks renameat2 (then use link + unlink)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    AT_FDCWD = -100
    rc = fn(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def publish(tmp: Path, path: Path, force: bool, *, directory: bool = False) -> None:
    """Move the finished temp file (or temp folder) to ``path``: atomically refusing an existing path, or
    (``force``) replacing a regular file (or, for a folder output, a folder)."""
    if force:
        check_output(path, force=True, directory=directory)  # what is there now must still be replaceable
        if directory and path.exists():
            # a folder cannot be renamed over a non-empty folder: move the old one aside, then remove it
            old = _temp_name(path)
            os.rename(path, old)
            os.rename(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
        return
    try:
        if _renameat2_noreplace(tmp, path):
            return
        if directory:  # no hard links of folders: check, then rename (racy only where renameat2 is missing)
            if os.path.lexists(path):
                raise FileExistsError(path)
            os.rename(tmp, path)
            return
        os.link(tmp, path)  # fails if path exists, atomically
        os.unlink(tmp)
    except FileExistsError:
        raise TVToolError(f"{path}: was created by someone else while this was being written; pass "
                          f"{spell('--force', 'force=True')} to overwrite") from None


class SignalInterrupt(KeyboardInterrupt):
    """SIGTERM / SIGHUP during a write: unwinds like Ctrl-C so the temp file is removed, then the process ends by
    the signal (see ``atomic_path``)."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum
        self.exit_code = 128 + signum


_HANDLED = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None)


def _raise_signal(signum, frame):
    raise SignalInterrupt(signum)


@contextlib.contextmanager
def _signals_raise():
    """While writing, turn SIGTERM / SIGHUP into SignalInterrupt (main thread, default handlers only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for s in _HANDLED:
        if signal.getsignal(s) is signal.SIG_DFL:
            previous[s] = signal.signal(s, _raise_signal)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _die_by(signum: int) -> None:
    """End the process by ``signum`` with its default action, as if it had not been caught."""
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, force: bool = False, *, directory: bool = False):
    """Yield a temporary path beside ``path``; publish it there only if the block succeeds (see module doc).
    With ``directory`` the temp path is an empty folder to fill (a transformers or open_clip folder output).

    OSErrors while writing (disk full, permission denied, ...) become a TVToolError naming ``path``.
    """
    path = check_output(path, force, directory=directory)
    remove_stale_temps(path)
    tmp = _temp_name(path)
    interrupted = None
    with _signals_raise():
        try:
            try:
                if directory:
                    os.mkdir(tmp)  # usual permissions (umask applies)
                else:
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
                    os.close(fd)  # created with the usual permissions (umask applies)
                yield tmp
                publish(tmp, path, force, directory=directory)
            except OutputError:
                raise  # already names its output (a nested write)
            except OSError as exc:
                reason = "no space left on the device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
                raise OutputError(f"{path}: cannot write the output ({reason})") from None
        except BaseException as exc:
            with contextlib.suppress(OSError):
                _remove(tmp)
            if isinstance(exc, SignalInterrupt):
                interrupted = exc.signum
            else:
                raise
    if interrupted is not None:
        _die_by(interrupted)
        raise SystemExit(128 + interrupted)  # only if the signal did not end us at once
