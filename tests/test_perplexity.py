"""Perplexity and KL divergence (``qwenlite.quality.perplexity``, ``qwenlite perplexity``).

The text is CPython's own documentation, ``pydoc_data.topics`` (it ships with every Python), so no
dataset is downloaded. Oracles:

* the formula: the same chunks through ``Model.logits`` and torch's ``log_softmax`` give the same PPL
  and uncertainty (float64 arithmetic of the second half of each chunk, llama-perplexity's rules);
* the model: transformers on the checkpoint dequantized from the same GGUF gives a PPL within 0.5%;
* the base file: parsed here with ``struct`` from llama.cpp's format description, its log-probabilities
  equal torch's within one 16-bit step; a base file written here from transformers' logits gives the
  KL divergence torch computes from the two models' full distributions;
* llama.cpp itself (peer tier, ``make peer-tools``): ``llama-perplexity`` on the same file, text and
  context gives the same PPL within 0.5% and the same KLD within 2%, and each reads the other's file.
"""

from __future__ import annotations

import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peer import PEER_DIR

from qwenlite.errors import QwenliteError

N_CTX = 128
N_CHUNKS = 6
LLAMA_PERPLEXITY = PEER_DIR / "server-build" / "bin" / "llama-perplexity"


def corpus() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@pytest.fixture(scope="module")
def text() -> str:
    return corpus()


def _reference_ppl(logit_rows: list[torch.Tensor], chunk_list: list[list[int]]) -> tuple[float, float]:
    """PPL and its uncertainty from per-chunk logits ``[n_ctx, n_vocab]`` by the documented rules."""
    first = N_CTX // 2
    v = []
    for logits, c in zip(logit_rows, chunk_list):
        lp = torch.log_softmax(logits.double(), dim=-1)
        v += [-float(lp[i, c[i + 1]]) for i in range(first, N_CTX - 1)]
    a = np.asarray(v)
    err = math.sqrt(((a * a).mean() - a.mean() ** 2) / (len(a) - 1))
    return math.exp(a.mean()), math.exp(a.mean()) * err


def test_chunking_and_formula(real_model, text: str) -> None:  # noqa: ANN001
    r = real_model.perplexity(text, N_CTX, N_CHUNKS)
    tokens = real_model.tokenize(text)
    chunk_list = [tokens[i * N_CTX : (i + 1) * N_CTX] for i in range(N_CHUNKS)]
    ref, ref_err = _reference_ppl([torch.from_numpy(real_model.logits(c)) for c in chunk_list], chunk_list)
    print(f"qwenlite PPL {r.ppl:.5f} +/- {r.ppl_err:.5f}; from Model.logits + torch {ref:.5f} +/- {ref_err:.5f}")
    assert r.n_chunks == N_CHUNKS and r.count == N_CHUNKS * (N_CTX - 1 - N_CTX // 2)
    assert r.ppl == pytest.approx(ref, rel=1e-6) and r.ppl_err == pytest.approx(ref_err, rel=1e-5)
    assert len(r.chunk_ppl) == N_CHUNKS and r.chunk_ppl[-1] == r.ppl
    assert 2 < r.ppl < 50  # a code model on English documentation: a real number, not noise (~150k vocab)


def test_matches_transformers(real_model, hf_model, text: str) -> None:  # noqa: ANN001
    r = real_model.perplexity(text, N_CTX, N_CHUNKS)
    tokens = real_model.tokenize(text)
    chunk_list = [tokens[i * N_CTX : (i + 1) * N_CTX] for i in range(N_CHUNKS)]
    with torch.no_grad():
        rows = [hf_model(torch.tensor([c])).logits[0] for c in chunk_list]
    ref, _ = _reference_ppl(rows, chunk_list)
    print(f"qwenlite PPL {r.ppl:.4f}, transformers {ref:.4f} ({(r.ppl / ref - 1) * 100:+.2f}%)")
    assert r.ppl == pytest.approx(ref, rel=0.005)


def _parse_base(path: Path) -> tuple[int, int, np.ndarray, np.ndarray]:
    """llama.cpp's base file read with struct: (n_ctx, n_vocab, tokens [n_chunk, n_ctx], log-probs
    [rows, n_vocab] as float64)."""
    raw = path.read_bytes()
    assert raw[:8] == b"_logits_"
    n_ctx, n_vocab, n_chunk = struct.unpack_from("<Iii", raw, 8)
    toks = np.frombuffer(raw, "<i4", n_chunk * n_ctx, 20).reshape(n_chunk, n_ctx)
    nv = 2 * ((n_vocab + 1) // 2) + 4
    rows = np.frombuffer(raw, "<u2", offset=20 + 4 * n_chunk * n_ctx).reshape(-1, nv)
    scale = rows[:, :4].copy().view("<f4")
    lp = scale[:, :1].astype(np.float64) * rows[:, 4 : 4 + n_vocab] + scale[:, 1:2]
    return n_ctx, n_vocab, toks, lp


def _write_base(path: Path, n_ctx: int, chunk_list: list[list[int]], logit_rows: list[np.ndarray]) -> None:
    """A base file written here, independently of qwenlite's writer, from float64 log-softmaxes."""
    n_vocab = logit_rows[0].shape[1]
    nv = 2 * ((n_vocab + 1) // 2) + 4
    out = [b"_logits_", struct.pack("<Iii", n_ctx, n_vocab, len(chunk_list)),
           np.asarray(chunk_list, "<i4").tobytes()]
    for logits in logit_rows:
        for row in logits[n_ctx // 2 : n_ctx - 1].astype(np.float64):
            lp = row - row.max() - np.log(np.exp(row - row.max()).sum())
            low = max(lp.min(), -16.0)
            scale = -low / 65535
            buf = np.zeros(nv, "<u2")
            buf[:4] = np.array([scale, low], "<f4").view("<u2")
            buf[4 : 4 + n_vocab] = np.where(lp > low, np.rint((lp - low) / scale), 0)
            out.append(buf.tobytes())
    path.write_bytes(b"".join(out))


def test_base_file_format(real_model, text: str, tmp_path: Path) -> None:  # noqa: ANN001
    base = tmp_path / "base.kld"
    r = real_model.perplexity(text, N_CTX, 3, kl_divergence_base=base)
    n_ctx, n_vocab, toks, lp = _parse_base(base)
    tokens = real_model.tokenize(text)
    assert (n_ctx, n_vocab) == (N_CTX, real_model.config.n_vocab)
    assert toks.tolist() == [tokens[i * N_CTX : (i + 1) * N_CTX] for i in range(3)]
    assert lp.shape[0] == 3 * (N_CTX - 1 - N_CTX // 2)
    ref = torch.log_softmax(torch.from_numpy(real_model.logits(toks[0].tolist())).double(), -1).numpy()
    ref = ref[N_CTX // 2 : N_CTX - 1]
    kept = ref > ref.max(axis=1, keepdims=True) - 16
    step = 16 / 65535
    assert np.abs(lp[: len(ref)] - ref)[kept].max() <= step  # within one 16-bit step
    same = real_model.perplexity(None, kl_divergence_base=base, kl_divergence=True)
    assert same.ppl == pytest.approx(r.ppl, rel=1e-6)
    k = same.kld
    print(f"a model against its own base file: KLD {k['kld']:.2e}, same top {k['same_top']:.3f}")
    assert k["kld"] < 1e-5 and k["same_top"] == 1.0 and k["ppl_base"] == pytest.approx(r.ppl, rel=1e-4)


def test_kl_divergence_against_transformers(real_model, hf_model, text: str, tmp_path: Path) -> None:  # noqa: ANN001
    """Base = transformers (written here), Q = qwenlite: KLD, top-1 agreement and PPL(base) equal what
    torch computes from the two full distributions."""
    tokens = real_model.tokenize(text)
    chunk_list = [tokens[i * N_CTX : (i + 1) * N_CTX] for i in range(4)]
    with torch.no_grad():
        hf_rows = [hf_model(torch.tensor([c])).logits[0].numpy() for c in chunk_list]
    base = tmp_path / "hf.kld"
    _write_base(base, N_CTX, chunk_list, hf_rows)
    k = real_model.perplexity(None, kl_divergence_base=base, kl_divergence=True).kld
    klds, top, nll_b = [], [], []
    for c, hf in zip(chunk_list, hf_rows):
        ours = real_model.logits(c)
        sl = slice(N_CTX // 2, N_CTX - 1)
        p = torch.log_softmax(torch.from_numpy(hf[sl]).double(), -1)
        qq = torch.log_softmax(torch.from_numpy(ours[sl]).double(), -1)
        klds += (p.exp() * (p - qq)).sum(-1).tolist()
        top += (p.argmax(-1) == qq.argmax(-1)).tolist()
        nll_b += [-float(p[i, c[N_CTX // 2 + 1 + i]]) for i in range(p.shape[0])]
    print(f"KLD qwenlite {k['kld']:.6f} torch {np.mean(klds):.6f}; same top {k['same_top']:.4f} {np.mean(top):.4f}")
    assert k["kld"] == pytest.approx(np.mean(klds), rel=0.02)
    assert k["same_top"] == pytest.approx(np.mean(top), abs=1.5 / len(top))
    assert k["ppl_base"] == pytest.approx(math.exp(np.mean(nll_b)), rel=1e-3)
    assert k["kld_median"] <= k["kld_p90"] <= k["kld_p99"] <= k["kld_max"]


def test_bad_input(real_model, text: str, tmp_path: Path) -> None:  # noqa: ANN001
    with pytest.raises(QwenliteError, match="needs at least 256 tokens; the text has"):
        real_model.perplexity("short text", N_CTX)
    with pytest.raises(QwenliteError, match="exceeds this model's context"):
        real_model.perplexity(text, 1 << 20)
    base = tmp_path / "base.kld"
    real_model.perplexity(text, N_CTX, 2, kl_divergence_base=base)
    cut = tmp_path / "cut.kld"
    cut.write_bytes(base.read_bytes()[:-10])
    with pytest.raises(QwenliteError, match="truncated or not a base file"):
        real_model.perplexity(None, kl_divergence_base=cut, kl_divergence=True)
    (tmp_path / "junk.kld").write_bytes(b"not a file at all" * 4)
    with pytest.raises(QwenliteError, match="not a KL-divergence base file"):
        real_model.perplexity(None, kl_divergence_base=tmp_path / "junk.kld", kl_divergence=True)
    with pytest.raises(QwenliteError, match="give no text"):
        real_model.perplexity(text, kl_divergence_base=base, kl_divergence=True)
    bad = tmp_path / "vocab.kld"
    raw = bytearray(base.read_bytes())
    raw[12:16] = struct.pack("<i", 1000)
    bad.write_bytes(bytes(raw))
    with pytest.raises(QwenliteError, match="truncated or not a base file"):
        real_model.perplexity(None, kl_divergence_base=bad, kl_divergence=True)
    assert not list(tmp_path.glob("*.incomplete-*"))


def test_cli(real_model_path: Path, tmp_path: Path, text: str) -> None:
    f = tmp_path / "text.txt"
    f.write_text(text[:40000], encoding="utf-8")
    base = tmp_path / "base.kld"
    cmd = [sys.executable, "-m", "qwenlite", "perplexity", "-m", str(real_model_path), "-c", str(N_CTX),
           "--chunks", "3", "-t", "2"]
    r = subprocess.run([*cmd, "-f", str(f), "--kl-divergence-base", str(base)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("PPL = ") and " +/- " in last
    assert r.stderr.strip().startswith("[1]") and "[3]" in r.stderr
    r2 = subprocess.run([*cmd, "--kl-divergence-base", str(base), "--kl-divergence"], capture_output=True,
                        text=True, timeout=600)
    assert r2.returncode == 0, r2.stderr
    assert "Mean    KLD:" in r2.stdout and "Same top p: 100.000" in r2.stdout
    assert r2.stdout.strip().splitlines()[-1] == last
    r3 = subprocess.run([*cmd, "--kl-divergence"], capture_output=True, text=True, timeout=600)
    assert r3.returncode == 1 and r3.stderr.count("\n") == 1 and "needs --kl-divergence-base" in r3.stderr


# ---- llama.cpp's llama-perplexity (make peer-tools) -------------------------------------------------

requires_tool = pytest.mark.skipif(not LLAMA_PERPLEXITY.exists(), reason="llama-perplexity not built "
                                   "(make peer-tools)")


def _llama(args: list[str]) -> str:
    r = subprocess.run([str(LLAMA_PERPLEXITY), "-t", "2", *args], capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout + r.stderr


def _field(out: str, prefix: str) -> float:
    line = next(x for x in out.splitlines() if prefix in x)
    return float(line.split(prefix, 1)[1].split()[0].strip(":"))


@pytest.mark.peer
@requires_tool
def test_perplexity_and_kld_match_llama_cpp(real_model_path: Path, hf_reference_dir: Path, text: str,
                                            tmp_path: Path) -> None:
    from qwenlite.converters.hf_to_gguf import convert

    f = tmp_path / "text.txt"
    f.write_text(text, encoding="utf-8")
    ours = subprocess.run([sys.executable, "-m", "qwenlite", "perplexity", "-m", str(real_model_path), "-f", str(f),
                           "--chunks", "8", "-t", "2"], capture_output=True, text=True, timeout=1800)
    ppl_ours = _field(ours.stdout, "PPL = ")
    ppl_llama = _field(_llama(["-m", str(real_model_path), "-f", str(f), "--chunks", "8"]), "PPL = ")
    print(f"PPL c=512, 8 chunks: qwenlite {ppl_ours:.4f}, llama-perplexity {ppl_llama:.4f}")
    assert ppl_ours == pytest.approx(ppl_llama, rel=0.005)
    q8 = convert(hf_reference_dir, tmp_path / "q8_0.gguf", "q8_0", progress=False)
    import qwenlite

    bases = {"llama.cpp": tmp_path / "llama.kld", "qwenlite": tmp_path / "ours.kld"}
    _llama(["-m", str(q8), "-f", str(f), "--chunks", "8", "--kl-divergence-base", str(bases["llama.cpp"])])
    with qwenlite.load(q8, n_threads=2, n_ctx=512) as m:
        m.perplexity(text, 512, 8, kl_divergence_base=bases["qwenlite"])
    with qwenlite.load(real_model_path, n_threads=2, n_ctx=512) as m:
        kld = {name: m.perplexity(None, kl_divergence_base=b, kl_divergence=True).kld["kld"]
               for name, b in bases.items()}
    llama = {name: _field(_llama(["-m", str(real_model_path), "--kl-divergence-base", str(b), "--kl-divergence"]),
                          "Mean    KLD:") for name, b in bases.items()}
    print(f"KLD Q4_K_M vs Q8_0: qwenlite {kld}, llama-perplexity {llama}")
    assert kld["qwenlite"] == pytest.approx(llama["llama.cpp"], rel=0.02)
    assert kld["llama.cpp"] == pytest.approx(llama["llama.cpp"], rel=0.02)  # we read llama.cpp's file
    assert llama["qwenlite"] == pytest.approx(llama["llama.cpp"], rel=0.02)  # it reads ours
