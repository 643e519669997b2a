"""How much device and host memory a learned merge needs in each placement, and which placement to use.

:func:`estimate_learned_memory` reads only the plan (tensor shapes from the safetensors headers, config.json,
the parameters): nothing is loaded. The figures are deliberately rough upper bounds (bytes):

* weights: theta_0, plus the merged weights W (resident: the merged tensors the forward keeps for backward;
  offload/stream: the leaf W), plus dL/dW (resident: all of it; offload/stream: freed tensor by tensor);
* task vectors: K x the merged tensors (resident: device; offload: host; stream: none), plus for
  offload/stream a few fp32 copies of the largest tensor in transit (stream with ``tau_consensus: sign``:
  K more, the signs are elected over one tensor's K task vectors). A LoRA expert over the base
  (:mod:`.lowrank`) counts its factors (fp32, on the device in every placement) and, as dense task
  vectors, only the tensors its adapter replaces whole; the merged weights and dL/dW are counted only for
  the tensors some expert changes (``touched``: all of them as soon as one expert is full-weight);
* activations of one forward/backward (``micro_batch_size`` inputs, or the step's ``batch_size_per_task x K``)
  of ``max_length (+ max_new_tokens)`` tokens: the layers' saved tensors (one layer's worth plus each layer's
  input with ``gradient_checkpointing``), the logits and, for the scored positions, their fp32 copies;
* teacher outputs: per input, the scored positions x (vocabulary or ``top_k``) in the storage dtype. With
  ``teacher: cached`` they live in the teacher cache on disk (read row by row, page cache only): they are
  reported as ``disk``, not host memory. ``teacher: online`` stores none but holds one expert's weights
  (theta_0 + tau_t) on the device while it recomputes a teacher.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import InsufficientMemoryError
from ..host_memory import host_memory
from ..io.loading import DTYPES
from ..io.lora import open_model
from ..plan import MergePlan
from .lowrank import dense_numel, expert_layouts, factor_bytes, touched
from .objectives import objective_of
from .placement import PLACEMENTS
from .reference import CAUSAL, model_kind
from .teachers import teacher_batch_size

#: the Python/torch runtime's own host footprint (libraries, allocator), counted once
RUNTIME_BYTES = 1 << 30
#: share of the free memory a plan may use
HEADROOM = 0.9
GiB = float(1 << 30)


def estimate_learned_memory(plan: MergePlan, device: torch.device | str) -> dict[str, Any]:
    """A plain, JSON-able dict: the parts, each placement's device/host needs, what is free, the choice."""
    device = torch.device(device)
    params = plan.config.parameters
    sizes = _tensor_sizes(plan)
    parts = _parts(plan, sizes, params.micro_batch_size, params.gradient_checkpointing)
    free = free_memory(device)
    placements = {p: _needs(p, parts, device) for p in PLACEMENTS}
    for need in placements.values():
        need["fits"] = _fits(need, free)
    fitting = [p for p in PLACEMENTS if placements[p]["fits"]]
    return {
        "unit": "bytes",
        "device": str(device),
        "dtype": plan.config.dtype,
        "n_tasks": len(plan.models),
        "merged_params": sizes["merged"],
        "parts": parts,
        "placements": placements,
        "free": free,
        "chosen": fitting[0] if fitting else None,
        "settings": {
            "placement": params.placement,
            "micro_batch_size": params.micro_batch_size,
            "gradient_checkpointing": params.gradient_checkpointing,
        },
    }


def placement_needs(plan: MergePlan) -> dict[str, Any]:
    """What each placement needs (bytes) on a CUDA worker and on a CPU-only one, with no free memory read:
    the service matches it against the capacities its workers report (``divmerge_service.workers``)."""
    params = plan.config.parameters
    parts = _parts(plan, _tensor_sizes(plan), params.micro_batch_size, params.gradient_checkpointing)
    return {
        "unit": "bytes",
        "placement": params.placement,
        "order": list(PLACEMENTS),
        "headroom": HEADROOM,
        "needs": {k: {p: _needs(p, parts, torch.device(k)) for p in PLACEMENTS} for k in ("cuda", "cpu")},
    }


def choose_placement(plan: MergePlan, device: torch.device) -> tuple[str, dict[str, Any]]:
    """The configured placement, or with ``auto`` the fastest that fits; refuses when none fits."""
    estimate = estimate_learned_memory(plan, device)
    wanted = plan.config.parameters.placement
    if wanted != "auto":
        return wanted, estimate
    if estimate["chosen"] is None:
        raise InsufficientMemoryError(_refusal(plan, device, estimate), estimate)
    return estimate["chosen"], estimate


def describe(estimate: dict[str, Any]) -> list[str]:
    """Human lines for ``divmerge validate``."""
    free = estimate["free"]
    lines = [
        f"memory estimate on {estimate['device']} ({estimate['dtype']}, K={estimate['n_tasks']}, "
        f"{estimate['merged_params'] / 1e6:.1f}M merged parameters): free device {_gib(free['device'])}, "
        f"host {_gib(free['host'])}"
    ]
    for name, need in estimate["placements"].items():
        mark = "fits" if need["fits"] else "does not fit"
        lines.append(f"  {name:<8} device {_gib(need['device'])}, host {_gib(need['host'])}: {mark}")
    chosen = estimate["chosen"]
    lines.append(f"  auto would use: {chosen or 'nothing fits'}")
    return lines


# --- internals ----------------------------------------------------------------------------------------------
def _tensor_sizes(plan: MergePlan) -> dict[str, int]:
    assert plan.base is not None
    merged = largest = other = 0
    floats: dict[str, int] = {}
    with open_model(plan.base, plan.options) as ck:
        for n in plan.tensor_names:
            if n not in ck:
                continue
            numel = math.prod(ck.shape(n))
            if ck.dtype(n).is_floating_point:
                merged += numel
                largest = max(largest, numel)
                floats[n] = numel
            else:
                other += numel * 8
    layouts = expert_layouts(plan)
    return {
        "merged": merged,
        "largest": largest,
        "other_bytes": other,
        # elements of the dense task vectors over all experts, fp32 bytes of the low-rank factors
        "dense_tau": sum(dense_numel(lay, floats) for lay in layouts),
        "factor_bytes": factor_bytes(layouts),
        "touched": sum(floats[n] for n in touched(layouts, list(floats))),
    }


def _cfg(config: dict[str, Any], *keys: str, default: int = 0) -> int:
    for k in keys:
        v = config.get(k)
        if isinstance(v, int) and v > 0:
            return v
    return default


def _n_inputs(plan: MergePlan) -> list[int]:
    out = []
    for spec in plan.specs:
        data = spec.data
        if data is None:
            out.append(0)
        elif data.texts is not None:
            out.append(min(data.num_samples, sum(1 for t in data.texts if t.strip())))
        else:
            out.append(data.num_samples)
    return out


def _parts(plan: MergePlan, sizes: dict[str, int], micro: int | None, checkpointing: bool) -> dict[str, int]:
    cfg, params = plan.model_config, plan.config.parameters
    b = DTYPES[plan.config.dtype].itemsize
    k = len(plan.models)
    kind = model_kind(cfg)
    causal = kind == CAUSAL
    teachers = objective_of(plan).teachers  # teacher generation, outputs and top-k
    hidden = _cfg(cfg, "hidden_size", "n_embd", "d_model", default=768)
    layers = _cfg(cfg, "num_hidden_layers", "n_layer", default=12)
    heads = _cfg(cfg, "num_attention_heads", "n_head", default=12)
    kv = _cfg(cfg, "num_key_value_heads", default=heads) * (hidden // max(heads, 1))
    inter = _cfg(cfg, "intermediate_size", "n_inner", default=4 * hidden)
    vocab = _cfg(cfg, "vocab_size", default=32000)
    labels = _cfg(cfg, "num_labels", default=len(cfg.get("id2label") or {}) or 2)

    step_inputs = (
        sum(min(params.batch_size_per_task, n) for n in _n_inputs(plan)) or params.batch_size_per_task
    )
    batch = min(micro or step_inputs, step_inputs)
    length = params.max_length + (params.max_new_tokens if causal and teachers else 0)
    tokens = batch * length
    per_layer = tokens * (8 * hidden + 2 * kv + 4 * inter) * b + batch * heads * length * length * 4
    activations = (layers * tokens * hidden * b + per_layer) if checkpointing else layers * per_layer
    if causal:
        scored = batch * (params.max_new_tokens if teachers else length)
        width = params.top_k if (teachers and params.top_k) else vocab
        activations += tokens * vocab * b + scored * vocab * 4 * 3 + scored * width * 4 * 2
    # teacher generation: a batch of prompts scored over the full vocabulary
    teacher = 0
    if teachers:
        tb = teacher_batch_size(params.batch_size_per_task)
        teacher = tb * length * ((vocab * (b + 4) if causal else 0) + 4 * hidden * b + 2 * layers * kv * b)
    store_b = 4 if plan.config.dtype == "float32" else b
    online = teachers and params.teacher == "online"
    if not teachers or online:
        outputs = 0
    elif causal:
        per_pos = params.top_k * (store_b + 8) if params.top_k else vocab * store_b
        outputs = sum(_n_inputs(plan)) * params.max_new_tokens * per_pos
    else:
        outputs = sum(_n_inputs(plan)) * labels * store_b
    model = sizes["merged"] * b + sizes["other_bytes"]
    # the task vectors are counted per expert (a LoRA expert's are its factors); stream with sign consensus
    # reads one tensor's K task vectors at once
    consensus = k * sizes["largest"] * 4 if getattr(params, "tau_consensus", "none") == "sign" else 0
    return {
        "model": model,
        "touched": sizes["touched"] * b,
        "largest_tensor_fp32": sizes["largest"] * 4,
        "task_vectors": sizes["dense_tau"] * b,
        "low_rank_factors": sizes["factor_bytes"],
        "activations": max(activations, teacher),
        "online_teacher_weights": model if online else 0,
        "teacher_outputs_disk": outputs,
        "consensus_fp32": consensus,
        "micro_batch_inputs": batch,
        "tokens_per_input": length,
    }


def _needs(placement: str, parts: dict[str, int], device: torch.device) -> dict[str, int]:
    model, k_tau, changed = parts["model"], parts["task_vectors"], parts["touched"]
    # offload/stream: one tensor's task vector, base, expert, sum and dL/dW in fp32 at a time
    transit = 5 * parts["largest_tensor_fp32"]
    if placement == "resident":  # theta_0, the merged tensors, dL/dW, the task vectors
        on_device, on_host = model + 2 * changed + k_tau, 0
    elif placement == "offload":  # theta_0 and W on the device, the task vectors on the host
        on_device, on_host = model + changed + transit, k_tau
    else:  # stream: W only (theta_0 is read from the base's file too); one tensor's reads on the host
        on_device, on_host = model + transit + parts["consensus_fp32"], 2 * parts["largest_tensor_fp32"]
    on_device += parts["low_rank_factors"] + parts["activations"] + parts["online_teacher_weights"]
    on_host += RUNTIME_BYTES
    if device.type != "cuda":  # one memory: the host holds everything
        on_host, on_device = on_host + on_device, 0
    return {"device": on_device, "host": on_host}


def _fits(need: dict[str, int], free: dict[str, int | None]) -> bool:
    for where in ("device", "host"):
        if free[where] is not None and need[where] > HEADROOM * free[where]:
            return False
    return True


def free_memory(device: torch.device) -> dict[str, int | None]:
    """Free bytes on the compute device (CUDA; 0 for CPU, which uses the host) and on the host: the
    smaller of MemAvailable and what the process's memory cgroup (a container's limit) still allows."""
    dev: int | None = 0
    if device.type == "cuda":
        dev = torch.cuda.mem_get_info(device)[0] if torch.cuda.is_available() else None
    host = host_memory()
    return {"device": dev, "host": host[1] if host is not None else None}


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / GiB:.2f} GiB"


def _refusal(plan: MergePlan, device: torch.device, estimate: dict[str, Any]) -> str:
    """Why nothing fits, and the settings that would (or the smallest need when even those do not)."""
    free = estimate["free"]
    stream = estimate["placements"]["stream"]
    msg = (
        f"the learned merge fits in no placement on {device}: 'stream' (the smallest) needs "
        f"{_gib(stream['device'])} on the device and {_gib(stream['host'])} of host memory; free: "
        f"{_gib(free['device'])} on the device, {_gib(free['host'])} on the host"
    )
    params = plan.config.parameters
    lean = plan.config.model_copy(
        update={
            "parameters": params.model_copy(
                update={"placement": "stream", "micro_batch_size": 1, "gradient_checkpointing": True}
            )
        }
    )
    lean_plan = MergePlan(**{**plan.__dict__, "config": lean})
    lean_est = estimate_learned_memory(lean_plan, device)
    settings = "placement: stream, micro_batch_size: 1, gradient_checkpointing: true"
    if lean_est["placements"]["stream"]["fits"]:
        return f"{msg}; with {settings} it would fit"
    need = lean_est["placements"]["stream"]
    return (
        f"{msg}; even with {settings} it needs {_gib(need['device'])} on the device and {_gib(need['host'])} "
        "of host memory (a smaller max_length, top_k or fewer inputs reduce it)"
    )
