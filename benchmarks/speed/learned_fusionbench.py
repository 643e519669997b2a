"""Time FusionBench's layer-wise AdaMerging steps on our BERT checkpoints (run with the fusionbench venv).

FusionBench 0.2.33 ships layer-wise AdaMerging only as program-driven algorithms bound to its own model
pools: ``CLIPLayerWiseAdaMergingAlgorithm`` (CLIP vision), ``FlanT5LayerWiseAdaMergingAlgorithm`` and
``GPT2LayerWiseAdaMergingAlgorithm`` (a ``GPT2ForSequenceClassificationPool`` with per-task score
heads). None accepts a BERT sequence classifier, so this script drives the same pieces directly:
``fusion_bench.models.wrappers.layer_wise_fusion.LayerWiseMergedModel`` (one weight per parameter tensor
and task), ``get_layer_wise_weights``, ``fusion_bench.method.adamerging.entropy_loss`` and the loop body
of ``LayerWiseAdaMergingAlgorithm.test_time_adaptation``: per task a forward on its batch + entropy loss
+ ``backward(retain_graph=True)``, then ``optimizer.step()`` and ``module.merge_weights()``.

Prints one JSON line like ``learned_ours``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .configs import random_texts
from .measure import proc_memory_mb


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--experts", nargs="+", required=True)
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--init", type=float, default=None)
    ap.add_argument("--lr", type=float, default=1e-2)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    import fusion_bench
    import torch
    from fusion_bench.method.adamerging.entropy_loss import entropy_loss
    from fusion_bench.models.wrappers.layer_wise_fusion import LayerWiseMergedModel, get_layer_wise_weights
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.base)
    k = len(args.experts)
    batches = []  # batches[step][task]
    per_task = [
        random_texts(args.batch * args.steps, args.seq_len - 2, args.vocab, seed=100 + t) for t in range(k)
    ]
    for s in range(args.steps):
        row = []
        for t in range(k):
            texts = per_task[t][s * args.batch : (s + 1) * args.batch]
            enc = tokenizer(
                texts, padding=True, truncation=True, max_length=args.seq_len, return_tensors="pt"
            )
            row.append(dict(enc))
        batches.append(row)

    pretrained = AutoModelForSequenceClassification.from_pretrained(args.base).float()
    finetuned = [AutoModelForSequenceClassification.from_pretrained(e).float() for e in args.experts]
    n_tensors = len(tuple(p for p in pretrained.parameters() if p.requires_grad))
    weights = get_layer_wise_weights(
        k, n_tensors, init_values=args.init if args.init is not None else 1.0 / k
    )
    module = LayerWiseMergedModel(
        layer_wise_weight=weights,
        pretrained_model=pretrained,
        finetuned_models=finetuned,
        clamp_weights=False,
        tie_weights=True,
        strict=False,
    )
    optimizer = torch.optim.Adam([module.merge_weight], lr=args.lr)
    module.train()
    module.merge_weights()
    setup_s = time.perf_counter() - t0

    times, cpu_times, losses = [], [], []
    for s in range(args.steps):
        ts, cs = time.perf_counter(), time.process_time()
        total = 0.0
        for t in range(k):
            logits = module(**batches[s][t]).logits
            loss = entropy_loss(logits)
            loss.backward(retain_graph=True)
            total += float(loss.detach())
        optimizer.step()
        optimizer.zero_grad()
        module.merge_weights()
        times.append(time.perf_counter() - ts)
        cpu_times.append(time.process_time() - cs)
        losses.append(total)
    mem = proc_memory_mb()
    json.dump(
        {
            "tool": "fusionbench",
            "version": getattr(fusion_bench, "__version__", "0.2.33"),
            "granularity": "per tensor (FusionBench 'layer-wise')",
            "coefficient_groups": n_tensors,
            "k": k,
            "batch_per_task": args.batch,
            "seq_len": int(batches[0][0]["input_ids"].shape[1]),
            "steps": len(times),
            "step_times_s": times,
            "step_cpu_s": cpu_times,
            "setup_s": setup_s,
            "total_s": time.perf_counter() - t0,
            "threads": torch.get_num_threads(),
            "losses": losses,
            **{f"opt_{k_}": v for k_, v in mem.items()},
        },
        sys.stdout,
    )
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
