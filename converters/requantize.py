"""Re-quantize an unquantized (F32 / F16 / BF16) GGUF into another output type.

This is llama-quantize for qwenlite's types: the metadata is copied, ``general.file_type`` is
replaced, and every tensor goes through the same type choice and chunked write path as a conversion
(``converters.pipeline``). Already-quantized inputs are refused: quantizing dequantized values again
compounds the error, so the right input is always the float file.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gguf import GGUFReader

from converters.mixes import FILE_TYPES, file_type
from converters.pipeline import SourceTensor, write_model
from qwenlite.errors import QwenliteError
from qwenlite.gguf.constants import GGMLType, GGUFValueType
from qwenlite.gguf.reader import GGUFFile
from qwenlite.gguf.writer import GGUFWriter

_FLOAT_VIEWS = {GGMLType.F32: ("<f4", "F32"), GGMLType.F16: ("<f2", "F16"), GGMLType.BF16: ("<u2", "BF16")}
_SKIP_KEYS = {"general.file_type", "general.alignment"}


def _metadata_types(path: Path) -> dict[str, tuple[GGUFValueType, GGUFValueType | None]]:
    """The stored GGUF type of every key. qwenlite's reader returns plain Python values (an int may
    have been u32, i32 or u64), so the types come from gguf-py's reader, which keeps them."""
    out: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {}
    for key, f in GGUFReader(path).fields.items():
        if key.startswith("GGUF."):
            continue
        vtype = GGUFValueType(int(f.types[0]))
        elem = GGUFValueType(int(f.types[1])) if vtype == GGUFValueType.ARRAY and len(f.types) > 1 else None
        if vtype == GGUFValueType.ARRAY and (elem is None or elem == GGUFValueType.ARRAY):
            raise QwenliteError(f"metadata {key!r}: nested or untyped arrays cannot be copied")
        out[key] = (vtype, elem)
    return out


def _copy_metadata(src: GGUFFile, w: GGUFWriter, new_file_type: int) -> None:
    """Copy every key with its original GGUF type; ``general.file_type`` becomes the new type."""
    types = _metadata_types(src.path)
    for key, value in src.metadata.items():
        if key == "general.file_type":
            w.add_uint32(key, new_file_type)
        elif key not in _SKIP_KEYS:
            vtype, elem = types[key]
            w.add(key, value, vtype, elem)
    if "general.file_type" not in src.metadata:
        w.add_uint32("general.file_type", new_file_type)


def requantize(
    in_path: str | os.PathLike[str], out_path: str | os.PathLike[str], ftype: str, progress: bool = True
) -> Path:
    """Write ``in_path`` (an f32/f16/bf16 GGUF) re-quantized to ``ftype`` at ``out_path``."""
    src_path, out = Path(in_path), Path(out_path)
    ft = file_type(ftype)
    if out.exists() and src_path.exists() and os.path.samefile(src_path, out):
        raise QwenliteError(f"refusing to overwrite the input file {out}")
    with GGUFFile(src_path) as src:
        arch = src.architecture
        tensors: list[SourceTensor] = []
        for t in src:
            view = _FLOAT_VIEWS.get(t.qtype)
            if view is None:
                raise QwenliteError(
                    f"{src_path.name}: tensor {t.name} is already quantized ({t.qtype.name}); "
                    "re-quantize from the f32/f16/bf16 file instead"
                )
            data = t.data.view(view[0]).reshape(t.shape)
            tensors.append(SourceTensor(t.name, tuple(t.shape), [(data, view[1])], keep=t.qtype))
        n_layer = int(src.require(f"{arch}.block_count", int))
        n_expert = int(src.get(f"{arch}.expert_count", 0) or 0)
        return write_model(
            out, lambda w: _copy_metadata(src, w, int(ft.file_type)), tensors, ft, n_layer, n_expert, progress
        )


def main(argv: list[str] | None = None) -> int:
    """``python -m converters.requantize IN.gguf OUT.gguf --type q4_k_m``"""
    p = argparse.ArgumentParser(description="Re-quantize an f32/f16/bf16 GGUF.")
    p.add_argument("input")
    p.add_argument("out")
    p.add_argument("--type", required=True, choices=list(FILE_TYPES))
    p.add_argument("--quiet", action="store_true", help="no progress output")
    args = p.parse_args(argv)
    try:
        requantize(args.input, args.out, args.type, progress=not args.quiet)
    except QwenliteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
