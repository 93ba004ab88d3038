"""Files appear whole or not at all: written under a temporary name beside the target, then renamed."""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _remove(tmp: str, folder: bool) -> None:
    if folder:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        Path(tmp).unlink(missing_ok=True)


@contextmanager
def _temporary(path: Path, folder: bool):
    """The temporary file (or folder) for `path`, removed if the body raises. Its name, the one rule
    of the writers and of `probe`: `.NAME.XXXXXXXX` plus `path`'s suffix for files (writers that pick
    the format from it need that). SIGINT/SIGTERM are held while it is made, so their handlers (which
    raise) run only once its removal is armed: a signal in between would leave it behind."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS) if hasattr(signal, "pthread_sigmask") else None
    try:
        if folder:
            tmp = tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.")
        else:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
            os.close(fd)
        try:
            if held is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a pending signal is handled here
                held = None
            yield tmp
        except BaseException:
            _remove(tmp, folder)
            raise
    finally:
        if held is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


def probe(path: Path, *, folder: bool = False) -> None:
    """Create and remove the temporary that atomic_write (or atomic_folder) would use for `path`:
    raises the OSError that writing would meet (missing or non-folder parent, no permission, a name
    too long once made temporary), before any work is spent."""
    with _temporary(Path(path), folder) as tmp:
        _remove(tmp, folder)


def _readable_by_others(path: str) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)  # mkstemp/mkdtemp make them private


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """write(temporary path) then rename it to `path`; on any error it is removed."""
    path = Path(path)
    with _temporary(path, folder=False) as tmp:
        write(tmp)
        _readable_by_others(tmp)
        os.replace(tmp, path)


def atomic_folder(path: Path, write: Callable[[Path], None]) -> None:
    """write(temporary folder) then rename it to `path`, which must not exist: FileExistsError if it
    does (another writer finished first; it is left as it is); the temporary is removed on error."""
    path = Path(path)
    with _temporary(path, folder=True) as tmp:
        write(Path(tmp))
        _readable_by_others(tmp)
        if os.path.lexists(path):  # rename(2) would silently replace an empty folder
            raise FileExistsError(f"{path} appeared while it was being written")
        os.rename(tmp, path)  # a non-empty folder made meanwhile: OSError (ENOTEMPTY), not replaced
