"""Re-quantize an unquantized (F32 / F16 / BF16) GGUF into another output type.

This is llama-quantize for qwenlite's types: the metadata is copied, ``general.file_type`` is
replaced, and every tensor goes through the same type choice and chunked write path as a conversion
(``converters.pipeline``). Already-quantized inputs are refused: quantizing dequantized values again
compounds the error, so the right input is always the float file.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
from pathlib import Path

import numpy as np

from converters.mapped import MappedFile
from converters.mixes import FILE_TYPES, file_type
from converters.pipeline import SourceTensor, write_model
from qwenlite.errors import QwenliteError
from qwenlite.gguf.constants import GGMLType, GGUFValueType
from qwenlite.gguf.reader import GGUFFile, TensorInfo
from qwenlite.gguf.writer import GGUFWriter

_FLOAT_VIEWS = {GGMLType.F32: ("<f4", "F32"), GGMLType.F16: ("<f2", "F16"), GGMLType.BF16: ("<u2", "BF16")}
_SKIP_KEYS = {"general.file_type", "general.alignment"}


_SCALAR_SIZES = {
    GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.BOOL: 1,
    GGUFValueType.UINT16: 2, GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4,
    GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8,
}  # fmt: skip


def _metadata_types(path: Path) -> dict[str, tuple[GGUFValueType, GGUFValueType | None]]:
    """The stored GGUF type of every key (and array element type).

    qwenlite's reader returns plain Python values, so an int could have been u32, i32 or u64; a
    faithful copy needs the stored type. This walks the key/value section once more, skipping the
    values. It runs after ``GGUFFile`` has validated the same header, so every length is in bounds.
    """
    mapped = MappedFile(path)
    try:
        buf = memoryview(mapped.view("u1", mapped.size, 0))
        n_kv = struct.unpack_from("<Q", buf, 16)[0]
        pos = 24
        out: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {}
        for _ in range(n_kv):
            (klen,) = struct.unpack_from("<Q", buf, pos)
            key = bytes(buf[pos + 8 : pos + 8 + klen]).decode("utf-8")
            vtype = GGUFValueType(struct.unpack_from("<I", buf, pos + 8 + klen)[0])
            pos += 12 + klen
            elem = None
            if vtype == GGUFValueType.ARRAY:
                etype, count = struct.unpack_from("<IQ", buf, pos)
                elem = GGUFValueType(etype)
                pos += 12
                if elem == GGUFValueType.ARRAY:
                    raise QwenliteError(f"metadata {key!r}: nested arrays cannot be copied")
                if elem == GGUFValueType.STRING:
                    for _ in range(count):
                        pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
                else:
                    pos += count * _SCALAR_SIZES[elem]
            elif vtype == GGUFValueType.STRING:
                pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
            else:
                pos += _SCALAR_SIZES[vtype]
            out[key] = (vtype, elem)
        del buf
        return out
    finally:
        mapped.close()


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


def _source(src_path: Path, t: TensorInfo, data_map: MappedFile) -> SourceTensor:
    view = _FLOAT_VIEWS.get(t.qtype)
    if view is None:
        raise QwenliteError(
            f"{src_path.name}: tensor {t.name} is already quantized ({t.qtype.name}); "
            "re-quantize from the f32/f16/bf16 file instead"
        )
    data = data_map.view(view[0], t.nbytes // np.dtype(view[0]).itemsize, t.offset).reshape(t.shape)
    return SourceTensor(t.name, tuple(t.shape), [(data, view[1])], keep=t.qtype, release=data_map.release)


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
        n_layer = int(src.require(f"{arch}.block_count", int))
        n_expert = int(src.get(f"{arch}.expert_count", 0) or 0)
        data_map = MappedFile(src_path)  # our own mapping, so consumed pages can be released
        try:
            tensors = [_source(src_path, t, data_map) for t in src]
            return write_model(
                out, lambda w: _copy_metadata(src, w, int(ft.file_type)), tensors, ft, n_layer, n_expert, progress
            )
        finally:
            data_map.close()


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
