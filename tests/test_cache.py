"""The read cache: a second question about the same bytes with the same model, settings and prompt opening opens
the memory kept the first time; anything else that changed reads again; the cache stays within its limit."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from infllm.cli.app import app

ENGINE = ["--window", "256", "--sinks", "16", "--block-size", "32", "--topk", "2", "--query-chunk", "64",
          "--prefill-chunk", "128", "--cache-blocks", "4"]


pytestmark = pytest.mark.usefixtures("isolated_env")


@pytest.fixture
def infllm(tiny_model_dir):
    def run(command, *args, input=None, engine=ENGINE):
        argv = [command, "--model", str(tiny_model_dir), "--device", "cpu", "--max-tokens", "5", *engine,
                *map(str, args)]
        return CliRunner().invoke(app, argv, input=input, prog_name="infllm")

    return run


def entries(tmp_path):
    return sorted((tmp_path / "cache" / "reads").glob("*.infllm"))


def cache_command(*args):
    return CliRunner().invoke(app, ["cache", *args], prog_name="infllm")


def test_asking_the_same_bytes_again_opens_the_cached_read(infllm, book, tmp_path):
    first = infllm("ask", "--json", book, "What is the pass key?")
    assert first.exit_code == 0, first.stderr
    assert len(entries(tmp_path)) == 1 and "keeping the read in the cache" in first.stderr
    second = infllm("ask", "--json", book, "What is the pass key?")
    assert second.exit_code == 0, second.stderr
    assert "opening the cached read of" in second.stderr and "extracting text" not in second.stderr
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert "prefill_s" in a["timings"] and "open_s" in b["timings"] and "prefill_s" not in b["timings"]
    assert (b["answer"], b["tokens_read"], b["inputs"]) == (a["answer"], a["tokens_read"], a["inputs"])
    # summarize's template opens as ask's does (the request comes after the document): the same memory.
    summary = infllm("summarize", book)
    assert summary.exit_code == 0 and "opening the cached read" in summary.stderr and len(entries(tmp_path)) == 1
    other = infllm("ask", "--system", "Answer in French.", book, "q")  # another opening: a read of its own
    assert "extracting text" in other.stderr and len(entries(tmp_path)) == 2


def test_no_cache_reads_again_and_keeps_nothing(infllm, book, tmp_path):
    assert infllm("ask", "--no-cache", book, "q").exit_code == 0
    assert entries(tmp_path) == []
    assert infllm("ask", book, "q").exit_code == 0
    again = infllm("ask", "--no-cache", book, "q")
    assert "extracting text" in again.stderr and "cached read" not in again.stderr


def test_changed_bytes_or_settings_read_again(infllm, book, tmp_path):
    assert infllm("ask", book, "q").exit_code == 0
    book.write_text(book.read_text().replace("Line 3:", "Line 4:"))  # same size, other bytes
    changed = infllm("ask", book, "q")
    assert "extracting text" in changed.stderr and len(entries(tmp_path)) == 2
    other = [*ENGINE[:ENGINE.index("--topk")], "--topk", "3", *ENGINE[ENGINE.index("--topk") + 2:]]
    assert "extracting text" in infllm("ask", book, "q", engine=other).stderr and len(entries(tmp_path)) == 3


def test_stdin_is_not_cached(infllm, book, tmp_path):
    assert infllm("ask", "-", "q", input=book.read_text()).exit_code == 0
    assert entries(tmp_path) == []


def test_least_recently_used_reads_are_evicted_to_stay_within_the_limit(infllm, book, tmp_path, monkeypatch):
    # Float32 blocks: entries of a few MB, so that a limit in whole MB holds two and not three.
    monkeypatch.setenv("INFLLM_KV_DTYPE", "model")
    assert infllm("ask", book, "q").exit_code == 0
    [entry] = entries(tmp_path)
    size_mb = entry.stat().st_size / 2**20
    monkeypatch.setenv("INFLLM_CACHE_LIMIT_MB", str(int(size_mb * 2.5) + 1))  # room for two entries, not three
    others = []
    for i in range(2):
        other = tmp_path / f"other{i}.txt"
        other.write_text(book.read_text() + f"and {i}\n")
        others.append(other)
    assert infllm("ask", others[0], "q").exit_code == 0
    assert "opening the cached read" in infllm("ask", book, "q").stderr  # book is now the most recently used
    assert infllm("ask", others[1], "q").exit_code == 0
    kept = entries(tmp_path)
    assert len(kept) == 2 and entry in kept  # others[0], the least recently used, made room
    assert sum(p.stat().st_size for p in kept) <= (int(size_mb * 2.5) + 1) * 2**20


def test_a_read_larger_than_the_limit_is_not_cached_and_said_once(infllm, book, tmp_path, monkeypatch):
    monkeypatch.setenv("INFLLM_CACHE_LIMIT_MB", "0")
    result = infllm("ask", "--each", book, book, "q")
    assert result.exit_code == 0, result.stderr
    assert entries(tmp_path) == []
    said = [line for line in result.stderr.splitlines() if "is not cached" in line]
    assert len(said) == 1 and "INFLLM_CACHE_LIMIT_MB" in said[0]


def test_a_bad_limit_is_refused_before_the_model_loads(infllm, book, monkeypatch):
    monkeypatch.setenv("INFLLM_CACHE_LIMIT_MB", "lots")
    result = infllm("ask", book, "q")
    assert result.exit_code == 2 and "INFLLM_CACHE_LIMIT_MB" in result.stderr
    assert "loading model" not in result.stderr


def test_cache_list_and_clear(infllm, book, tmp_path):
    assert infllm("ask", book, "q").exit_code == 0
    listed = cache_command("list", "--json")
    assert listed.exit_code == 0, listed.stderr
    [entry] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert entry["sources"] == [str(book)] and entry["tokens"] > 1000 and entry["bytes"] > 0
    assert str(tmp_path / "cache" / "reads") in listed.stderr
    assert str(book) in cache_command("list").stdout
    cleared = cache_command("clear")
    assert cleared.exit_code == 0 and "removed 1 cached reads" in cleared.stderr
    assert entries(tmp_path) == [] and cache_command("list").stdout == ""


def test_a_damaged_entry_is_read_again(infllm, book, tmp_path):
    assert infllm("ask", book, "q").exit_code == 0
    [entry] = entries(tmp_path)
    entry.write_bytes(entry.read_bytes()[:1000])
    again = infllm("ask", book, "q")
    assert again.exit_code == 0, again.stderr
    assert "extracting text" in again.stderr and entries(tmp_path)[0].stat().st_size > 1000
