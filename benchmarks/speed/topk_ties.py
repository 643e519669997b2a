"""How often mergekit's top-k cut falls inside a run of equal magnitudes, and what that costs.

TIES and its relatives keep the ``int(density * numel)`` largest ``|tau|`` of each tensor, as mergekit's
``argsort(|tau|, descending=True)[:k]``. When exactly ``k`` entries reach the k-th magnitude the kept set is
unique and our radix threshold finds it in a few streaming passes; when equal magnitudes straddle the cut,
which of them are kept depends on the order torch's unstable CPU sort leaves ties in, so matching mergekit
bit for bit takes its sort. This counts, over the speed benchmark's family (base + N(0, 0.002^2) experts,
fp32), the tensors and entries on each path and times both selections on one thread:
``python -m benchmarks.speed.topk_ties [--size 25M] [--k 4] [--density 0.5]``.
"""

from __future__ import annotations

import argparse
import time

import torch
from safetensors import safe_open

from divmerge_core.methods.sparsify import RADIX_MIN_NUMEL, _kth_largest_magnitude

from .checkpoints import make_family


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="25M")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--density", type=float, default=0.5)
    a = ap.parse_args()
    torch.set_num_threads(1)
    base_dir, experts = make_family(a.size, a.k)
    counts = {"unique": [0, 0], "straddled": [0, 0], "small": [0, 0]}
    radix_s = sort_s = 0.0
    with safe_open(str(base_dir / "model.safetensors"), framework="pt") as hb:
        for e in experts:
            with safe_open(str(e / "model.safetensors"), framework="pt") as he:
                for name in hb.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    tau = he.get_tensor(name) - hb.get_tensor(name)
                    k = max(1, int(a.density * tau.numel()))
                    if tau.numel() < RADIX_MIN_NUMEL:
                        counts["small"][0] += 1
                        counts["small"][1] += tau.numel()
                        continue
                    t0 = time.perf_counter()
                    _, _, reaching = _kth_largest_magnitude(tau, k)
                    radix_s += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    torch.argsort(tau.abs().reshape(-1), descending=True)
                    sort_s += time.perf_counter() - t0
                    path = "unique" if reaching == k else "straddled"
                    counts[path][0] += 1
                    counts[path][1] += tau.numel()
    total = sum(n for _, n in counts.values())
    for path, (tensors, numel) in counts.items():
        print(f"{path:>9}: {tensors} tensors, {numel / total:.1%} of the entries")
    print(f"radix threshold {radix_s:.2f} s, argsort {sort_s:.2f} s (tensors >= {RADIX_MIN_NUMEL} entries)")


if __name__ == "__main__":
    main()
