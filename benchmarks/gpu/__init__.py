"""GPU benchmark of learned merges (issue 9): ``python -m benchmarks.gpu`` (``--quick`` runs a tiny CPU version).

Qwen2.5-0.5B-shaped and 7B-class-shaped causal LMs are built from config with random weights (nothing from
the Hub), 7 experts = base + small noise, saved as safetensors on local disk; each case runs a layer-level
DivMerge end to end (teachers + epochs + write) in its own process and records wall times and peak device
and host memory. Results are written after every case to ``benchmarks/results/gpu.md`` (+ ``.json``).
Only torch, transformers, safetensors, tokenizers, pyyaml and pydantic are imported.
"""
