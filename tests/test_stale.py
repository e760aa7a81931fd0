"""A snapshot whose source files changed since it was read: one warning line on stderr, or with --refuse-stale
exit 5 before the model loads. Files that did not change are not read again to say so."""

from __future__ import annotations

import os
import time

import pytest
from typer.testing import CliRunner

from infllm.cli.app import app

ENGINE = ["--window", "256", "--sinks", "16", "--block-size", "32", "--topk", "2", "--query-chunk", "64",
          "--prefill-chunk", "128", "--cache-blocks", "4"]


pytestmark = pytest.mark.usefixtures("isolated_env")


@pytest.fixture(scope="module")
def snapshot(tiny_model_dir, tmp_path_factory):
    """(a folder holding book.txt, notes/a.md, notes/b.md, the snapshot read from book.txt and notes/)."""
    root = tmp_path_factory.mktemp("stale")
    (root / "notes").mkdir()
    (root / "book.txt").write_text("".join(f"Line {i}: the pass key is {i * 7 % 101}.\n" for i in range(120)))
    (root / "notes" / "a.md").write_text("# A\nfirst note\n")
    (root / "notes" / "b.md").write_text("# B\nsecond note\n")
    snap = root / "book.infllm"
    argv = ["read", "--model", str(tiny_model_dir), "--device", "cpu", *ENGINE, str(root / "book.txt"),
            str(root / "notes"), "-o", str(snap)]
    result = CliRunner().invoke(app, argv, prog_name="infllm")
    assert result.exit_code == 0, result.stderr
    return root, snap


@pytest.fixture
def copy(snapshot, tmp_path):
    """A fresh copy of the sources and snapshot at the same paths, restored after the test."""
    root, snap = snapshot
    saved = {p: (p.read_bytes(), p.stat().st_mtime) for p in root.rglob("*") if p.is_file()}
    yield root, snap
    for p, (data, mtime) in saved.items():
        p.write_bytes(data)
        os.utime(p, (mtime, mtime))


def ask(tiny_model_dir, snap, *flags):
    argv = ["ask", "--model", str(tiny_model_dir), "--device", "cpu", "--max-tokens", "2", *flags, str(snap), "q"]
    return CliRunner().invoke(app, argv, prog_name="infllm")


def warnings(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if "changed since" in line]


def test_unchanged_sources_give_no_warning(tiny_model_dir, copy):
    result = ask(tiny_model_dir, copy[1])
    assert result.exit_code == 0, result.stderr
    assert warnings(result) == []


@pytest.mark.parametrize("change", ["longer", "same size", "in a folder"])
def test_a_changed_source_is_one_warning_line_or_with_refuse_stale_exit_5(tiny_model_dir, copy, change):
    root, snap = copy
    path = root / ("notes/b.md" if change == "in a folder" else "book.txt")
    text = path.read_text()
    path.write_text(text + "more\n" if change == "longer" else "X" + text[1:])
    result = ask(tiny_model_dir, snap)
    assert result.exit_code == 0, result.stderr
    assert warnings(result) == [f"infllm: warning: {path} changed since {snap} was read; read it again"]
    refused = ask(tiny_model_dir, snap, "--refuse-stale")
    assert refused.exit_code == 5 and refused.stdout == ""
    assert refused.stderr.splitlines()[-1] == f"infllm: error: {path} changed since {snap} was read; read it again"
    assert "loading model" not in refused.stderr


def test_a_touched_or_removed_source_is_not_a_change(tiny_model_dir, copy):
    root, snap = copy
    os.utime(root / "book.txt")  # modified now, same bytes: compared, not changed
    os.utime(root / "notes" / "a.md")
    (root / "notes" / "b.md").unlink()  # gone: nothing to compare
    result = ask(tiny_model_dir, snap, "--refuse-stale")
    assert result.exit_code == 0, result.stderr
    assert warnings(result) == []


def test_sources_older_than_the_snapshot_are_not_read_again(copy, monkeypatch):
    import infllm.documents.readers
    from infllm.snapshot import SnapshotFile, changed_sources

    root, snap = copy
    old = time.time() - 3600
    for path in (root / "book.txt", root / "notes" / "a.md", root / "notes" / "b.md"):
        os.utime(path, (old, old))

    def no_reading(*args, **kwargs):
        raise AssertionError("an unchanged source was read again")

    monkeypatch.setattr(infllm.documents.readers, "read_text", no_reading)
    assert changed_sources(SnapshotFile(snap)) == []
