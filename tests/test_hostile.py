"""Hostile input, one test per class of issue 19: every case ends in one clear ``QwenliteError`` (or a
correct run), never a traceback, a hang, an unbounded allocation or a file left behind.

GGUF edits go through the fuzz campaign's ``RawGGUF``, which writes any value of any type with no
checks, as an attacker would; the campaign itself (thousands of mutants) is ``tests/test_fuzz.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fuzz.gguf_mut import Array, RawGGUF, nested
from hf_fixtures import make_qwen2_checkpoint, make_qwen2moe_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

import qwenlite
from qwenlite.converters.hf_to_gguf import convert
from qwenlite.errors import GGUFError, QwenliteError
from qwenlite.gguf.constants import GGUFValueType
from qwenlite.gguf.reader import GGUFFile
from qwenlite.model.config import ModelConfig

MAX_MESSAGE = 600
VT = GGUFValueType


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_qwen2_checkpoint(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_qwen2moe_checkpoint(tmp_path_factory.mktemp("hfmoe"))


@pytest.fixture(scope="module")
def tiny(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(ckpt, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", "f32", progress=False)


@pytest.fixture(scope="module")
def tiny_moe(moe_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(moe_ckpt, tmp_path_factory.mktemp("gguf") / "moe-q8_0.gguf", "q8_0", progress=False)


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(d: Path, **changes: object) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def edited(src: Path, out: Path, **meta: tuple[int, object]) -> Path:
    """``src`` with metadata keys (dots as ``__``) set to (type, value) pairs, written unchecked."""
    g = RawGGUF.parse(src)
    for name, (vtype, value) in meta.items():
        key = name.replace("__", ".").encode()
        entry = g.find(key.decode())
        if entry is None:
            g.kv.append([key, vtype, value])
        else:
            entry[1], entry[2] = vtype, value
    out.write_bytes(g.encode())
    return out


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and len(msg) <= MAX_MESSAGE, msg[:300]
    return msg


def run_cli(*args: str, timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qwenlite", *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


# ---- 1. converter: size fields are bounded and checked against the tensors before any work ------


@pytest.mark.parametrize(("field", "value", "match"), [
    ("vocab_size", 10**9, r"'vocab_size' must be an integer in 1\.\.4194304, got 1000000000"),
    ("vocab_size", 4000, r"embed_tokens.weight' has shape \(413, 96\), but config.json implies \(4000, 96\)"),
    ("num_hidden_layers", 10**6, r"'num_hidden_layers' must be an integer in 1\.\.1024"),
    ("num_hidden_layers", 1000, r"missing tensor|layers"),
    ("hidden_size", 2**40, r"'hidden_size' must be an integer in 1\.\.1048576"),
])
def test_config_sizes_are_bounded(ckpt: Path, tmp_path: Path, field: str, value: int, match: str) -> None:
    d = copy_ckpt(ckpt, tmp_path / "m")
    edit_config(d, **{field: value})
    with pytest.raises(QwenliteError, match=match) as e:
        convert(d, tmp_path / "out.gguf", "f32", progress=False)
    one_line(e)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_moe_expert_count_is_bounded(moe_ckpt: Path, tmp_path: Path) -> None:
    d = copy_ckpt(moe_ckpt, tmp_path / "m")
    edit_config(d, num_experts=10**6)
    with pytest.raises(QwenliteError, match=r"'num_experts' must be an integer in 1\.\.4096"):
        convert(d, tmp_path / "out.gguf", "f32", progress=False)
    edit_config(d, num_experts=600)
    with pytest.raises(QwenliteError, match="mlp.gate.weight' has shape"):
        convert(d, tmp_path / "out.gguf", "f32", progress=False)


# ---- 2. only regular files are read ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"])
def test_fifo_in_checkpoint_is_refused(ckpt: Path, tmp_path: Path, name: str) -> None:
    d = copy_ckpt(ckpt, tmp_path / "m")
    (d / name).unlink()
    os.mkfifo(d / name)
    # In a subprocess: were the FIFO opened, the call would block forever.
    r = run_cli("convert", str(d), "-o", str(tmp_path / "out.gguf"), "--type", "f32", timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == f"error: {d / name} is not a regular file (a FIFO, device or " \
                                                "directory); refusing to read it"


def test_symlink_to_a_device_is_refused(ckpt: Path, tmp_path: Path) -> None:
    d = copy_ckpt(ckpt, tmp_path / "m")
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").symlink_to("/dev/zero")
    with pytest.raises(QwenliteError, match="is not a regular file"):
        convert(d, tmp_path / "out.gguf", "f32", progress=False)


# ---- 3. outputs: never replace a non-regular file, never create folders unasked ---------------------


def test_output_that_is_not_a_regular_file(ckpt: Path, tmp_path: Path, tiny: Path) -> None:
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    with pytest.raises(GGUFError, match="is not a regular file"):
        convert(ckpt, fifo, "f32", progress=False)
    from qwenlite.converters.requantize import requantize

    with pytest.raises(GGUFError, match="is not a regular file"):
        requantize(tiny, fifo, "q8_0", progress=False)
    assert fifo.is_fifo()  # still the FIFO: nothing replaced it
    with pytest.raises(QwenliteError, match="is a directory"):
        convert(ckpt, tmp_path, "f32", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe.gguf"]


def test_output_folder_must_exist_unless_asked(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "new" / "deeper" / "m.gguf"
    r = run_cli("convert", str(ckpt), "-o", str(out), "--type", "f32")
    assert r.returncode == 1 and not (tmp_path / "new").exists()
    assert r.stderr.strip().splitlines()[-1] == (f"error: output folder {out.parent} does not exist (create it, "
                                                 "or pass --mkdir)")
    r = run_cli("convert", str(ckpt), "-o", str(out), "--type", "f32", "--mkdir")
    assert r.returncode == 0, r.stderr
    with qwenlite.load(out) as m:
        assert m.logits([1, 2]).shape == (2, m.config.n_vocab)


# ---- 4. any length of text tokenizes ----------------------------------------------------------------


def test_ten_megabytes_of_whitespace(tiny: Path) -> None:
    with qwenlite.load(tiny, n_ctx=64) as m:
        for text in (" " * 10**7, " \t" * 5 * 10**6, "\n" * 10**6 + "x"):
            ids = m.tokenize(text)
            assert m.detokenize(ids) == text
        # below the cut (4096) tokenization is that of one call; above, still a faithful round trip
        text = "a" + " " * 4000 + "b"
        assert m.tokenize(text) == m.tokenizer._encoding.encode_ordinary(text)
        with pytest.raises(QwenliteError, match="the prompt is .* tokens but a sequence's context is 64"):
            m.generate(" " * 10**6, max_tokens=2)


def test_cli_prompt_of_a_million_spaces(tiny: Path) -> None:
    r = run_cli("run", "-m", str(tiny), "-c", "64", "-n", "2", "-f", "-", input=" " * 10**6)
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "context" in r.stderr, r.stderr[-500:]


# ---- 5. SIGTERM cleans up; temp files of killed processes are removed by the next run ---------------


@pytest.fixture(scope="module")
def bigger_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Large enough (~20M parameters) that a conversion writes for a second or more."""
    return make_qwen2_checkpoint(tmp_path_factory.mktemp("big"), hidden_size=512, intermediate_size=2048,
                                 num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4)


def _start_convert(src: Path, out: Path) -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen([sys.executable, "-m", "qwenlite", "convert", str(src), "-o", str(out), "--type",
                             "q4_k_m"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    temp = out.with_name(f"{out.name}.incomplete-{proc.pid}")
    deadline = time.monotonic() + 120
    while not temp.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.002)
    return proc, temp


def test_sigterm_during_convert_leaves_nothing(bigger_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    proc, temp = _start_convert(bigger_ckpt, out)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 143
    assert list(tmp_path.iterdir()) == []


def test_stale_temp_files_of_killed_runs_are_removed(bigger_ckpt: Path, tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    proc, temp = _start_convert(bigger_ckpt, out)
    proc.kill()
    proc.wait(60)
    assert temp.exists()  # SIGKILL cannot be handled
    alive = tmp_path / f"other.gguf.incomplete-{os.getpid()}"  # a writer still running: kept
    alive.write_bytes(b"x")
    from qwenlite.converters.requantize import requantize

    requantize(tiny, tmp_path / "q.gguf", "q8_0", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "q.gguf"]


# ---- 6. non-finite hyperparameters, weights and activations ------------------------------------------


@pytest.mark.parametrize(("key", "vtype", "value", "match"), [
    ("qwen2.rope.freq_base", VT.FLOAT32, float("nan"), "rope.freq_base' must be a finite number"),
    ("qwen2.rope.freq_base", VT.FLOAT32, 0.0, "rope.freq_base' must be a finite number"),
    ("qwen2.rope.freq_base", VT.FLOAT32, float("inf"), "rope.freq_base' must be a finite number"),
    ("qwen2.attention.layer_norm_rms_epsilon", VT.FLOAT32, float("nan"), "layer_norm_rms_epsilon' must be"),
    ("qwen2.attention.layer_norm_rms_epsilon", VT.FLOAT32, -1e-6, "layer_norm_rms_epsilon' must be"),
    ("qwen2.attention.layer_norm_rms_epsilon", VT.FLOAT32, 0.0, "layer_norm_rms_epsilon' must be"),
    ("qwen2.attention.layer_norm_rms_epsilon", VT.FLOAT64, float("inf"), "layer_norm_rms_epsilon' must be"),
    ("qwen2.rope.scaling.type", VT.STRING, "yarn", "yarn rope scaling needs"),
    ("qwen2.rope.scaling.factor", VT.FLOAT32, float("nan"), "rope.scaling.factor' must be a finite"),
])
def test_nonfinite_hyperparameters(tiny: Path, tmp_path: Path, key: str, vtype: int, value: object,
                                   match: str) -> None:
    bad = edited(tiny, tmp_path / "bad.gguf", **{key.replace(".", "__"): (vtype, value)})
    with pytest.raises(GGUFError, match=match) as e:
        qwenlite.load(bad)
    one_line(e)


def _poison(src: Path, out: Path, tensor: str, row: int) -> Path:
    """``src`` (an f32 file) with NaN written into one row of ``tensor``."""
    g = RawGGUF.parse(src)
    name, ne, _, offset = next(t for t in g.tensors if t[0] == tensor.encode())
    data = bytearray(g.data)
    pos = offset + 4 * ne[0] * row
    data[pos : pos + 8] = struct.pack("<ff", float("nan"), float("inf"))
    g.data = bytes(data)
    out.write_bytes(g.encode())
    return out


def test_nonfinite_weights_name_the_layer(tiny: Path, tmp_path: Path) -> None:
    bad = _poison(tiny, tmp_path / "embd.gguf", "token_embd.weight", 5)
    with qwenlite.load(bad) as m:
        assert np.isfinite(m.logits([1, 2, 3])).all()  # rows that are fine run
        with pytest.raises(QwenliteError, match=r"NaN or infinite values in the embedding rows of this batch "
                                                r"\(token_embd.weight\)") as e:
            m.logits([1, 5, 3])
        one_line(e)
        assert isinstance(m.generate([1, 2], max_tokens=2, seed=1), str)  # the model stays usable
    bad = _poison(tiny, tmp_path / "blk.gguf", "blk.1.ffn_down.weight", 0)
    with qwenlite.load(bad) as m, pytest.raises(QwenliteError, match=r"in the output of layer 1 \(blk.1.\*\)"):
        m.generate("hello", max_tokens=2)
    bad = _poison(tiny, tmp_path / "attn.gguf", "blk.0.attn_q.weight", 0)
    with qwenlite.load(bad) as m, pytest.raises(QwenliteError, match=r"layer 0 \(blk.0.\*\)"):
        m.logits([1, 2, 3])


def test_converter_refuses_nonfinite_weights(ckpt: Path, tmp_path: Path) -> None:
    d = copy_ckpt(ckpt, tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    w = tensors["model.layers.2.mlp.up_proj.weight"].copy()
    w[7, 3] = np.inf
    tensors["model.layers.2.mlp.up_proj.weight"] = w
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out.gguf"
    with pytest.raises(QwenliteError, match=r"tensor 'blk.2.ffn_up.weight' holds 1\+ NaN or infinite values "
                                            r"\(the first in row 7\): the checkpoint is broken; --allow-nonfinite"):
        convert(d, out, "q8_0", progress=False)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    with pytest.warns(qwenlite.errors.QwenliteWarning, match="written as they are"):
        convert(d, out, "f32", progress=False, allow_nonfinite=True)
    with GGUFFile(out) as f:
        assert np.isinf(f.tensor("blk.2.ffn_up.weight").data.view(np.float32)).sum() == 1


# ---- 7. nesting depth -----------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [5, 900, 20000])
def test_deeply_nested_arrays(tiny: Path, tmp_path: Path, depth: int) -> None:
    bad = edited(tiny, tmp_path / "nest.gguf", general__junk=(VT.ARRAY, nested(depth)))
    with pytest.raises(GGUFError, match="nests arrays more than 4 deep") as e:
        GGUFFile(bad)
    one_line(e)
    r = run_cli("info", str(bad))
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1


def test_nested_arrays_within_the_bound_load(tiny: Path, tmp_path: Path) -> None:
    ok = edited(tiny, tmp_path / "nest.gguf", general__junk=(VT.ARRAY, nested(4)))
    with GGUFFile(ok) as f:
        assert f.metadata["general.junk"] == [[[np.array([1], np.uint32)]]] or f.metadata["general.junk"]


# ---- 8. wrongly typed hyperparameters -------------------------------------------------------------


@pytest.mark.parametrize(("key", "vtype", "value"), [
    ("qwen2.attention.key_length", VT.STRING, "64"),
    ("qwen2.attention.key_length", VT.ARRAY, Array(VT.UINT32, [24])),
    ("qwen2.attention.head_count_kv", VT.FLOAT32, float("nan")),
    ("qwen2.attention.head_count_kv", VT.FLOAT32, 2.0),
    ("qwen2.rope.freq_base", VT.STRING, "1e6"),
    ("qwen2.rope.scaling.type", VT.UINT32, 1),
    ("qwen2.rope.scaling.type", VT.STRING, "dynamic"),
    ("qwen2.rope.scaling.factor", VT.ARRAY, Array(VT.FLOAT32, [2.0])),
    ("qwen2.rope.scaling.original_context_length", VT.FLOAT32, float("inf")),
    ("qwen2.feed_forward_length", VT.INT32, -160),
    ("qwen2.feed_forward_length", VT.STRING, "x"),
    ("qwen2.block_count", VT.BOOL, True),
    ("qwen2.block_count", VT.UINT64, 2**63),
    ("qwen2.context_length", VT.INT64, -1),
    ("general.architecture", VT.UINT32, 7),
])
def test_wrongly_typed_hyperparameters(tiny: Path, tmp_path: Path, key: str, vtype: int, value: object) -> None:
    bad = edited(tiny, tmp_path / "bad.gguf", **{key.replace(".", "__"): (vtype, value)})
    with pytest.raises(GGUFError, match=key.split(".", 1)[1].replace(".", r"\.") if "arch" not in key
                       else "general.architecture") as e:
        qwenlite.load(bad)
    one_line(e)


@pytest.mark.parametrize(("key", "vtype", "value", "match"), [
    ("qwen2moe.dense_layers", VT.UINT32, 1, "dense_layers' must be an array of integers"),
    ("qwen2moe.dense_layers", VT.ARRAY, Array(VT.UINT32, [7]), r"dense_layers' must be an array of integers in 0\.\.2"),
    ("qwen2moe.dense_layers", VT.ARRAY, Array(VT.UINT32, [1, 1]), "names a layer twice"),
    ("qwen2moe.expert_used_count", VT.UINT32, 7, r"expert_used_count' must be an integer in 1\.\.6"),
    ("qwen2moe.expert_count", VT.UINT32, 10**6, r"expert_count' must be an integer in 1\.\.4096"),
    ("qwen2moe.expert_weights_norm", VT.STRING, "yes", "expert_weights_norm' must be true or false"),
])
def test_moe_hyperparameters(tiny_moe: Path, tmp_path: Path, key: str, vtype: int, value: object,
                             match: str) -> None:
    bad = edited(tiny_moe, tmp_path / "bad.gguf", **{key.replace(".", "__"): (vtype, value)})
    with pytest.raises(GGUFError, match=match) as e:
        qwenlite.load(bad)
    one_line(e)


# ---- 9. converter config tracebacks -----------------------------------------------------------------


@pytest.mark.parametrize(("changes", "match"), [
    ({"architectures": [["x"]]}, "'architectures' must be a list of names"),
    ({"architectures": "Qwen2ForCausalLM"}, "'architectures' must be a list of names"),
    ({"rms_norm_eps": 1e300}, r"'rms_norm_eps' must be a finite number in \(0, 1\]"),
    ({"rope_parameters": {"rope_theta": 1e300, "rope_type": "default"}},
     r"'rope_theta' must be a finite number in \(0, 1e\+12\]"),
    ({"rope_parameters": None, "rope_theta": 1e300}, r"'rope_theta' must be a finite number"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 1e300, "original_max_position_embeddings": 64}},
     "'rope factor' must be a finite number"),
    ({"tie_word_embeddings": "no"}, "'tie_word_embeddings' must be true or false"),
])
def test_converter_config_values(ckpt: Path, tmp_path: Path, changes: dict, match: str) -> None:
    d = copy_ckpt(ckpt, tmp_path / "m")
    edit_config(d, **changes)
    with pytest.raises(QwenliteError, match=match) as e:
        convert(d, tmp_path / "out.gguf", "f32", progress=False)
    one_line(e)


def test_converter_json_with_nan_literals(ckpt: Path, tmp_path: Path) -> None:
    d = copy_ckpt(ckpt, tmp_path / "m")
    text = (d / "config.json").read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": NaN')
    (d / "config.json").write_text(text)
    with pytest.raises(QwenliteError, match=r"config.json is not valid JSON: NaN is not valid JSON"):
        convert(d, tmp_path / "out.gguf", "f32", progress=False)


def test_converter_tokenizer_files(ckpt: Path, tmp_path: Path) -> None:
    d = copy_ckpt(ckpt, tmp_path / "m")
    (d / "chat_template.jinja").write_bytes(b"\xff\xfe{{ messages }}")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(QwenliteError, match=f"{d / 'chat_template.jinja'} is not UTF-8 text"):
        convert(d, tmp_path / "out.gguf", "f32", progress=False)
    (d / "chat_template.jinja").unlink()
    # The slow tokenizer's files: added_tokens_decoder keys must be token ids.
    tok = json.loads((d / "tokenizer.json").read_text())
    (d / "tokenizer.json").unlink()
    (d / "vocab.json").write_text(json.dumps(tok["model"]["vocab"]))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in tok["model"]["merges"]))
    cfg["added_tokens_decoder"]["x"] = {"content": "<|x|>"}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(QwenliteError, match="added_tokens_decoder key 'x' is not a token id"):
        convert(d, tmp_path / "out.gguf", "f32", progress=False)


# ---- 10. API and CLI arguments ------------------------------------------------------------------------


@pytest.mark.parametrize(("call", "match"), [
    (lambda m: m.chat("hi"), "messages must be a list"),
    (lambda m: m.chat(["hi"]), "message 0: must be an object"),
    (lambda m: m.chat(None), "messages must be a list"),
    (lambda m: m.logits([2**63]), "token id 9223372036854775808 out of range"),
    (lambda m: m.logits([1.0, 2.0]), "token ids must be integers, got float"),
    (lambda m: m.logits([True]), "token ids must be integers, got bool"),
    (lambda m: m.generate("hi", stop=5), "stop must be a string or a list of strings"),
    (lambda m: m.generate("hi", temperature=float("nan")), "temperature must be a finite number"),
    (lambda m: m.generate(b"hi"), "must be text or a list of token ids, got bytes"),
    (lambda m: m.detokenize([10**9]), "outside the vocabulary"),
])
def test_api_arguments(tiny: Path, call: object, match: str) -> None:
    with qwenlite.load(tiny, n_ctx=64) as m:
        with pytest.raises(QwenliteError, match=match) as e:
            call(m)  # type: ignore[operator]
        one_line(e)
        assert isinstance(m.generate("hi", max_tokens=2, seed=-1), str)  # -1: a random seed


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"n_ctx": 2**40}, "more than 8x the 256 tokens"),
    ({"n_ctx": 10**7}, "more than 8x the 256 tokens"),
    ({"n_ctx": "64"}, "context size must be an integer"),
    ({"n_threads": "2"}, "threads must be an integer >= 1"),
    ({"n_seq": 10**9}, "cannot reserve .* MiB for the KV cache"),
])
def test_load_arguments(tiny: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(QwenliteError, match=match) as e:
        qwenlite.load(tiny, **kwargs)
    one_line(e)


def test_load_of_something_that_is_not_a_path() -> None:
    with pytest.raises(QwenliteError, match="load\\(\\) takes a model file path"):
        qwenlite.load(None)  # type: ignore[arg-type]
    with pytest.raises(QwenliteError, match="is not a file"):
        qwenlite.load("/dev/zero")


@pytest.mark.parametrize("args", [["-s", "-1"], ["-c", str(2**40)], ["--seed", "x"], ["-t", "0"], ["-n", "-7"]])
def test_cli_flags(tiny: Path, args: list[str]) -> None:
    r = run_cli("run", "-m", str(tiny), "-p", "hi", "-n", "2", *args)
    if args == ["-s", "-1"]:
        assert r.returncode == 0, r.stderr
    else:
        assert r.returncode in (1, 2) and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


# ---- 11. inconsistencies refused at load or convert time ---------------------------------------------


def test_token_list_must_match_the_embedding_table(tiny: Path, tmp_path: Path) -> None:
    g = RawGGUF.parse(tiny)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
        entry = g.find(key)
        entry[2] = Array(entry[2].etype, entry[2].items[:-8])
    (tmp_path / "short.gguf").write_bytes(g.encode())
    with pytest.raises(GGUFError, match="the token list has 405 tokens but the embedding table has 413 rows"):
        qwenlite.load(tmp_path / "short.gguf")


def test_converter_refuses_a_vocabulary_the_loader_refuses(ckpt: Path, tmp_path: Path) -> None:
    d = copy_ckpt(ckpt, tmp_path / "m")
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["added_tokens"].append({"id": 405, "content": "<|im_end|>", "special": True})  # a second <|im_end|>
    (d / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(QwenliteError, match="the checkpoint's tokenizer cannot be used: .*appears twice"):
        convert(d, tmp_path / "out.gguf", "f32", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


# ---- 12. messages: bounded echoes, the key or allocation named ------------------------------------------


def test_echoed_values_are_bounded(tiny: Path, ckpt: Path, tmp_path: Path) -> None:
    bad = edited(tiny, tmp_path / "arch.gguf", general__architecture=(VT.STRING, "A" * 65535))
    with pytest.raises(GGUFError, match=r"architecture 'AAAA.*\.\.\. \(65535 characters\) is not supported") as e:
        qwenlite.load(bad)
    assert len(one_line(e)) < 300
    d = copy_ckpt(ckpt, tmp_path / "m")
    edit_config(d, architectures=["Q" * 65535])
    with pytest.raises(QwenliteError, match=r"\(65535 characters\)") as e:
        convert(d, tmp_path / "out.gguf", "f32", progress=False)
    assert len(one_line(e)) < 300


def test_negative_feed_forward_length_names_the_key(tiny: Path, tmp_path: Path) -> None:
    bad = edited(tiny, tmp_path / "ff.gguf", qwen2__feed_forward_length=(VT.INT32, -5))
    with pytest.raises(GGUFError, match=r"'qwen2.feed_forward_length' must be an integer in 0\.\.1048576, got -5"):
        qwenlite.load(bad)


def test_address_space_limit_names_the_allocation(tiny: Path, tmp_path: Path) -> None:
    sparse = tmp_path / "sparse.gguf"
    shutil.copy(tiny, sparse)
    os.truncate(sparse, 9 << 30)  # 9 GiB, almost all of it a hole
    for call in (f"qwenlite.load({str(tiny)!r}, n_ctx=2048, n_seq=200000)", f"qwenlite.load({str(sparse)!r})"):
        code = ("import resource, qwenlite\n"
                "resource.setrlimit(resource.RLIMIT_AS, (1 << 33, 1 << 33))\n"
                f"{call}\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith(("qwenlite.errors.QwenliteError: cannot reserve", "qwenlite.errors.GGUFError:")), last
        assert "for the KV cache" in last or "cannot map the 9216 MiB file into memory" in last, last


# ---- 13. one model, many threads ---------------------------------------------------------------------


def test_threads_share_one_model_safely(tiny: Path) -> None:
    import threading

    with qwenlite.load(tiny, n_ctx=64) as m:
        want = m.generate("hello", max_tokens=8, temperature=0)
        got: list[str] = []
        threads = [threading.Thread(target=lambda: got.append(m.generate("hello", max_tokens=8, temperature=0)))
                   for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == [want] * 6
        first = m.generate("hello", max_tokens=8, stream=True)
        next(first)
        second = m.generate("world", max_tokens=8, stream=True)
        with pytest.raises(QwenliteError, match="still streaming a previous generation"):
            next(second)
        first.close()


# ---- property-based -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny: Path):  # noqa: ANN201
    with qwenlite.load(tiny, n_ctx=64) as m:
        yield m.tokenizer


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_any_text_round_trips(tokenizer, text: str) -> None:  # noqa: ANN001
    import unicodedata

    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == unicodedata.normalize("NFC", text.encode("utf-8", "replace").decode())


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                    max_leaves=8)
FIELDS = ["architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rope_theta", "rms_norm_eps",
          "rope_scaling", "num_experts", "num_experts_per_tok", "mlp_only_layers", "decoder_sparse_step"]


@settings(max_examples=400, deadline=None)
@given(changes=st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=3),
       arch=st.sampled_from(["Qwen2ForCausalLM", "Qwen2MoeForCausalLM"]))
def test_any_config_json_is_accepted_or_refused_clearly(changes: dict, arch: str) -> None:
    cfg = {"architectures": [arch], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 128,
           "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
           "shared_expert_intermediate_size": 64, **changes}
    try:
        ModelConfig.from_hf_config(cfg)
    except QwenliteError as e:
        assert "\n" not in str(e) and len(str(e)) <= MAX_MESSAGE
