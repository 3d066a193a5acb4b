"""`refimpl chat` (refimpl/chat_cli.py, docs/cli.md "Chat"): the loop driven through standard input in a
subprocess, as a user would, on the tiny golden models; the answers checked against model.generate on the same
templated ids; Ctrl-C through a pseudo-terminal."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

import pytest

from golden_cases import GOLDEN, ROOT

pytest.importorskip("jinja2")

import refimpl  # noqa: E402

LLAMA = os.path.join(GOLDEN, "models", "llama_text")
OPT = os.path.join(GOLDEN, "models", "opt_text")
NO_TOKENIZER = os.path.join(GOLDEN, "models", "llama_base")
CODE = "import sys; from refimpl.chat_cli import main; sys.exit(main(sys.argv[1:]))"
N = 12  # tokens per answer


def chat(*args, stdin=""):
    return subprocess.run([sys.executable, "-c", CODE, *map(str, args)], cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def llama():
    return refimpl.load(LLAMA), refimpl.load_tokenizer(LLAMA)


def answer(model, tokenizer, history, n=N):
    """What one turn should print: greedy generate on the templated conversation, decoded."""
    ids = tokenizer.apply_chat_template(history, add_generation_prompt=True)
    out = model.generate([ids], max_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0][len(ids):].tolist(), skip_special_tokens=True)


def test_two_turns_match_generate(llama):
    model, tokenizer = llama
    history = [{"role": "user", "content": "Hello there"}]
    first = answer(model, tokenizer, history)
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "Tell me more"}]
    second = answer(model, tokenizer, history)
    run = chat(LLAMA, "-n", N, "--greedy", stdin="Hello there\nTell me more\n/exit\nnot read\n")
    assert run.returncode == 0, run.stderr
    assert run.stdout == first + "\n" + second + "\n"
    assert first != second  # the second turn saw the first


def test_reset_starts_over(llama):
    model, tokenizer = llama
    fresh = answer(model, tokenizer, [{"role": "user", "content": "Tell me more"}])
    first = answer(model, tokenizer, [{"role": "user", "content": "Hello there"}])
    run = chat("-m", LLAMA, "-n", N, stdin="Hello there\n/reset\nTell me more\n")
    assert run.returncode == 0, run.stderr
    assert run.stdout == first + "\n" + fresh + "\n"


def test_system_message_goes_first(llama):
    model, tokenizer = llama
    system = "You answer in one word."
    history = [{"role": "system", "content": system}, {"role": "user", "content": "Hello there"}]
    text = tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
    assert text.startswith(f"<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\nHello there [/INST]")
    with_system = tokenizer.apply_chat_template(history, add_generation_prompt=True)
    assert with_system == tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(with_system).startswith(f"<s> [INST] <<SYS>>\n{system}\n<</SYS>>") or \
        system in tokenizer.decode(with_system)
    assert len(with_system) > len(tokenizer.apply_chat_template(history[1:], add_generation_prompt=True))
    expected = answer(model, tokenizer, history)
    run = chat(LLAMA, "--system", system, "-n", N, stdin="Hello there\n")
    assert run.returncode == 0, run.stderr
    assert run.stdout == expected + "\n"
    # and /reset keeps it
    run = chat(LLAMA, "--system", system, "-n", N, stdin="Hi\n/reset\nHello there\n")
    assert run.returncode == 0, run.stderr
    assert run.stdout.endswith("\n" + expected + "\n")


def test_end_of_input_exits_0():
    run = chat(LLAMA, "-n", N, stdin="")
    assert (run.returncode, run.stdout) == (0, "")
    run = chat(LLAMA, "-n", 3, stdin="Hello")  # a last line without a newline is still a message
    assert run.returncode == 0, run.stderr
    assert run.stdout.endswith("\n") and len(run.stdout) > 1


def test_no_tokenizer_is_one_line_exit_2():
    run = chat(NO_TOKENIZER, stdin="Hello\n")
    assert run.returncode == 2
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("refimpl: error: ") and "tokenizer" in lines[0]


def test_bad_flags_are_one_line_exit_2():
    for args, flag in (((LLAMA, "-n", 0), "--max-tokens"), ((LLAMA, "--temp", 0), "--temp"),
                       ((LLAMA, "--weights", "int8"), "--weights"), ((OPT,), "--chat-template")):
        run = chat(*args, stdin="Hello\n")
        assert run.returncode == 2, (args, run.stderr)
        lines = run.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("refimpl: error: ") and flag in lines[0], (args, lines)


def test_turn_error_is_printed_and_the_session_goes_on():
    """opt_text has 128 positions: a long message does not fit with -n 100; the next, short one does."""
    model, tokenizer = refimpl.load(OPT), refimpl.load_tokenizer(OPT)
    short = [{"role": "user", "content": "hi"}]
    long_line = " ".join(["word"] * 60)
    assert len(tokenizer.apply_chat_template([{"role": "user", "content": long_line}],
                                             chat_template="llama-2", add_generation_prompt=True)) + 100 > 128
    ids = tokenizer.apply_chat_template(short, chat_template="llama-2", add_generation_prompt=True)
    out = model.generate([ids], max_new_tokens=100, do_sample=False)
    expected = tokenizer.decode(out[0][len(ids):].tolist(), skip_special_tokens=True)
    run = chat(OPT, "--chat-template", "llama-2", "-n", 100, "--greedy", stdin=f"{long_line}\nhi\n")
    assert run.returncode == 0, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("refimpl: error: ")]
    assert len(errors) == 1 and "/reset" in errors[0] and "128" in errors[0], run.stderr
    assert run.stdout == expected + "\n"  # the failed message left the conversation


# --- Ctrl-C, through a pseudo-terminal ------------------------------------------------------------------------------

class Terminal:
    """The chat on a pseudo-terminal (stdin, stdout and stderr), its output read as it comes."""

    def __init__(self, *args):
        import pty

        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen([sys.executable, "-c", CODE, *map(str, args)], cwd=ROOT, stdin=slave,
                                     stdout=slave, stderr=slave, start_new_session=True, close_fds=True)
        os.close(slave)
        self.output = b""

    def read_until(self, test, timeout=60.0):
        deadline = time.monotonic() + timeout
        while not test(self.output):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out; the terminal shows {self.output[-400:]!r}")
            ready, _, _ = select.select([self.master], [], [], min(left, 0.5))
            if ready:
                try:
                    data = os.read(self.master, 4096)
                except OSError:  # the child closed the terminal
                    data = b""
                if not data and self.proc.poll() is not None:
                    raise AssertionError(f"the chat ended ({self.proc.returncode}); it showed {self.output[-400:]!r}")
                self.output += data

    def prompt_after(self, mark):
        self.read_until(lambda out: b"> " in out[mark:])

    def say(self, line):
        mark = len(self.output)
        os.write(self.master, line.encode() + b"\n")
        return mark

    def answering(self, mark, line, n_bytes=40):
        """Wait for the echo of line and then n_bytes of answer."""
        echo = line.encode()

        def started(out):
            at = out.find(echo, mark)
            return at >= 0 and len(out) - (at + len(echo)) >= n_bytes
        self.read_until(started)

    def wait(self, timeout=60.0):
        """The exit status, reading the terminal meanwhile (a child writing to a full terminal would block)."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if ready:
                try:
                    self.output += os.read(self.master, 4096)
                except OSError:
                    time.sleep(0.05)
        if self.proc.poll() is None:
            raise AssertionError(f"the chat did not end; the terminal shows {self.output[-400:]!r}")
        return self.proc.returncode

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_ctrl_c_stops_the_answer_not_the_session():
    term = Terminal(LLAMA, "-n", 100000, "--greedy")  # answers that would run for minutes
    try:
        term.prompt_after(0)
        for line in ("Hello there", "Tell me more"):
            mark = term.say(line)
            term.answering(mark, line)
            time.sleep(0.2)
            stop = len(term.output)
            term.proc.send_signal(signal.SIGINT)
            term.prompt_after(stop)  # a new prompt: the session goes on, and the next line is answered
            assert term.proc.poll() is None
        mark = term.say("/exit")
        assert term.wait() == 0
        assert b"Traceback" not in term.output
    finally:
        term.close()


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_ctrl_c_at_the_prompt_quits():
    term = Terminal(LLAMA, "-n", N)
    try:
        term.prompt_after(0)
        # the prompt is printed just before readline waits; a signal in between waits for the next key (CPython's
        # readline select loop), a race a person at the keyboard never meets
        time.sleep(0.5)
        term.proc.send_signal(signal.SIGINT)
        assert term.wait() in (0, 130), term.output[-400:]
        assert b"Traceback" not in term.output
    finally:
        term.close()
