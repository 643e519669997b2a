"""The I/O floor of a classic merge: read K+1 checkpoints once, write one, merge nothing.

``python -m benchmarks.speed.floor --inputs BASE EXPERT... --out DIR`` reads every tensor of every input
(safetensors, as both tools read them, each copied into memory once), writes the first input's tensors to ``DIR/model.safetensors`` and
prints one JSON line: the seconds spent importing torch and safetensors, reading, writing and in all. No
merge can be faster than this on the same files and page cache; ``run.py`` measures it in a fresh process
like every merge, so the wall time includes interpreter start-up too.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

T0 = time.perf_counter()
import torch  # noqa: E402 - timed on purpose
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

IMPORT_S = time.perf_counter() - T0


def read_all(folder: Path, keep: bool) -> tuple[dict[str, torch.Tensor], int]:
    """Every tensor of ``folder``'s safetensors files; returns them only when ``keep``, and the bytes read."""
    kept: dict[str, torch.Tensor] = {}
    n_bytes = 0
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():  # noqa: SIM118 - safe_open handles are not iterable
                # a copy: get_tensor may hand back a view of the file's mapping, which reads nothing yet
                t = h.get_tensor(name).clone()
                n_bytes += t.numel() * t.element_size()
                if keep:
                    kept[name] = t
                del t
    return kept, n_bytes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.speed.floor", description=__doc__)
    ap.add_argument("--inputs", nargs="+", type=Path, required=True, help="checkpoint folders, base first")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t_read = time.perf_counter()
    first: dict[str, torch.Tensor] = {}
    read_bytes = 0
    for i, folder in enumerate(args.inputs):
        tensors, n = read_all(folder, keep=i == 0)
        read_bytes += n
        if i == 0:
            first = tensors
    read_s = time.perf_counter() - t_read
    t_write = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(first, str(args.out / "model.safetensors"))
    write_s = time.perf_counter() - t_write
    print(
        json.dumps(
            {
                "inputs": len(args.inputs),
                "read_bytes": read_bytes,
                "import_s": round(IMPORT_S, 3),
                "read_s": round(read_s, 3),
                "write_s": round(write_s, 3),
                "in_process_s": round(IMPORT_S + read_s + write_s, 3),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
