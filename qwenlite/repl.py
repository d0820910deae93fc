"""``qwenlite chat``'s interactive loop, as llama.cpp and ollama users expect it.

Line editing and history come from ``readline`` (history kept in ``$QWENLITE_HOME/chat_history``).
A turn may span lines: ollama's ``\"\"\"`` ... ``\"\"\"``, or a trailing backslash. Lines starting
with ``/`` are commands and never reach the model (``//`` sends a literal slash). Ctrl-C during a
reply stops that reply and keeps the conversation, the partial reply marked as interrupted; Ctrl-C
at the prompt or Ctrl-D ends the chat on a new line. While a reply streams, the terminal's echo is
off and typed-ahead keys are discarded afterwards, so they neither garble the output nor become the
next turn. Piped (not a terminal), every line is a turn and a failed turn makes the exit status 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from qwenlite import hub
from qwenlite.chat.sampler import Sampler
from qwenlite.chat.session import ChatSession
from qwenlite.errors import QwenliteError

HELP = """\
commands:
  /help                 this list
  /exit, /bye           end the chat (Ctrl-D too)
  /clear                start a new conversation (asks first)
  /system TEXT          set the system prompt (an empty TEXT restores the model's default)
  /set                  show the settings;  /set NAME VALUE  changes one (temperature, top_k, top_p,
                        min_p, repeat_penalty, seed, max_tokens)
  /save FILE            write the conversation as JSON;  /load FILE  reads one back
input:
  \"\"\" ... \"\"\"         a multi-line message (paste code between the quotes)
  a trailing \\          continues the message on the next line
  //text                sends "/text"
  Ctrl-C                stops a reply (the conversation stays); at the prompt, exits"""

SETTINGS = {"temperature": float, "top_k": int, "top_p": float, "min_p": float, "repeat_penalty": float,
            "seed": int, "max_tokens": int}
COLOR_USER, COLOR_REPLY, COLOR_RESET = "\033[32m", "\033[36m", "\033[0m"


class CompileNotice:
    """Says, on stderr, that the kernels are compiling when the first output is slow to come (a fresh
    install compiles for about a minute; later starts load them from Numba's disk cache in ~2 s).
    ``done()`` on the first output clears the line. Silent if output arrives within ``after`` seconds."""

    def __init__(self, after: float = 2.0, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.after = after
        self._stop = threading.Event()
        self._shown = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self._stop.wait(self.after):
            return
        live = self.stream.isatty()
        start = time.monotonic() - self.after
        spin = "|/-\\"
        i = 0
        self._shown = True
        msg = "compiling kernels for this model (first run only; later starts take a few seconds)"
        if not live:
            print(f"{msg}...", file=self.stream, flush=True)
            return
        while not self._stop.wait(0.25):
            self.stream.write(f"\r{msg} {spin[i % 4]} {time.monotonic() - start:4.0f} s")
            self.stream.flush()
            i += 1

    def done(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        if self._shown and self.stream.isatty():
            self.stream.write("\r\033[K")
            self.stream.flush()


class _Terminal:
    """Echo off while a reply streams (keys typed then are dropped), restored afterwards."""

    def __init__(self, stream: TextIO) -> None:
        self.fd: int | None = None
        try:
            import termios

            if stream.isatty():
                self.fd = stream.fileno()
                self.termios = termios
        except (ImportError, OSError, ValueError):
            self.fd = None

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        if self.fd is None:
            yield
            return
        t = self.termios
        saved = t.tcgetattr(self.fd)
        quiet = list(saved)
        quiet[3] &= ~(t.ECHO | t.ICANON)  # keep ISIG: Ctrl-C must still interrupt
        try:
            t.tcsetattr(self.fd, t.TCSANOW, quiet)
            yield
        finally:
            with contextlib.suppress(OSError):
                t.tcflush(self.fd, t.TCIFLUSH)
                t.tcsetattr(self.fd, t.TCSANOW, saved)


class Repl:
    """The chat loop over a ``ChatSession``; ``run()`` returns the exit status."""

    def __init__(self, session: ChatSession, *, interactive: bool, color: bool = False,
                 stdin: TextIO | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> None:
        self.session = session
        self.interactive = interactive
        self.color = color and interactive
        self.stdin = stdin or sys.stdin
        self.out = stdout or sys.stdout
        self.err = stderr or sys.stderr
        self.failed = False
        self.told_dropped = False
        self.terminal = _Terminal(self.stdin)
        self.history_file = hub.home_dir() / "chat_history"
        self.readline: Any = None
        self.first = True  # the first reply may wait for the kernels to compile

    # ---- input -------------------------------------------------------------------------------------

    def _setup_readline(self) -> None:
        if not self.interactive:
            return
        try:
            import readline
        except ImportError:
            return
        self.readline = readline
        readline.set_history_length(2000)
        with contextlib.suppress(OSError):
            readline.read_history_file(self.history_file)

    def _save_history(self) -> None:
        if self.readline is not None:
            with contextlib.suppress(OSError):
                self.history_file.parent.mkdir(parents=True, exist_ok=True)
                self.readline.write_history_file(self.history_file)

    def _line(self, prompt: str) -> str | None:
        if self.interactive:
            if self.color:
                prompt = f"\001{COLOR_USER}\002{prompt}"
            try:
                line = input(prompt)
            except EOFError:
                return None
            finally:
                if self.color:
                    self.out.write(COLOR_RESET)
            return line
        line = self.stdin.readline()
        return line.rstrip("\n") if line else None

    def read_turn(self) -> str | None:
        """One message: a line, a ``\"\"\"`` block, or lines joined by trailing backslashes."""
        line = self._line(">>> ")
        if line is None:
            return None
        if line.lstrip().startswith('"""'):
            first = line.lstrip()[3:]
            if first.endswith('"""') and len(first) >= 3:
                return first[:-3]
            parts = [first] if first else []
            while (more := self._line("... ")) is not None:
                if more.rstrip().endswith('"""'):
                    parts.append(more.rstrip()[:-3])
                    break
                parts.append(more)
            return "\n".join(parts).strip("\n")
        parts = []
        while line.endswith("\\"):
            parts.append(line[:-1])
            line = self._line("... ")
            if line is None:
                line = ""
                break
        parts.append(line)
        return "\n".join(parts)

    # ---- commands ----------------------------------------------------------------------------------

    def _say(self, text: str) -> None:
        print(text, file=self.err)

    def command(self, text: str) -> bool:
        """Run a /command; False when the chat should end."""
        name, _, rest = text[1:].partition(" ")
        rest = rest.strip()
        s = self.session
        if name in ("exit", "bye", "quit"):
            return False
        if name == "help":
            self._say(HELP)
        elif name in ("clear", "reset"):
            if name == "clear" and self.interactive:
                answer = self._line("clear the conversation? [y/N] ")
                if (answer or "").strip().lower() not in ("y", "yes"):
                    self._say("kept")
                    return True
            s.reset()
            self._say("new conversation")
        elif name == "system":
            s.system = rest or None
            self._say("system prompt set" if rest else "system prompt: the model's default")
        elif name == "set":
            self._set(rest)
        elif name == "save":
            self._save(rest)
        elif name == "load":
            self._load(rest)
        else:
            self._say(f"unknown command /{name}; /help lists them (//text sends a line starting with /)")
        return True

    def settings(self) -> dict[str, Any]:
        cfg = self.session.sampler.config
        return {"temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p, "min_p": cfg.min_p,
                "repeat_penalty": cfg.repeat_penalty, "seed": self.session.sampler.seed,
                "max_tokens": self.session.max_tokens}

    def _set(self, rest: str) -> None:
        if not rest:
            self._say("  ".join(f"{k}={v}" for k, v in self.settings().items()))
            return
        key, _, value = rest.partition(" ")
        key = key.replace("-", "_")
        if key == "temp":
            key = "temperature"
        if key not in SETTINGS or not value.strip():
            self._say(f"usage: /set NAME VALUE with NAME one of {', '.join(SETTINGS)}")
            return
        try:
            parsed = SETTINGS[key](value.strip())
        except ValueError:
            self._say(f"{key}: {value.strip()!r} is not a {SETTINGS[key].__name__}")
            return
        if key == "max_tokens":
            self.session.max_tokens = parsed if parsed > 0 else self.session.engine.n_ctx
        else:
            cfg = self.session.sampler.config
            try:
                self.session.sampler = Sampler(replace(cfg, **{key: parsed}))
            except QwenliteError as exc:
                self._say(f"error: {exc}")
                return
        self._say(f"{key} = {parsed}")

    def _save(self, rest: str) -> None:
        if not rest:
            self._say("usage: /save FILE")
            return
        data = {"system": self.session.system, "messages": self.session.history, "settings": self.settings()}
        path = Path(rest).expanduser()
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, path)
        except OSError as exc:
            self._say(f"error: cannot write {rest}: {exc.strerror or exc}")
            return
        self._say(f"saved {len(self.session.history)} messages to {rest}")

    def _load(self, rest: str) -> None:
        if not rest:
            self._say("usage: /load FILE")
            return
        try:
            data = json.loads(Path(rest).expanduser().read_text(encoding="utf-8"))
            messages = data["messages"]
            if not isinstance(messages, list) or not all(
                    isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)
                    for m in messages):
                raise ValueError("'messages' must be a list of user / assistant messages")
            system = data.get("system")
            if system is not None and not isinstance(system, str):
                raise ValueError("'system' must be a string or null")
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            self._say(f"error: cannot load {rest}: {exc}")
            return
        self.session.reset()
        self.session.system = system
        self.session.history = [{"role": m["role"], "content": m["content"]} for m in messages]
        self._say(f"loaded {len(messages)} messages from {rest}")

    # ---- the loop ----------------------------------------------------------------------------------

    def turn(self, text: str) -> None:
        s = self.session
        before = s.dropped
        if self.color:
            self.out.write(COLOR_REPLY)
        notice = CompileNotice() if self.first else None
        self.first = False
        try:
            with self.terminal.quiet():
                for piece in s.send(text):
                    if notice is not None:
                        notice.done()
                        notice = None
                    self.out.write(piece)
                    self.out.flush()
        except KeyboardInterrupt:
            self.out.write(COLOR_RESET if self.color else "")
            self.out.write("\n")
            self._say("[interrupted: the partial reply is kept]")
            return
        except QwenliteError as exc:  # one bad turn (too long) should not end the conversation
            self.failed = True
            self._say(f"error: {' '.join(str(exc).split())}")
        finally:
            if notice is not None:
                notice.done()
            if self.color:
                self.out.write(COLOR_RESET)
        self.out.write("\n")
        self.out.flush()
        if s.dropped > before and not self.told_dropped:
            self.told_dropped = True
            self._say("note: the oldest turns were dropped to fit the context")

    def run(self) -> int:
        self._setup_readline()
        if self.interactive:
            self._say("chat with the model; /help for commands, /bye or Ctrl-D to end")
        try:
            while True:
                try:
                    text = self.read_turn()
                except KeyboardInterrupt:
                    text = None
                if text is None:
                    if self.interactive:
                        self.out.write("\n")
                    break
                stripped = text.strip()
                if not stripped:
                    continue
                if stripped.startswith("/") and not stripped.startswith("//"):
                    if not self.command(stripped):
                        break
                    continue
                self.turn(text[text.index("/") + 1:] if stripped.startswith("//") else text)
        finally:
            self._save_history()
        return 1 if self.failed else 0
