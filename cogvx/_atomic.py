"""Files appear whole or not at all: written under a temporary name beside the target, then renamed."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def _readable_by_others(path: str) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)  # mkstemp/mkdtemp make them private


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """write(temporary path) then rename it to `path`; the temporary name keeps `path`'s suffix
    (writers that pick the format from it need that); on any error it is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        _readable_by_others(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_folder(path: Path, write: Callable[[Path], None]) -> None:
    """write(temporary folder) then rename it to `path` (which must not exist); removed on error."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        write(tmp)
        _readable_by_others(str(tmp))
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
