"""Speed and memory benchmark: our engine vs mergekit (classic) and FusionBench (learned).

Run ``python -m benchmarks.speed [--quick]``; results go to ``benchmarks/results/speed.{md,json,png}``.
"""
