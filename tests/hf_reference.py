"""Rebuild a Hugging Face Qwen2 checkpoint from a GGUF file, for ``transformers`` to serve as the oracle.

Every tensor is dequantized with ``gguf.quants.dequantize`` (independent of qwenlite's kernels) and saved
in float32 under its HF name, with a config.json built from the metadata and a tokenizer
(vocab.json, merges.txt, tokenizer_config.json with the chat template) so the converter can be run on the
result too. The checkpoint is cached next to the model, keyed by the GGUF's size, because dequantizing
the 0.5B model takes a while.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    _, layer, rest = gguf_name.split(".", 2)
    return f"model.layers.{layer}.{_LAYER_NAMES[rest]}"


def _field(reader: GGUFReader, key: str):  # noqa: ANN202 - gguf-py returns mixed types
    return reader.fields[key].contents() if key in reader.fields else None


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable-unicode table, inverted."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def write_tokenizer(reader: GGUFReader, out: Path) -> None:
    """vocab.json + merges.txt + tokenizer_config.json + generation_config.json from the GGUF vocab."""
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = _field(reader, "tokenizer.ggml.merges")
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 1}
    added = {
        str(i): {"content": t, "special": ty == 3, "lstrip": False, "rstrip": False, "normalized": False,
                 "single_word": False}
        for i, (t, ty) in enumerate(zip(tokens, types))
        if ty in (3, 4)
    }
    eos = int(_field(reader, "tokenizer.ggml.eos_token_id"))
    pad = int(_field(reader, "tokenizer.ggml.padding_token_id") or eos)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "Qwen2Tokenizer",
                "added_tokens_decoder": added,
                "eos_token": tokens[eos],
                "pad_token": tokens[pad],
                "bos_token": None,
                "add_bos_token": False,
                "chat_template": _field(reader, "tokenizer.chat_template"),
                "model_max_length": 32768,
            },
            ensure_ascii=False,
        )
    )
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": pad, "eos_token_id": [eos, pad]}))


def gguf_to_hf(gguf_path: Path, out: Path) -> Path:
    """Write the HF checkpoint of ``gguf_path`` into ``out`` (once; reused when already complete)."""
    done = out / ".complete"
    if done.exists():
        return out
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    reader = GGUFReader(gguf_path)
    arch = _field(reader, "general.architecture")
    assert arch == "qwen2", f"hf_reference rebuilds qwen2 checkpoints, not {arch}"
    names = {t.name for t in reader.tensors}
    state = {}
    for t in reader.tensors:
        values = dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = tuple(int(d) for d in reversed(t.shape))
        state[hf_name(t.name)] = torch.from_numpy(np.ascontiguousarray(values.reshape(shape)))
    n_vocab = state["model.embed_tokens.weight"].shape[0]
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": n_vocab,
        "hidden_size": int(_field(reader, "qwen2.embedding_length")),
        "intermediate_size": int(_field(reader, "qwen2.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "qwen2.block_count")),
        "num_attention_heads": int(_field(reader, "qwen2.attention.head_count")),
        "num_key_value_heads": int(_field(reader, "qwen2.attention.head_count_kv")),
        "max_position_embeddings": int(_field(reader, "qwen2.context_length")),
        "rope_theta": float(_field(reader, "qwen2.rope.freq_base")),
        "rms_norm_eps": float(_field(reader, "qwen2.attention.layer_norm_rms_epsilon")),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
        "use_sliding_window": False,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=1))
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer(reader, out)
    done.touch()
    return out


def load_hf_model(hf_dir: Path):  # noqa: ANN201 - a transformers model
    """The float32 transformers model of ``hf_dir``, eager attention, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def hf_logits(model, ids: list[int]) -> np.ndarray:  # noqa: ANN001
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


# The HF class of each task head, its head module and whether that has a bias (transformers' Generic*
# classes), and the trunk's prefix (Qwen2ForQuestionAnswering keeps the old ``transformer.``).
TASK_CLASSES = {
    "sequence-classification": ("Qwen2ForSequenceClassification", "score", False, "model"),
    "token-classification": ("Qwen2ForTokenClassification", "score", True, "model"),
    "question-answering": ("Qwen2ForQuestionAnswering", "qa_outputs", True, "transformer"),
}


def task_checkpoint(causal_dir: Path, out: Path, task: str, labels: list[str], seed: int = 0) -> Path:
    """A ``Qwen2For<Task>`` checkpoint in ``out`` with the trunk of the causal-LM checkpoint
    ``causal_dir`` and a random head (N(0, 0.02) like transformers' init, scaled so logits span a few
    units), no LM head; written once and reused."""
    done = out / ".complete"
    if done.exists():
        return out
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    cls, head, has_bias, prefix = TASK_CLASSES[task]
    out.mkdir(parents=True, exist_ok=True)
    state = {}
    with safe_open(str(causal_dir / "model.safetensors"), "pt") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            if name.startswith("model."):
                state[prefix + name[len("model"):]] = f.get_tensor(name)
    d = state[f"{prefix}.norm.weight"].shape[0]
    g = torch.Generator().manual_seed(seed)
    state[f"{head}.weight"] = 0.02 * torch.randn(len(labels), d, generator=g)
    if has_bias:
        state[f"{head}.bias"] = 0.5 * torch.randn(len(labels), generator=g)
    config = json.loads((causal_dir / "config.json").read_text())
    config["architectures"] = [cls]
    config["id2label"] = {str(i): name for i, name in enumerate(labels)}
    config["label2id"] = {name: i for i, name in enumerate(labels)}
    config["pad_token_id"] = config["bos_token_id"]
    (out / "config.json").write_text(json.dumps(config, indent=1))
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in ("tokenizer_config.json", "vocab.json", "merges.txt", "generation_config.json"):
        (out / name).write_bytes((causal_dir / name).read_bytes())
    done.touch()
    return out
