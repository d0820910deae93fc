"""``qwenlite chat`` as a person uses it, through a real pseudo-terminal (pexpect), and the llama.cpp /
ollama style flags and model commands through subprocesses, on the real 0.5B model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

PROMPT = ">>> "


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "QWENLITE_HOME": str(home), "PYTHONUNBUFFERED": "1", "TERM": "xterm"}


def run_cli(*args: str, home: Path, stdin: str | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwenlite", *args], capture_output=True, text=True,
                          input=stdin, timeout=timeout, env=_env(home))


@pytest.fixture()
def chat(tmp_path: Path, real_model_path: Path):  # noqa: ANN201
    child = pexpect.spawn(sys.executable, ["-m", "qwenlite", "chat", "-m", str(real_model_path), "--temp", "0",
                                           "-n", "400", "-t", "2"],
                          env=_env(tmp_path), encoding="utf-8", timeout=300, dimensions=(40, 200))
    child.expect_exact(PROMPT)
    yield child
    child.close(force=True)


def _send(child, line: str) -> None:  # noqa: ANN001
    child.sendline(line)


def _saved(child, path: Path) -> dict:  # noqa: ANN001
    _send(child, f"/save {path}")
    child.expect("saved")
    child.expect_exact(PROMPT)
    return json.loads(path.read_text())


def test_repl_commands_multiline_history_and_ctrl_c(chat, tmp_path: Path) -> None:  # noqa: ANN001
    child = chat
    _send(child, "/help")
    child.expect("commands:")
    child.expect_exact(PROMPT)
    _send(child, "/set max_tokens 12")
    child.expect_exact("max_tokens = 12")
    child.expect_exact(PROMPT)
    # A pasted block between triple quotes is one turn.
    _send(child, '"""')
    _send(child, "def add(a, b):")
    _send(child, '    return a + b"""')
    child.expect_exact(PROMPT, timeout=300)
    # A trailing backslash continues the line.
    _send(child, "Say hi \\")
    _send(child, "in French.")
    child.expect_exact(PROMPT)
    conv = _saved(child, tmp_path / "c1.json")
    users = [m["content"] for m in conv["messages"] if m["role"] == "user"]
    assert users == ["def add(a, b):\n    return a + b", "Say hi \nin French."]
    assert all(not m["content"].startswith("/") for m in conv["messages"])  # commands never reach the model
    # History: the up arrow brings back the last line (the /save), Enter runs it again.
    child.send("\x1b[A\r")
    child.expect("saved 4 messages")
    child.expect_exact(PROMPT)
    # Ctrl-C during a long reply stops it; the conversation (and the partial reply) stay.
    _send(child, "/set max_tokens 400")
    child.expect_exact(PROMPT)
    _send(child, "Write a very long essay about the history of computing, with many sections.")
    child.expect_exact("many sections.")  # the terminal's echo of the line
    child.expect(r"\w{3,}", timeout=300)  # the reply is streaming
    time.sleep(1.0)
    child.send("zzz")  # typed while the reply streams: neither echoed nor kept as the next turn
    time.sleep(0.5)
    child.sendintr()
    child.expect_exact("[interrupted")
    child.expect_exact(PROMPT)
    assert "zzz" not in child.before
    conv = _saved(child, tmp_path / "c2.json")
    last = conv["messages"][-1]
    assert last["role"] == "assistant" and last.get("interrupted") is True and last["content"]
    assert len(conv["messages"]) == 6
    assert not any("zzz" in m["content"] for m in conv["messages"])
    # The chat goes on after the interruption, with the earlier turns intact.
    _send(child, "/set max_tokens 8")
    child.expect_exact(PROMPT)
    _send(child, "Thanks!")
    child.expect_exact(PROMPT)
    assert len(_saved(child, tmp_path / "c3.json")["messages"]) == 8
    # /clear asks first; /load restores; unknown commands are refused, not sent.
    _send(child, "/clear")
    child.expect_exact("[y/N]")
    _send(child, "n")
    child.expect_exact("kept")
    _send(child, "/load " + str(tmp_path / "c1.json"))
    child.expect("loaded 4 messages")
    _send(child, "/frobnicate")
    child.expect("unknown command /frobnicate")
    _send(child, "/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert (tmp_path / "chat_history").read_text().count("/save") >= 1  # history kept in the qwenlite home


def test_repl_ctrl_c_and_ctrl_d_at_the_prompt_exit_cleanly(chat) -> None:  # noqa: ANN001
    chat.sendintr()
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


def test_repl_ctrl_d(chat) -> None:  # noqa: ANN001
    chat.sendeof()
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0 and "Traceback" not in (chat.before or "")


# ---------------------------------------------------------------- flags


def test_llama_cpp_flags(tmp_path: Path, real_model_path: Path) -> None:
    m = str(real_model_path)
    a = run_cli("run", "-m", m, "-p", "def add(a, b):", "-n", "12", "-s", "5", "-t", "2", home=tmp_path)
    b = run_cli("run", "-m", m, "-p", "def add(a, b):", "-n", "12", "--seed", "5", "-t", "2", home=tmp_path)
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout, a.stderr
    r = run_cli("run", "-m", m, "-p", "def add(a, b):", "-n", "4", "-s", "-1", "-v", "-t", "2", home=tmp_path)
    assert r.returncode == 0 and "seed " in r.stderr and "Traceback" not in r.stderr
    # The prompt from -f - and from a piped stdin; -e turns escapes into characters.
    piped = run_cli("run", "-m", m, "-n", "6", "--temp", "0", "-t", "2", home=tmp_path, stdin="def add(a, b):")
    dash = run_cli("run", "-m", m, "-f", "-", "-n", "6", "--temp", "0", "-t", "2", home=tmp_path,
                   stdin="def add(a, b):")
    flag = run_cli("run", "-m", m, "-p", "def add(a, b):", "-n", "6", "--temp", "0", "-t", "2", home=tmp_path)
    assert piped.stdout == dash.stdout == flag.stdout and flag.stdout
    esc = run_cli("run", "-m", m, "-e", "-p", "# one\\n# two\\n", "-n", "6", "--temp", "0", "-t", "2", home=tmp_path)
    raw = run_cli("run", "-m", m, "-p", "# one\n# two\n", "-n", "6", "--temp", "0", "-t", "2", home=tmp_path)
    assert esc.stdout == raw.stdout
    # --ignore-eos runs to -n; -r is --stop.
    r = run_cli("run", "-m", m, "-p", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "--ignore-eos",
                "-n", "40", "--temp", "0", "-v", "-t", "2", home=tmp_path)
    assert "40 generated" in r.stderr, r.stderr
    r = run_cli("run", "-m", m, "-p", "1, 2, 3, 4,", "-r", "7", "-n", "40", "--temp", "0", "-t", "2", home=tmp_path)
    assert r.returncode == 0 and "7" not in r.stdout and "5" in r.stdout
    # chat: -sys and -p; the old --system and --prompt still work.
    r = run_cli("chat", "-m", m, "-sys", "Answer with one word.", "-p", "Capital of France?", "--temp", "0",
                "-t", "2", home=tmp_path)
    old = run_cli("chat", "-m", m, "--system", "Answer with one word.", "--prompt", "Capital of France?",
                  "--temp", "0", "-t", "2", home=tmp_path)
    assert r.returncode == 0 and "Paris" in r.stdout and r.stdout == old.stdout


def test_flags_are_checked_before_loading_and_context_limits(tmp_path: Path, real_model_path: Path) -> None:
    m = str(real_model_path)
    for bad, match in ((["--top-p", "2"], "top-p"), (["-n", "-5"], "n-predict"), (["--min-p", "-1"], "min-p")):
        t0 = time.perf_counter()
        r = run_cli("run", "-m", m, "-p", "x", *bad, home=tmp_path)
        assert r.returncode == 1 and r.stderr.startswith("error: ") and match in r.stderr, r.stderr
        assert time.perf_counter() - t0 < 20  # no model load (and no compile) before the error
    r = run_cli("run", "-m", m, "-p", "x", "-c", str(2**40), home=tmp_path)
    assert r.returncode == 1 and "trained on" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("run", "-m", m, "-p", "hi", "-n", "2", "-c", "40000", "-t", "64", home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "warning: context size 40000 is above the 32768" in r.stderr and "YaRN" in r.stderr
    assert "warning: -t 64 is more than the" in r.stderr
    r = run_cli("--version", home=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("qwenlite ")
    assert "(default: 0.95)" in run_cli("run", "--help", home=tmp_path).stdout


def test_dropping_old_turns_is_said_once(tmp_path: Path, real_model_path: Path) -> None:
    lines = "".join(f"Tell me fact number {i} about the number {i}, in one sentence.\n" for i in range(8))
    r = run_cli("chat", "-m", str(real_model_path), "-c", "256", "-n", "24", "--temp", "0", "-t", "2",
                home=tmp_path, stdin=lines)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("note: the oldest turns were dropped to fit the context") == 1


def test_replies_to_the_end_of_the_turn_keep_the_conversation(tmp_path: Path, real_model_path: Path) -> None:
    # -n -1 (chat's default) must not reserve the whole context for the reply and drop every earlier turn.
    r = run_cli("chat", "-m", str(real_model_path), "--temp", "0", "-t", "2", home=tmp_path,
                stdin="My name is Ada. Say OK.\nWhat is my name? One word.\n")
    assert r.returncode == 0, r.stderr
    assert "dropped" not in r.stderr and "Ada" in r.stdout.splitlines()[-1]


def test_piped_chat_failure_sets_the_exit_status(tmp_path: Path, real_model_path: Path) -> None:
    r = run_cli("chat", "-m", str(real_model_path), "-c", "64", "-n", "4", "--temp", "0", "-t", "2",
                home=tmp_path, stdin="hello\n" + "word " * 200 + "\n")
    assert r.returncode == 1 and "error:" in r.stderr and "Traceback" not in r.stderr


def test_marker_text_in_a_reply_is_kept(tmp_path: Path, real_model_path: Path) -> None:
    r = run_cli("chat", "-m", str(real_model_path), "-p", "In ChatML, what is the token <|im_end|> used for?",
                "--temp", "0", "-n", "80", "-t", "2", home=tmp_path)
    assert r.returncode == 0 and len(r.stdout.strip()) > 60, r.stdout  # once cut after "In ChatML, the token "


# ---------------------------------------------------------------- model management


def test_list_show_rm_and_info_json(tmp_path: Path, real_model_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / real_model_path.name).symlink_to(real_model_path)
    r = run_cli("list", home=tmp_path)
    assert r.returncode == 0 and "qwen2.5-coder-0.5b-instruct-q4_k_m" in r.stdout and "491 MB" in r.stdout
    listed = json.loads(run_cli("list", "--json", home=tmp_path).stdout)
    assert listed[0]["size_bytes"] == real_model_path.stat().st_size
    shown = json.loads(run_cli("show", "qwen2.5-coder-0.5b-instruct-q4_k_m", "--json", home=tmp_path).stdout)
    assert shown["architecture"] == "qwen2" and shown["quantization"] == "Q4_K_M"
    assert shown["context_length"] == 32768 and shown["layers"] == 24 and shown["tools_in_template"]
    # The file holds an untied output matrix: 630.2M weights, of a model sold as 0.5B.
    assert shown["parameters_human"] == "630.2M" and shown["size_label"] == "0.5B"
    assert shown["license"] == "Apache-2.0"  # from the manifest: the file has no general.license
    text = run_cli("show", str(real_model_path), home=tmp_path).stdout
    assert "Q4_K_M" in text and "32768" in text
    info = json.loads(run_cli("info", str(real_model_path), "--json", home=tmp_path).stdout)
    assert info["metadata"]["general.architecture"] == "qwen2"
    assert info["metadata"]["tokenizer.ggml.tokens"] == {"array_of": "str", "length": 151936}
    assert len(info["tensors"]) == 291 and info["hyperparameters"]["n_layer"] == 24
    r = run_cli("rm", "qwen2.5-coder-0.5b-instruct-q4_k_m", home=tmp_path)
    assert r.returncode == 0 and not list(models.iterdir()) and real_model_path.is_file()
    r = run_cli("rm", "nope", home=tmp_path)
    assert r.returncode == 1 and "no model 'nope'" in r.stderr


def test_python_api_rough_edges(real_model, real_model_path: Path) -> None:
    import warnings

    import qwenlite
    from qwenlite.errors import QwenliteError

    m = real_model
    a = m.generate("def add(a, b):", max_tokens=6, temperature=0.9, seed=-1)
    assert isinstance(a, str)
    for bad in ("hi", ["hi"], None, [{"content": "no role"}]):
        with pytest.raises(QwenliteError):
            m.chat(bad)  # type: ignore[arg-type]
    with pytest.raises(QwenliteError, match="integers"):
        m.logits([1.5, 2])  # type: ignore[list-item]
    with pytest.raises(QwenliteError, match="out of range"):
        m.logits([2**63])
    with pytest.raises(QwenliteError, match=">= 1"):
        qwenlite.load(real_model_path, n_ctx=0)
    with pytest.raises(QwenliteError, match="trained on"):
        qwenlite.load(real_model_path, n_ctx=2**40)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        other = qwenlite.load("qwen2.5-coder-0.5b-instruct-q4_k_m", n_ctx=40000, n_threads=2)  # a known name
    assert any(issubclass(w.category, qwenlite.QwenliteWarning) for w in caught)
    assert other.path == real_model_path
    other.close()
    with pytest.raises(QwenliteError, match="closed"):
        other.generate("x", max_tokens=1)


def test_color_on_a_terminal_only(tmp_path: Path, real_model_path: Path) -> None:
    args = ["-m", "qwenlite", "run", "-m", str(real_model_path), "-p", "def add(a, b):", "-n", "4", "--temp", "0",
            "-t", "2", "--color"]
    child = pexpect.spawn(sys.executable, args, env=_env(tmp_path), encoding="utf-8", timeout=300)
    child.expect(pexpect.EOF)
    out = child.before
    assert "\x1b[32mdef add(a, b):\x1b[36m" in out and out.rstrip().endswith("\x1b[0m")  # prompt, reply, reset
    piped = run_cli(*args[2:], home=tmp_path)
    assert piped.returncode == 0 and "\x1b[" not in piped.stdout
