"""Re-quantize an unquantized (F32 / F16 / BF16) GGUF into another output type.

This is llama-quantize for qwenlite's types: the metadata is copied, ``general.file_type`` is
replaced, and every tensor goes through the same type choice and chunked write path as a conversion
(``qwenlite.converters.pipeline``). Already-quantized inputs are refused: quantizing dequantized values again
compounds the error, so the right input is always the float file.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from qwenlite.converters.mapped import MappedFile
from qwenlite.converters.mixes import FILE_TYPES, file_type
from qwenlite.converters.pipeline import SourceTensor, write_model
from qwenlite.errors import QwenliteError
from qwenlite.gguf import names as gn
from qwenlite.gguf.constants import GGMLType
from qwenlite.gguf.reader import GGUFFile, TensorInfo
from qwenlite.gguf.writer import GGUFWriter, check_output
from qwenlite.model.config import ModelConfig

_FLOAT_VIEWS = {GGMLType.F32: ("<f4", "F32"), GGMLType.F16: ("<f2", "F16"), GGMLType.BF16: ("<u2", "BF16")}
_SKIP_KEYS = {gn.FILE_TYPE, gn.ALIGNMENT}




def _copy_metadata(src: GGUFFile, w: GGUFWriter, new_file_type: int) -> None:
    """Copy every key with its original GGUF type; ``general.file_type`` becomes the new type."""
    types = src.metadata_types
    for key, value in src.metadata.items():
        if key == gn.FILE_TYPE:
            w.add_uint32(key, new_file_type)
        elif key not in _SKIP_KEYS:
            vtype, elem = types[key]
            w.add(key, value, vtype, elem)
    if gn.FILE_TYPE not in src.metadata:
        w.add_uint32(gn.FILE_TYPE, new_file_type)


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
    in_path: str | os.PathLike[str], out_path: str | os.PathLike[str], ftype: str, progress: bool = True, *,
    parents: bool = False, allow_nonfinite: bool = False,
) -> Path:
    """Write ``in_path`` (an f32/f16/bf16 GGUF) re-quantized to ``ftype`` at ``out_path`` (options as
    ``hf_to_gguf.convert``'s)."""
    src_path, out = Path(in_path), Path(out_path)
    ft = file_type(ftype)
    if out.exists() and src_path.exists() and os.path.samefile(src_path, out):
        raise QwenliteError(f"refusing to overwrite the input file {out}")
    check_output(out, parents)
    with GGUFFile(src_path) as src:
        cfg = ModelConfig.from_gguf(src)  # every hyperparameter checked, as a load would
        n_layer, n_expert = cfg.n_layer, cfg.n_expert
        data_map = MappedFile(src_path)  # our own mapping, so consumed pages can be released
        try:
            tensors = [_source(src_path, t, data_map) for t in src]
            return write_model(
                out, lambda w: _copy_metadata(src, w, int(ft.file_type)), tensors, ft, n_layer, n_expert, progress,
                parents=parents, allow_nonfinite=allow_nonfinite,
            )
        finally:
            data_map.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m qwenlite.converters.requantize IN.gguf OUT.gguf --type q4_k_m``"""
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
