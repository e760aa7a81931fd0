"""Document readers: turn the sources a user names into a lazy stream of text `Piece`s.

This module owns everything between a path (or "-" for stdin) and text: opening, sniffing, decoding,
decompressing, PDF text extraction, walking directories, and refusing what cannot be read. Every refusal
is a `SourceError` whose message is one line naming the source and the reason. Nothing is silently
truncated or dropped: a source is either read whole, or refused, or (inside a directory only) skipped
and counted in a `SkipReport`.

What each kind of source becomes:

- Text (any file that is not a PDF; Markdown is just text): decoded as UTF-8; a UTF-8 byte-order mark
  is stripped. A UTF-16 or UTF-32 byte-order mark selects that encoding (strictly: invalid data is
  refused). Otherwise, bytes that are not valid UTF-8 are decoded one by one as cp1252, and as latin-1
  for the five bytes cp1252 leaves undefined, so every byte becomes a character. The fallback works per
  invalid sequence rather than per file because sources are streamed and a bad byte may come after
  text that was already handed on; mixed files (mostly UTF-8 plus a few Windows bytes) read well.
  A source is refused as binary when the text decoded from its first 8 KiB holds a NUL or more than
  30% control characters (tab, newlines, form feed, backspace and escape count as text).
- gzip (by its magic bytes, whatever the name): decompressed while streaming, multi-member included,
  refused once it inflates past `max_gz_bytes` (2 GiB by default).
- PDF (by the `%PDF-` magic, also after gzip or on stdin): pypdf, one page at a time; one Piece per page
  or per chunk of a long page, `page` 1-based, `line` counted within the page. Each page's text ends in
  a newline so pages never run into each other. Blank pages are skipped; a PDF with no text on any page
  is refused (no text layer: OCR it first). Encrypted PDFs open only if the empty password works.
  More than `max_pdf_chars` (200 million by default) of extracted text is refused as a likely bomb.
- Directory: every non-hidden file below it, in sorted path order (entries of a folder sorted by name,
  folders read where they sort). Hidden entries (name starting with '.', `.git/` among them) are not
  entered; binary files and files that cannot be read (permissions, special files, broken links, bad
  PDFs, ...) are skipped. Files and folders that a `.gitignore` ignores (the directory's own, those of
  the folders below it, and those of the folders above it up to the top of its git repository, deeper
  ones overriding, as git reads them, with the `pathspec` library) are skipped too, unless `gitignore`
  is False: a code base is read without its build outputs and vendored trees. All are counted in the
  `SkipReport`. A file that fails after part of it was handed on is not
  skipped but raised, since a half-read file must not pass as read. Each file's text starts with the
  header line `===== FILE: relative/path =====` (with '/' separators); the header is glued to the front
  of the file's first Piece and does not count as a line, so that Piece's `line` is 1, the first line
  of the file's content. An empty file yields its header alone. A directory where every file was
  skipped is refused.
- "-": stdin, read in chunks and decoded incrementally, so an endless pipe is read in flat memory.

Named pipes, devices and sockets are refused when named (a FIFO would block forever otherwise) and
skipped inside directories. Empty files and empty stdin are refused, and so are those holding only whitespace.
"""

from __future__ import annotations

import codecs
import itertools
import logging
import os
import stat
import sys
import tempfile
import unicodedata
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

from pathspec import GitIgnoreSpec
from pypdf import PasswordType, PdfReader
from pypdf.errors import DependencyError, FileNotDecryptedError, LimitReachedError

from infllm.errors import SourceError

STDIN = "-"
STDIN_NAME = "<stdin>"

DEFAULT_MAX_PIECE_CHARS = 65536
DEFAULT_MAX_GZ_BYTES = 2 * 1024**3
DEFAULT_MAX_PDF_CHARS = 200_000_000

READ_CHUNK = 1 << 16
SNIFF_BYTES = 8192
BINARY_CONTROL_RATIO = 0.30
PDF_SPOOL_BYTES = 64 * 1024**2  # a PDF from stdin or gzip is kept in memory up to this, then on disk
MAX_PATH_LIST_BYTES = 64 * 1024**2  # the longest list of paths read (--files-from)

GZIP_MAGIC = b"\x1f\x8b"
PDF_MAGIC = b"%PDF-"
MARKDOWN_SUFFIXES = (".md", ".markdown", ".mdown", ".mkd")
GITIGNORE = ".gitignore"

_TEXT_CONTROLS = frozenset("\t\n\v\f\r\b\x1b")
_BOMS = (  # UTF-32 first: its little-endian mark begins with UTF-16's
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)

# pypdf reports recoverable damage through logging; with no handler configured Python would print
# those lines on stderr. The CLI may still configure logging to show them.
logging.getLogger("pypdf").addHandler(logging.NullHandler())


@dataclass(frozen=True)
class Piece:
    """A run of extracted text and where it came from."""

    text: str
    source: str  # the path as the user gave it, or "<stdin>"; for files inside a directory, that file's path
    page: int | None  # 1-based PDF page number, None for non-PDF
    line: int  # 1-based line (in the file, or in the PDF page) of the first char of text after any header


@dataclass
class SkipReport:
    """What a directory walk skipped, by reason."""

    binary: int = 0
    hidden: int = 0  # hidden entries, a hidden folder counting once
    unreadable: int = 0
    ignored_files: int = 0  # matched by a .gitignore
    ignored_folders: int = 0  # matched by a .gitignore, each counting once (what is inside is not looked at)

    def ignored_line(self) -> str:
        """What .gitignore kept out, for one line on stderr ("" when nothing)."""
        counts = [f"{n:,} {what}{'s' if n != 1 else ''}"
                  for n, what in ((self.ignored_files, "file"), (self.ignored_folders, "folder")) if n]
        return f"skipped {' and '.join(counts)} ignored by .gitignore (--no-ignore reads them)" if counts else ""


@dataclass(frozen=True)
class SourceInfo:
    """Cheap facts about a source, for `infllm info`."""

    source: str
    kind: str  # 'text' | 'markdown' | 'pdf' | 'directory' | 'stdin'
    bytes: int | None  # size on disk (compressed if gzip; all files for a directory); None for stdin
    pages: int | None = None  # PDFs, unless gzip-compressed (that would mean inflating it all)
    files: int | None = None  # directories: non-hidden files not ignored by .gitignore (binary ones found when read)
    compressed: bool = False  # gzip


@dataclass(frozen=True)
class _Limits:
    piece_chars: int
    gz_bytes: int
    pdf_chars: int
    gitignore: bool = True


class _LooksBinary(SourceError):
    """Raised for binary files, so that a directory walk can count them apart from unreadable ones."""


def iter_pieces(
    sources: list[str],
    stdin: BinaryIO | None = None,
    skipped: SkipReport | None = None,
    max_piece_chars: int = DEFAULT_MAX_PIECE_CHARS,
    *,
    max_gz_bytes: int = DEFAULT_MAX_GZ_BYTES,
    max_pdf_chars: int = DEFAULT_MAX_PDF_CHARS,
    gitignore: bool = True,
) -> Iterator[Piece]:
    """Yield the text of the sources in order, lazily, as pieces of at most max_piece_chars characters
    (a directory's file header included), each split at a line boundary where possible: a single line
    longer than that is split anyway, never dropped.

    A source "-" means `stdin` (default: the process's stdin), read incrementally. Sources that cannot
    be opened at all (missing, special files, "-" twice) are refused here, before anything is read, so a
    typo in the last path fails fast; problems with the content surface while iterating. gitignore: skip
    what .gitignore files ignore inside directories (a file named as a source is always read).
    """
    if max_piece_chars < 1:
        raise ValueError("max_piece_chars must be at least 1")
    if sources.count(STDIN) > 1:
        raise SourceError("'-' (stdin) is given more than once; stdin can be read only once")
    check_sources(sources)
    limits = _Limits(max_piece_chars, max_gz_bytes, max_pdf_chars, gitignore)
    return _all_pieces(sources, stdin, skipped if skipped is not None else SkipReport(), limits)


def check_sources(sources: list[str], missing_ok: bool = False) -> None:
    """Refuse missing paths and named pipes, devices and sockets among the sources, from their metadata alone,
    with the line reading them would give; with missing_ok, paths that do not exist here are left to whoever
    reads them (Ray workers may see files the driver does not).

    For callers that look at sources before reading them: a command refuses a mistyped path before it loads the
    model (seconds on a CPU), and opening a FIFO blocks until a writer comes, so nothing may open a source (to
    tell a snapshot from a document, say) before this has passed.
    """
    for source in sources:
        if source != STDIN and not (missing_ok and not os.path.lexists(source)):
            _check_source(source)


def read_text(sources: list[str], stdin: BinaryIO | None = None) -> tuple[str, list[Piece]]:
    """All the sources' text at once, and the pieces it was joined from (in order, so offsets add up)."""
    pieces = list(iter_pieces(sources, stdin))
    return "".join(piece.text for piece in pieces), pieces


def read_path_list(path: str, stdin: BinaryIO | None = None) -> list[str]:
    """The paths a list file names (like `tar -T` or `rsync --files-from`), "-" reading the list from stdin.

    One path a line (LF or CRLF), or NUL-separated if the list holds a NUL (`find -print0`). Blank lines are
    skipped; anything else is a path as written, spaces included. Names that are not UTF-8 are kept as the
    bytes they are (os.fsdecode). The list is read whole, up to MAX_PATH_LIST_BYTES: a longer one (/dev/zero,
    a document given by mistake) is refused before it fills the memory.
    """
    if path == STDIN:
        stream = stdin if stdin is not None else getattr(sys.stdin, "buffer", None)
        if stream is None:
            raise SourceError("'--files-from -' was given but this process has no stdin")
        data = stream.read(MAX_PATH_LIST_BYTES + 1)
    else:
        try:  # a plain open: a list may well come from a pipe, e.g. --files-from <(find . -name '*.md')
            with open(path, "rb") as file:
                data = file.read(MAX_PATH_LIST_BYTES + 1)
        except OSError as exc:
            raise _os_error(path, exc) from None
    if len(data) > MAX_PATH_LIST_BYTES:
        raise _fail(path, f"is longer than {MAX_PATH_LIST_BYTES // 2**20} MB, too long for a list of paths (a "
                          "million of them take 64 MB); is it the right file?")
    if b"\0" in data:
        entries = data.split(b"\0")
    else:
        entries = [line.removesuffix(b"\r") for line in data.split(b"\n")]
    return [os.fsdecode(entry) for entry in entries if entry.strip()]


def source_files(source: str, gitignore: bool = True) -> Iterator[tuple[str, str]]:
    """(path, name within the source) of every file that reading `source` opens, in reading order: the file
    itself (name ""), or a directory's non-hidden files (not ignored by .gitignore, unless gitignore is False).
    What a reading's text depends on, short of reading it."""
    if stat.S_ISDIR(_check_source(source).st_mode):
        yield from _walk(source, SkipReport(), gitignore)
    else:
        yield source, ""


def describe_source(path: str, gitignore: bool = True) -> SourceInfo:
    """Cheap facts about one source, without reading it whole; refuses it as reading would, except for
    problems only a full read finds (a PDF without text, bad data deep inside)."""
    if path == STDIN:
        return SourceInfo(STDIN_NAME, "stdin", None)
    status = _check_source(path)
    if stat.S_ISDIR(status.st_mode):
        return _describe_directory(path, gitignore)
    kind = "markdown" if _strip_gz(path).lower().endswith(MARKDOWN_SUFFIXES) else "text"
    with _open_regular(path) as file:
        head, chunks = _peek(_read_chunks(file.read, path), len(GZIP_MAGIC))
        compressed = head.startswith(GZIP_MAGIC)
        if compressed:
            chunks = _gunzip(chunks, path, DEFAULT_MAX_GZ_BYTES)
        head, _ = _peek(chunks, SNIFF_BYTES)
        if not head:
            raise _fail(path, "is empty")
        if head.startswith(PDF_MAGIC):
            pages = None if compressed else _page_count(_open_pdf(file, path), path)
            return SourceInfo(path, "pdf", status.st_size, pages=pages, compressed=compressed)
        _check_text_head(head, path)
    return SourceInfo(path, kind, status.st_size, compressed=compressed)


# --- sources -------------------------------------------------------------------------------------


def _all_pieces(
    sources: list[str], stdin: BinaryIO | None, skipped: SkipReport, limits: _Limits
) -> Iterator[Piece]:
    for source in sources:
        if source == STDIN:
            yield from _nonempty(_stdin_pieces(stdin, limits), SourceError("no input on stdin ('-' was given)"),
                                 SourceError("only whitespace on stdin ('-' was given), no text"))
        elif stat.S_ISDIR(_check_source(source).st_mode):
            yield from _directory_pieces(source, skipped, limits)
        else:
            yield from _nonempty(_file_pieces(source, "", limits), _fail(source, "is empty"),
                                 _fail(source, "holds only whitespace, no text"))


def _nonempty(pieces: Iterable[Piece], empty: SourceError, blank: SourceError) -> Iterator[Piece]:
    """The pieces, then `empty` if there were none, or `blank` if they held nothing but whitespace."""
    produced = text = False
    for piece in pieces:
        produced = True
        text = text or bool(piece.text.strip())
        yield piece
    if not produced:
        raise empty
    if not text:
        raise blank


def _stdin_pieces(stdin: BinaryIO | None, limits: _Limits) -> Iterator[Piece]:
    stream = stdin if stdin is not None else getattr(sys.stdin, "buffer", None)
    if stream is None:
        raise SourceError("'-' was given but this process has no stdin")
    # read1 returns what the pipe has now instead of waiting for a full chunk.
    read = getattr(stream, "read1", stream.read)
    yield from _stream_pieces(_read_chunks(read, STDIN_NAME), STDIN_NAME, "", limits)


def _file_pieces(path: str, header: str, limits: _Limits) -> Iterator[Piece]:
    with _open_regular(path) as file:
        yield from _stream_pieces(_read_chunks(file.read, path), path, header, limits, file)


def _stream_pieces(
    chunks: Iterator[bytes], name: str, header: str, limits: _Limits, file: BinaryIO | None = None
) -> Iterator[Piece]:
    """Pieces of a byte stream; `file` is the seekable file behind `chunks`, if there is one."""
    head, chunks = _peek(chunks, len(GZIP_MAGIC))
    if head.startswith(GZIP_MAGIC):
        chunks = _gunzip(chunks, name, limits.gz_bytes)
        file = None  # what is inside the gzip is not seekable
    head, chunks = _peek(chunks, len(PDF_MAGIC))
    if not head.startswith(PDF_MAGIC):
        yield from _pieces(_decode(chunks, name), name, None, header, limits.piece_chars)
    elif file is not None:
        yield from _pdf_pieces(file, name, header, limits)
    else:
        yield from _spooled_pdf_pieces(chunks, name, header, limits)


def _check_source(path: str) -> os.stat_result:
    """Refuse what cannot be a source, from its metadata alone (never opening it: a FIFO would block)."""
    try:
        status = os.stat(path)
    except OSError as exc:
        raise _os_error(path, exc) from None
    if not (stat.S_ISREG(status.st_mode) or stat.S_ISDIR(status.st_mode)):
        raise _special_file(path, status.st_mode)
    return status


def _open_regular(path: str) -> BinaryIO:
    # O_NONBLOCK so that a path swapped for a FIFO after _check_source cannot hang the open.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise _os_error(path, exc) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _special_file(path, mode)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _read_chunks(read: Callable[[int], bytes | None], name: str) -> Iterator[bytes]:
    while True:
        try:
            chunk = read(READ_CHUNK)
        except OSError as exc:
            raise _os_error(name, exc) from None
        if not chunk:
            return
        yield chunk


def _peek(chunks: Iterator[bytes], size: int) -> tuple[bytes, Iterator[bytes]]:
    """The first `size` bytes or more (fewer only at the end), and the stream still holding them."""
    chunks = iter(chunks)
    head = b""
    for chunk in chunks:
        head += chunk
        if len(head) >= size:
            break
    return head, itertools.chain([head] if head else [], chunks)


# --- directories ---------------------------------------------------------------------------------


def _directory_pieces(root: str, skipped: SkipReport, limits: _Limits) -> Iterator[Piece]:
    read_any = False
    for path, relative in _walk(root, skipped, limits.gitignore):
        header = f"===== FILE: {relative} =====\n"
        produced = False
        try:
            for piece in _file_pieces(path, header, limits):
                produced = True
                yield piece
        except _LooksBinary:
            if produced:
                raise
            skipped.binary += 1
            continue
        except SourceError:
            if produced:
                raise
            skipped.unreadable += 1
            continue
        read_any = True
        if not produced:
            yield Piece(header, path, None, 1)
    if not read_any:
        raise _fail(
            root,
            f"has no readable text files (skipped {skipped.binary} binary, {skipped.hidden} hidden, "
            f"{skipped.unreadable} unreadable"
            + (f", {skipped.ignored_files + skipped.ignored_folders} ignored by .gitignore"
               if skipped.ignored_files + skipped.ignored_folders else "") + ")",
        )


def _walk(root: str, skipped: SkipReport, gitignore: bool = True) -> Iterator[tuple[str, str]]:
    """(path, path relative to root with '/') of every non-hidden regular file, in sorted order; with gitignore,
    none that a .gitignore ignores (nor anything in a folder it ignores).

    A stack of listings instead of recursion, so that deep trees cannot exhaust Python's stack; folders
    already seen (symlink loops) are read once.
    """
    seen: set[tuple[int, int]] = set()
    try:
        rules = _Ignores.above(root).inside(root, "") if gitignore else None
        stack = [(_listing(root, "", seen), rules)]
    except OSError as exc:
        raise _os_error(root, exc) from None
    while stack:
        listing, rules = stack[-1]
        entry = next(listing, None)
        if entry is None:
            stack.pop()
            continue
        item, relative = entry
        if item.name.startswith("."):
            skipped.hidden += 1
            continue
        relative = f"{relative}{item.name}"
        try:
            is_dir, is_file = item.is_dir(), item.is_file()
        except OSError:
            is_dir = is_file = False
        if rules is not None and rules.ignores(relative, is_dir):
            if is_dir:
                skipped.ignored_folders += 1
            else:
                skipped.ignored_files += 1
            continue
        if is_dir:
            try:
                stack.append((_listing(item.path, relative + "/", seen),
                              None if rules is None else rules.inside(item.path, relative + "/")))
            except OSError:
                skipped.unreadable += 1
        elif is_file:
            yield item.path, relative
        else:  # broken link, FIFO, socket, device
            skipped.unreadable += 1


class _Ignores:
    """The .gitignore files that apply in one folder of a walk, each with where its patterns are rooted."""

    def __init__(self, specs: tuple[tuple[GitIgnoreSpec, str, int], ...] = ()):
        # (spec, prefix, strip): the spec sees a root-relative path as prefix + path[strip:], i.e. relative to the
        # folder of its .gitignore (above the root: the prefix leads down to it; below: the strip cuts down to it).
        self.specs = specs

    @classmethod
    def above(cls, root: str) -> "_Ignores":
        """The .gitignore files of the folders above `root`, up to the top of its git repository (none when it is
        in no repository: a folder above a copied tree is not the tree's, nor when they ignore `root` itself)."""
        found, below = [], ""
        folder = os.path.abspath(root)
        while True:
            parent = os.path.dirname(folder)
            if os.path.exists(os.path.join(folder, ".git")) or parent == folder:
                break
            below = os.path.basename(folder) + "/" + below
            folder = parent
            spec = _read_gitignore(folder)
            if spec is not None:
                found.append((spec, below, 0))
        if not os.path.exists(os.path.join(folder, ".git")):
            return cls()
        # A folder named as a source is read even if those files ignore it (then their patterns are not its own).
        if any(spec.check_file(prefix).include for spec, prefix, _ in found):
            return cls()
        return cls(tuple(reversed(found)))

    def inside(self, folder: str, relative: str) -> "_Ignores":
        """The rules for the entries of `folder` (at `relative` from the root, with '/'): these, then its own."""
        spec = _read_gitignore(folder)
        return self if spec is None else _Ignores((*self.specs, (spec, "", len(relative))))

    def ignores(self, relative: str, is_dir: bool) -> bool:
        path = relative + "/" if is_dir else relative  # "build/" patterns match folders only
        for spec, prefix, strip in reversed(self.specs):  # the deepest .gitignore that has a say decides
            include = spec.check_file(prefix + path[strip:]).include
            if include is not None:
                return include
        return False


def _read_gitignore(folder: str) -> GitIgnoreSpec | None:
    """The patterns of folder/.gitignore, or None if it has none (an unreadable one counts as none, as in git)."""
    try:
        with open(os.path.join(folder, GITIGNORE), "rb") as file:
            text = file.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    return GitIgnoreSpec.from_lines(text.splitlines())


def _listing(folder: str, relative: str, seen: set[tuple[int, int]]) -> Iterator[tuple[os.DirEntry[str], str]]:
    """A folder's entries sorted by name, with the folder's relative path; empty if already seen."""
    status = os.stat(folder)
    if (status.st_dev, status.st_ino) in seen:
        return iter(())
    seen.add((status.st_dev, status.st_ino))
    with os.scandir(folder) as entries:
        items = sorted(entries, key=lambda item: item.name)
    return ((item, relative) for item in items)


def _describe_directory(root: str, gitignore: bool) -> SourceInfo:
    files = size = 0
    for path, _ in _walk(root, SkipReport(), gitignore):
        files += 1
        try:
            size += os.stat(path).st_size
        except OSError:
            pass  # gone or unreadable since the listing: reading will report it
    return SourceInfo(root, "directory", size, files=files)


# --- bytes to text -------------------------------------------------------------------------------


def _gunzip(chunks: Iterator[bytes], name: str, limit: int) -> Iterator[bytes]:
    """Inflate gzip data in bounded steps, so a small bomb never becomes a big buffer."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    total = 0
    try:
        for pending in chunks:
            more_output = False
            while pending or more_output:
                if inflater.eof:  # another gzip member follows
                    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
                out = inflater.decompress(pending, READ_CHUNK)
                pending = inflater.unused_data if inflater.eof else inflater.unconsumed_tail
                # A full output step may leave output inside zlib even when no input is left.
                more_output = len(out) == READ_CHUNK and not inflater.eof
                total += len(out)
                if total > limit:
                    raise _fail(name, f"inflates to more than {limit:,} bytes (the limit for gzip input)")
                if out:
                    yield out
    except zlib.error as exc:
        raise _fail(name, f"is not valid gzip data ({exc})") from None
    if not inflater.eof:
        raise _fail(name, "is truncated (its gzip data ends early)")


def _decode(chunks: Iterator[bytes], name: str) -> Iterator[str]:
    head, chunks = _peek(chunks, SNIFF_BYTES)
    codec = _codec_for(head)
    _check_text_head(head, name)
    try:
        decoder = _decoder(codec)
        for chunk in chunks:
            text = decoder.decode(chunk)
            if text:
                yield text
        text = decoder.decode(b"", final=True)
        if text:
            yield text
    except UnicodeDecodeError:
        raise _bad_encoding(name, codec) from None


def _check_text_head(head: bytes, name: str) -> None:
    codec = _codec_for(head)
    try:
        sample = _decoder(codec).decode(head[:SNIFF_BYTES])
    except UnicodeDecodeError:
        raise _bad_encoding(name, codec) from None
    if "\x00" in sample:
        raise _LooksBinary(f"{_show(name)}: looks binary, not text (it holds NUL bytes)")
    controls = sum(1 for char in sample if char not in _TEXT_CONTROLS and unicodedata.category(char) == "Cc")
    if controls > BINARY_CONTROL_RATIO * len(sample):
        raise _LooksBinary(f"{_show(name)}: looks binary, not text (mostly control characters)")


def _codec_for(head: bytes) -> str:
    for bom, codec in _BOMS:
        if head.startswith(bom):
            return codec
    return "utf-8-sig"  # plain UTF-8 too; only strips a leading BOM


def _decoder(codec: str) -> codecs.IncrementalDecoder:
    # Only UTF-8 gets the byte fallback: a UTF-16/32 mark is a promise, and breaking it means damage.
    return codecs.getincrementaldecoder(codec)("infllm-cp1252" if codec == "utf-8-sig" else "strict")


_CP1252_OR_LATIN1 = tuple(bytes([byte]).decode("cp1252", errors="ignore") or chr(byte) for byte in range(256))


def _cp1252_fallback(error: UnicodeDecodeError) -> tuple[str, int]:
    bad = error.object[error.start : error.end]
    return "".join(_CP1252_OR_LATIN1[byte] for byte in bad), error.end


codecs.register_error("infllm-cp1252", _cp1252_fallback)


# --- text to pieces ------------------------------------------------------------------------------


def _pieces(texts: Iterable[str], source: str, page: int | None, header: str, max_chars: int) -> Iterator[Piece]:
    """Pieces of the text, `header` glued to the first one and counted in its size but not its lines."""
    first_limit = max(1, max_chars - len(header))
    for text, line in _split(texts, max_chars, first_limit):
        yield Piece(header + text, source, page, line)
        header = ""


def _split(texts: Iterable[str], max_chars: int, first_limit: int) -> Iterator[tuple[str, int]]:
    """Cut a text stream into runs of at most max_chars (first_limit for the first), ending each at the
    last newline that fits, or mid-line when none does; yields (run, 1-based line of its first char)."""
    buffer = ""
    line = 1
    limit = first_limit
    for text in texts:
        buffer += text
        start = 0  # cut by index, not by slicing the buffer each time, to stay linear
        while len(buffer) - start > limit:
            newline = buffer.rfind("\n", start, start + limit)
            cut = newline + 1 if newline >= 0 else start + limit
            run = buffer[start:cut]
            yield run, line
            line += run.count("\n")
            start = cut
            limit = max_chars
        buffer = buffer[start:]
    if buffer:
        yield buffer, line


# --- PDF -----------------------------------------------------------------------------------------


def _spooled_pdf_pieces(chunks: Iterator[bytes], name: str, header: str, limits: _Limits) -> Iterator[Piece]:
    # pypdf needs to seek, which stdin and gzip streams cannot.
    with tempfile.SpooledTemporaryFile(max_size=PDF_SPOOL_BYTES) as spool:
        try:
            for chunk in chunks:
                spool.write(chunk)
        except OSError as exc:
            raise _fail(name, f"could not be buffered for PDF reading ({exc.strerror or exc})") from None
        spool.seek(0)
        yield from _pdf_pieces(spool, name, header, limits)  # type: ignore[arg-type]


def _pdf_pieces(file: BinaryIO, name: str, header: str, limits: _Limits) -> Iterator[Piece]:
    reader = _open_pdf(file, name)
    total = 0
    too_much = _fail(name, f"yields more than {limits.pdf_chars:,} characters of text (the limit; a PDF bomb?)")
    for number in range(1, _page_count(reader, name) + 1):
        budget = _TextBudget(limits.pdf_chars - total)
        with _pdf_errors(name):
            try:
                page = reader.pages[number - 1]
                # Only forms can multiply a page's text; without a visitor pypdf skips pages with no text at all.
                text = page.extract_text(visitor_text=budget.spend) if _draws_forms(page) else page.extract_text()
            except _OverBudget:
                raise too_much from None
        if budget.over:  # the last text of the page went over and nothing came after to raise
            raise too_much
        if not text.strip():
            continue
        total += len(text)
        if total > limits.pdf_chars:
            raise too_much
        if not text.endswith("\n"):
            text += "\n"
        yield from _pieces([text], name, number, header, limits.piece_chars)
        header = ""
    if total == 0:
        hint = "OCR it first, e.g. `ocrmypdf in.pdf out.pdf`"
        raise _fail(name, f"has no text layer (no page holds text: a scan?); {hint}")


class _OverBudget(Exception):
    """Raised from inside pypdf's text extraction when a page has given more text than the budget left."""


class _TextBudget:
    """Counts the text pypdf reports while extracting one page, and stops the extraction once too much came.

    The cap on a document's text is otherwise checked only after each page, but one page can hold a form
    (an XObject) drawn thousands of times, each drawing parsed and extracted anew: that page alone could
    take hours and gigabytes. pypdf swallows exceptions raised while it extracts a form, so the budget is
    sticky: once over, every later report raises again, and the first one outside the form gets through.
    """

    def __init__(self, chars: int):
        self.left = chars
        self.over = False

    def spend(self, text, *_context) -> None:
        if self.over:
            raise _OverBudget
        self.left -= len(text) if isinstance(text, str) else 0
        if self.left < 0:
            self.over = True
            raise _OverBudget


def _draws_forms(page) -> bool:
    """Whether the page's resources hold a form XObject (forms inside forms need one at the top)."""
    try:
        resources = page.get("/Resources")
        xobjects = resources.get_object().get("/XObject") if resources is not None else None
        if xobjects is None:
            return False
        xobjects = xobjects.get_object()
        return any(xobjects[key].get_object().get("/Subtype") == "/Form" for key in xobjects)
    except Exception:  # noqa: BLE001 - damaged resources: assume the worst, extraction will judge the rest
        return True


def _open_pdf(file: BinaryIO, name: str) -> PdfReader:
    with _pdf_errors(name):
        file.seek(0)
        reader = PdfReader(file)
        # Many PDFs are "encrypted" only to set permissions, with an empty password that opens them.
        if reader.is_encrypted and reader.decrypt("") == PasswordType.NOT_DECRYPTED:
            raise _encrypted(name)
    return reader


def _page_count(reader: PdfReader, name: str) -> int:
    with _pdf_errors(name):
        return len(reader.pages)


@contextmanager
def _pdf_errors(name: str) -> Iterator[None]:
    """Turn whatever pypdf raises on a damaged or hostile file into a SourceError.

    pypdf parses untrusted bytes and fails in many ways (its own errors, but also KeyError, ValueError,
    RecursionError, ...), so every Exception from inside this block is the file's fault, not ours.
    """
    try:
        yield
    except SourceError:
        raise
    except FileNotDecryptedError:
        raise _encrypted(name) from None
    except DependencyError as exc:
        # pypdf needs the optional `cryptography` package for AES before it even checks a password.
        if "AES" in str(exc):
            raise _encrypted(name, " with AES") from None
        raise _fail(name, f"cannot be read without an optional package: {_first_line(exc)}") from None
    except LimitReachedError as exc:
        raise _fail(name, f"exceeds pypdf's safety limits, a PDF bomb? ({_first_line(exc)})") from None
    except Exception as exc:
        raise _fail(name, f"is not a readable PDF ({type(exc).__name__}: {_first_line(exc)})") from None


# --- messages ------------------------------------------------------------------------------------


def _fail(name: str, reason: str) -> SourceError:
    return SourceError(f"{_show(name)}: {reason}")


def _show(name: str) -> str:
    # Keep the message on one line whatever bytes the file name holds.
    return name if name.isprintable() else ascii(name)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else "no details"


def _encrypted(name: str, how: str = "") -> SourceError:
    hint = "decrypt it first, e.g. `qpdf --decrypt --password=PW in.pdf out.pdf`"
    return _fail(name, f"is encrypted{how} (password-protected); {hint}")


def _bad_encoding(name: str, codec: str) -> SourceError:
    return _fail(name, f"is not valid {codec.upper()}, though it starts with a {codec.upper()} byte-order mark")


def _os_error(name: str, exc: OSError) -> SourceError:
    if isinstance(exc, FileNotFoundError):
        return _fail(name, "no such file or directory")
    if isinstance(exc, PermissionError):
        return _fail(name, "permission denied")
    return _fail(name, f"cannot be read ({exc.strerror or exc})")


def file_kind(mode: int) -> str:
    """What a file of this mode is, for a message: "a directory", "a named pipe (FIFO)", ..."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def _special_file(name: str, mode: int) -> SourceError:
    hint = "to read a stream, pass '-' and redirect it to stdin"
    return _fail(name, f"is {file_kind(mode)}, not a regular file or directory; {hint}")


def _strip_gz(path: str) -> str:
    return path[:-3] if path.lower().endswith(".gz") else path
