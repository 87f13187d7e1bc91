"""Files written atomically (results, logs, checkpoints, NIfTI): no nibabel here, so that the profile and the
benchmarks, which write results on GPU machines without it, use the same code."""
import os
import re
import socket
import tempfile
import threading
from pathlib import Path


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, a scheduler's preemption, torchrun stopping the other ranks), raised like Ctrl-C so that
    write_atomic removes its temporary file (the default action ends the process on the spot)."""


_termination = threading.Event()
_interruption = threading.Event()


def terminate():
    """What the CLI's SIGTERM handler does: note the request, and raise Terminated where the process is."""
    _termination.set()
    raise Terminated()


def interrupt():
    """What the CLI's SIGINT (Ctrl-C) handler does: note it, and raise KeyboardInterrupt where the process is."""
    _interruption.set()
    raise KeyboardInterrupt()


def terminating() -> bool:
    return _termination.is_set()


def interrupted() -> bool:
    return _interruption.is_set()


def forget_termination():
    """For the next run in this process (the CLI's main, called again by tests)."""
    _termination.clear()
    _interruption.clear()


def stop_if_terminated():
    """Raise Terminated (or KeyboardInterrupt, for Ctrl-C) again where the signal's was lost: an exception raised at
    an arbitrary point can be swallowed by the code it interrupts (Python 3.11 wraps one raised in a class's
    __set_name__ into a RuntimeError, which matplotlib's guarded import of its 3D axes caught; training then went on
    with SIGTERM or Ctrl-C ignored). Long loops call this once per step."""
    if _termination.is_set():
        raise Terminated()
    if _interruption.is_set():
        raise KeyboardInterrupt()


def _file_mode():
    """The mode a plain open() gives a new file (0o666 less the umask), read once: mkstemp makes its files 0o600."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _file_mode()


def write_atomic(path, write, suffix=None):
    """Call write(tmp_path), flush it to disk, then rename it to `path` (a crash leaves the old file or the new
    one, never a part): for JSON, CSV, PNG, NIfTI and checkpoints. The file gets the usual mode (umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_owner()}.", suffix=suffix or path.suffix, dir=path.parent)
    except OSError as e:  # (a read-only folder: name the file being written, not the hidden temporary)
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _FILE_MODE)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        # ENOSPC from a write names no file, other errors the hidden temporary: the command line's one-line error
        # should name the file being written
        if isinstance(e, OSError) and e.filename in (None, tmp) and e.errno is not None:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise


def _owner(pid=None):
    """'<host>-<pid>': the writer named in write_atomic's temporary file names, so that remove_stale_temporaries
    knows one whose writer is gone (kill -9, a power cut) from one being written."""
    return f"{socket.gethostname()}-{os.getpid() if pid is None else pid}"


def remove_stale_temporaries(folder):
    """Removes the temporary files write_atomic left in `folder` when its process was killed before it could (kill
    -9, the out-of-memory killer): those of processes of this host that no longer run. Another host's, or a running
    process's, are left alone. -> the paths removed."""
    pattern = re.compile(r"\." + re.escape(socket.gethostname()) + r"-(?P<pid>\d+)\.[^.]+")
    removed = []
    for candidate in Path(folder).glob(".*"):
        match = pattern.search(candidate.name)
        if match is None or not candidate.is_file() or _running(int(match["pid"])):
            continue
        try:
            candidate.unlink()
            removed.append(candidate)
        except FileNotFoundError:  # (removed meanwhile)
            pass
    return removed


def _running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # (another user's)
        return True
    return True


def write_text_atomic(path, text):
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))
