"""Tests for infllm.documents.readers: every kind of source, every refusal, laziness, and exact round trips."""

from __future__ import annotations

import gzip
import io
import itertools
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infllm.errors import EXIT_INPUT, SourceError
from infllm.documents.readers import Piece, SkipReport, describe_source, iter_pieces, read_path_list, read_text

DATA = Path(__file__).resolve().parent / "data"
THREE_PAGES = str(DATA / "three-pages.pdf")


def text_of(pieces: list[Piece]) -> str:
    return "".join(piece.text for piece in pieces)


def read(path: Path | str, **kwargs) -> str:
    return text_of(list(iter_pieces([str(path)], **kwargs)))


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def refusal(sources: list[str], **kwargs) -> str:
    """The one-line message iter_pieces gives for sources it must refuse."""
    with pytest.raises(SourceError) as caught:
        list(iter_pieces(sources, **kwargs))
    assert caught.value.exit_code == EXIT_INPUT
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.fixture
def no_hang() -> Iterator[None]:
    """Fail instead of hanging forever if a read blocks (e.g. on a FIFO)."""

    def give_up(signum, frame):
        raise TimeoutError("the read blocked")

    previous = signal.signal(signal.SIGALRM, give_up)
    signal.alarm(5)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


class ChunkStream(io.RawIOBase):
    """A raw binary stream fed by a generator of byte chunks; counts how many chunks were pulled."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks = chunks
        self._left = b""
        self.pulled = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._left:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._left = chunk
            self.pulled += 1
        size = min(len(buffer), len(self._left))
        buffer[:size] = self._left[:size]
        self._left = self._left[size:]
        return size


# --- text encodings ------------------------------------------------------------------------------


def test_utf8_bom_is_stripped(tmp_path):
    path = write(tmp_path, "bom.txt", "\ufeffhéllo\nworld\n".encode())
    assert read(path) == "héllo\nworld\n"


def test_invalid_utf8_falls_back_to_cp1252_per_bad_byte(tmp_path):
    # Windows quotes and e-acute (cp1252), valid UTF-8 in between, and 0x81, which cp1252 leaves undefined.
    data = b"caf\xe9 \x93quoted\x94 " + "naïve".encode() + b" \x81\n"
    assert read(write(tmp_path, "win.txt", data)) == "café \u201cquoted\u201d naïve \x81\n"


def test_utf16_with_bom_is_decoded(tmp_path):
    path = write(tmp_path, "utf16.txt", "two\nlines ☃\n".encode("utf-16"))
    assert read(path) == "two\nlines ☃\n"


def test_utf16_bom_with_broken_data_is_refused(tmp_path):
    path = write(tmp_path, "odd.txt", b"\xff\xfea\x00b")  # odd byte count after the mark
    assert "not valid UTF-16" in refusal([str(path)])


def test_nul_bytes_are_refused_as_binary(tmp_path):
    path = write(tmp_path, "nul.txt", b"looks like text\x00but is not\n")
    message = refusal([str(path)])
    assert str(path) in message and "binary" in message


def test_control_heavy_file_is_refused_as_binary(tmp_path):
    path = write(tmp_path, "blob.dat", bytes(range(1, 32)) * 100)
    assert "binary" in refusal([str(path)])


def test_control_light_file_is_text(tmp_path):
    # ANSI colours and a few stray controls are still text.
    data = b"\x1b[31mred\x1b[0m\n" * 50 + b"\x07bell\n"
    assert read(write(tmp_path, "log.txt", data)) == data.decode()


def test_crlf_is_kept_and_lines_count_newlines(tmp_path):
    path = write(tmp_path, "dos.txt", b"a\r\nb\r\nc\r\n")
    pieces = list(iter_pieces([str(path)], max_piece_chars=3))
    assert text_of(pieces) == "a\r\nb\r\nc\r\n"
    assert [piece.line for piece in pieces] == [1, 2, 3]


# --- refusals ------------------------------------------------------------------------------------


def test_empty_file_is_refused(tmp_path):
    assert "is empty" in refusal([str(write(tmp_path, "empty.txt", b""))])


def test_file_of_only_a_bom_is_empty(tmp_path):
    assert "is empty" in refusal([str(write(tmp_path, "bom-only.txt", b"\xef\xbb\xbf"))])


def test_missing_path_is_refused_before_anything_is_read(tmp_path):
    good = write(tmp_path, "good.txt", b"fine\n")
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(SourceError, match="no such file") as caught:
        iter_pieces([str(good), missing])  # refused at call time, not after reading good.txt
    assert missing in str(caught.value)


def test_permission_denied(tmp_path, deny_reading):
    path = write(tmp_path, "secret.txt", b"hidden\n")
    deny_reading(path)
    message = refusal([str(path)])
    assert str(path) in message and "permission denied" in message


def test_fifo_is_refused_without_hanging(tmp_path, no_hang):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    message = refusal([str(fifo)])
    assert "named pipe" in message and "'-'" in message


def test_fifo_inside_directory_is_skipped_without_hanging(tmp_path, no_hang):
    os.mkfifo(tmp_path / "pipe")
    write(tmp_path, "a.txt", b"text\n")
    skipped = SkipReport()
    assert read(tmp_path, skipped=skipped) == "===== FILE: a.txt =====\ntext\n"
    assert skipped == SkipReport(unreadable=1)


def test_device_is_refused():
    assert "character device" in refusal(["/dev/null"])


def test_stdin_twice_is_refused():
    with pytest.raises(SourceError, match="more than once"):
        iter_pieces(["-", "-"], stdin=io.BytesIO(b"x"))


def test_unprintable_file_name_stays_on_one_line(tmp_path):
    message = refusal([str(tmp_path / "bad\nname.txt")])
    assert "no such file" in message


# --- gzip ----------------------------------------------------------------------------------------


def test_gzip_is_decompressed(tmp_path):
    text = "".join(f"line {n}\n" for n in range(10_000))
    path = write(tmp_path, "log.txt.gz", gzip.compress(text.encode()))
    assert read(path) == text


def test_gzip_detected_by_magic_and_multi_member(tmp_path):
    path = write(tmp_path, "noext", gzip.compress(b"first\n") + gzip.compress(b"second\n"))
    assert read(path) == "first\nsecond\n"


def test_gzip_bomb_is_refused(tmp_path):
    path = write(tmp_path, "bomb.gz", gzip.compress(b"a" * 10_000_000))
    assert "inflates to more than 1,000,000 bytes" in refusal([str(path)], max_gz_bytes=1_000_000)


@pytest.mark.parametrize("tail", [b"", b"tail\n"])
@pytest.mark.parametrize("size", [65535, 65536, 65537, 3 * 65536])
def test_gzip_output_at_chunk_boundaries(tmp_path, size, tail):
    text = ("abcdefg\n" * size)[:size]
    members = gzip.compress(text.encode()) + (gzip.compress(tail) if tail else b"")
    assert read(write(tmp_path, "edge.gz", members)) == text + tail.decode()


def test_truncated_gzip_is_refused(tmp_path):
    data = gzip.compress(os.urandom(1000).hex().encode())
    assert "truncated" in refusal([str(write(tmp_path, "cut.gz", data[:-20]))])


def test_corrupt_gzip_is_refused(tmp_path):
    assert "gzip" in refusal([str(write(tmp_path, "bad.gz", b"\x1f\x8b\x08\x00garbage" * 10))])


def test_gzip_of_nothing_is_empty(tmp_path):
    assert "is empty" in refusal([str(write(tmp_path, "none.gz", gzip.compress(b"")))])


def test_real_gzip_document():
    jargon = Path("/work/shared/docs/jargon-file-4.4.7.txt.gz")
    if not jargon.exists():
        pytest.skip("shared docs not present")
    assert read(jargon) == gzip.decompress(jargon.read_bytes()).decode()


# --- stdin and laziness --------------------------------------------------------------------------


def test_stdin_from_bytesio():
    pieces = list(iter_pieces(["-"], stdin=io.BytesIO(b"from\nstdin\n")))
    assert pieces == [Piece("from\nstdin\n", "<stdin>", None, 1)]


def test_empty_stdin_is_refused():
    assert "no input on stdin" in refusal(["-"], stdin=io.BytesIO(b""))


@pytest.mark.parametrize("buffered", [False, True])
def test_stdin_is_read_lazily(buffered, no_hang):
    # A never-ending pipe: pieces must come out while it is still flowing.
    lines = (f"line {n}\n".encode() for n in itertools.count(1))
    raw = ChunkStream(lines)
    stream = io.BufferedReader(raw) if buffered else raw
    pieces = iter_pieces(["-"], stdin=stream, max_piece_chars=1000)
    first = list(itertools.islice(pieces, 5))
    assert first[0].text.startswith("line 1\nline 2\n")
    assert raw.pulled < 100_000  # only what a few reads need
    assert [piece.line for piece in first] == [1] + [1 + text_of(first[:i]).count("\n") for i in range(1, 5)]


def test_stdin_gzip_and_pdf():
    gz = gzip.compress(b"zipped\n")
    assert text_of(list(iter_pieces(["-"], stdin=io.BytesIO(gz)))) == "zipped\n"
    pieces = list(iter_pieces(["-"], stdin=io.BytesIO(Path(THREE_PAGES).read_bytes())))
    assert [piece.page for piece in pieces] == [1, 2, 3]
    assert {piece.source for piece in pieces} == {"<stdin>"}


def test_sources_in_order_with_stdin_between(tmp_path):
    a = write(tmp_path, "a.txt", b"A\n")
    b = write(tmp_path, "b.txt", b"B\n")
    text, pieces = read_text([str(a), "-", str(b)], stdin=io.BytesIO(b"S\n"))
    assert text == "A\nS\nB\n"
    assert [piece.source for piece in pieces] == [str(a), "<stdin>", str(b)]


# --- splitting -----------------------------------------------------------------------------------


def test_five_megabyte_line_is_split_not_lost(tmp_path):
    line = "".join(chr(0x41 + n % 26) for n in range(5_000_000))
    path = write(tmp_path, "long.txt", line.encode())
    pieces = list(iter_pieces([str(path)], max_piece_chars=65536))
    assert text_of(pieces) == line
    assert len(pieces) == -(-len(line) // 65536)
    assert all(len(piece.text) <= 65536 for piece in pieces)
    assert all(piece.line == 1 for piece in pieces)


def test_pieces_end_at_line_boundaries_and_know_their_line(tmp_path):
    text = "".join(f"{'x' * (n % 37)} line {n}\n" for n in range(1, 3001))
    path = write(tmp_path, "lines.txt", text.encode())
    pieces = list(iter_pieces([str(path)], max_piece_chars=500))
    assert text_of(pieces) == text
    offset = 0
    for piece in pieces:
        assert len(piece.text) <= 500
        assert piece.text.endswith("\n")
        assert piece.line == text.count("\n", 0, offset) + 1
        assert piece.text.startswith(f"{'x' * (piece.line % 37)} line {piece.line}\n")
        offset += len(piece.text)


# --- directories ---------------------------------------------------------------------------------


def make_tree(root: Path) -> None:
    write(root, "b.txt", b"bee\n")
    write(root, "a.md", b"# A\nalpha\n")
    write(root, "sub/c.txt", b"sea\n")
    write(root, "sub/.hidden.txt", b"secret\n")
    write(root, ".git/config", b"[core]\n")
    write(root, "sub/deeper/d.txt.gz", gzip.compress(b"dee\n"))
    write(root, "z.bin", b"\x00\x01\x02binary")
    write(root, "empty.txt", b"")
    write(root, "doc.pdf", Path(THREE_PAGES).read_bytes())
    write(root, "scan.pdf", (DATA / "no-text.pdf").read_bytes())


def test_directory_walk_order_headers_and_skips(tmp_path):
    make_tree(tmp_path)
    skipped = SkipReport()
    pieces = list(iter_pieces([str(tmp_path)], skipped=skipped))
    assert skipped == SkipReport(binary=1, hidden=2, unreadable=1)  # z.bin; .git, .hidden.txt; scan.pdf
    assert [(Path(p.source).relative_to(tmp_path).as_posix(), p.page) for p in pieces] == [
        ("a.md", None),
        ("b.txt", None),
        ("doc.pdf", 1),
        ("doc.pdf", 2),
        ("doc.pdf", 3),
        ("empty.txt", None),
        ("sub/c.txt", None),
        ("sub/deeper/d.txt.gz", None),
    ]
    assert pieces[0].text == "===== FILE: a.md =====\n# A\nalpha\n"
    assert pieces[2].text.startswith("===== FILE: doc.pdf =====\nAlpha page one")
    assert not pieces[3].text.startswith("=====")
    assert pieces[5].text == "===== FILE: empty.txt =====\n"
    assert pieces[7].text == "===== FILE: sub/deeper/d.txt.gz =====\ndee\n"
    assert all(piece.line == 1 for piece in pieces)


def test_directory_header_counts_in_piece_size_not_in_lines(tmp_path):
    write(tmp_path, "f.txt", b"".join(b"%03d\n" % n for n in range(100)))
    pieces = list(iter_pieces([str(tmp_path)], max_piece_chars=40))
    assert all(len(piece.text) <= 40 for piece in pieces)
    assert pieces[0].text.startswith("===== FILE: f.txt =====\n000\n")
    assert pieces[0].line == 1
    assert pieces[1].text.startswith(f"{pieces[1].line - 1:03d}\n")


def test_unlistable_directories(tmp_path, monkeypatch):
    write(tmp_path, "top/a.txt", b"a\n")
    write(tmp_path, "top/locked/b.txt", b"b\n")
    real_scandir = os.scandir
    locked = {str(tmp_path / "top" / "locked")}

    def scandir(path):
        if os.fspath(path) in locked:
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    skipped = SkipReport()
    assert read(tmp_path / "top", skipped=skipped) == "===== FILE: a.txt =====\na\n"
    assert skipped == SkipReport(unreadable=1)
    locked.add(str(tmp_path / "top"))
    assert "permission denied" in refusal([str(tmp_path / "top")])


def test_symlink_loop_is_read_once(tmp_path):
    write(tmp_path, "d/f.txt", b"once\n")
    os.symlink(tmp_path / "d", tmp_path / "d" / "loop")
    assert read(tmp_path / "d") == "===== FILE: f.txt =====\nonce\n"


def test_directory_without_text_is_refused(tmp_path):
    write(tmp_path, "x.bin", b"\x00" * 10)
    write(tmp_path, ".notes.txt", b"hidden\n")
    message = refusal([str(tmp_path)])
    assert "no readable text files" in message and "1 binary, 1 hidden" in message


def make_repo(root: Path) -> Path:
    """A code base in a git repository: build outputs, a vendored tree and logs that its .gitignore files ignore
    (nested ones included, a deeper one re-including a file), and the folder `src` a user might name."""
    files = {
        ".git/HEAD": b"ref: refs/heads/main\n",
        ".gitignore": b"*.log\n/dist/\n",
        "README.md": b"# the project\n",
        "dist/app.js": b"minified\n",
        "run.log": b"noise\n",
        "src/.gitignore": b"build/\n!keep.log\n",
        "src/main.py": b"print('hi')\n",
        "src/keep.log": b"kept\n",
        "src/debug.log": b"noise\n",
        "src/build/out.txt": b"generated\n",
        "src/lib/.gitignore": b"vendor\n",
        "src/lib/util.py": b"pass\n",
        "src/lib/vendor/big.py": b"vendored\n",
    }
    for name, data in files.items():
        write(root, name, data)
    return root / "src"


def files_read(root: Path, **kwargs) -> list[str]:
    return [Path(p.source).relative_to(root).as_posix() for p in iter_pieces([str(root)], **kwargs)]


def test_a_directory_skips_what_its_gitignore_files_ignore_and_counts_it(tmp_path):
    make_repo(tmp_path)
    skipped = SkipReport()
    assert files_read(tmp_path, skipped=skipped) == ["README.md", "src/keep.log", "src/lib/util.py", "src/main.py"]
    # run.log, src/debug.log; dist/, src/build/, src/lib/vendor/ (each once: what is inside is not looked at)
    assert (skipped.ignored_files, skipped.ignored_folders) == (2, 3)
    assert skipped.hidden == 4  # .git/ and the three .gitignore files
    assert skipped.ignored_line() == "skipped 2 files and 3 folders ignored by .gitignore (--no-ignore reads them)"


def test_a_folder_inside_a_repository_follows_the_gitignore_files_above_it(tmp_path):
    src = make_repo(tmp_path)
    assert files_read(src) == ["keep.log", "lib/util.py", "main.py"]  # *.log from the top, !keep.log from src/
    assert files_read(src / "lib") == ["util.py"]
    assert files_read(tmp_path / "dist") == ["app.js"]  # named, it is read, though the top's .gitignore ignores it


def test_no_ignore_reads_every_file_but_hidden_ones(tmp_path):
    make_repo(tmp_path)
    skipped = SkipReport()
    assert files_read(tmp_path, skipped=skipped, gitignore=False) == [
        "README.md", "dist/app.js", "run.log", "src/build/out.txt", "src/debug.log", "src/keep.log",
        "src/lib/util.py", "src/lib/vendor/big.py", "src/main.py"]
    assert skipped.ignored_line() == "" and skipped.hidden == 4


def test_what_a_read_depends_on_leaves_ignored_files_out(tmp_path):
    """The read cache hashes these files: a rebuilt output the read skips must not make it read again."""
    from infllm.documents.readers import source_files

    src = make_repo(tmp_path)
    assert [name for _, name in source_files(str(src))] == ["keep.log", "lib/util.py", "main.py"]
    assert len(list(source_files(str(src), gitignore=False))) == 6
    assert describe_source(str(src)).files == 3


def test_a_directory_whose_every_file_is_ignored_says_so(tmp_path):
    write(tmp_path, ".gitignore", b"*.txt\n")
    write(tmp_path, "a.txt", b"a\n")
    message = refusal([str(tmp_path)])
    assert "no readable text files" in message and "1 ignored by .gitignore" in message


# --- PDF -----------------------------------------------------------------------------------------


def test_pdf_pages_lines_and_words():
    pieces = list(iter_pieces([THREE_PAGES]))
    assert [(piece.page, piece.line) for piece in pieces] == [(1, 1), (2, 1), (3, 1)]
    for piece, word in zip(pieces, ["aardvark", "buffalo", "chinchilla"]):
        assert piece.text.splitlines()[1] == f"second line mentions {word}"
        assert piece.text.endswith("\n")
    assert "buffalo" not in pieces[0].text + pieces[2].text


def test_long_pdf_page_is_split_with_page_lines():
    pieces = list(iter_pieces([THREE_PAGES], max_piece_chars=32))
    assert [(piece.page, piece.line) for piece in pieces if piece.page == 2] == [(2, 1), (2, 2), (2, 3)]
    assert pieces[4].text == "second line mentions buffalo\n"


def test_pdf_detected_by_magic_not_name(tmp_path):
    path = write(tmp_path, "report.txt", Path(THREE_PAGES).read_bytes())
    assert [piece.page for piece in iter_pieces([str(path)])] == [1, 2, 3]


@pytest.mark.parametrize("name", ["no-text.pdf", "scanned-huckfinn-page29-notext.pdf"])
def test_pdf_without_text_layer_is_refused(name):
    message = refusal([str(DATA / name)])
    assert "no text" in message and "ocrmypdf" in message


def test_encrypted_pdf_is_refused():
    assert "encrypted" in refusal([str(DATA / "encrypted.pdf")])


def test_aes_encrypted_pdf_is_refused():
    aes = Path("/work/shared/docs/encrypted-aes256-graph.pdf")
    if not aes.exists():
        pytest.skip("shared docs not present")
    assert "encrypted" in refusal([str(aes)])


def test_pdf_with_empty_password_is_read():
    assert read(DATA / "empty-password.pdf") == "open text behind an empty password\n"


@pytest.mark.parametrize("keep", [10, 300, 0.5, 0.9])
def test_truncated_pdf_is_refused(tmp_path, keep):
    data = Path(THREE_PAGES).read_bytes()
    cut = keep if isinstance(keep, int) else int(len(data) * keep)
    message = refusal([str(write(tmp_path, "cut.pdf", data[:cut]))])
    assert "not a readable PDF" in message


def test_pdf_text_cap_is_enforced():
    assert "more than 100 characters" in refusal([THREE_PAGES], max_pdf_chars=100)


# --- describe_source and read_text ---------------------------------------------------------------


def test_describe_source(tmp_path):
    make_tree(tmp_path)
    assert describe_source("-").kind == "stdin"
    info = describe_source(THREE_PAGES)
    assert (info.kind, info.pages, info.bytes) == ("pdf", 3, Path(THREE_PAGES).stat().st_size)
    assert describe_source(str(tmp_path / "a.md")).kind == "markdown"
    gz = describe_source(str(tmp_path / "sub/deeper/d.txt.gz"))
    assert (gz.kind, gz.compressed) == ("text", True)
    folder = describe_source(str(tmp_path))
    assert (folder.kind, folder.files) == ("directory", 8)
    with pytest.raises(SourceError, match="binary"):
        describe_source(str(tmp_path / "z.bin"))
    with pytest.raises(SourceError, match="encrypted"):
        describe_source(str(DATA / "encrypted.pdf"))
    with pytest.raises(SourceError, match="no such file"):
        describe_source(str(tmp_path / "missing"))


def bytes_read_by_this_process() -> int:
    with open("/proc/self/io") as io_stats:
        return int(io_stats.readline().split()[1])  # rchar


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
def test_describe_source_reads_only_the_start(tmp_path):
    path = write(tmp_path, "big.txt", b"word " * 2_000_000)
    before = bytes_read_by_this_process()
    assert describe_source(str(path)).bytes == 10_000_000
    assert bytes_read_by_this_process() - before < 1_000_000


def test_read_text_joins_pieces(tmp_path):
    path = write(tmp_path, "t.txt", b"one\ntwo\n")
    text, pieces = read_text([str(path)])
    assert text == "one\ntwo\n" and text_of(pieces) == text


# --- properties ----------------------------------------------------------------------------------

_ODD_BYTES = st.one_of(
    st.binary(max_size=2000),
    st.binary(max_size=500).map(lambda data: b"%PDF-1.4\n" + data),
    st.binary(max_size=500).map(lambda data: b"\x1f\x8b" + data),
    st.binary(max_size=500).map(gzip.compress),
    st.binary(max_size=500).map(lambda data: b"\xff\xfe" + data),
    st.binary(max_size=500).map(lambda data: b"\xef\xbb\xbf" + data),
    st.text(max_size=500).map(str.encode),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=_ODD_BYTES)
def test_any_bytes_give_text_or_source_error(tmp_path, data):
    path = tmp_path / "fuzz"
    path.write_bytes(data)
    try:
        pieces = list(iter_pieces([str(path)], max_piece_chars=64))
    except SourceError as err:
        assert "\n" not in str(err)
        return
    assert pieces and all(isinstance(piece.text, str) and piece.text for piece in pieces)


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(
        alphabet=st.one_of(st.characters(exclude_categories=("Cc", "Cs")), st.sampled_from("\n\n\r\t")),
        min_size=1,
    ).filter(lambda text: not text.startswith("\ufeff") and text.strip()),  # only whitespace is refused
    max_chars=st.integers(min_value=1, max_value=50),
)
def test_text_round_trips_exactly(text, max_chars):
    pieces = list(iter_pieces(["-"], stdin=io.BytesIO(text.encode()), max_piece_chars=max_chars))
    assert text_of(pieces) == text
    offset = 0
    for piece in pieces:
        assert 0 < len(piece.text) <= max_chars
        assert piece.line == text.count("\n", 0, offset) + 1
        offset += len(piece.text)



# --- read_path_list (--files-from) ---------------------------------------------------------------------------


def test_path_list_lines_nul_separators_and_odd_names(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"a.txt\r\n\n   \nname with spaces.txt \n\xff.txt\nlast-without-newline")
    assert read_path_list(str(listing)) == ["a.txt", "name with spaces.txt ", os.fsdecode(b"\xff.txt"),
                                            "last-without-newline"]
    assert read_path_list("-", stdin=io.BytesIO(b"a\nb\0c\n\0\0")) == ["a\nb", "c\n"]  # NUL-separated: as is
    assert read_path_list("-", stdin=io.BytesIO(b"")) == []


def test_path_list_that_cannot_be_read(tmp_path):
    with pytest.raises(SourceError, match="no such file or directory"):
        read_path_list(str(tmp_path / "missing.txt"))
    with pytest.raises(SourceError, match="cannot be read"):
        read_path_list(str(tmp_path))
