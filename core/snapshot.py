"""Snapshots: the context memory of a read document in one safetensors file, written atomically, opened lazily.

The file is plain safetensors (8-byte header length, JSON header, raw tensor bytes); its `__metadata__` holds one
entry, "infllm": a JSON object describing the snapshot (docs/snapshot-format.md). Tensors are the engine's
export (`layer.I.state.*`, `layer.I.store.PART.P` for each part of a block's K/V in the recorded `kv_dtype`,
`layer.I.store.repr`, and `layer.I.store.repr_scale` for int8 representative keys) and the document's (`doc.*`).

Untrusted files are checked before anything is allocated: the header is parsed strictly (offsets, sizes, dtypes
against the file's length), the metadata against the model, tokenizer and engine settings, and every tensor's
shape against what the engine would export at the recorded counters. The data is then read into memory: small
tensors at once, block pages the first time a block of theirs is used, each verified against its SHA-256.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import struct
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from infllm.citations.passages import SourceMap, passage
from infllm.config import EngineConfig
from infllm.engine.blockstore import KV_PAGE_BLOCKS
from infllm.errors import ResourceError, SnapshotError, UsageError, one_line
from infllm.runtime.loading import LoadedModel
from infllm.runtime.resources import check_reading
from infllm.session import Session
from infllm.documents.readers import STDIN, Piece, file_kind

FORMAT = "infllm-snapshot"
# 3: blocks' K/V in engine.kv_dtype (int8 parts with scales, or the model's dtype); 4: may hold the citing heads'
# calibration ("citing" and the tensor cite.quality), so that citations from the file ask no probe questions;
# 5: the recent buffer's running representative scores (state.rec_score, state.rec_qsum) instead of each recent
# token's query (state.rec_q), which the reader of an older file turns into those scores (LayerMemory.adopt);
# 6: representative keys held as engine.repr_dtype (int8 `store.repr` with float32 `store.repr_scale`, or the
# model's dtype as before, which older files hold).
VERSION = 6
# The oldest version read: 2 (the memory keeps one recent-token buffer) differs from 3 only in holding its blocks
# in the model's dtype, so it is read as kv_dtype "model".
_OLDEST = 2
SUFFIX = ".infllm"
_KEY = "infllm"
_MAX_HEADER = 256 * 2**20  # a header this large would describe ~10^6 tensors: not one of ours
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
           "U8": torch.uint8, "I8": torch.int8}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_FIELDS = {"format", "version", "tool_version", "created", "model", "tokenizer", "engine", "dtype", "counters",
           "tokens", "doc_start", "system", "sources", "pieces", "checksums", "citing"}
# Settings that shape the stored memory; the others (how much is retrieved, cached, pushed at once) may change.
_FIXED = ("sinks", "window", "block_size", "repr_keys", "kv_dtype", "repr_dtype")
_DOC_DTYPES = {"doc.prefix": torch.int64, "doc.offsets": torch.int64, "doc.text": torch.uint8, "doc.blocks": torch.int64,
               "cite.quality": torch.float32}


# ---- the file ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offsets in the data section
    end: int


def _fail(path: Path, why: str) -> SnapshotError:
    return SnapshotError(f"{path}: {why}")


def read_header(path: str | os.PathLike) -> tuple[dict, dict[str, _Entry], int]:
    """Parse and check a snapshot's header: (metadata, tensor entries, offset of the data section).

    Reads only the header. Raises SnapshotError for anything that is not a complete snapshot of a version
    this code understands.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise _fail(path, "not an infllm snapshot (too short)")
            (length,) = struct.unpack("<Q", head)
            if not 2 <= length <= min(_MAX_HEADER, size - 8):
                raise _fail(path, "not an infllm snapshot (no safetensors header)"
                            if length > _MAX_HEADER else "truncated or not an infllm snapshot")
            raw = f.read(length)
    except OSError as err:
        raise _fail(path, f"cannot read: {err.strerror or err}") from None
    try:
        header = json.loads(raw)
        meta = json.loads(header["__metadata__"][_KEY])
    except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: JSON nested past Python's stack
        raise _fail(path, "not an infllm snapshot (no infllm metadata in the header)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _fail(path, "not an infllm snapshot (wrong format name)")
    version = meta.get("version")
    if not isinstance(version, int) or version < 1:
        raise _fail(path, "snapshot metadata has no valid format version")
    if version < _OLDEST:
        raise _fail(path, f"written by an older infllm (snapshot format {version}; this one reads {_OLDEST} to "
                          f"{VERSION}): read the document again")
    if version > VERSION:
        raise _fail(path, f"written by a newer infllm (snapshot format {version}; this one reads {_OLDEST} to "
                          f"{VERSION}): upgrade infllm")
    unknown = sorted(set(meta) - _FIELDS)
    if unknown:
        raise _fail(path, f"snapshot metadata has unknown fields ({', '.join(unknown[:5])}): not written by "
                          f"this infllm version")
    return meta, _entries(path, header, size - 8 - length), 8 + length


def _entries(path: Path, header: dict, data_len: int) -> dict[str, _Entry]:
    entries = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[spec["dtype"]]
            shape = tuple(spec["shape"])
            start, end = spec["data_offsets"]
            ok = all(isinstance(n, int) and n >= 0 for n in (*shape, start, end))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise _fail(path, f"corrupt header entry for tensor {name!r}")
        numel = 1
        for n in shape:
            numel *= n
        if end - start != numel * dtype.itemsize:
            raise _fail(path, f"corrupt header: tensor {name!r} size does not match its shape")
        entries[name] = _Entry(dtype, shape, start, end)
    at = 0
    for e in sorted(entries.values(), key=lambda e: e.start):
        if e.start != at:
            raise _fail(path, "corrupt header: tensor data overlaps or leaves gaps")
        at = e.end
    if at > data_len:
        raise _fail(path, f"truncated: the header describes {at:,} bytes of data, the file holds {data_len:,}")
    if at < data_len:
        raise _fail(path, "corrupt: data after the last tensor")
    return entries


def is_snapshot(path: str) -> bool:
    """Whether a source names a snapshot: by its suffix, or by an infllm header."""
    if path.endswith(SUFFIX):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    try:
        read_header(path)
    except SnapshotError:
        return False
    return True


def _digest(t: torch.Tensor) -> str:
    """SHA-256 of a CPU tensor's bytes as stored (any dtype)."""
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def check_output(path: str | os.PathLike, sources: Sequence[str] = ()) -> None:
    """Refuse, before any work, a snapshot path that cannot be written or whose writing would destroy an input.

    The one check of every writer (`infllm read -o`, `ask --save`, `Reading.save`). UsageError when the path exists
    and is not a regular file (a directory, a device: the rename would replace the node), is one of the sources
    (compared as files, so links, hard links and other spellings of the same file count), is a file a source
    folder's walk reads, or is the file stdin reads; when its folder does not exist or no file can be created in it.
    """
    name, path = os.fspath(path), Path(path)  # messages name it as it was given
    try:
        status = os.stat(path)
    except FileNotFoundError:
        status = None
    except OSError as err:
        raise _unwritable(name, err.strerror or str(err)) from None
    if status is not None:
        if not stat.S_ISREG(status.st_mode):
            raise _unwritable(name, f"it is {file_kind(status.st_mode)}, not a regular file")
        for source in sources:
            if _reads(source, path, status):
                raise _unwritable(name, f"it is {'what stdin reads' if source == STDIN else 'read from ' + source}, "
                                        "and the snapshot would replace it; name another file")
    folder = path.parent
    if not folder.is_dir():
        raise _unwritable(name, f"the folder {folder} does not exist")
    try:  # the one sure test: create a file there (read-only file systems and missing rights both show)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=folder)
    except OSError as err:
        raise _unwritable(name, f"no file can be created in {folder} ({err.strerror or err})") from None
    os.close(fd)
    os.unlink(probe)


def _reads(source: str, path: Path, status: os.stat_result) -> bool:
    """Whether reading `source` reads the existing regular file `path` (of stat `status`)."""
    same = lambda other: (other.st_dev, other.st_ino) == (status.st_dev, status.st_ino)  # noqa: E731
    try:
        if source == STDIN:
            return same(os.fstat(sys.stdin.fileno()))
        found = os.stat(source)
    except (OSError, ValueError, AttributeError):  # no such source (reading names it), or no stdin file
        return False
    if not stat.S_ISDIR(found.st_mode):
        return same(found)
    real, folder = Path(os.path.realpath(path)), Path(os.path.realpath(source))
    if not real.is_relative_to(folder):
        return False
    # A folder's walk reads every file below it but hidden ones, and skips a snapshot as binary.
    return not any(part.startswith(".") for part in real.relative_to(folder).parts) and not is_snapshot(str(path))


def _unwritable(path: str | Path, why: str) -> UsageError:
    return UsageError(f"cannot write the snapshot to {path}: {why}")


def write_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> int:
    """Write a snapshot atomically: a temporary file beside `path`, fsync, rename over `path`, fsync the folder.

    On any failure (Ctrl-C, a full disk) the temporary file is removed and an existing `path` is untouched.
    Returns the file's size.
    """
    from safetensors.torch import save_file

    path = Path(path)
    check_output(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        meta = {**meta, "checksums": {name: _digest(t) for name, t in cpu.items()}}
        save_file(cpu, str(tmp), metadata={_KEY: json.dumps(meta, separators=(",", ":"))})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        # safetensors reports OS errors as its own exception type, with the OS message in it.
        if isinstance(err, OSError) and err.errno == errno.ENOSPC or "No space left" in str(err):
            raise ResourceError(f"not enough disk space to write {path}; nothing was written") from None
        if isinstance(err, OSError) or type(err).__name__ == "SafetensorError":  # the folder changed since checked
            raise _unwritable(path, one_line(err)) from None
        raise
    return path.stat().st_size


class SnapshotFile:
    """An opened snapshot: its header and metadata checked; its tensors read from the file when asked for.

    Nothing is memory-mapped: a mapped file that shrinks while in use (truncated by another program) kills the
    process with SIGBUS when a page past its new end is touched, even a page the process has written to (the
    kernel drops private copies past the end too), and Python cannot catch that. Tensors are read with pread
    into the process's own memory from one descriptor, opened once (the file as it was checked: a rename over
    the path changes nothing), so a shrunk file is a short read and a SnapshotError. Block pages go to the engine
    unread (`lazy`) and are read and verified on first use, so opening stays cheap.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.meta, self.entries, self._data_start = read_header(self.path)
        checksums = self.meta.get("checksums")
        if not isinstance(checksums, dict) or set(checksums) != set(self.entries):
            raise _fail(self.path, "corrupt: the checksums do not cover the tensors")
        self._checksums = checksums
        self._size = self._data_start + max((e.end for e in self.entries.values()), default=0)
        self._fd: int | None = None
        self._closer: weakref.finalize | None = None

    def _descriptor(self) -> int:
        if self._fd is None:
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except OSError as err:
                raise _fail(self.path, f"cannot read: {err.strerror or err}") from None
            self._closer = weakref.finalize(self, os.close, fd)
            self._fd = fd
            if os.fstat(fd).st_size < self._size:
                raise _fail(self.path, "truncated since it was checked (it is shorter than its header says)")
        return self._fd

    def close(self) -> None:
        """Close the file (a later read opens it again)."""
        if self._closer is not None:
            self._closer()
        self._fd = self._closer = None

    def tensor(self, name: str) -> torch.Tensor:
        """A tensor's data, read and verified against its checksum now."""
        out, read = self.lazy(name)
        read()
        return out

    def lazy(self, name: str, allocate: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] | None = None
             ) -> tuple[torch.Tensor, Callable[[], None]]:
        """A tensor not read yet (its memory is not touched until then) and the function that reads and verifies it.
        allocate(shape, dtype) gives the memory it is read into (default: new RAM)."""
        e = self.entries[name]
        out = torch.empty(e.shape, dtype=e.dtype) if allocate is None else allocate(e.shape, e.dtype)
        return out, lambda: self._read_into(name, out)

    def _read_into(self, name: str, out: torch.Tensor) -> None:
        e = self.entries[name]
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        at = 0
        try:
            while at < len(view):
                got = os.preadv(self._descriptor(), [view[at:]], self._data_start + e.start + at)
                if got == 0:
                    raise _fail(self.path, f"truncated while in use: it ends inside tensor {name}")
                at += got
        except OSError as err:
            raise _fail(self.path, f"cannot read: {err.strerror or err}") from None
        if _digest(out) != self._checksums[name]:
            raise _fail(self.path, f"corrupt data in tensor {name} (checksum mismatch); the file is damaged")


# ---- sessions <-> files --------------------------------------------------------------------------------------

def _tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("infllm")
    except PackageNotFoundError:
        return "unknown"


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides how text becomes ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        data = backend.to_str()
    else:
        data = json.dumps(sorted(tokenizer.get_vocab().items()))
    data += json.dumps(getattr(tokenizer, "all_special_tokens", []))
    return hashlib.sha256(data.encode()).hexdigest()


def _sources_meta(source_map: SourceMap) -> tuple[list[dict], list[dict]]:
    """Per source file: name, characters and SHA-256 of its extracted text; and the pieces, for the source map."""
    sources: dict[str, dict] = {}
    hashes: dict = {}
    pieces = []
    for piece in source_map.pieces:
        entry = sources.setdefault(piece.source, {"name": piece.source, "chars": 0})
        entry["chars"] += len(piece.text)
        hashes.setdefault(piece.source, hashlib.sha256()).update(piece.text.encode("utf-8", "surrogatepass"))
        pieces.append({"source": piece.source, "page": piece.page, "line": piece.line, "chars": len(piece.text)})
    for name, entry in sources.items():
        entry["sha256"] = hashes[name].hexdigest()
        if os.path.isfile(name):
            entry["bytes"] = os.path.getsize(name)
    return list(sources.values()), pieces


def save_session(session: Session, path: str | os.PathLike, model_spec: str | None, system: str | None) -> int:
    """Write what `session` has read (its memory, prompt prefix, text and source map) to `path`. Returns bytes."""
    engine = session.engine
    session.rewind()  # what was read, not what a question since added
    page_in(engine)
    tensors, counters = engine.export()
    text = session.source_map.text if session.source_map else ""
    doc_tokens = engine.position - session.doc_start
    offsets = session.doc_offsets if session.doc_offsets is not None else torch.zeros((0, 2), dtype=torch.int64)
    if offsets.shape[0] != doc_tokens:
        offsets = torch.zeros((0, 2), dtype=torch.int64)  # no offsets: no citations from this snapshot
    tensors["doc.prefix"] = torch.tensor(session.prefix, dtype=torch.int64)
    tensors["doc.offsets"] = offsets
    tensors["doc.text"] = torch.frombuffer(bytearray(text.encode("utf-8", "surrogatepass")), dtype=torch.uint8)
    tensors["doc.blocks"] = _block_map(session)
    sources, pieces = _sources_meta(session.source_map) if session.source_map else ([], [])
    citing = None
    if session.calibration is not None:
        citing = {"key": session.calibration[0]}
        tensors["cite.quality"] = session.calibration[1].float()
    if model_spec is not None and os.path.exists(model_spec):
        model_spec = os.path.abspath(model_spec)
    meta = {
        "format": FORMAT, "version": VERSION, "tool_version": _tool_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {"name": session.loaded.name, "spec": model_spec, "fingerprint": session.loaded.fingerprint},
        "tokenizer": {"fingerprint": tokenizer_fingerprint(session.loaded.tokenizer)},
        "engine": engine.config.to_dict(), "dtype": _DTYPE_NAMES[engine.adapter.dtype], "counters": counters,
        "tokens": engine.position, "doc_start": session.doc_start, "system": system,
        "sources": sources, "pieces": pieces, "citing": citing,
    }
    return write_file(path, tensors, meta)


def page_in(engine) -> None:
    """Read every block page that an opened snapshot left to be read on first use: the engine's export hands the
    pages over as they are, and such a page is not read yet."""
    for layer in engine.layers:
        for block in range(0, layer.store.count, KV_PAGE_BLOCKS):
            layer.store.parts(block)


def _block_map(session: Session) -> torch.Tensor:
    """[blocks, 4] int64: per memory block, the index of its source, its PDF page (0: none), first and last line
    (-1 everywhere for blocks of prompt text or without a source map)."""
    layer = session.engine.layers[0]
    rows = []
    names: dict[str, int] = {}
    for b in range(layer.store.count):
        where = None
        if session.source_map is not None and session.doc_offsets is not None:
            where = passage(b, layer.block_span, session.doc_start, session.doc_offsets, session.source_map)
        if where is None:
            rows.append((-1, -1, -1, -1))
        else:
            rows.append((names.setdefault(where.source, len(names)), where.page or 0, where.first_line,
                         where.last_line))
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 4)


def snapshot_config(meta: dict, overrides: dict[str, int | None], path: Path) -> EngineConfig:
    """The engine settings to answer with: the snapshot's, with the overrides that do not change its layout.

    The stored settings are untrusted: they pass the flags' own validation (ranges included) before anything is
    sized or allocated from them."""
    try:
        settings = dict(meta["engine"])
        if meta["version"] == 2:  # before kv_dtype: blocks in the model's dtype
            settings.setdefault("kv_dtype", "model")
        if meta["version"] < 6:  # before repr_dtype: representative keys in the model's dtype
            settings.setdefault("repr_dtype", "model")
        stored = EngineConfig(**settings).validate()
    except (TypeError, KeyError, ValueError):
        raise _fail(path, "snapshot metadata has missing or unknown engine settings") from None
    except UsageError as err:
        raise _fail(path, f"snapshot metadata has invalid engine settings: {err}") from None
    for name in _FIXED:
        value = overrides.get(name)
        if value is not None and value != getattr(stored, name):
            flag = name.replace("_", "-")
            raise _fail(path, f"this snapshot was read with --{flag} {getattr(stored, name)}; it cannot be used "
                              f"with --{flag} {value} (read the document again to change it)")
    for name in ("query_chunk", "prefill_chunk"):
        value = overrides.get(name)
        if value is not None and value < getattr(stored, name):
            # The saved recent-token buffer is sized by both; a smaller one might not hold it.
            flag = name.replace("_", "-")
            raise _fail(path, f"this snapshot was read with --{flag} {getattr(stored, name)}; it can be asked "
                              f"with that or more, not {value}")
    return stored.with_overrides(**{k: v for k, v in overrides.items() if k not in _FIXED})


def _section(meta: dict, key: str) -> dict:
    """A metadata object, or {} if the field is missing or not an object (then checks on it fail cleanly)."""
    value = meta.get(key)
    return value if isinstance(value, dict) else {}


def check_model(snap: SnapshotFile, fingerprint: str, name: str) -> None:
    """Refuse a snapshot made with other weights (before they are loaded, when called with a resolved model), saying
    what would work: the model it names, or reading again when it names none or names the model in use."""
    model = _section(snap.meta, "model")
    if model.get("fingerprint") == fingerprint:
        return
    stored = model.get("spec") or model.get("name")
    if not isinstance(stored, str) or not stored:
        raise _fail(snap.path, f"made with another model than {name}, and its metadata does not say which (damaged?): "
                               "read the document again")
    if stored in (name, os.path.abspath(name)):  # the same path or name, other weights: the files were changed
        raise _fail(snap.path, f"made with {stored} as it was then: its files have changed since (another "
                               "fingerprint); read the document again")
    raise _fail(snap.path, f"made with another model ({model.get('name')}), not {name}: pass --model {stored}")


def _check_system(snap: SnapshotFile, tokenizer, doc_start: int) -> None:
    """Refuse a stored system prompt that its prompt tokens (doc_start of them) cannot hold, before it is tokenized:
    damage could make it any size. No token covers more characters than the vocabulary's longest entry, times
    four for normalizers that merge characters (a letter and its accents)."""
    system = snap.meta.get("system")
    if system is None:
        return
    if not isinstance(system, str):
        raise _fail(snap.path, "corrupt metadata: its system prompt is not text")
    longest = max(map(len, tokenizer.get_vocab()), default=1)
    if len(system) > 4 * longest * doc_start:
        raise _fail(snap.path, f"corrupt metadata: its system prompt ({len(system):,} characters) is longer than its "
                               f"{doc_start:,} prompt tokens can hold")


def open_session(loaded: LoadedModel, snap: SnapshotFile, overrides: dict[str, int | None]) -> Session:
    """A session whose memory is the snapshot's: checked against the model, tokenizer and settings first,
    then adopted without reading the blocks (they are verified and paged in when retrieved)."""
    meta, path = snap.meta, snap.path
    check_model(snap, loaded.fingerprint, loaded.name)
    if _section(meta, "tokenizer").get("fingerprint") != tokenizer_fingerprint(loaded.tokenizer):
        raise _fail(path, "made with another tokenizer than this model's")
    config = snapshot_config(meta, overrides, path)
    try:
        config.validate(getattr(loaded.model.config, "max_position_embeddings", None))
        session = Session(loaded, config)
    except UsageError as err:
        raise _fail(path, f"its settings do not fit this model: {err}") from None
    engine = session.engine
    counters = meta.get("counters")
    try:
        if not isinstance(counters, dict) or not all(isinstance(counters.get(k), int) for k in
                                                     ("position", "rec_start", "rec_len", "blocks")):
            raise ValueError("missing memory counters")
        expected = engine.expected_shapes(counters)
        if meta["version"] < 5:
            expected = _with_recent_queries(expected)
        doc_start, tokens = meta["doc_start"], meta["tokens"]
        if not (isinstance(doc_start, int) and tokens == counters["position"] and 0 <= doc_start <= tokens):
            raise ValueError("token counts do not agree")
    except (ValueError, KeyError, TypeError) as err:
        raise _fail(path, f"corrupt metadata: {err}") from None
    _check_system(snap, loaded.tokenizer, doc_start)
    n_offsets = snap.entries["doc.offsets"].shape[0] if "doc.offsets" in snap.entries else -1
    n_text = snap.entries["doc.text"].shape if "doc.text" in snap.entries else ()
    expected.update({"doc.prefix": (doc_start,), "doc.offsets": (n_offsets if n_offsets == 0 else tokens - doc_start, 2),
                     "doc.blocks": (counters["blocks"], 4), "doc.text": n_text[:1]})
    citing = meta.get("citing")
    if citing is not None:
        if not (isinstance(citing, dict) and isinstance(citing.get("key"), str)):
            raise _fail(path, "corrupt metadata: the citations' calibration has no key")
        expected["cite.quality"] = (len(engine.layers) * engine.adapter.heads,)
    got = {name: e.shape for name, e in snap.entries.items()}
    if got != expected:
        wrong = sorted(set(got) ^ set(expected)) or sorted(n for n in got if got[n] != expected[n])
        raise _fail(path, f"corrupt: tensor {wrong[0]} is missing, extra or of the wrong shape for these settings")
    pages: dict[tuple[int, int], list[str]] = {}  # (layer, page) -> the names of its parts
    for name, e in snap.entries.items():
        want = _DOC_DTYPES.get(name)
        page = _block_page(name)
        if page is not None:
            pages.setdefault(page, []).append(name)
            want = engine.layers[page[0]].store.codec.stored_dtype(name.split(".")[3])
        elif name.endswith((".store.repr", ".store.repr_scale")):
            want = engine.layers[int(name.split(".")[1])].store.repr_stored_dtype(name.split(".")[3])
        if (e.dtype != want) if want else not e.dtype.is_floating_point:
            raise _fail(path, f"corrupt: tensor {name} has dtype {e.dtype}")

    # Block pages are read (and verified) when a block of theirs is first used, into the engine's host pages: RAM
    # within the budget, the disk tier past it (checked and placed here, as a read would be); the rest (state,
    # representative keys, the document) now.
    # A GPU run's host pages are pinned, and pinning every page at open would cost ~2 GB/s: there they stay in new
    # unpinned RAM, as the cache's misses copy them anyway.
    check_reading(session, tokens, [str(path)])
    host, cpu = engine.host, torch.device("cpu")
    allocate = None if host.pin else lambda shape, dtype: host.page(tuple(shape), dtype, cpu)
    tensors, checks = {}, {}
    for page, names in pages.items():
        reads = []
        for name in names:
            tensors[name], read = snap.lazy(name, allocate)
            reads.append(read)
        checks[page] = lambda reads=reads: [read() for read in reads]
    for name in snap.entries:
        if name not in tensors:
            tensors[name] = snap.tensor(name)
    engine.adopt({n: t for n, t in tensors.items() if n.startswith("layer.")}, counters, checks)
    source_map = _source_map(snap, tensors["doc.text"])
    offsets = tensors["doc.offsets"] if n_offsets else None
    session.resume(tensors["doc.prefix"].tolist(), offsets, source_map)
    if citing is not None:
        session.adopt_calibration(citing["key"], tensors["cite.quality"])
    return session


def _with_recent_queries(expected: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The tensors a snapshot of format 2 to 4 holds: each layer's recent queries `state.rec_q`, shaped as its
    recent keys, where the running scores are now."""
    out = {}
    for name, shape in expected.items():
        if name.endswith(".state.rec_score"):
            out[name[: -len("rec_score")] + "rec_q"] = expected[name[: -len("rec_score")] + "rec_k"]
        elif not name.endswith(".state.rec_qsum"):
            out[name] = shape
    return out


def _block_page(name: str) -> tuple[int, int] | None:
    """(layer, page) of a block page's part, `layer.I.store.PART.P` (names already checked against the engine's);
    None for any other tensor."""
    parts = name.split(".")
    if len(parts) == 5 and parts[0] == "layer" and parts[2] == "store":
        return int(parts[1]), int(parts[4])
    return None


def _source_map(snap: SnapshotFile, text_bytes: torch.Tensor) -> SourceMap | None:
    at, pieces = 0, []
    try:
        text = bytes(text_bytes.numpy()).decode("utf-8", "surrogatepass")
        for p in snap.meta.get("pieces") or []:
            if not (isinstance(p["chars"], int) and p["chars"] >= 0 and (p["page"] is None or isinstance(p["page"], int))):
                raise ValueError(p)
            pieces.append(Piece(text[at : at + p["chars"]], str(p["source"]), p["page"], int(p["line"])))
            at += p["chars"]
    except (KeyError, TypeError, ValueError):  # UnicodeDecodeError is a ValueError
        raise _fail(snap.path, "corrupt metadata: bad source pieces or text") from None
    if at != len(text):
        raise _fail(snap.path, "corrupt metadata: the source pieces do not cover the text")
    return SourceMap(text, pieces) if pieces else None


def changed_sources(snap: SnapshotFile) -> list[str]:
    """The snapshot's source files that still exist here but no longer hold the text it read.

    Cheap when nothing changed: a file whose size differs has changed; one of the same size is read again only
    if it was modified after the snapshot was made (its text then compared with the text the snapshot holds).
    Files that are gone, or were named relative to another directory, cannot be checked and are not reported.
    """
    from datetime import datetime

    from infllm.documents.readers import read_text
    from infllm.errors import SourceError

    try:
        made = datetime.strptime(str(snap.meta.get("created")), "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except ValueError:
        made = 0.0  # unknown: compare every file of the same size
    held = None
    changed = []
    for entry in snap.meta.get("sources") or []:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not os.path.isfile(name):
            continue
        status = os.stat(name)
        if isinstance(entry.get("bytes"), int) and status.st_size != entry["bytes"]:
            changed.append(name)
            continue
        if status.st_mtime < made:  # `created` has whole seconds: a change in its second is still compared
            continue
        if held is None:
            source_map = _source_map(snap, snap.tensor("doc.text"))
            held = source_map.pieces if source_map is not None else []
        before = "".join(piece.text for piece in held if piece.source == name)
        try:
            now = read_text([name])[0]
        except SourceError:
            changed.append(name)
            continue
        # A directory's file was read after a header line naming it (infllm.documents.readers).
        header = before[: len(before) - len(now)]
        if not (before.endswith(now) and (not header or (header.startswith("===== FILE: ")
                                                          and header.count("\n") == 1 and header.endswith("\n")))):
            changed.append(name)
    return changed
