"""Learned merge coefficients: DivMerge (Touayouch et al., arXiv 2509.02108) and the AdaMerging baseline.

Merged weights are ``theta_0 + sum_t Gamma[g, t] * tau_t`` with task vectors ``tau_t = theta_t - theta_0``
and one coefficient per (group, task); Gamma is real, may be negative and is not clipped.

* divmerge minimises ``mean_t E_{x ~ X_t} D(p_teacher_t(.|x) || p_merged(.|x))`` (D = JS or forward KL);
  every input is compared with its own task's teacher only, teacher outputs are computed once.
* adamerging minimises the Shannon entropy of the merged model's predictions on each task's inputs
  (causal LMs: the next-token predictions at every input position, averaged per input).

Only the base parameters, the stacked task vectors ``[K, ...]`` and the cached teacher outputs stay
resident; a single module is run with ``torch.func.functional_call`` on the merged parameters.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch
from torch.func import functional_call

from .data import TaskInputs, load_task_inputs
from .divergence import divergence, entropy
from .errors import ConfigError, IncompatibleModelsError, NumericalError
from .grouping import group_tensors, layer_group
from .loading import Checkpoint
from .plan import LearnedCoefficients, MergePlan
from .progress import Reporter
from .teachers import (
    CAUSAL,
    ChatFormat,
    Example,
    annotate_teacher,
    build_module,
    collate,
    encode,
    load_tokenizer,
    model_kind,
    per_example_mean,
    scored_logits,
    teacher_batch_size,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def learn_coefficients(plan: MergePlan, *, device: torch.device, reporter: Reporter) -> LearnedCoefficients:
    cfg, params = plan.config, plan.config.parameters
    method = cfg.merge_method
    if method not in ("divmerge", "adamerging"):
        raise ConfigError(f"learn_coefficients does not handle merge_method {method!r}")
    if plan.base is None:
        raise ConfigError(f"merge_method {method!r} needs a base_model", field="base_model")
    dtype = _DTYPES[cfg.dtype]
    kind = model_kind(plan.model_config)
    n_tasks = len(plan.models)

    # --- data ------------------------------------------------------------------------------------------
    tasks: list[TaskInputs] = []
    for t, spec in enumerate(plan.specs):
        reporter.check()
        if spec.data is None:
            raise ConfigError(
                f"model {plan.models[t].ref.raw!r} has no 'data'", field=f"{_model_field(plan, t)}.data"
            )
        tasks.append(load_task_inputs(spec.data, plan.options, params.seed))
        reporter.report("data", t + 1, n_tasks, message=f"{len(tasks[-1])} inputs from {tasks[-1].source}")
    label_masks = resolve_label_masks(plan, device)
    tokenizer = load_tokenizer(plan.reference.path)
    examples = [
        encode(
            kind,
            tokenizer,
            inputs,
            t,
            params.max_length,
            params.max_new_tokens,
            plan.model_config,
            _chat_format(plan, t),
        )
        for t, inputs in enumerate(tasks)
    ]

    # --- module, task vectors and teachers -----------------------------------------------------------------
    module = build_module(plan.reference.path, kind, dtype, device)
    if kind != CAUSAL and getattr(module.config, "pad_token_id", None) is None:
        # ...ForSequenceClassification of decoder models finds each sequence's last token by its padding
        module.config.pad_token_id = tokenizer.pad_token_id
    slots, merged_names, aliases = _module_slots(module, plan)
    base_ck = Checkpoint(plan.base.path, plan.options)
    tau: dict[str, torch.Tensor] = {}
    for n in merged_names:
        tau[n] = torch.empty((n_tasks, *base_ck.shape(n)), dtype=dtype, device=device)
    try:
        for t, model in enumerate(plan.models):
            reporter.check()
            with Checkpoint(model.path, plan.options) as ck, torch.no_grad():
                missing = [n for n in slots if n not in ck]
                if missing:
                    raise IncompatibleModelsError(
                        [f"{model.ref.raw!r} has no tensor {m!r}" for m in missing[:20]]
                    )
                for n, slot in slots.items():
                    w = ck.get(n, torch.float32 if slot.is_floating_point() else None, device)
                    if n in tau:
                        tau[n][t] = (w - base_ck.get(n, torch.float32, device)).to(dtype)
                    slot.copy_(w)
            if method == "divmerge":
                annotate_teacher(
                    module,
                    kind,
                    tokenizer,
                    examples[t],
                    batch_size=teacher_batch_size(params.batch_size_per_task),
                    max_new_tokens=params.max_new_tokens,
                    top_k=params.top_k,
                    label_mask=None if label_masks is None else label_masks[t],
                    store_dtype=torch.float32 if dtype == torch.float32 else dtype,
                    device=device,
                    check=reporter.check,
                )
                reporter.report("teacher", t + 1, n_tasks)
        with torch.no_grad():
            for n, slot in slots.items():
                slot.copy_(base_ck.get(n, None, device))
        float_names = [n for n in plan.tensor_names if n in base_ck and base_ck.dtype(n).is_floating_point]
    finally:
        base_ck.close()
    theta0 = {n: slots[n].detach() for n in merged_names}

    # --- coefficients -----------------------------------------------------------------------------------------
    groups, group_of = _groups(plan, float_names, aliases)
    group_index = {g: i for i, g in enumerate(groups)}
    init = params.init if params.init is not None else 1.0 / n_tasks
    gamma = torch.nn.Parameter(torch.full((len(groups), n_tasks), float(init), device=device))
    rows = {n: group_index[group_of[n]] for n in merged_names}

    def merged_params() -> dict[str, torch.Tensor]:
        coeffs = gamma.to(dtype)
        return {n: theta0[n] + torch.tensordot(coeffs[rows[n]], tau[n], dims=1) for n in merged_names}

    # --- optimisation ---------------------------------------------------------------------------------------------
    loss_fn = _loss_fn(method, params.divergence, kind)
    sampler = _Sampler([len(e) for e in examples], params.batch_size_per_task, params.seed)
    total = params.epochs * sampler.steps_per_epoch
    optimiser = torch.optim.Adam([gamma], lr=params.lr)
    losses: list[float] = []
    for step in range(1, total + 1):
        reporter.check()
        picked = [examples[t][i] for t, idx in enumerate(sampler.next()) for i in idx]
        batch = collate(kind, picked, tokenizer, device)
        optimiser.zero_grad(set_to_none=True)
        out = functional_call(
            module, merged_params(), args=(), kwargs=batch.inputs, tie_weights=True, strict=False
        )
        logits = scored_logits(kind, out.logits, batch).float()
        owner_task = torch.tensor([e.task for e in picked], device=device)
        if label_masks is not None:  # each input is scored on its own task's labels only
            logits = logits.masked_fill(~label_masks[owner_task], -math.inf)
        per_example = per_example_mean(loss_fn(logits, picked), batch, len(picked))
        task_means = torch.zeros(n_tasks, device=device).index_add(0, owner_task, per_example)
        task_means = task_means / torch.bincount(owner_task, minlength=n_tasks).clamp_min(1)
        loss = task_means.mean()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NumericalError(f"{method}: the loss became {value} at step {step}; try a smaller lr")
        loss.backward()
        optimiser.step()
        if not torch.isfinite(gamma).all():
            raise NumericalError(f"{method}: the coefficients became non-finite at step {step}")
        losses.append(value)
        reporter.report("optimise", step, total, value)

    return LearnedCoefficients(
        method=method,
        granularity=params.granularity,
        groups=groups,
        tasks=[m.ref.raw for m in plan.models],
        values=gamma.detach().cpu().double().tolist(),
        group_of=group_of,
        losses=losses,
        resolved_datasets={t.source: t.commit for t in tasks if t.source != "inline"},
    )


# --- helpers ------------------------------------------------------------------------------------------------
def _model_field(plan: MergePlan, t: int) -> str:
    """The config path of task model ``t`` (``models.<i>``; the base may sit in the list before it)."""
    i = next((i for i, m in enumerate(plan.config.models) if m is plan.specs[t]), t)
    return f"models.{i}"


def _chat_format(plan: MergePlan, t: int) -> ChatFormat | None:
    """Task ``t``'s ``data.chat_template`` / ``data.system_prompt`` as a :class:`ChatFormat` (None when off)."""
    data = plan.specs[t].data
    if data is None or not data.chat_template:
        return None
    return ChatFormat(data.system_prompt, field=f"{_model_field(plan, t)}.data.chat_template")


def resolve_label_masks(plan: MergePlan, device: torch.device) -> torch.Tensor | None:
    """[n_tasks, num_labels] bool: the labels each task is scored on (``data.labels``), None if no task sets any.

    A task without ``labels`` keeps every label. Names resolve through config.json ``id2label``.
    """
    wanted = [spec.data.labels if spec.data is not None else None for spec in plan.specs]
    if all(w is None for w in wanted):
        return None
    kind = model_kind(plan.model_config)
    id2label = {int(k): str(v) for k, v in (plan.model_config.get("id2label") or {}).items()}
    n_labels = int(plan.model_config.get("num_labels") or len(id2label))
    by_name = {v: k for k, v in id2label.items()}
    masks = torch.ones((len(wanted), n_labels), dtype=torch.bool)
    for t, labels in enumerate(wanted):
        if labels is None:
            continue
        field = f"{_model_field(plan, t)}.data.labels"
        if kind == CAUSAL:
            raise ConfigError("'labels' applies to sequence-classification models only", field=field)
        ids = []
        for label in labels:
            i = label if isinstance(label, int) else by_name.get(label)
            if i is None or not 0 <= i < n_labels:
                known = ", ".join(repr(v) for v in list(id2label.values())[:20])
                raise ConfigError(
                    f"label {label!r} is not one of the model's {n_labels} labels (id2label: {known})",
                    field=field,
                )
            ids.append(i)
        masks[t] = False
        masks[t, ids] = True
    return masks.to(device)


def _module_slots(
    module: torch.nn.Module, plan: MergePlan
) -> tuple[dict[str, torch.Tensor], list[str], dict[str, str]]:
    """Map checkpoint names to the module's tensors.

    Returns (name -> module tensor for every checkpoint tensor the module has, canonical float names the
    forward uses (one per tied set), alias -> canonical for tied checkpoint names).
    """
    tensors: dict[str, torch.Tensor] = {}
    canonical_of: dict[int, str] = {}
    aliases: dict[str, str] = {}
    named = list(module.named_parameters(remove_duplicate=False)) + list(
        module.named_buffers(remove_duplicate=False)
    )
    for name, t in named:
        tensors[name] = t
        canonical_of.setdefault(id(t), name)
    slots = {n: tensors[n].data for n in plan.tensor_names if n in tensors}
    if not slots:
        raise ConfigError("none of the checkpoint's tensor names match the model built from config.json")
    # the first checkpoint name of each tied set is the one passed to functional_call
    chosen: dict[int, str] = {}
    merged: list[str] = []
    for n in plan.tensor_names:
        if n not in slots or not slots[n].is_floating_point():
            continue
        key = id(tensors[n])
        if key in chosen:
            aliases[n] = chosen[key]
            del slots[n]  # written through its canonical name
            continue
        chosen[key] = n
        merged.append(n)
    covered = {id(tensors[n]) for n in plan.tensor_names if n in tensors}
    uncovered = [name for name, p in module.named_parameters() if id(p) not in covered]
    if uncovered:
        raise IncompatibleModelsError(
            [f"the checkpoints have no tensor for parameter {u!r}" for u in uncovered[:20]]
        )
    return slots, merged, aliases


def _groups(
    plan: MergePlan, float_names: list[str], aliases: dict[str, str]
) -> tuple[list[str], dict[str, str]]:
    """Groups over the float tensors; tied aliases join their canonical tensor's group.

    ``group_of`` covers every float tensor, and (task/layer granularity) the non-float ones as well.
    """
    granularity = plan.config.parameters.granularity
    groups, group_of = group_tensors(float_names, granularity)
    for alias, canonical in aliases.items():  # a tied copy follows the tensor the forward actually uses
        if alias in group_of and canonical in group_of:
            group_of[alias] = group_of[canonical]
    used = set(group_of.values())
    groups = [g for g in groups if g in used]
    if granularity != "tensor":
        for n in plan.tensor_names:
            group_of.setdefault(n, _fallback_group(n, granularity, groups))
    return groups, group_of


def _fallback_group(name: str, granularity: str, groups: list[str]) -> str:
    if granularity == "task":
        return groups[0]
    g = layer_group(name)
    return g if g in groups else groups[0]


def _loss_fn(method: str, div: str, kind: str) -> Callable[[torch.Tensor, list[Example]], torch.Tensor]:
    """Per-scored-row loss: [B] (classification) or [T] (causal tokens)."""
    if method == "adamerging":
        return lambda logits, _: entropy(torch.log_softmax(logits, dim=-1))

    def div_loss(logits: torch.Tensor, picked: list[Example]) -> torch.Tensor:
        if kind != CAUSAL:
            target = torch.stack([e.target for e in picked]).to(logits.device, torch.float32)
            return divergence(div, target, torch.log_softmax(logits, dim=-1))
        target = torch.cat([e.target for e in picked]).to(logits.device, torch.float32)
        if picked[0].target_index is not None:
            index = torch.cat([e.target_index for e in picked]).to(logits.device)
            logits = logits.gather(-1, index)  # the student renormalised on the teacher's top-k support
        return divergence(div, target, torch.log_softmax(logits, dim=-1))

    return div_loss


class _Sampler:
    """Each step takes ``batch`` inputs from every task; each task cycles through seeded reshuffles."""

    def __init__(self, sizes: list[int], batch: int, seed: int):
        self.sizes, self.batch = sizes, batch
        self.rngs = [random.Random(f"{seed}/batches/{t}") for t in range(len(sizes))]
        self.orders: list[list[int]] = [[] for _ in sizes]
        self.steps_per_epoch = max(1, max(math.ceil(n / batch) for n in sizes))

    def next(self) -> list[list[int]]:
        out = []
        for t, n in enumerate(self.sizes):
            take: list[int] = []
            while len(take) < min(self.batch, n):
                if not self.orders[t]:
                    order = list(range(n))
                    self.rngs[t].shuffle(order)
                    self.orders[t] = order
                i = self.orders[t].pop()
                if i not in take:
                    take.append(i)
                # an index already taken in this batch (at a reshuffle boundary) is simply skipped
            out.append(take)
        return out
