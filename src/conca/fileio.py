"""Neutral file I/O: atomic writes that respect the umask, plain-name checks, one-writer locks, sha256 digests.

The bottom layer: imports nothing from conca but its errors, so every other module may use it."""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import os
import socket
import tempfile
from pathlib import Path

from conca.errors import ConfigError, CorruptDataError

try:
    import fcntl
except ImportError:  # not a POSIX system: output folders are not locked there
    fcntl = None

LOCK_FILE = ".conca.lock"

# (resolved path, size, mtime_ns) -> sha256: a file is hashed once per process unless it changes.
_DIGESTS: dict[tuple[str, int, int], str] = {}


def bytes_sha256(data: bytes) -> str:
    """sha256 of `data`, as lowercase hex."""
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: "str | Path") -> str:
    """sha256 of a file's bytes, read in 8 MiB blocks, memoised by path, size and mtime."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(8 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def canonical_sha256(obj) -> str:
    """sha256 of `obj` as canonical JSON (sorted keys, compact separators)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def current_umask() -> int:
    """The process umask, read without changing it where the kernel reports it (Linux
    /proc/self/status); elsewhere by the set-and-restore dance, which is only briefly racy."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename, so a reader
    (or a killed writer) sees the old file or the new one, never half of one. The file gets the
    usual mode for a new file (0666 less the umask), not mkstemp's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj) -> None:
    from conca.strict_json import dumps  # strict JSON: NaN/inf become null

    atomic_write_bytes(path, (dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def check_plain_name(name: object, where: Path, what: str = "file") -> str:
    """`name` as a plain file name inside a folder (no separator, no '..', not absolute), or a
    CorruptDataError naming `where` (the file that recorded it): a manifest must not point a
    reader at files outside its own folder."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\0" in name or os.path.isabs(name)):
        raise CorruptDataError(f"{where} lists {what} {name!r}, which is not a plain file name inside its folder")
    return name


class DirectoryLock:
    """An exclusive lock on an output folder: one writer at a time.

    The lock is `flock` on `FOLDER/.conca.lock`, held while the object is entered; the kernel
    drops it when the process dies, so a folder left by a killed run is simply taken over. The
    file records the holder (pid, command, host, start time) so that a refused second writer can
    say who holds the folder. Released on exit: the file is removed, and the folder too when this
    lock created it and nothing else was written there."""

    def __init__(self, folder: Path, command: str):
        self.folder = Path(folder)
        self.command = command
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None
        self._created_folder = False

    def acquire(self) -> "DirectoryLock":
        if self.folder.exists() and not self.folder.is_dir():
            raise ConfigError(f"output {self.folder} is a file, not a directory")
        if fcntl is None:
            return self
        if not self.folder.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            self._created_folder = True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                raise ConfigError(f"{self.folder} is in use by another conca process ({self._holder()}): "
                                  "wait for it to finish or use another --out") from None
            # The previous holder may have removed the file between our open and our flock: then we
            # locked an orphan, and must lock the file now at that path instead.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        holder = {"pid": os.getpid(), "command": self.command, "host": socket.gethostname(),
                  "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        return self

    def _holder(self) -> str:
        try:
            info = json.loads(self.path.read_text())
            return (f"pid {info['pid']} on {info['host']}, `{info['command']}`, started {info['started']}; "
                    f"lock file {self.path}")
        except (OSError, ValueError, KeyError, TypeError):
            return f"holder not yet recorded in {self.path}"

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            self.path.unlink(missing_ok=True)  # while still held: no one can have locked it meanwhile
        finally:
            os.close(fd)
        if self._created_folder:
            try:
                self.folder.rmdir()  # only succeeds when the run wrote nothing there
            except OSError:
                pass

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
