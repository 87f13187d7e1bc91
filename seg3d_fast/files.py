"""Files written atomically (results, logs, checkpoints, NIfTI): no nibabel here, so that the profile and the
benchmarks, which write results on GPU machines without it, use the same code."""
import os
import tempfile
from pathlib import Path


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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix, dir=path.parent)
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
        # ENOSPC from a write names no file: the command line's one-line error should say which
        if isinstance(e, OSError) and e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise


def write_text_atomic(path, text):
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))
