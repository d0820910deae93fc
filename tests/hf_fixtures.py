"""Tiny random Hugging Face Qwen2 / Qwen2-MoE checkpoints for converter and model tests.

``make_qwen2_checkpoint(tmpdir, **config_overrides)`` and ``make_qwen2moe_checkpoint(...)`` build a
model with ``transformers`` (random weights, fixed seed), save it with ``save_pretrained`` and add a
Qwen2-style tokenizer, so the directory looks like a real HF download and can be converted, loaded
by transformers as the oracle, or both. Defaults are chosen to exercise the converter's edge cases:
widths that are multiples of 32 but not 256 (type fallbacks), GQA, and for the MoE a dense layer, a
shared expert and renormalized top-k.

The tokenizer is a small byte-level BPE trained here with ``tokenizers`` using Qwen2's pre-tokenizer
(regex split + byte-level, NFC), with Qwen's special tokens; or, with
``tokenizer_from_gguf=<path>``, the real Qwen2.5 vocabulary taken from a GGUF file (then
``vocab_size`` must be at least that vocabulary, e.g. 151936).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_TOKENS = ["<tool_call>", "</tool_call>"]
SMALL_BPE_SIZE = 400  # trained tokens (256 bytes + merges); specials come after


PROSE = (
    "A converter reads every tensor of a checkpoint, names it the way the runtime expects, and writes it "
    "in the chosen format. Weights that are shared, tied or stacked need care; so do widths that are not "
    "multiples of the block size. Simple is better than complex, and errors should never pass silently.\n"
)


def _corpus() -> list[str]:
    extra = [
        "def main():\n    print('hello, world')\n    return 0\n",
        "The quick brown fox jumps over the lazy dog. 1234567890",
        "Zürich, naïve café, 日本語のテキスト, emoji 🦙 and tabs\tand  spaces",
    ]
    return [PROSE] * 3 + extra * 5


def small_tokenizer_json() -> dict[str, Any]:
    """A deterministic byte-level BPE with Qwen2's pre-tokenizer, as a tokenizer.json dict."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=SMALL_BPE_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_corpus(), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in USER_TOKENS])
    return json.loads(tok.to_str())


def tokenizer_json_from_gguf(gguf_path: str | Path) -> dict[str, Any]:
    """The real vocabulary of a llama.cpp Qwen2 GGUF as a tokenizer.json dict (NORMAL tokens -> BPE
    vocab, CONTROL / USER_DEFINED -> added tokens; [PAD] entries dropped)."""
    from gguf import GGUFReader

    r = GGUFReader(gguf_path)
    tf, yf, mf = (r.fields[k] for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"))
    tokens = [bytes(tf.parts[i]).decode("utf-8") for i in tf.data]
    types = [int(yf.parts[i][0]) for i in yf.data]
    merges = [bytes(mf.parts[i]).decode("utf-8").split(" ") for i in mf.data]
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 1}
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": ty == 3}
        for i, (t, ty) in enumerate(zip(tokens, types))
        if ty in (3, 4)
    ]  # fmt: skip
    base = small_tokenizer_json()
    base["model"]["vocab"] = vocab
    base["model"]["merges"] = merges
    base["added_tokens"] = added
    return base


def _write_tokenizer(out: Path, tok_json: dict[str, Any], eos_id: int, pad_id: int) -> int:
    """Write tokenizer.json, tokenizer_config.json, generation_config.json; returns the token count."""
    (out / "tokenizer.json").write_text(json.dumps(tok_json, ensure_ascii=False), encoding="utf-8")
    decoder = {
        str(a["id"]): {"content": a["content"], "lstrip": False, "normalized": False, "rstrip": False,
                       "single_word": False, "special": a["special"]}
        for a in tok_json["added_tokens"]
    }  # fmt: skip
    tok_config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 32768,
        "tokenizer_class": "Qwen2Tokenizer",
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, ensure_ascii=False, indent=1), encoding="utf-8")
    gen = {"bos_token_id": pad_id, "eos_token_id": [eos_id, pad_id], "pad_token_id": pad_id}
    (out / "generation_config.json").write_text(json.dumps(gen), encoding="utf-8")
    return len(tok_json["model"]["vocab"]) + len(tok_json["added_tokens"])


def _finish(
    model: torch.nn.Module, out: Path, tok_json: dict[str, Any], dtype: str, max_shard_size: str | None
) -> Path:
    added = {a["content"]: a["id"] for a in tok_json["added_tokens"]}
    eos_id, pad_id = added["<|im_end|>"], added["<|endoftext|>"]
    model.config.bos_token_id = pad_id
    model.config.eos_token_id = eos_id
    model.config.pad_token_id = pad_id  # what a sequence classifier's batches are padded with
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out, **kwargs)
    _write_tokenizer(out, tok_json, eos_id, pad_id)
    return out


def _tokenizer(tokenizer_from_gguf: str | Path | None) -> dict[str, Any]:
    return small_tokenizer_json() if tokenizer_from_gguf is None else tokenizer_json_from_gguf(tokenizer_from_gguf)


def _n_tokens(tok_json: dict[str, Any]) -> int:
    return len(tok_json["model"]["vocab"]) + len(tok_json["added_tokens"])


def make_qwen2_checkpoint(
    tmpdir: str | Path,
    *,
    seed: int = 0,
    dtype: str = "float32",
    max_shard_size: str | None = None,
    tokenizer_from_gguf: str | Path | None = None,
    name: str = "tiny-qwen2",
    head: str = "ForCausalLM",
    **config_overrides: Any,
) -> Path:
    """A random Qwen2 model (``Qwen2ForCausalLM`` unless ``head`` says otherwise) saved under
    ``tmpdir/name``; returns that directory.

    Defaults: hidden 96 (a multiple of 32, not of 256), 4 heads / 2 kv heads (head_dim 24), ffn 160,
    3 layers, untied embeddings, vocab padded 8 rows beyond the tokenizer. ``dtype`` is the saved
    dtype (float32, float16 or bfloat16); ``max_shard_size`` (e.g. "100KB") makes a sharded checkpoint.
    ``head`` picks the class: ``Qwen2`` + "ForCausalLM", "ForSequenceClassification",
    "ForTokenClassification" or "ForQuestionAnswering" (give ``id2label`` for the labels).
    """
    import transformers
    from transformers import Qwen2Config

    tok_json = _tokenizer(tokenizer_from_gguf)
    cfg: dict[str, Any] = dict(
        vocab_size=_n_tokens(tok_json) + 8,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    cfg.update(config_overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, "Qwen2" + head)(Qwen2Config(**cfg)).eval()
    _randomize_norms_and_biases(model, seed)
    out = Path(tmpdir) / name
    return _finish(model, out, tok_json, dtype, max_shard_size)


def make_qwen2moe_checkpoint(
    tmpdir: str | Path,
    *,
    seed: int = 0,
    dtype: str = "float32",
    max_shard_size: str | None = None,
    tokenizer_from_gguf: str | Path | None = None,
    name: str = "tiny-qwen2moe",
    head: str = "ForCausalLM",
    **config_overrides: Any,
) -> Path:
    """A random Qwen2-MoE model (``Qwen2MoeForCausalLM`` unless ``head`` says otherwise) saved under
    ``tmpdir/name``; returns that directory.

    Defaults: hidden 64, 3 layers with layer 1 dense (``mlp_only_layers=[1]``), 6 experts top-2 with
    ``norm_topk_prob=True``, expert ffn 96 (not a multiple of 256), shared expert ffn 128, dense ffn 160.
    ``head`` as for ``make_qwen2_checkpoint``.
    """
    import transformers
    from transformers import Qwen2MoeConfig

    tok_json = _tokenizer(tokenizer_from_gguf)
    cfg: dict[str, Any] = dict(
        vocab_size=_n_tokens(tok_json) + 8,
        hidden_size=64,
        intermediate_size=160,
        moe_intermediate_size=96,
        shared_expert_intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=6,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
        max_position_embeddings=256,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    cfg.update(config_overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, "Qwen2Moe" + head)(Qwen2MoeConfig(**cfg)).eval()
    _randomize_norms_and_biases(model, seed)
    out = Path(tmpdir) / name
    return _finish(model, out, tok_json, dtype, max_shard_size)


def _randomize_norms_and_biases(model: torch.nn.Module, seed: int) -> None:
    """transformers initializes norms to 1, biases to 0 and the MoE weights to N(0, 0.02) or even
    empty; give every parameter distinct random values so a swapped or dropped tensor is visible."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
