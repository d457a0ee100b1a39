"""Opening Chroma: the embedded store under `$RAPPORT_HOME/chroma`, held by one process, or a Chroma server.

Chroma's embedded store is not safe for two processes at once (a second writer hangs or corrupts it), so
the process that opens it takes an exclusive lock on `chroma.lock` beside it and writes who it is there.
Another process fails at once with a message naming the holder: never a hang, never a corrupt store.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sys
from pathlib import Path
from urllib.parse import urlparse

from memory.errors import StoreUnavailable

logger = logging.getLogger(__name__)


class StoreLock:
    """An exclusive, non-blocking advisory lock; released when closed or when the process dies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read_holder()
            os.close(self._fd)
            raise StoreUnavailable(
                f"the stores in {path.parent} are in use by {holder}; stop it or point this command at it "
                "(RAPPORT_CHROMA_URL / the HTTP API)"
            ) from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, json.dumps({"pid": os.getpid(), "command": " ".join(sys.argv)[:200]}).encode())

    def _read_holder(self) -> str:
        try:
            holder = json.loads(os.pread(self._fd, 4096, 0) or b"{}")
            return f"`{holder.get('command', '?')}` (pid {holder.get('pid', '?')})"
        except (OSError, ValueError):
            return "another process"

    def close(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1


def chroma_settings():
    from chromadb.config import Settings as ChromaSettings

    fresh_pages_for_large_buffers()
    return ChromaSettings(anonymized_telemetry=False, allow_reset=False)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def fresh_pages_for_large_buffers() -> None:
    """Serve every allocation of 128 KiB or more from fresh (zeroed) pages of the kernel, not from recycled heap.

    Chroma's HNSW index mallocs its whole capacity (100 vectors and up: 167 KB and up) and writes all of it to
    `data_level0.bin`, used or not. A CI run found bytes of a deleted user's collection metadata (its owner id)
    in the unused capacity of another user's index file: most likely recycled heap, since glibc raises its mmap
    threshold as the process frees large blocks. Pinning the threshold at 128 KiB keeps such buffers on fresh
    pages. (Not reproduced on demand; the erasure tests in tests/test_memory.py guard it.) Elsewhere than glibc
    this does nothing.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):
        pass


class ChromaHandle:
    """A Chroma client plus whatever must be released with it (the embedded store's lock)."""

    def __init__(self, client, lock: StoreLock | None = None, path: Path | None = None) -> None:
        self.client = client
        self.lock = lock
        self.path = path  # the embedded store's directory; None for a server

    def close(self) -> None:
        if self.lock is not None:
            self.lock.close()
            self.lock = None


def open_chroma(*, path: Path | None = None, url: str | None = None) -> ChromaHandle:
    """The embedded store at `path` (locked to this process) or the Chroma server at `url`."""
    import chromadb

    if url:
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise StoreUnavailable(f"RAPPORT_CHROMA_URL={url!r} is not an http(s) URL")
        try:
            client = chromadb.HttpClient(host=parsed.hostname, port=parsed.port or (443 if parsed.scheme == "https" else 8000),
                                         ssl=parsed.scheme == "https", settings=chroma_settings())
            client.heartbeat()
        except Exception as exc:  # chromadb raises bare ValueError/ConnectionError kinds here
            raise StoreUnavailable(f"Chroma server at {url} is unavailable: {exc}") from exc
        return ChromaHandle(client)
    if path is None:
        raise ValueError("open_chroma needs a path or a url")
    lock = StoreLock(path.parent / "chroma.lock")
    try:
        client = chromadb.PersistentClient(path=str(path), settings=chroma_settings())
    except Exception as exc:
        lock.close()
        raise StoreUnavailable(f"Chroma store at {path} cannot be opened: {exc}") from exc
    return ChromaHandle(client, lock, path)
