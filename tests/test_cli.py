"""The ``qwenlite`` CLI: error paths through a real subprocess, delegation and bench in-process.

Every user error must come out as exactly one ``error: ...`` line on stderr, exit status 1, and no
traceback. Tests that generate text need ``qwenlite.load`` and skip while it cannot be imported.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from qwenlite import cli
from qwenlite.bench import bench
from qwenlite.errors import QwenliteError

ROOT = Path(__file__).resolve().parent.parent


def cli_run(*args: str, home: Path, stdin: str | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), QWENLITE_HOME=str(home),
               QWENLITE_PYPI_URL="http://127.0.0.1:9/pypi")  # never download from these tests
    return subprocess.run([sys.executable, "-m", "qwenlite.cli", *args], capture_output=True, text=True,
                          env=env, input=stdin, timeout=timeout, cwd=ROOT)


def assert_user_error(proc: subprocess.CompletedProcess, match: str) -> None:
    assert proc.returncode == 1, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert match in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def have_loader() -> bool:
    try:
        importlib.import_module("qwenlite.api")
    except ImportError:
        return False
    return True


needs_loader = pytest.mark.skipif(not have_loader(), reason="qwenlite.load cannot be imported yet")


# ---------------------------------------------------------------- error paths (no model needed)


def test_missing_model_file(tmp_path: Path) -> None:
    proc = cli_run("run", "-m", str(tmp_path / "nope.gguf"), "-p", "hi", home=tmp_path)
    assert_user_error(proc, "model file not found")


def test_unknown_model_name(tmp_path: Path) -> None:
    assert_user_error(cli_run("info", "llama-70b", home=tmp_path), "known models")


def test_non_utf8_prompt_file(tmp_path: Path) -> None:
    bad = tmp_path / "prompt.txt"
    bad.write_bytes(b"caf\xe9 au lait")
    proc = cli_run("run", "-m", str(tmp_path / "x.gguf"), "-f", str(bad), home=tmp_path)
    assert_user_error(proc, "not valid UTF-8 (bad byte at offset 3)")


def test_missing_prompt_file_and_conflicting_prompts(tmp_path: Path) -> None:
    assert_user_error(cli_run("run", "-f", str(tmp_path / "none.txt"), home=tmp_path), "cannot read prompt file")
    f = tmp_path / "p.txt"
    f.write_text("x")
    assert_user_error(cli_run("run", "-p", "a", "-f", str(f), home=tmp_path), "not both")


def test_truncated_file_info(tmp_path: Path, real_model_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    with real_model_path.open("rb") as f:
        cut.write_bytes(f.read(1_000_000))
    proc = cli_run("info", str(cut), home=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1


def test_not_a_gguf(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04" + bytes(100))
    proc = cli_run("info", str(junk), home=tmp_path)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_pull_list_offline(tmp_path: Path) -> None:
    proc = cli_run("pull", "--list", home=tmp_path)
    assert proc.returncode == 0
    assert "* qwen2.5-coder-0.5b-instruct-q4_k_m" in proc.stdout
    assert "qwen2.5-coder-1.5b-instruct-q4_k_m" in proc.stdout


def test_pull_failure_is_one_line(tmp_path: Path) -> None:
    assert_user_error(cli_run("pull", home=tmp_path), "download failed")
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_help() -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0


def test_info_real_model(tmp_path: Path, real_model_path: Path) -> None:
    proc = cli_run("info", str(real_model_path), home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"size: {real_model_path.stat().st_size:,} bytes" in out
    assert "general.architecture = qwen2" in out
    assert "n_layer = 24" in out and "n_embd = 896" in out
    assert "tokenizer.ggml.tokens = [151936 x" in out
    for qtype in ("Q5_0", "Q8_0", "Q4_K", "Q6_K", "F32"):
        assert f"  {qtype} " in out
    assert "token_embd.weight" in out and "blk.23.ffn_down.weight" in out
    assert "tensors: 291," in out and "output.weight              Q8_0    151936x896" in out


# ---------------------------------------------------------------- delegation and exit codes (in-process)


def fake_module(monkeypatch: pytest.MonkeyPatch, name: str, func_name: str, func: object) -> None:
    mod = types.ModuleType(name)
    setattr(mod, func_name, func)
    monkeypatch.setitem(sys.modules, name, mod)


def test_convert_and_quantize_delegate(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    fake_module(monkeypatch, "qwenlite.converters.hf_to_gguf", "convert", lambda *a, **k: calls.append(("c", a, k)))
    fake_module(monkeypatch, "qwenlite.converters.requantize", "requantize", lambda *a, **k: calls.append(("q", a, k)))
    assert cli.main(["convert", "hf", "-o", "out.gguf", "--type", "q8_0"]) == 0
    assert cli.main(["quantize", "in.gguf", "out.gguf", "--type", "q4_k_m", "--mkdir", "--allow-nonfinite"]) == 0
    assert calls == [("c", ("hf", "out.gguf", "q8_0"), {"progress": True, "parents": False, "allow_nonfinite": False}),
                     ("q", ("in.gguf", "out.gguf", "q4_k_m"), {"progress": True, "parents": True,
                                                              "allow_nonfinite": True})]


def test_errors_and_interrupts_become_exit_codes(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    def boom(*a: object, **k: object) -> None:
        raise QwenliteError("bad\ninput")

    def interrupt(*a: object, **k: object) -> None:
        raise KeyboardInterrupt

    fake_module(monkeypatch, "qwenlite.converters.hf_to_gguf", "convert", boom)
    assert cli.main(["convert", "hf", "-o", "x"]) == 1
    assert capsys.readouterr().err == "error: bad input\n"
    fake_module(monkeypatch, "qwenlite.converters.hf_to_gguf", "convert", interrupt)
    assert cli.main(["convert", "hf", "-o", "x"]) == 130
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- bench against a counting engine


class CountingEngine:
    n_ctx = 1024

    def __init__(self) -> None:
        self.n_past = 0
        self.calls: list[int] = []

    def reset(self) -> None:
        self.n_past = 0

    def eval(self, ids: list[int]) -> np.ndarray:
        assert all(0 <= t < 151643 for t in ids)
        self.n_past += len(ids)
        assert self.n_past <= self.n_ctx
        self.calls.append(len(ids))
        return np.zeros(151936, dtype=np.float32)


def test_bench_measures_pp_as_one_batch_and_tg_as_single_tokens() -> None:
    eng = CountingEngine()
    seen = []
    res = bench(eng, n_prompt=32, n_gen=5, reps=3, on_rep=lambda k, r, t: seen.append((k, r)))
    # 1 vocab probe + (1 warm-up + 3 reps) of pp, then of tg.
    assert eng.calls == [1] + [32] * 4 + [1] * 5 * 4
    assert seen == [("pp", 0), ("pp", 1), ("pp", 2), ("tg", 0), ("tg", 1), ("tg", 2)]
    assert len(res["pp_samples"]) == 3 and res["pp_tps"] == pytest.approx(np.mean(res["pp_samples"]))
    assert res["tg_std"] == pytest.approx(np.std(res["tg_samples"], ddof=1))
    assert eng.n_past == 0
    with pytest.raises(QwenliteError):
        bench(eng, n_prompt=2000, n_gen=1, reps=1)


# ---------------------------------------------------------------- with the real model


@needs_loader
def test_run_stdout_is_only_generated_text(tmp_path: Path, real_model_path: Path) -> None:
    prompt = "def fibonacci(n):"
    proc = cli_run("run", "-m", str(real_model_path), "-p", prompt, "-n", "24", "--temp", "0", "-t", "2",
                    home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and not proc.stdout.startswith(prompt)
    assert "<|" not in proc.stdout
    assert "Traceback" not in proc.stderr
    import qwenlite.api

    model = qwenlite.api.load(real_model_path, n_threads=2)
    assert proc.stdout == model.generate(prompt, max_tokens=24, temperature=0.0, special=True)


@needs_loader
def test_chat_one_reply_and_piped_repl(tmp_path: Path, real_model_path: Path) -> None:
    proc = cli_run("chat", "-m", str(real_model_path), "--prompt", "Say hello in French, one word.",
                    "--temp", "0", "-n", "32", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "bonjour" in proc.stdout.lower() and "<|im_" not in proc.stdout
    proc = cli_run("chat", "-m", str(real_model_path), "--temp", "0", "-n", "24",
                    stdin="What is 2+2? Reply with the number only.\n/exit\nnot sent\n", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "4" in proc.stdout and "not sent" not in proc.stdout


@needs_loader
def test_grammar_and_json_schema_flags(tmp_path: Path, real_model_path: Path) -> None:
    pytest.importorskip("llguidance")
    schema = {"type": "object", "properties": {"lang": {"enum": ["python", "go"]}, "year": {"type": "integer"}},
              "required": ["lang", "year"], "additionalProperties": False}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    (tmp_path / "yn.gbnf").write_text('root ::= "yes" | "no"\n')
    proc = cli_run("chat", "-m", str(real_model_path), "--prompt", "Which is older, and when was it made?",
                   "--json-schema", str(tmp_path / "s.json"), "--temp", "0", "-n", "60", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    reply = json.loads(proc.stdout)
    assert reply["lang"] in ("python", "go") and isinstance(reply["year"], int)
    proc = cli_run("run", "-m", str(real_model_path), "-p", "Is the sky blue? Answer:", "--grammar",
                   str(tmp_path / "yn.gbnf"), "--temp", "0.8", "--seed", "2", "-n", "5", home=tmp_path)
    assert proc.returncode == 0 and proc.stdout in ("yes", "no"), proc.stderr
    proc = cli_run("run", "-m", str(real_model_path), "-p", "x", "--grammar", 'root ::= "a" | "b"', "-n", "3",
                   home=tmp_path)  # inline text, as llama.cpp takes it
    assert proc.returncode == 0 and proc.stdout in ("a", "b"), proc.stderr
    assert_user_error(cli_run("run", "-m", str(real_model_path), "-p", "x", "--grammar", "root ::= (",
                              home=tmp_path), "grammar cannot be compiled")
    assert_user_error(cli_run("run", "-m", str(real_model_path), "-p", "x", "-j", '{"type": "strin"}',
                              home=tmp_path), "JSON schema cannot be compiled")


@needs_loader
def test_run_errors_with_the_loader(tmp_path: Path, real_model_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    with real_model_path.open("rb") as f:
        cut.write_bytes(f.read(50_000_000))
    proc = cli_run("run", "-m", str(cut), "-p", "hi", home=tmp_path)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr
    long_prompt = tmp_path / "long.txt"
    long_prompt.write_text(" hello" * 600)
    proc = cli_run("run", "-m", str(real_model_path), "-c", "512", "-f", str(long_prompt), home=tmp_path)
    assert_user_error(proc, "context")


@needs_loader
def test_bench_json(tmp_path: Path, real_model_path: Path) -> None:
    proc = cli_run("bench", "-m", str(real_model_path), "-p", "16", "-n", "4", "-t", "2", "-r", "2", "--json",
                    home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["n_threads"] == 2 and res["model"] == real_model_path.name
    for key in ("pp_tps", "pp_std", "tg_tps", "tg_std"):
        assert res[key] >= 0
    assert res["pp_tps"] > 0 and res["tg_tps"] > 0


def test_warmup_reports_and_leaves_stdout_empty(tmp_path: Path, real_model_path: Path) -> None:
    proc = cli_run("warmup", "-m", str(real_model_path), "-t", "2", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert re.search(r"warm: load \d+\.\d s, kernels \d+\.\d s", proc.stderr)


@needs_loader
def test_bench_batch_json_and_kv_type_flags(tmp_path: Path, real_model_path: Path) -> None:
    proc = cli_run("bench", "-m", str(real_model_path), "-n", "3", "-r", "1", "--batch", "1,2", "-t", "2",
                   "-ctk", "q8_0", "-ctv", "q8_0", "--json", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["kv_type"] == "q8_0"
    assert [row["n_seq"] for row in res["batch"]] == [1, 2]
    assert all(row["tg_tps"] > 0 and len(row["tg_samples"]) == 1 for row in res["batch"])
    for flags, message in ((["-ctk", "q8_0", "-ctv", "f16"], "one type"), (["--kv-type", "q4_0"], "unknown KV cache"),
                           (["--batch", "2,x"], "--batch takes")):
        proc = cli_run("bench", "-m", str(real_model_path), "-n", "2", "-r", "1", *flags, home=tmp_path)
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr
    proc = cli_run("run", "-m", str(real_model_path), "-p", "def f(x):", "-n", "8", "--temp", "0", "--kv-type", "f32",
                   home=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr


def test_serve_without_the_server_extra_names_the_install_command(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['uvicorn'] = None; from qwenlite import cli; "
            "sys.exit(cli.main(['serve', '-m', 'nowhere.gguf']))")
    env = dict(os.environ, PYTHONPATH=str(ROOT), QWENLITE_HOME=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert_user_error(proc, "pip install 'qwenlite[server]'")


@pytest.mark.parametrize(("flags", "match"), [
    (["--parallel", "0"], "--parallel must be >= 1"),
    (["--port", "70000"], "--port must be in 0..65535"),
    (["--queue", "-1"], "--queue must be >= 0"),
    (["-c", "0"], "-c/--ctx-size must be >= 1"),
])
def test_serve_bad_flags_are_one_clear_error(tmp_path: Path, real_model_path: Path, flags: list[str],
                                             match: str) -> None:
    assert_user_error(cli_run("serve", "-m", str(real_model_path), *flags, home=tmp_path), match)
