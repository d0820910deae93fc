"""Read a Hugging Face byte-level BPE tokenizer (Qwen2 style) into the GGUF ``tokenizer.*`` keys.

Qwen2 ships ``tokenizer.json`` (the "fast" form) and/or ``vocab.json`` + ``merges.txt`` (the "slow"
form), with special-token names in ``tokenizer_config.json`` and ids in ``config.json`` /
``generation_config.json``. The result is what llama.cpp's converter writes for a gpt2-style vocab:

* ``tokens``: one entry per id up to the model's ``vocab_size`` (the embedding has more rows than the
  tokenizer has tokens: Qwen2.5 has 151,665 tokens and 151,936 rows); ids the tokenizer lacks become
  ``[PAD<id>]`` with type UNUSED, so id -> row stays the identity.
* ``token_types``: added tokens are CONTROL when flagged special or when they look special
  (``<|...|>``), otherwise USER_DEFINED (e.g. ``<tool_call>``); all others NORMAL.
* ``merges``: ``"left right"`` strings; a space inside a merge part (new tokenizer.json pair format)
  is written as U+0120, as llama.cpp does, so the string stays splittable on the single space.
* special ids: name in tokenizer_config.json looked up among the added tokens first, then the
  ``*_token_id`` fields of config.json, then generation_config.json (first entry of a list).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwenlite.converters.files import read_json, read_text
from qwenlite.errors import QwenliteError, shown
from qwenlite.gguf.constants import TokenType

SPECIAL_KINDS = ("bos", "eos", "unk", "sep", "pad")


@dataclass
class HFTokenizer:
    """Everything the GGUF tokenizer keys need, already padded to the model's vocab size."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)
    add_bos: bool = False
    add_eos: bool | None = None
    chat_template: str | None = None
    named_chat_templates: dict[str, str] = field(default_factory=dict)


def _load_json(path: Path) -> Any:
    return read_json(path)


def _optional_json(path: Path) -> dict[str, Any]:
    if not path.exists() and not path.is_symlink():
        return {}
    data = _load_json(path)
    if not isinstance(data, dict):
        raise QwenliteError(f"{path.name}: expected a JSON object")
    return data


def looks_special(token: str) -> bool:
    """llama.cpp treats ``<|...|>`` added tokens as control tokens even when not flagged special."""
    return token.startswith("<|") and token.endswith("|>")


def _encode_merge_part(part: str) -> str:
    return "".join(chr(ord(c) + 256) if c == " " else c for c in part)


def _merges_from_json(merges: Any) -> list[str]:
    if not isinstance(merges, list):
        raise QwenliteError("tokenizer.json: model.merges is not a list")
    out = []
    for m in merges:
        if isinstance(m, str):
            out.append(m)
        elif isinstance(m, list) and len(m) == 2 and all(isinstance(p, str) for p in m):
            out.append(" ".join(_encode_merge_part(p) for p in m))
        else:
            raise QwenliteError(f"tokenizer.json: unknown merge entry {m!r}")
    return out


def _merges_from_txt(path: Path) -> list[str]:
    lines = read_text(path).splitlines()
    out = []
    for i, line in enumerate(lines):
        line = line.strip()
        if not line or (i == 0 and line.startswith("#")):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise QwenliteError(f"{path.name}: line {i + 1} is not a merge pair: {shown(line)}")
        out.append(f"{parts[0]} {parts[1]}")
    return out


def _check_vocab(vocab: Any, source: str) -> dict[str, int]:
    if not isinstance(vocab, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0 for k, v in vocab.items()
    ):
        raise QwenliteError(f"{source}: vocab must map strings to non-negative ids")
    return vocab


def _read_fast(path: Path) -> tuple[dict[str, int], list[dict[str, Any]], list[str]]:
    data = _load_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise QwenliteError("tokenizer.json: not a BPE tokenizer (only byte-level BPE, as Qwen2 uses, is supported)")
    decoder = data.get("decoder") or {}
    if model.get("byte_fallback") or not isinstance(decoder, dict) or decoder.get("type") != "ByteLevel":
        raise QwenliteError("tokenizer.json: not a byte-level BPE tokenizer (decoder must be ByteLevel)")
    added = data.get("added_tokens") or []
    if not isinstance(added, list) or not all(isinstance(a, dict) for a in added):
        raise QwenliteError("tokenizer.json: added_tokens is not a list of objects")
    return _check_vocab(model.get("vocab"), "tokenizer.json"), added, _merges_from_json(model.get("merges", []))


def _read_slow(model_dir: Path, tok_config: dict[str, Any]) -> tuple[dict[str, int], list[dict[str, Any]], list[str]]:
    vocab = _check_vocab(_load_json(model_dir / "vocab.json"), "vocab.json")
    if not (model_dir / "merges.txt").exists():
        raise QwenliteError(f"{model_dir}: vocab.json without merges.txt")
    added: list[dict[str, Any]] = []
    decoder = tok_config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise QwenliteError("tokenizer_config.json: added_tokens_decoder is not an object")
    for key, entry in decoder.items():
        if not isinstance(entry, dict) or not (key.isascii() and key.isdigit()) or len(key) > 9:
            raise QwenliteError(f"tokenizer_config.json: added_tokens_decoder key {shown(key)} is not a token id")
        added.append({"id": int(key), **entry})
    extra = _optional_json(model_dir / "added_tokens.json")
    known = {a.get("content") for a in added}
    added.extend({"id": i, "content": t, "special": False} for t, i in extra.items() if t not in known)
    return vocab, added, _merges_from_txt(model_dir / "merges.txt")


def _special_name(entry: Any) -> str | None:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return entry["content"]
    return None


def _chat_templates(model_dir: Path, tok_config: dict[str, Any]) -> tuple[str | None, dict[str, str]]:
    value: Any = tok_config.get("chat_template")
    if value is None and (model_dir / "chat_template.jinja").exists():
        value = read_text(model_dir / "chat_template.jinja")
    elif value is None and (model_dir / "chat_template.json").exists():
        value = _optional_json(model_dir / "chat_template.json").get("chat_template")
    if value is None or isinstance(value, str):
        return value, {}
    if not isinstance(value, list):
        raise QwenliteError("tokenizer_config.json: chat_template must be a string or a list of templates")
    default, named = None, {}
    for choice in value:
        if not isinstance(choice, dict) or not isinstance(choice.get("template"), str):
            raise QwenliteError("tokenizer_config.json: bad chat_template entry")
        name = "".join(c if c.isascii() and c.isalnum() else "_" for c in str(choice.get("name", "")))
        if name == "default":
            default = choice["template"]
        elif name:
            named[name] = choice["template"]
    return default, named


def load_hf_tokenizer(model_dir: str | Path, vocab_size: int) -> HFTokenizer:
    """Read the tokenizer files of ``model_dir`` and pad the vocab to ``vocab_size`` entries."""
    model_dir = Path(model_dir)
    tok_config = _optional_json(model_dir / "tokenizer_config.json")
    if (model_dir / "tokenizer.json").exists():
        vocab, added, merges = _read_fast(model_dir / "tokenizer.json")
    elif (model_dir / "vocab.json").exists():
        vocab, added, merges = _read_slow(model_dir, tok_config)
    else:
        raise QwenliteError(f"{model_dir}: no tokenizer.json or vocab.json + merges.txt")
    if not merges:
        raise QwenliteError(f"{model_dir}: the tokenizer has no merges")

    by_id: dict[int, str] = {}
    for token, i in vocab.items():
        if i in by_id:
            raise QwenliteError(f"tokenizer: id {i} is used by both {shown(by_id[i])} and {shown(token)}")
        by_id[i] = token
    added_ids: dict[int, bool] = {}  # id -> special flag
    for a in added:
        i, content = a.get("id"), a.get("content")
        if not isinstance(i, int) or isinstance(i, bool) or i < 0 or not isinstance(content, str):
            raise QwenliteError(f"tokenizer: bad added token {shown(a)}")
        if by_id.get(i, content) != content:
            raise QwenliteError(f"tokenizer: id {i} is used by both {shown(by_id[i])} and {shown(content)}")
        by_id[i] = content
        added_ids[i] = bool(a.get("special", False))
    if not by_id:
        raise QwenliteError(f"{model_dir}: the tokenizer has no tokens")
    top = max(by_id)
    if top >= vocab_size:
        raise QwenliteError(
            f"tokenizer has ids up to {top} but the model's vocab_size is {vocab_size}: "
            "tokenizer and checkpoint do not belong together"
        )

    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added_ids:
            if added_ids[i] or looks_special(token):
                types.append(TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")  # pre-normalize user-defined spaces like llama.cpp
                types.append(TokenType.USER_DEFINED)
            tokens.append(token)
        else:
            tokens.append(token)
            types.append(TokenType.NORMAL)

    special_ids: dict[str, int] = {}
    added_by_content = {by_id[i]: i for i in sorted(added_ids, reverse=True)}  # first id wins
    for kind in SPECIAL_KINDS:
        name = _special_name(tok_config.get(f"{kind}_token"))
        if name is not None and name in added_by_content:
            special_ids[kind] = added_by_content[name]
    for cfg in (_optional_json(model_dir / "config.json"), _optional_json(model_dir / "generation_config.json")):
        for kind in SPECIAL_KINDS:
            value = cfg.get(f"{kind}_token_id")
            if isinstance(value, list) and value:
                value = value[0]
            if kind not in special_ids and isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                special_ids[kind] = value
    special_ids = {k: v for k, v in special_ids.items() if v < vocab_size}

    add_bos = tok_config.get("add_bos_token")
    add_eos = tok_config.get("add_eos_token")
    template, named = _chat_templates(model_dir, tok_config)
    return HFTokenizer(
        tokens=tokens,
        token_types=types,
        merges=merges,
        special_ids=special_ids,
        add_bos=add_bos if isinstance(add_bos, bool) else False,
        add_eos=add_eos if isinstance(add_eos, bool) else None,
        chat_template=template,
        named_chat_templates=named,
    )
