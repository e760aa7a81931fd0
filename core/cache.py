"""A cache of reads: asking about the same bytes again opens the memory kept the first time instead of reading.

An entry is a snapshot file (infllm.snapshot: written atomically, checked when opened) named by a hash of all
that decides the memory: the sources' names and bytes (a directory's files, in reading order), the model's
weights and tokenizer, the dtype, the engine settings and the prompt's opening. A change to any of them gives
another name, so an entry can never answer for a changed file; unused entries age out.

Snapshots are large (the whole block store: ~47 KB a token for the default model in float32), so the cache is
bounded: INFLLM_CACHE_LIMIT_MB (default 4096; 0 keeps nothing), and never more than half the disk's free space.
The least recently used entries are removed to make room, and a read larger than the limit is not kept.
stdin is not cached: its bytes are known only once read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from infllm.errors import InfllmError, UsageError
from infllm.reporting import Reporter
from infllm.runtime.resources import cache_dir

LIMIT_ENV = "INFLLM_CACHE_LIMIT_MB"
DEFAULT_LIMIT_MB = 4096
SUFFIX = ".infllm"


def limit_bytes() -> int:
    """The cache's size limit from INFLLM_CACHE_LIMIT_MB; a bad value is refused before any work."""
    raw = os.environ.get(LIMIT_ENV, "").strip()
    if not raw:
        return DEFAULT_LIMIT_MB * 2**20
    if not raw.isdigit():
        raise UsageError(f"{LIMIT_ENV} must be a whole number of MB (0: cache nothing), got {raw!r}")
    return int(raw) * 2**20


@dataclass(frozen=True)
class Entry:
    """One cached read, as `infllm cache list` shows it."""

    path: Path
    bytes: int
    last_used: float  # the file's mtime: set when written and each time the entry is opened
    sources: list[str]
    tokens: int
    model: str

    def to_dict(self) -> dict:
        return {"path": str(self.path), "bytes": self.bytes, "last_used": time.strftime(
            "%Y-%m-%dT%H:%M:%S%z", time.localtime(self.last_used)), "sources": self.sources, "tokens": self.tokens,
            "model": self.model}


class ReadCache:
    """The reads kept under `root` (default: `cache_dir()/reads`, so INFLLM_CACHE and XDG_CACHE_HOME move it)."""

    def __init__(self, root: Path | None = None, limit: int | None = None, report: Reporter | None = None):
        self.root = root if root is not None else cache_dir() / "reads"
        self.limit = limit if limit is not None else limit_bytes()
        self.report = report or Reporter()
        self._said_too_big = False  # "not cached" is said once per run, not once per source

    # ---- keys and lookups ------------------------------------------------------------------------------------

    @staticmethod
    def key(sources: list[str], loaded, config, prefix: list[int], gitignore: bool = True) -> str | None:
        """The entry name for reading `sources` with this model, settings and prompt opening; None if a source
        cannot be hashed (stdin, a missing file: the read itself then says why). A directory's files are those
        the read opens (gitignore as for the read), so a file it skips changes nothing."""
        from infllm.documents.readers import STDIN, source_files
        from infllm.snapshot import tokenizer_fingerprint

        if STDIN in sources:
            return None
        digest = hashlib.sha256()
        settings = {"model": loaded.fingerprint, "tokenizer": tokenizer_fingerprint(loaded.tokenizer),
                    "dtype": str(loaded.model.dtype), "engine": config.to_dict(), "prefix": list(prefix)}
        digest.update(json.dumps(settings, sort_keys=True).encode())
        try:
            for source in sources:
                for path, name in source_files(source, gitignore):
                    # Lengths first, so that no two lists of names and contents hash alike.
                    for part in (os.fsencode(source), os.fsencode(name)):
                        digest.update(b"%d:" % len(part) + part)
                    with open(path, "rb") as file:
                        digest.update(b"%d:" % os.fstat(file.fileno()).st_size)
                        for chunk in iter(lambda: file.read(1 << 22), b""):
                            digest.update(chunk)
        except (OSError, InfllmError):
            return None
        return digest.hexdigest()[:40]

    def path(self, key: str) -> Path:
        return self.root / f"{key}{SUFFIX}"

    def find(self, key: str):
        """The entry's opened snapshot (infllm.snapshot.SnapshotFile), marked as just used; None if there is none
        or it is damaged (then it is removed, and the document is read again)."""
        from infllm.errors import SnapshotError
        from infllm.snapshot import SnapshotFile

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            snap = SnapshotFile(path)
            os.utime(path)  # least recently used goes first
        except (SnapshotError, OSError):
            self.discard(key)
            return None
        return snap

    def discard(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    # ---- keeping a read --------------------------------------------------------------------------------------

    def keep(self, key: str, session, size: int, model_spec: str | None, system: str | None) -> bool:
        """Write a read to the cache if `size` (its estimated bytes) fits, evicting the least recently used
        entries to make room. Never fails the run: a read that cannot be kept is said once and left out."""
        from infllm.snapshot import save_session

        try:
            self.root.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(self.root).free
            room = min(self.limit, free // 2)
            if size > room:
                self._too_big(size, room)
                return False
            self._evict(self.limit - size)
            written = save_session(session, self.path(key), model_spec, system)
        except OSError as err:  # a read-only or full cache folder: the answer matters, the cache does not
            self.report.warn(f"the read was not cached: cannot write {self.root} ({err.strerror or err})")
            return False
        except InfllmError as err:
            self.report.warn(f"the read was not cached: {err}")
            return False
        if written > self.limit:  # the estimate was short: keep the limit anyway
            self.discard(key)
            self._too_big(written, self.limit)
            return False
        return True

    def _too_big(self, size: int, room: int) -> None:
        if not self._said_too_big:
            self._said_too_big = True
            self.report.warn(f"this read (~{size / 2**20:,.0f} MB) is not cached: the read cache holds "
                             f"{room / 2**20:,.0f} MB ({LIMIT_ENV}, at most half the free disk space)")

    def _evict(self, keep_bytes: int) -> None:
        """Remove the least recently used entries until the rest take at most keep_bytes."""
        entries = sorted(self._files(), key=lambda f: f[2])
        total = sum(size for _, size, _ in entries)
        for path, size, _ in entries:
            if total <= keep_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size

    def _files(self) -> list[tuple[Path, int, float]]:
        """(path, bytes, last used) of every entry; temporary files of writes under way are not entries."""
        found = []
        if self.root.is_dir():
            for path in self.root.glob(f"*{SUFFIX}"):
                try:
                    status = path.stat()
                except OSError:  # removed by another process meanwhile
                    continue
                found.append((path, status.st_size, status.st_mtime))
        return found

    # ---- `infllm cache list|clear` ---------------------------------------------------------------------------

    def entries(self) -> list[Entry]:
        """Every entry, most recently used first, described from its header (damaged ones as such)."""
        from infllm.errors import SnapshotError
        from infllm.snapshot import read_header

        entries = []
        for path, size, used in sorted(self._files(), key=lambda f: -f[2]):
            try:
                meta = read_header(path)[0]
            except SnapshotError:
                entries.append(Entry(path, size, used, [], 0, "(damaged)"))
                continue
            model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
            names = [str(s.get("name")) for s in meta.get("sources") or [] if isinstance(s, dict)]
            tokens = meta.get("tokens") if isinstance(meta.get("tokens"), int) else 0
            entries.append(Entry(path, size, used, names, tokens, str(model.get("name"))))
        return entries

    def clear(self) -> tuple[int, int]:
        """Remove every entry; returns (entries, bytes) removed."""
        files = self._files()
        for path, _, _ in files:
            path.unlink(missing_ok=True)
        return len(files), sum(size for _, size, _ in files)
