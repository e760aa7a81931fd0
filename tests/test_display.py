"""What infllm shows on stderr in a terminal, with NO_COLOR and in a pipe; and typer's shell completion.

A terminal is simulated with rich's own switches, which `Display` honours because it lets rich decide:
TTY_COMPATIBLE=1 (or FORCE_COLOR) makes stderr count as a terminal, TTY_COMPATIBLE=0 makes it count as a pipe.
NO_COLOR is stricter here than no-color.org asks: no escape code at all (no dim, no cursor moves), the reading line
redrawn with a carriage return. A stream (stdin) shows tokens and a rate, never a total or an ETA.
Every run uses the tiny random Llama from conftest on the CPU, with a document longer than its window.
Progress is drawn by time, not by count: the unit tests move a fake clock by hand, never sleep.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from infllm.cli.app import app
from infllm.cli.progress import LIVE_INTERVAL_S, LOG_INTERVAL_S, Display

ENGINE = ["--window", "256", "--sinks", "16", "--block-size", "32", "--topk", "2", "--query-chunk", "64",
          "--prefill-chunk", "128", "--cache-blocks", "4"]
TERMINAL_ENV = ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS", "LINES")
COMMANDS = {"ask", "summarize", "info"}

ESC = "\x1b"
SGR = re.compile(r"\x1b\[([0-9;]*)m")  # Select Graphic Rendition: colours and styles


def colour_codes(text: str) -> list[str]:
    """The SGR sequences in `text` that set a colour (foreground or background, any palette)."""
    found = []
    for match in SGR.finditer(text):
        params = [p for p in match.group(1).split(";") if p]
        codes = [int(p) for p in params]
        if any(30 <= c <= 49 or 90 <= c <= 107 for c in codes):
            found.append(match.group(0))
    return found


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("INFLLM_CACHE", str(tmp_path / "cache"))
    for name in ("INFLLM_DEBUG", "INFLLM_MODEL", "INFLLM_DEVICE", "INFLLM_DTYPE", "INFLLM_WINDOW", "INFLLM_TOPK",
                 "INFLLM_SINKS", *TERMINAL_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")  # a colour-capable terminal type, whatever the test runner has


@pytest.fixture(scope="module")
def doc(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("display") / "doc.txt"
    path.write_text("".join(f"Line {i}: the pass key is {i * 7 % 101}. Remember it.\n" for i in range(150)),
                    encoding="utf-8")
    return path


@pytest.fixture
def ask(tiny_model_dir, doc):
    """ask(*args, env={...}) -> click Result for `infllm ask` on the test document (stdout and stderr apart)."""
    runner = CliRunner()

    def run(*args, env=None):
        # --no-cache: every run reads, so that each shows the reading display.
        argv = ["ask", "--model", str(tiny_model_dir), "--device", "cpu", "--max-tokens", "5", "--no-cache", *ENGINE,
                *map(str, args), str(doc), "What is the pass key?"]
        result = runner.invoke(app, argv, env=env, prog_name="infllm")
        assert result.exit_code == 0, (result.stderr, result.exception)
        return result

    return run


# --- Display on its own ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("env, live", [({}, False), ({"TTY_COMPATIBLE": "1"}, True), ({"FORCE_COLOR": "1"}, True),
                                       ({"TTY_COMPATIBLE": "0", "FORCE_COLOR": "1"}, False)])
def test_display_decides_terminal_from_the_stream_and_rich_env(monkeypatch, env, live):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert Display(stream=io.StringIO()).live is live  # a StringIO is no tty: only the env can force one
    assert Display(quiet=True, stream=io.StringIO()).live is False


class Clock:
    """A clock the test moves by hand: progress is drawn by time, and no test sleeps for it."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_display_no_color_writes_no_escape_code_in_any_kind_of_line(monkeypatch):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("NO_COLOR", "1")
    out, clock = io.StringIO(), Clock()
    display = Display(stream=out, clock=clock)
    assert display.live
    display.phase("loading model")
    display.warn("something odd")
    display.error("one source failed")
    display.always("[1] a citation")
    for total in (100, None):
        with display.reading(total, lambda: 2**20) as update:
            for done in range(0, 101, 10):
                clock.now += 1
                update(done)
    text = out.getvalue()
    assert "loading model" in text and "something odd" in text and "one source failed" in text
    assert ESC not in text
    assert "\rread 50/100 tokens" in text and "\rread 50 tokens" in text  # redrawn in place, not scrolled
    assert text.endswith("\r")  # the reading line is cleared at the end, as rich's transient bar is


@pytest.mark.parametrize("live", [False, True])
def test_a_stream_shows_tokens_and_rate_but_no_total_and_no_eta(monkeypatch, live):
    monkeypatch.setenv("TTY_COMPATIBLE", "1" if live else "0")
    out, clock = io.StringIO(), Clock()
    with Display(stream=out, clock=clock).reading(None, lambda: 0) as update:
        for done in range(0, 5000, 128):
            clock.now += 1
            update(done)
    text = out.getvalue()
    assert "tok/s" in text and ("4,992 tok" if live else "read 4,480 tokens") in text
    assert "ETA" not in text and "/" not in text.replace("tok/s", "") and not re.search(r"\d:\d\d:\d\d", text)


@pytest.mark.parametrize("total", [1_000_000, None])
def test_in_a_log_progress_comes_by_time_from_the_first_update(monkeypatch, total):
    """A line at the first update (however small a share of the total it is), then one at most every
    LOG_INTERVAL_S, whatever the count: a slow read is never silent for long, a fast one never floods the log."""
    monkeypatch.setenv("TTY_COMPATIBLE", "0")
    out, clock = io.StringIO(), Clock()
    with Display(stream=out, clock=clock).reading(total, lambda: 0) as update:
        for step in range(1, 41):  # 100 tokens every half second: 20 s in all
            clock.now += 0.5
            update(100 * step)
    counts = [int(line.split()[2].split("/")[0].replace(",", "")) for line in out.getvalue().splitlines()]
    assert LOG_INTERVAL_S == 5.0
    assert counts == [100, 1_100, 2_100, 3_100]  # at 0.5 s, then every 5 s


def test_a_live_display_is_redrawn_at_most_every_live_interval(monkeypatch):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("NO_COLOR", "1")  # the carriage-return line: each redraw is one "\r" in the text
    out, clock = io.StringIO(), Clock()
    with Display(stream=out, clock=clock).reading(10_000, lambda: 0) as update:
        for step in range(1, 101):  # an update every 0.1 s for 10 s
            clock.now += 0.1
            update(step)
    drawn = re.findall(r"read (\d+)/10,000", out.getvalue())
    assert drawn[0] == "1"  # the first update at once
    assert LIVE_INTERVAL_S == 0.5 and len(drawn) == 20  # then one every 0.5 s, not one per update


def test_the_live_bar_shows_the_eta_from_the_second_update(monkeypatch):
    """rich's own time-remaining column stayed blank until its third sample. Ours is the rate since the first
    update (which comes after one-off set-up, so a mean from the start would be off for long)."""
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("COLUMNS", "160")
    out, clock = io.StringIO(), Clock()
    with Display(stream=out, clock=clock).reading(10_000, lambda: 0) as update:
        clock.now += 5  # the model's first call: slow
        update(10)
        assert "read 10/10,000 tokens" in out.getvalue() and "ETA" not in out.getvalue()
        clock.now += 2
        update(1_010)  # 500 tok/s since the first update: 8,990 tokens left take 18 s
        assert "read 1,010/10,000 tokens, 500 tok/s, ETA 18 s" in out.getvalue()


def test_term_dumb_gets_plain_lines_not_a_bar(monkeypatch):
    """A dumb terminal cannot move the cursor: rich would show nothing there until the end."""
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("TERM", "dumb")
    out, clock = io.StringIO(), Clock()
    display = Display(stream=out, clock=clock)
    assert not display.live
    with display.reading(10_000, lambda: 0) as update:
        for done in (100, 2_100):
            clock.now += 5
            update(done)
    first, second = out.getvalue().splitlines()  # each ends with the memory in use
    assert first.startswith("infllm: read 100/10,000 tokens, RSS ")
    assert second.startswith("infllm: read 2,100/10,000 tokens, 400 tok/s, ETA 20 s, RSS ")
    assert ESC not in out.getvalue() and "\r" not in out.getvalue()


@pytest.mark.parametrize("answer_shown", [False, True])
def test_answering_counts_tokens_only_when_the_answer_is_not_on_a_terminal(monkeypatch, answer_shown):
    monkeypatch.setenv("TTY_COMPATIBLE", "0")
    out, clock = io.StringIO(), Clock()
    with Display(stream=out, clock=clock, answer_shown=answer_shown).answering() as update:
        for tokens in range(1, 31):  # a token every half second
            clock.now += 0.5
            update(tokens)
    lines = out.getvalue().splitlines()
    assert lines == ([] if answer_shown else ["infllm: answering: 1 token",
                                              "infllm: answering: 11 tokens, 2.0 tok/s",
                                              "infllm: answering: 21 tokens, 2.0 tok/s"])


def test_quiet_shows_errors_and_citations_only(monkeypatch):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    out = io.StringIO()
    display = Display(quiet=True, stream=out, answer_shown=False)
    display.phase("loading model")
    display.warn("something odd")
    for progress in (display.reading(100, lambda: 0), display.answering()):
        with progress as update:
            update(50)
    display.error("one source failed")
    display.always("[1] a citation")
    assert out.getvalue() == "infllm: error: one source failed\n[1] a citation\n"


def test_display_colours_without_no_color(monkeypatch):
    """The control for the test above: the same lines in a terminal do carry colour."""
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    out = io.StringIO()
    Display(stream=out).warn("something odd")
    assert colour_codes(out.getvalue())


# --- the CLI end to end --------------------------------------------------------------------------------------


def test_forced_terminal_shows_the_live_display_on_stderr_only(ask):
    plain = ask("--quiet")  # the bare answer, for comparison
    result = ask(env={"TTY_COMPATIBLE": "1", "COLUMNS": "120"})
    # stderr: rich's live display (cursor hidden while the bar runs, the bar's own text), then the summary line.
    assert ESC in result.stderr
    assert "\x1b[?25l" in result.stderr and "\x1b[?25h" in result.stderr  # hide / show cursor around the bar
    assert "reading" in result.stderr and "tok/s" in result.stderr
    assert "loading model" in result.stderr and "answered" in result.stderr
    # The plain progress lines are for pipes only.
    assert not any(re.match(r"infllm: read [\d,]+/[\d,]+ tokens", line) for line in result.stderr.splitlines())
    # stdout: the answer and its newline, exactly as in a quiet run; no escape codes, no progress.
    assert result.stdout == plain.stdout
    assert ESC not in result.stdout and "infllm:" not in result.stdout and "tok/s" not in result.stdout


def test_no_color_in_a_forced_terminal_has_no_escape_codes(ask):
    result = ask(env={"TTY_COMPATIBLE": "1", "NO_COLOR": "1", "COLUMNS": "120"})
    assert "\rread " in result.stderr and "tok/s" in result.stderr  # still a live line, redrawn in place ...
    assert ESC not in result.stderr  # ... with no colour, no dim text and no cursor codes
    assert ESC not in result.stdout


def test_a_stream_in_a_forced_terminal_has_a_live_display_without_eta(tiny_model_dir, doc):
    argv = ["ask", "--model", str(tiny_model_dir), "--device", "cpu", "--max-tokens", "5", *ENGINE, "-", "q"]
    result = CliRunner().invoke(app, argv, input=doc.read_text(encoding="utf-8"), prog_name="infllm",
                                env={"TTY_COMPATIBLE": "1", "COLUMNS": "120"})
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert "reading" in result.stderr and "tok/s" in result.stderr and "\x1b[?25l" in result.stderr
    assert not re.search(r"\d:\d\d:\d\d", result.stderr)  # rich's time-remaining column is left out
    assert "a stream" in result.stderr


def test_forced_terminal_does_colour_without_no_color(ask):
    """Control for the NO_COLOR test: the same run in a terminal does emit colour codes (the bar is coloured)."""
    result = ask(env={"TTY_COMPATIBLE": "1", "COLUMNS": "120"})
    assert colour_codes(result.stderr)


@pytest.mark.parametrize("env", [{}, {"TTY_COMPATIBLE": "0"}])
def test_not_a_terminal_gives_plain_lines(ask, env):
    result = ask(env=env)
    assert ESC not in result.stderr and ESC not in result.stdout
    lines = result.stderr.splitlines()
    assert lines and all(line.startswith("infllm: ") for line in lines), lines
    reading = [line for line in lines if re.match(r"infllm: read [\d,]+/[\d,]+ tokens", line)]
    assert 1 <= len(reading) <= 11  # by time: a line at once, then one every 5 s, not one per prefill step
    assert "tok/s" in lines[-1] and "answered" in lines[-1]


def test_term_dumb_gets_plain_progress_lines(ask):
    result = ask(env={"TTY_COMPATIBLE": "1", "TERM": "dumb", "COLUMNS": "120"})
    assert ESC not in result.stderr and "\r" not in result.stderr
    assert any(re.match(r"infllm: read [\d,]+/[\d,]+ tokens", line) for line in result.stderr.splitlines())


def test_an_answer_going_to_a_file_or_pipe_is_counted_on_stderr(ask):
    """stdout is not a terminal here, so the answer coming is not seen: stderr says how far it has got."""
    result = ask()
    plain = ask("--quiet")
    assert any(re.fullmatch(r"infllm: answering: \d+ tokens?(, [\d,.]+ tok/s)?", line)
               for line in result.stderr.splitlines()), result.stderr
    assert result.stdout == plain.stdout and "answering" not in plain.stderr


# --- shell completion (typer's) --------------------------------------------------------------------------------


def test_show_completion_bash_prints_a_script(monkeypatch):
    # Without shell detection typer takes the shell as the option's value, as on a machine without shellingham.
    monkeypatch.setenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")
    result = CliRunner().invoke(app, ["--show-completion", "bash"], prog_name="infllm")
    assert result.exit_code == 0, (result.output, result.exception)
    script = result.stdout
    assert "_INFLLM_COMPLETE=complete_bash" in script
    assert "complete -o default -F _infllm_completion infllm" in script
    assert "COMP_WORDS" in script and "COMP_CWORD" in script


def complete(words: str, cword: int) -> set[str]:
    """What `infllm` offers for word `cword` of `words`, through the protocol the bash script uses."""
    env = {"_INFLLM_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
    result = CliRunner().invoke(app, [], env=env, prog_name="infllm")
    assert result.exit_code == 0, (result.output, result.exception)
    return set(result.stdout.split())


def test_completion_offers_the_commands():
    offered = complete("infllm ", 1)
    assert COMMANDS <= offered  # other commands may be offered too
    assert not any(word.startswith("-") for word in offered)


def test_completion_narrows_by_prefix():
    assert "summarize" in complete("infllm su", 1)
    assert not {"ask", "info"} & complete("infllm su", 1)
    assert {"ask"} == complete("infllm as", 1)


def test_completion_offers_a_commands_options():
    offered = complete("infllm ask --", 2)
    assert {"--model", "--json", "--quiet", "--max-tokens"} <= offered


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_script_completes_the_commands(tmp_path):
    """The real thing: bash sources `infllm --show-completion bash`, then runs its completion function."""
    exe = Path(sys.executable).parent / "infllm"
    if not exe.exists():
        pytest.skip("the infllm console script is not installed next to this Python")
    env = {k: v for k, v in os.environ.items() if k not in TERMINAL_ENV}
    env["PATH"] = f"{exe.parent}{os.pathsep}{env.get('PATH', '')}"
    env["_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION"] = "1"
    script = subprocess.run([str(exe), "--show-completion", "bash"], capture_output=True, text=True, env=env,
                            timeout=120, check=True).stdout
    (tmp_path / "completion.bash").write_text(script, encoding="utf-8")
    probe = ('source "$1"; COMP_WORDS=(infllm ""); COMP_CWORD=1; _infllm_completion infllm; '
             'printf "%s\\n" "${COMPREPLY[@]}"')
    out = subprocess.run(["bash", "-c", probe, "probe", str(tmp_path / "completion.bash")], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert COMMANDS <= set(out.stdout.split())
