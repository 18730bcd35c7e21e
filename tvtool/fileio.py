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



# a checkpoint folder's JSON (config.json, *.index.json, adapter_config.json, open_clip_config.json) is a few KB to
# a few MB; real documents nest a handful of levels
MAX_JSON_BYTES = 64 << 20
MAX_JSON_DEPTH = 64


def read_bytes(path: str | os.PathLike, what: str, limit: int) -> bytes:
    """The whole of a regular file of at most ``limit`` bytes (checked before reading)."""
    with open_input(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise TVToolError(f"{path}: {size} bytes is more than {what} can be ({limit}); is this the right file?")
        data = f.read(size)  # read(n) allocates n bytes up front: ask for what the file holds, not the limit
        if f.read(1):  # grew while being read
            raise TVToolError(f"{path}: changed while being read; try again")
    return data


def read_json(path: str | os.PathLike, what: str = "a JSON file", *, limit: int = MAX_JSON_BYTES,
              max_depth: int = MAX_JSON_DEPTH):
    """A JSON document from a file a user handed us, bounded: a regular file (never a FIFO) of at most ``limit``
    bytes, UTF-8, nested at most ``max_depth`` levels. Every failure is one TVToolError naming the file.

    Without the bounds a config.json could be gigabytes, or nest deeply enough to end in a RecursionError (in the
    parser, or in any code that walks the result)."""
    data = read_bytes(path, what, limit)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TVToolError(f"{path}: not UTF-8 text (byte {exc.start}); expected {what}") from None
    return parse_json(text, str(path), what, max_depth=max_depth)


def parse_json(text: str | bytes, origin: str, what: str = "a JSON document", *, max_depth: int = MAX_JSON_DEPTH):
    """``json.loads`` with the nesting bound of :func:`read_json` (for JSON found inside a file: safetensors
    metadata); one TVToolError ``origin: ...`` on failure."""
    import json

    try:
        doc = json.loads(text)
    except RecursionError:
        raise TVToolError(f"{origin}: JSON nested too deeply to be {what}; the file is damaged or hostile") from None
    except ValueError as exc:
        raise TVToolError(f"{origin}: not valid JSON ({str(exc)[:120]}); expected {what}") from None
    if json_depth(doc, max_depth) > max_depth:
        raise TVToolError(f"{origin}: JSON nested over {max_depth} levels deep; no {what} is, refusing it")
    return doc


def json_depth(doc, stop: int) -> int:
    """How deeply a parsed JSON document nests (a scalar: 0), walked without recursion; stops counting past
    ``stop``."""
    deepest, stack = 0, [(doc, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > stop:
                    break
            stack.extend((child, depth) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


# ------------------------------------------------------------------------------------------------- appending
def check_append(path: str | os.PathLike, what: str = "a log file") -> None:
    """Before any work: a file to append to (``--log``) must be a regular file, a character device (/dev/null, a
    terminal) or not exist yet in an existing folder. A FIFO would block the run at its end, waiting for a reader."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if not path.parent.is_dir():
            raise TVToolError(f"{path}: its folder does not exist; expected {what}") from None
        return
    except OSError as exc:
        raise TVToolError(f"{path}: cannot check it ({exc.strerror or exc})") from None
    if not (stat.S_ISREG(mode) or stat.S_ISCHR(mode)):
        raise TVToolError(f"{path}: is {_kind(mode)}, not a regular file; expected {what}")


def open_append(path: str | os.PathLike, what: str = "a log file"):
    """Open ``path`` for appending text (created if missing) without ever blocking on a FIFO."""
    check_append(path, what)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:  # ENXIO: a FIFO (swapped in since the check) with no reader
        raise TVToolError(f"{path}: cannot write it ({exc.strerror or exc}); expected {what}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISCHR(mode)):
            raise TVToolError(f"{path}: is {_kind(mode)}, not a regular file; expected {what}")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "a")
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
        if folder and not written_by_tvtool(path):
            raise TVToolError(f"{path}: is a folder not written by tvtool (it has no {FOLDER_MARKER}); "
                              f"{spell('--force', 'force=True')} replaces only folders tvtool wrote, never other "
                              "files: remove it yourself or give another output")
    parent = path.parent
    if not parent.is_dir():
        raise TVToolError(f"{parent}: output folder does not exist")
    return path


# Written into every folder output: `--force` replaces a folder only when it holds this file, so a user's folder
# (with their other files in it) is never taken for an old output.
FOLDER_MARKER = ".tvtool-output"


def written_by_tvtool(folder: str | os.PathLike) -> bool:
    try:
        return stat.S_ISREG(os.lstat(Path(folder) / FOLDER_MARKER).st_mode)
    except OSError:
        return False


def check_not_input(out: str | os.PathLike, inputs) -> None:
    """Refuse a folder output that is (or holds) one of the ``inputs``: replacing it would destroy what is read."""
    out = Path(out)
    if not out.exists():
        return
    top = os.path.realpath(out)
    for inp in inputs:
        if inp is None or not os.path.exists(inp):
            continue
        real = os.path.realpath(inp)
        if real == top or real.startswith(top + os.sep):
            raise TVToolError(f"{out}: is the input {inp}" + ("" if real == top else " (holds it)")
                              + "; write the output to another folder")


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
_RENAME_EXCHANGE = 2


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(2) with ``flags``; False where the kernel, libc or filesystem lacks it (callers fall back)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    AT_FDCWD = -100
    rc = fn(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _renameat2_noreplace(src: Path, dst: Path) -> bool:
    """Rename without replacing; False where renameat2 is missing (then use link + unlink)."""
    return _renameat2(src, dst, _RENAME_NOREPLACE)


def _swap_folder(tmp: Path, path: Path) -> None:
    """Put the finished folder ``tmp`` at ``path`` in place of what is there, then remove the old one.

    One atomic exchange where renameat2 has RENAME_EXCHANGE: ``path`` is at every moment either the old output or
    the new one. Elsewhere, the old output is first moved aside under a name that no stale-temp sweep removes; if
    the new one cannot then be put in place, the old one is put back, or, if even that fails, the error says where
    it is."""
    if _renameat2(tmp, path, _RENAME_EXCHANGE):
        _remove(tmp)  # tmp now holds the old output
        return
    backup = path.parent / f".{path.name}.tvtold-{secrets.token_hex(4)}"
    os.rename(path, backup)
    try:
        os.rename(tmp, path)
    except OSError as exc:
        try:
            os.rename(backup, path)
        except OSError:
            raise TVToolError(f"{path}: could not be replaced ({exc.strerror or exc}) nor put back; the previous "
                              f"output is kept at {backup}: move it back yourself") from None
        raise
    _remove(backup)


def publish(tmp: Path, path: Path, force: bool, *, directory: bool = False) -> None:
    """Move the finished temp file (or temp folder) to ``path``: atomically refusing an existing path, or
    (``force``) replacing a regular file (or, for a folder output, a folder)."""
    if force:
        check_output(path, force=True, directory=directory)  # what is there now must still be replaceable
        if directory and os.path.lexists(path):  # a folder cannot be renamed over a non-empty folder: exchange
            _swap_folder(tmp, path)
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
                    (tmp / FOLDER_MARKER).write_text("written by tvtool: `--force` may replace this folder\n")
                else:
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
                    os.close(fd)  # created with the usual permissions (umask applies)
                yield tmp
                publish(tmp, path, force, directory=directory)
            except OutputError:
                raise  # already names its output (a nested write)
            except OSError as exc:
                reason = "no space left on the device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
                err = OutputError(f"{path}: cannot write the output ({reason})")
                err.errno = exc.errno  # callers tell a full disk from a read-only cache
                raise err from None
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


# ------------------------------------------------------------------------------------------- undoing a step
# `tvtool data prepare` undoes a failed download by removing what it created, and only that: another process may
# be writing into the same data root. What this process creates is known from Python's audit events (files opened
# for writing that did not exist, folders made, rename and link targets), recorded only inside the block.
_RECORDERS: list[tuple[str, list[str]]] = []
_HOOKED = False


def _created_path(event: str, args) -> object:
    if event == "open":
        path, mode, flags = (tuple(args) + (None, None, None))[:3]
        if isinstance(mode, str):
            return path if any(c in mode for c in "wax+") else None
        return path if isinstance(flags, int) and flags & os.O_CREAT else None
    if event == "os.mkdir":
        return args[0]
    if event in ("os.rename", "os.link", "os.symlink"):
        return args[1]
    return None


def _audit(event: str, args) -> None:
    if not _RECORDERS or event not in ("open", "os.mkdir", "os.rename", "os.link", "os.symlink"):
        return
    try:
        path = _created_path(event, args)
        if path is None or isinstance(path, int):
            return
        path = os.path.abspath(os.fsdecode(path))
        if os.path.lexists(path):  # the hook runs before the operation: only a new path is a creation
            return
        for top, created in _RECORDERS:
            if path.startswith(top + os.sep):
                created.append(path)
    except Exception:  # an audit hook must never break the operation it watches
        pass


@contextlib.contextmanager
def recording_creations(root: str | os.PathLike):
    """Yield a list that fills with the paths under ``root`` this process creates inside the block."""
    global _HOOKED
    import sys

    if not _HOOKED:  # audit hooks cannot be removed: one, idle outside these blocks
        sys.addaudithook(_audit)
        _HOOKED = True
    entry = (os.path.abspath(root), [])
    _RECORDERS.append(entry)
    try:
        yield entry[1]
    finally:
        _RECORDERS.remove(entry)


def remove_created(paths) -> None:
    """Remove what :func:`recording_creations` recorded, deepest first; a folder only once empty (something another
    process put there stays, and so does the folder holding it)."""
    for path in sorted(set(paths), key=lambda p: p.count(os.sep), reverse=True):
        with contextlib.suppress(OSError):
            if os.path.isdir(path) and not os.path.islink(path):
                os.rmdir(path)
            else:
                os.unlink(path)

