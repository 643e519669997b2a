"""Where the loss reads each input's teacher distribution from: ``parameters.teacher``.

* ``cached`` (default): each task's teacher outputs are one entry of the worker's teacher cache
  (:mod:`.teacher_cache`): a file, read row by row when a step needs them, never held in RAM,
  and reused by any later job with the same expert, inputs and settings (no teacher forward runs then).
* ``online``: nothing is stored but the causal continuations (a few token ids per input); at every step
  each task's teacher distribution on that step's inputs is recomputed from theta_0 + tau_t.

Both run the expert pass through :class:`TeacherStage`: ``begin(t)`` says whether task ``t``'s teacher must
run with the expert's weights in the module, ``run(t, module)`` runs it. With several ranks every rank
computes its share of each task's inputs (continuations and distributions) and the results are exchanged
(cached: all ranks write their rows into one entry file that rank 0 then publishes).

``data.labels: auto`` (sequence classification) is resolved here: a task's labels are those its expert
predicts (argmax) on that task's inputs. So is the default of a task without ``labels``: once every expert
has run (:meth:`TeacherStage.finish`), it is restricted to the labels its expert predicts when those are
at least two and no other task's expert predicts (or lists) any of them, i.e. the experts use separate
slices of one head shared by several tasks; otherwise it keeps every label. Classification entries hold
the full, unrestricted distribution, so the label restriction is applied when targets are read and one
entry serves every restriction.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Protocol

import torch

from ..errors import ConfigError, DivMergeError
from ..io.lora import adapter_identity
from ..plan import MergePlan
from ..progress import Reporter
from .batching import scored_rows
from .encoding import Example
from .inputs import LearnedInputs, model_field, model_labels, separate_slices
from .ranks import Ranks
from .reference import CAUSAL, CLASSIFICATION
from .teacher_cache import Entry, EntryWriter, TeacherCache, entry_key, expert_identity, tokenizer_identity
from .teachers import continue_prompts, restrict_labels, teacher_batch_size, teacher_logp, top_k_support


class TeacherStore(Protocol):
    def targets(
        self, picked: list[Example], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(teacher log-probs [rows, C or V or k] in fp32, top-k token ids [rows, k] or None) of ``picked``.

        Rows follow ``picked``: one per example (classification), one per scored position (causal).
        """

    def close(self) -> None:
        """Let go of whatever the store holds (cache entries become evictable)."""


class TeacherStage:
    """The teacher half of the expert pass, shared by both stores."""

    def __init__(
        self,
        plan: MergePlan,
        kind: str,
        inputs: LearnedInputs,
        *,
        dtype: torch.dtype,
        device: torch.device,
        reporter: Reporter,
        ranks: Ranks,
    ):
        self.plan, self.kind, self.inputs = plan, kind, inputs
        self.params = plan.config.parameters
        self.dtype, self.device, self.reporter, self.ranks = dtype, device, reporter, ranks
        self.batch_size = teacher_batch_size(self.params.batch_size_per_task)
        self.auto = [t for t, s in enumerate(plan.specs) if s.data is not None and s.data.labels == "auto"]
        #: tasks without ``data.labels``: restricted by :meth:`finish` where the experts share one head
        self.unset = (
            [t for t, s in enumerate(plan.specs) if s.data is not None and s.data.labels is None]
            if kind == CLASSIFICATION
            else []
        )
        #: the labels each expert of ``auto`` and ``unset`` predicts on its own task's inputs
        self.predicted: dict[int, set[int]] = {}

    def begin(self, t: int) -> bool:
        """Whether task ``t``'s expert must be loaded into the module for :meth:`run`."""
        raise NotImplementedError

    def run(self, t: int, module: torch.nn.Module) -> None:
        raise NotImplementedError

    @property
    def store_dtype(self) -> torch.dtype:
        return self.dtype  # fp32 runs keep fp32 targets; bf16/fp16 runs store them at that precision

    def close(self) -> None:
        """Let go of whatever the stage holds."""

    def scans(self, t: int) -> bool:
        """Whether task ``t``'s expert predictions decide its labels (``labels: auto`` or unset)."""
        return t in self.auto or t in self.unset

    def finish(self) -> None:
        """After every expert ran: restrict each task without ``labels`` whose expert's predicted labels are at
        least two and disjoint from the labels of every other task (predicted, or listed explicitly)."""
        masks = self.inputs.label_masks
        used: dict[int, set[int]] = dict(self.predicted)
        if masks is not None:
            for t, spec in enumerate(self.plan.specs):
                if spec.data is not None and isinstance(spec.data.labels, list):
                    used[t] = set(masks[t].nonzero().flatten().tolist())
        chosen = separate_slices(used, self.unset)
        if not chosen:
            return
        if masks is None:
            _, n_labels = model_labels(self.plan.model_config)
            masks = torch.ones((len(self.plan.specs), n_labels), dtype=torch.bool, device=self.device)
            self.inputs.label_masks = masks
        for t in chosen:  # a strict subset: the other tasks' labels are outside it
            masks[t] = False
            masks[t, sorted(used[t])] = True
        self.inputs.shared_head.extend(chosen)

    # --- shared pieces ------------------------------------------------------------------------------------
    def _restricted(self, target: torch.Tensor, picked: list[Example], device: torch.device) -> torch.Tensor:
        masks = self.inputs.label_masks
        if self.kind != CLASSIFICATION or masks is None:
            return target
        owner = torch.tensor([e.task for e in picked], device=device)
        return restrict_labels(target, masks.to(device)[owner])

    def _mine(self, t: int) -> list[Example]:
        return self.ranks.share(self.inputs.examples[t])

    def _continue(self, t: int, module: torch.nn.Module) -> None:
        """Causal: every rank continues its share of the prompts, then all ranks learn every continuation."""
        examples, mine = self.inputs.examples[t], self._mine(t)
        continue_prompts(
            module,
            self.inputs.tokenizer,
            mine,
            batch_size=self.batch_size,
            max_new_tokens=self.params.max_new_tokens,
            device=self.device,
            check=self.reporter.check,
        )
        idx = self.ranks.share(list(range(len(examples))))
        mine_layout = [(i, examples[i].fields["input_ids"], examples[i].start, examples[i].stop) for i in idx]
        for part in self.ranks.gather(mine_layout):
            for i, ids, start, stop in part:
                e = examples[i]
                e.fields, e.start, e.stop = {"input_ids": list(ids)}, start, stop

    def _predicted(self, t: int, predicted: set[int]) -> None:
        """Task ``t``'s expert predicts ``predicted`` on its inputs: ``labels: auto`` takes them now, a task
        without ``labels`` in :meth:`finish`."""
        self.predicted[t] = predicted
        if t in self.auto:
            self._resolve_auto(t, predicted)

    def _resolve_auto(self, t: int, predicted: set[int]) -> None:
        """Restrict task ``t``'s label mask to the labels its expert predicts."""
        labels = sorted(predicted)
        if len(labels) < 2:
            raise ConfigError(
                f"labels: auto: the expert predicts only label {labels} on this task's "
                f"{len(self.inputs.examples[t])} inputs; give the task's labels explicitly",
                field=f"{model_field(self.plan, t)}.data.labels",
            )
        masks = self.inputs.label_masks
        assert masks is not None
        masks[t] = False
        masks[t, labels] = True


# --- cached ---------------------------------------------------------------------------------------------
class CachedTeachers(TeacherStage):
    """Teacher outputs in the teacher cache: looked up by key, computed and published on a miss."""

    def __init__(self, plan: MergePlan, kind: str, inputs: LearnedInputs, **kw: Any):
        super().__init__(plan, kind, inputs, **kw)
        self.cache = TeacherCache.from_options(plan.options)
        self.entries: dict[int, Entry] = {}
        self.keys: dict[int, str] = {}
        self.hits: list[int] = []
        self._tokenizer_id = tokenizer_identity(plan.reference.path)

    def key(self, t: int) -> str:
        """Everything that determines task ``t``'s teacher outputs (computed before any continuation)."""
        expert = self.plan.models[t]
        prompts = json.dumps([e.fields for e in self.inputs.examples[t]], sort_keys=True)
        causal = self.kind == CAUSAL
        return entry_key(
            {
                "expert": expert_identity(expert.path, expert.commit),
                **({"adapter": adapter_identity(expert.adapter)} if expert.adapter else {}),
                "architecture": self.plan.model_config,
                "tokenizer": self._tokenizer_id,
                "kind": self.kind,
                "inputs": hashlib.sha256(prompts.encode("utf-8")).hexdigest(),
                "max_length": self.params.max_length,
                "max_new_tokens": self.params.max_new_tokens if causal else None,
                "top_k": self.params.top_k if causal else None,
                "compute_dtype": str(self.dtype),
                "store_dtype": str(self.store_dtype),
                "device": self.device.type,
            }
        )

    def begin(self, t: int) -> bool:
        self.keys[t] = key = self.key(t)
        entry = self.cache.open(key) if self.ranks.is_main else None
        hit = self.ranks.broadcast(entry is not None)
        if not hit:
            return True
        if entry is None:  # rank 0 holds the entry's lock, so it cannot have been evicted meanwhile
            entry = self.cache.open(key)
            if entry is None:
                raise DivMergeError(f"teacher cache entry {key} vanished while rank 0 held it")
        self._attach(t, entry)
        self.hits.append(t)
        return False

    def run(self, t: int, module: torch.nn.Module) -> None:
        if t in self.entries:  # a cache hit
            self.reporter.report("teacher", t + 1, len(self.plan.models), message="cached")
            return
        examples = self.inputs.examples[t]
        if self.kind == CAUSAL:
            self._continue(t, module)
        row = 0
        for e in examples:
            e.row, row = row, row + scored_rows(self.kind, e)
        width = self._width(module)
        top_k = self.params.top_k if self.kind == CAUSAL and self.params.top_k else None
        if top_k is not None and top_k >= width:
            top_k = None
        layout = {"kind": self.kind, "count": len(examples)}
        if self.kind == CAUSAL:
            layout["examples"] = [[e.fields["input_ids"], e.start, e.stop] for e in examples]
        writer = None
        if self.ranks.is_main:
            writer = self.cache.create(
                self.keys[t],
                rows=row,
                width=top_k or width,
                dtype=self.store_dtype,
                top_k=top_k,
                layout=layout,
            )
        path = self.ranks.broadcast(None if writer is None else str(writer.path))
        if writer is None:
            writer = EntryWriter.attach(Path(path))
        try:
            mine = self._mine(t)
            for lo in range(0, len(mine), self.batch_size):
                self.reporter.check()
                chunk = mine[lo : lo + self.batch_size]
                logp, index = top_k_support(
                    teacher_logp(module, self.kind, self.inputs.tokenizer, chunk, self.device), top_k
                )
                for e, (part, ipart) in zip(chunk, _per_example(self.kind, chunk, logp, index), strict=True):
                    writer.write(e.row, part, ipart)
            self.ranks.gather(None)  # every rank's rows are written
            if self.ranks.is_main:
                writer.commit()
            self.ranks.gather(None)
            entry = self.cache.open(self.keys[t])
            if entry is None:
                raise DivMergeError(f"teacher cache entry {self.keys[t]} vanished right after it was written")
        except BaseException:
            if self.ranks.is_main:
                writer.abort()
            else:
                writer.close()  # an attached rank lets go of the temporary file; rank 0 removes it
            raise
        writer.close()  # the entry's own shared lock now keeps it
        if self.ranks.is_main:
            self.cache.evict()
        self._attach(t, entry)
        self.reporter.report("teacher", t + 1, len(self.plan.models))

    def _width(self, module: torch.nn.Module) -> int:
        cfg = module.config
        return int(cfg.vocab_size if self.kind == CAUSAL else cfg.num_labels)

    def _attach(self, t: int, entry: Entry) -> None:
        """Point task ``t``'s examples at ``entry`` (continuations and rows), resolve ``labels: auto``."""
        examples = self.inputs.examples[t]
        layout = entry.layout
        if layout.get("count") != len(examples) or layout.get("kind") != self.kind:
            raise DivMergeError(f"teacher cache entry {entry.path.name} does not match task {t}'s inputs")
        row = 0
        for i, e in enumerate(examples):
            if self.kind == CAUSAL:
                ids, e.start, e.stop = layout["examples"][i]
                e.fields = {"input_ids": list(ids)}
            e.row, row = row, row + scored_rows(self.kind, e)
        self.entries[t] = entry
        if self.scans(t):
            logp, _ = entry.read(0, entry.rows)
            self._predicted(t, set(logp.argmax(-1).tolist()))

    def targets(
        self, picked: list[Example], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        parts = [self.entries[e.task].read(e.row, e.row + scored_rows(self.kind, e)) for e in picked]
        target = torch.cat([p[0] for p in parts]).to(device, torch.float32)
        index = None if parts[0][1] is None else torch.cat([p[1] for p in parts]).to(device, torch.long)
        return self._restricted(target, picked, device), index

    def close(self) -> None:
        for entry in self.entries.values():
            entry.close()
        self.entries.clear()
        if self.ranks.is_main:
            self.cache.evict()


# --- online ---------------------------------------------------------------------------------------------
class OnlineTeachers(TeacherStage):
    """Nothing stored but the continuations: each step's targets come from theta_0 + tau_t (``teacher: online``).

    The expert pass still runs each causal teacher once to continue its prompts (and each classifier without
    an explicit label list once, to find the labels it predicts).
    """

    def __init__(self, plan: MergePlan, kind: str, inputs: LearnedInputs, **kw: Any):
        super().__init__(plan, kind, inputs, **kw)
        self.module: torch.nn.Module | None = None
        self.vectors: Any = None

    def bind(self, module: torch.nn.Module, vectors: Any) -> None:
        """The module and the placement the targets are computed with (``vectors.task_weights(t)``)."""
        self.module, self.vectors = module, vectors

    def begin(self, t: int) -> bool:
        return self.kind == CAUSAL or self.scans(t)

    def run(self, t: int, module: torch.nn.Module) -> None:
        if self.kind == CAUSAL:
            self._continue(t, module)
        if self.scans(t):
            predicted: set[int] = set()
            mine = self._mine(t)
            for lo in range(0, len(mine), self.batch_size):
                self.reporter.check()
                chunk = mine[lo : lo + self.batch_size]
                logp = teacher_logp(module, self.kind, self.inputs.tokenizer, chunk, self.device)
                predicted.update(logp.argmax(-1).tolist())
            self._predicted(t, set().union(*self.ranks.gather(predicted)))
        self.reporter.report("teacher", t + 1, len(self.plan.models), message="online")

    def targets(
        self, picked: list[Example], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        assert self.module is not None and self.vectors is not None
        top_k = self.params.top_k if self.kind == CAUSAL else None
        rows: list[tuple[torch.Tensor, torch.Tensor | None] | None] = [None] * len(picked)
        for t in dict.fromkeys(e.task for e in picked):
            which = [j for j, e in enumerate(picked) if e.task == t]
            chunk = [picked[j] for j in which]
            logp = teacher_logp(
                self.module,
                self.kind,
                self.inputs.tokenizer,
                chunk,
                device,
                weights=self.vectors.task_weights(t),
            )
            logp, index = top_k_support(logp, top_k)
            if self.store_dtype != torch.float32:  # the same rounding as a cached entry
                logp = logp.to(self.store_dtype).float()
            for j, pair in zip(which, _per_example(self.kind, chunk, logp, index), strict=True):
                rows[j] = pair
        target = torch.cat([r[0] for r in rows])  # type: ignore[index]
        index = None if rows[0][1] is None else torch.cat([r[1] for r in rows])  # type: ignore[index,misc]
        return self._restricted(target, picked, device), index

    def close(self) -> None:
        self.module = self.vectors = None


def _per_example(
    kind: str, chunk: list[Example], logp: torch.Tensor, index: torch.Tensor | None
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Each example's rows of a chunk's teacher outputs (``logp`` and, with top-k, ``index``)."""
    counts = [scored_rows(kind, e) for e in chunk]
    indexes = index.split(counts) if index is not None else [None] * len(chunk)
    return list(zip(logp.split(counts), indexes, strict=True))


def teacher_stage(plan: MergePlan, kind: str, inputs: LearnedInputs, **kw: Any) -> TeacherStage:
    """The stage ``parameters.teacher`` asks for."""
    cls = OnlineTeachers if plan.config.parameters.teacher == "online" else CachedTeachers
    return cls(plan, kind, inputs, **kw)
