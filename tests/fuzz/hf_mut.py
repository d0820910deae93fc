"""Structure-aware mutations of Hugging Face checkpoint directories: ``config.json`` fields,
safetensors headers and data, tokenizer files, the shard index, and files that are not regular files.

``mutate(seed_dir, case_dir, family, rng)`` copies the seed and edits the copy.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
from pathlib import Path
from typing import Any

HOSTILE = [0, -1, 1, 2, 3, 10**6, 10**9, 2**31, 2**63, 10**30, 1e300, -1e300, 1e-300, 0.5, float("nan"),
           float("inf"), "", "x", "64", None, True, False, [], [1], ["x"], [["x"]], {}, {"a": 1}]
CONFIG_FIELDS = ["architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rope_theta",
                 "rms_norm_eps", "tie_word_embeddings", "rope_scaling", "rope_parameters", "num_experts",
                 "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
                 "decoder_sparse_step", "mlp_only_layers", "norm_topk_prob", "qkv_bias", "torch_dtype",
                 "sliding_window", "use_sliding_window", "model_type"]


def _json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, allow_nan=True), encoding="utf-8")


def m_config_value(d: Path, rng: random.Random) -> None:
    cfg = _json(d / "config.json")
    key = rng.choice(CONFIG_FIELDS)
    if rng.random() < 0.1:
        cfg.pop(key, None)
    elif key in ("rope_scaling", "rope_parameters") and rng.random() < 0.7:
        cfg[key] = {rng.choice(["type", "rope_type"]): rng.choice(["yarn", "linear", "dynamic", "default", 3]),
                    "factor": rng.choice(HOSTILE), "original_max_position_embeddings": rng.choice(HOSTILE),
                    "rope_theta": rng.choice(HOSTILE)}
    else:
        cfg[key] = rng.choice(HOSTILE)
    _write_json(d / "config.json", cfg)


def m_config_struct(d: Path, rng: random.Random) -> None:
    path = d / "config.json"
    what = rng.choice(["array", "garbage", "nested", "empty", "bom", "utf16", "huge-arch", "dup"])
    if what == "array":
        _write_json(path, [_json(path)])
    elif what == "garbage":
        path.write_bytes(path.read_bytes()[: rng.randrange(1, 200)])
    elif what == "nested":
        path.write_text("[" * 100000 + "]" * 100000)
    elif what == "empty":
        path.write_bytes(b"")
    elif what == "bom":
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    elif what == "utf16":
        path.write_bytes(path.read_text().encode("utf-16"))
    elif what == "huge-arch":
        cfg = _json(path)
        cfg["architectures"] = ["Q" * 65535]
        _write_json(path, cfg)
    else:
        text = path.read_text()
        path.write_text(text.rstrip().rstrip("}") + ', "hidden_size": "x"}')


def _st_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def _read_st(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_st(path: Path, header: dict[str, Any] | bytes, data: bytes, length: int | None = None) -> None:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h) if length is None else length) + h + data)


def m_st_header(d: Path, rng: random.Random) -> None:
    path = rng.choice(_st_files(d))
    header, data = _read_st(path)
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    what = rng.choice(["dtype", "shape", "offsets", "rename", "drop", "length", "garbage", "meta", "dup-range",
                       "type"])
    if what == "dtype":
        entry["dtype"] = rng.choice(["F64", "I8", "U8", "BOOL", "F8_E4M3", "X", 3, None, "F16", "BF16"])
    elif what == "shape":
        shape = list(entry["shape"])
        if shape and rng.random() < 0.7:
            shape[rng.randrange(len(shape))] = rng.choice([0, -1, 1, 10**9, 2**63, "x", 1.5])
        else:
            shape = rng.choice([[], [1] * 9, shape[::-1], "x", None])
        entry["shape"] = shape
    elif what == "offsets":
        a, b = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[b, a], [a, b + 4], [a + 1, b + 1], [0, 2**63], [-4, b], [a], "x",
                                            [a, len(data) + 8]])
    elif what == "rename":
        header[name.replace("layers.0", "layers.99") if "layers.0" in name else name + ".x"] = header.pop(name)
    elif what == "drop":
        del header[name]
    elif what == "length":
        _write_st(path, header, data, rng.choice([0, 1, 2**63, len(json.dumps(header)) + 100, 10**8]))
        return
    elif what == "garbage":
        raw = bytearray(json.dumps(header).encode())
        for _ in range(rng.choice([1, 3])):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        _write_st(path, bytes(raw), data)
        return
    elif what == "meta":
        header["__metadata__"] = rng.choice([{"format": "pt"}, {"a": 1}, "x", [1], None])
    elif what == "dup-range":
        other = header[rng.choice(names)]
        entry["data_offsets"] = list(other["data_offsets"])
    else:
        header[name] = rng.choice(["x", [1, 2], None, {"dtype": "F32"}])
    _write_st(path, header, data)


def m_st_data(d: Path, rng: random.Random) -> None:
    path = rng.choice(_st_files(d))
    header, data = _read_st(path)
    name = rng.choice([k for k in header if k != "__metadata__"])
    a, b = header[name]["data_offsets"]
    buf = bytearray(data)
    dtype = header[name]["dtype"]
    size = {"F32": 4, "F16": 2, "BF16": 2}.get(dtype, 4)
    bad = {"F32": [b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x00\x00\x80\xff"], "F16": [b"\x00\x7e", b"\x00\x7c"],
           "BF16": [b"\xc0\x7f", b"\x80\x7f"]}.get(dtype, [b"\x00\x00\xc0\x7f"])
    for _ in range(rng.choice([1, 4])):
        if b - a >= size:
            pos = a + size * rng.randrange((b - a) // size)
            buf[pos : pos + size] = rng.choice(bad)
    if rng.random() < 0.2:
        buf = buf[: rng.randrange(len(buf))]  # truncated data
    _write_st(path, header, bytes(buf))


def m_special_file(d: Path, rng: random.Random) -> None:
    """A file the converter opens replaced by a FIFO, a directory, a device or a dangling link."""
    name = rng.choice([*(p.name for p in _st_files(d)), "config.json", "tokenizer.json", "tokenizer_config.json",
                       "model.safetensors.index.json"])
    path = d / name
    if path.exists():
        path.unlink()
    what = rng.choice(["fifo", "dir", "devzero", "dangling", "loop", "devnull"])
    if what == "fifo":
        os.mkfifo(path)
    elif what == "dir":
        path.mkdir()
    elif what == "devzero":
        path.symlink_to("/dev/zero")
    elif what == "devnull":
        path.symlink_to("/dev/null")
    elif what == "dangling":
        path.symlink_to(d / "nowhere")
    else:
        path.symlink_to(path)


def m_tokenizer_json(d: Path, rng: random.Random) -> None:
    path = d / "tokenizer.json"
    tok = _json(path)
    model = tok["model"]
    vocab = model["vocab"]
    what = rng.choice(["vocab-type", "vocab-id", "vocab-dup", "vocab-drop", "merges", "merge-type", "added",
                       "added-id", "model-type", "huge-token", "pre"])
    if what == "vocab-type":
        model["vocab"] = rng.choice([[1, 2], "x", None, list(vocab)])
    elif what == "vocab-id":
        vocab[rng.choice(list(vocab))] = rng.choice([-1, 10**9, "3", 1.5, None, 2**63])
    elif what == "vocab-dup":
        keys = list(vocab)
        vocab[rng.choice(keys)] = vocab[rng.choice(keys)]
    elif what == "vocab-drop":
        del vocab[rng.choice(list(vocab))]
    elif what == "merges":
        model["merges"] = rng.choice([[], model["merges"][::-1], model["merges"][:3], "x", None])
    elif what == "merge-type":
        merges = model["merges"]
        merges[rng.randrange(len(merges))] = rng.choice(["a", "a b c", ["a"], [1, 2], None, "zz qq", ["Ġ", "x", "y"]])
    elif what == "added":
        tok["added_tokens"] = rng.choice([None, "x", [1], [{"content": None, "id": 1}], []])
    elif what == "added-id":
        if tok["added_tokens"]:
            tok["added_tokens"][0]["id"] = rng.choice([-1, 10**9, "x", 0, 5])
    elif what == "model-type":
        model["type"] = rng.choice(["WordPiece", "Unigram", None, 1])
    elif what == "huge-token":
        vocab["a" * 100000] = len(vocab)
    else:
        tok["pre_tokenizer"] = rng.choice([None, {"type": "Whitespace"}, "x"])
    _write_json(path, tok)


def m_tokenizer_config(d: Path, rng: random.Random) -> None:
    path = d / "tokenizer_config.json"
    cfg = _json(path)
    what = rng.choice(["decoder-key", "decoder-value", "template-type", "template-list", "eos", "bos", "add-bos",
                       "template-file", "template-file-bad"])
    if what == "decoder-key":
        dec = cfg["added_tokens_decoder"]
        dec[rng.choice(["x", "-1", "1e3", "99999999", " 1", "0x10"])] = dec.pop(next(iter(dec)))
    elif what == "decoder-value":
        dec = cfg["added_tokens_decoder"]
        dec[next(iter(dec))] = rng.choice(["x", None, {"content": 5}, {}, {"content": ""}])
    elif what == "template-type":
        cfg["chat_template"] = rng.choice([None, 5, {"x": 1}, "{{", ""])
    elif what == "template-list":
        cfg["chat_template"] = rng.choice([[{"name": None, "template": "x"}], [{"name": "default"}], ["x"],
                                           [{"name": "tool_use", "template": 5}]])
    elif what == "eos":
        cfg["eos_token"] = rng.choice(["<|nope|>", None, 5, {"content": "<|im_end|>"}, {"content": 5}, ""])
    elif what == "bos":
        cfg["bos_token"] = rng.choice(["<|nope|>", 5, {"x": 1}])
    elif what == "add-bos":
        cfg["add_bos_token"] = rng.choice(["yes", 1, None])
    elif what == "template-file":
        (d / "chat_template.jinja").write_text(rng.choice(["{{", "", "{% for m in messages %}{{ m.content }}"
                                                                       "{% endfor %}", "x" * 100]))
    else:
        (d / "chat_template.jinja").write_bytes(b"\xff\xfe{{ messages }}\x80")
    _write_json(path, cfg)


def m_slow_tokenizer(d: Path, rng: random.Random) -> None:
    """tokenizer.json replaced by vocab.json + merges.txt (the slow tokenizer's files), then mutated."""
    tok = _json(d / "tokenizer.json")
    (d / "tokenizer.json").unlink()
    vocab = dict(tok["model"]["vocab"])
    merges = [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]]
    what = rng.choice(["clean", "vocab-id", "merges-garbage", "merges-header", "merges-utf8", "vocab-array"])
    if what == "vocab-id":
        vocab[rng.choice(list(vocab))] = rng.choice([-1, "x", 10**9, None])
    elif what == "vocab-array":
        vocab = list(vocab)  # type: ignore[assignment]
    _write_json(d / "vocab.json", vocab)
    text = "#version: 0.2\n" + "\n".join(merges) + "\n"
    if what == "merges-garbage":
        lines = text.split("\n")
        lines[rng.randrange(1, len(lines))] = rng.choice(["a", "a b c", "   ", "\t"])
        text = "\n".join(lines)
    elif what == "merges-header":
        text = text.replace("#version: 0.2\n", rng.choice(["", "#version: 9\n", "# x\n"]))
    (d / "merges.txt").write_bytes(text.encode() if what != "merges-utf8" else b"\xff" + text.encode())


def m_index(d: Path, rng: random.Random) -> None:
    path = d / "model.safetensors.index.json"
    if not path.exists():
        m_st_header(d, rng)
        return
    idx = _json(path)
    wm = idx.get("weight_map", {})
    what = rng.choice(["missing-file", "traversal", "type", "drop", "absolute", "extra", "map-type"])
    name = rng.choice(list(wm)) if wm else "x"
    if what == "missing-file":
        wm[name] = "model-99999-of-00011.safetensors"
    elif what == "traversal":
        wm[name] = "../../../../etc/passwd"
    elif what == "type":
        wm[name] = rng.choice([5, None, ["a"]])
    elif what == "drop":
        wm.pop(name, None)
    elif what == "absolute":
        wm[name] = "/dev/zero"
    elif what == "extra":
        wm["model.layers.99.mlp.up_proj.weight"] = next(iter(wm.values()))
    else:
        idx["weight_map"] = rng.choice([None, [1], "x"])
    _write_json(path, idx)


FAMILIES = {
    "config-value": m_config_value,
    "config-struct": m_config_struct,
    "st-header": m_st_header,
    "st-data": m_st_data,
    "special-file": m_special_file,
    "tokenizer-json": m_tokenizer_json,
    "tokenizer-config": m_tokenizer_config,
    "slow-tokenizer": m_slow_tokenizer,
    "index": m_index,
}


def mutate(seed: Path, case: Path, family: str, rng: random.Random) -> None:
    shutil.copytree(seed, case, symlinks=True)
    if family != "special-file" and rng.random() < 0.15:  # never read a FIFO here: it would block
        extra = rng.choice(["config-value", "st-header", "tokenizer-config"])
        FAMILIES[extra](case, rng)
    FAMILIES[family](case, rng)
