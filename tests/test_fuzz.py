"""A bounded sample of the fuzz campaign (``tests/fuzz/run.py``; ``make fuzz`` runs the long one).

Every mutant GGUF file and checkpoint must end in a clean one-line ``QwenliteError`` or a correct
run: no traceback, hang, crash, unbounded allocation or leftover file. Runs in a subprocess, because
the campaign forks and Numba's threading layer must be chosen before Numba starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
GGUF_CASES = int(os.environ.get("QWENLITE_FUZZ_GGUF", "2000"))
HF_CASES = int(os.environ.get("QWENLITE_FUZZ_HF", "600"))
CLI_CASES = int(os.environ.get("QWENLITE_FUZZ_CLI", "200"))


def test_fuzz_sample(tmp_path: Path) -> None:
    summary = tmp_path / "summary.json"
    cmd = [sys.executable, str(HERE / "fuzz" / "run.py"), "--gguf", str(GGUF_CASES), "--hf", str(HF_CASES),
           "--cli", str(CLI_CASES), "--seed", "19", "--seeds", str(tmp_path / "seeds"), "--keep", str(tmp_path / "bad"),
           "--json", str(summary)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    print(r.stdout[-6000:])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    counts = json.loads(summary.read_text())["counts"]
    total = sum(sum(c.values()) for c in counts.values())
    assert total >= GGUF_CASES + HF_CASES + CLI_CASES - 50  # a few HF mutations may not apply to a seed ("skipped")
    ran = sum(c.get("ok", 0) for c in counts.values())
    assert ran > total // 20  # a campaign where nothing loads would test only the first check
