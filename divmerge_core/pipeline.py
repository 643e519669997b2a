"""The engine's entry points: :func:`prepare` (resolve + validate) and :func:`run_merge` (the whole merge).

Classic methods stream tensor by tensor: for each tensor the base and the K task models' copies are read,
combined on the device by the method's function (:mod:`divmerge_core.methods`), with the parameters
evaluated for that tensor (gradients, filters), cast to the output dtype, checked for NaN/inf and handed
to the streaming writer, so memory stays near K+2 tensors whatever the model size. A reader thread reads
the next tensor's inputs while the current one merges (:data:`PREFETCH_BYTES`). Learned methods first learn
their coefficients (``divmerge_core.learned``), then stream ``base + sum_t coeff_t * tau_t`` the same way
(:func:`divmerge_core.learned.apply.merged_tensor`).
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import MergeConfig, ModelSpec
from .errors import ConfigError, NumericalError
from .io.loading import DTYPES
from .io.lora import open_model
from .io.modelcard import render_model_card
from .io.output import (
    check_output_dir,
    copy_tokenizer_files,
    save_tokenizer,
    staged_output,
    write_model_config,
)
from .io.refs import ResolvedModel, resolve_model
from .io.writer import ShardedSafetensorsWriter, TensorSpec
from .learned.apply import merged_tensor
from .methods.base import TensorInputs
from .methods.settings import TensorSettings, layer_index
from .methods.sparsify import tensor_seed
from .options import EngineOptions
from .plan import LearnedCoefficients, MergePlan, MergeResult
from .progress import ProgressCallback, Reporter, StopCheck
from .relayer import plan_layers, relayered_config, write_relayered
from .validation import validate_models


def tensor_settings(config: MergeConfig, specs: list[ModelSpec], tensor_names: list[str]) -> TensorSettings:
    """The method's parameters, evaluated per tensor (mergekit's gradients, filters and slices)."""
    layers = [i for i in (layer_index(n) for n in tensor_names) if i is not None]
    return TensorSettings(
        config.parameters,
        [(s.model, s.parameters) for s in specs],
        config.method.model_parameters,
        config.layer_slices(),
        max(layers) + 1 if layers else 0,
    )


def _check_parameters(config: MergeConfig, specs: list[ModelSpec], tensor_names: list[str]) -> None:
    """Every tensor's parameter values exist and pass the method's check, before any tensor is read."""
    method = config.method
    if method.learned or (method.relayers and config.slices is not None):
        return  # a rebuilt layer stack is checked by relayer.plan_layers
    settings = tensor_settings(config, specs, tensor_names)
    slices = config.layer_slices()
    if slices is not None and slices[-1].end != settings.n_layers:
        raise ConfigError(
            f"the slices cover layers 0-{slices[-1].end}, the models have {settings.n_layers} layers "
            "(slices must cover every layer, in order)",
            field="slices",
        )
    required = [k for k, f in method.parameters.model_fields.items() if f.is_required()]
    for name in tensor_names:
        values, per_model = settings.for_tensor(name)
        missing = [k for k in required if values.get(k) is None]
        if missing:
            raise ConfigError(
                f"parameter {missing[0]!r} has no value for tensor {name!r} (no filter matches it; "
                "add a fallback without 'filter')",
                field=f"parameters.{missing[0]}",
            )
        problem = method.check(values, per_model) if method.check else None
        if problem:
            raise ConfigError(
                f"merge_method {config.merge_method!r} {problem} (tensor {name!r})", field="models"
            )


def prepare(
    config: MergeConfig,
    options: EngineOptions | None = None,
    reporter: Reporter | None = None,
    resolved_models: dict[str, ResolvedModel] | None = None,
) -> MergePlan:
    """Resolve every model reference (local folder or Hub snapshot) and check the models are compatible.

    ``resolved_models``: references the caller already resolved with the same options (raw -> model),
    not resolved again.
    """
    options = options or EngineOptions()
    reporter = reporter or Reporter()
    specs = config.task_models()
    raws = list(dict.fromkeys(([config.base_model] if config.base_model else []) + [s.model for s in specs]))
    resolved: dict[str, ResolvedModel] = {}
    for i, raw in enumerate(raws):
        reporter.check()
        reporter.report("resolve", i, len(raws), message=raw)
        known = (resolved_models or {}).get(raw)
        resolved[raw] = known if known is not None else resolve_model(raw, options)
    reporter.report("resolve", len(raws), len(raws))

    reporter.check()
    reporter.report("validate", 0, 1)
    base = resolved[config.base_model] if config.base_model else None
    models = [resolved[s.model] for s in specs]
    reference = base or models[0]
    labelled: list[tuple[str, ResolvedModel]] = []
    seen: set[str] = set()
    for role, model in ([("base model", base)] if base else []) + [("model", m) for m in models]:
        if model.ref.raw not in seen:  # the reference comes first: it is what the others are checked against
            seen.add(model.ref.raw)
            labelled.append((f"{role} {model.ref.raw!r}", model))
    spec = config.tokenizer_spec
    vocab_names = None
    if spec is not None:
        from .validation import read_header
        from .vocab import vocab_tensor_names

        names = list(read_header(labelled[0][0], reference, options).shapes)
        vocab_names = vocab_tensor_names(reference.path, labelled[0][0], names)
    report = validate_models(labelled, options, vocab_names)
    _check_parameters(config, specs, report.tensor_names)
    layout = model_config = None
    if config.method.relayers and config.slices is not None:
        layout = plan_layers(config, specs, report.tensor_names)
        model_config = relayered_config(report.model_config, layout)
    model_config = model_config or report.model_config
    vocab = None
    if spec is not None:
        assert vocab_names is not None
        vocab = _build_vocabulary(config, spec, [m for _, m in labelled], base, vocab_names, options)
        model_config = with_vocab_size(model_config, vocab.size)
    plan = MergePlan(
        config=config,
        options=options,
        base=base,
        models=models,
        specs=specs,
        reference=reference,
        model_config=model_config,
        tensor_names=layout.names if layout else report.tensor_names,
        layout=layout,
        vocab=vocab,
        chat_template=_chat_template(config, [m for _, m in labelled]),
    )
    if config.method.learned:
        from .learned import resolve_label_masks
        from .learned.reference import require_tokenizer
        from .learned.trimming import check_plan

        require_tokenizer(reference.path, f"{'base model' if base else 'model'} {reference.ref.raw!r}")
        resolve_label_masks(plan, torch.device("cpu"))  # an unknown label fails here, before any data loads
        check_plan(plan)  # trimmed task vectors need dense ones (no LoRA factors)
    reporter.report("validate", 1, 1)
    return plan


def _build_vocabulary(
    config: MergeConfig,
    spec: Any,
    models: list[ResolvedModel],
    base: ResolvedModel | None,
    names: list[str],
    options: EngineOptions,
) -> Any:
    """The output vocabulary of ``config``'s tokenizer source over ``models`` (the reference first)."""
    from .io.loading import read_model_config
    from .vocab import build_vocabulary

    source = None
    if spec.source not in ("base", "union"):
        known = {m.ref.raw: m for m in models}
        source = (known.get(spec.source) or resolve_model(spec.source, options)).path
    return build_vocabulary(
        spec,
        [(m.ref.raw, m.path, read_model_config(m.path)) for m in models],
        base.ref.raw if base is not None else None,
        source,
        names,
    )


def with_vocab_size(model_config: dict[str, Any], size: int) -> dict[str, Any]:
    """config.json with ``vocab_size`` (top level, else its ``text_config``'s) set to ``size``."""
    out = dict(model_config)
    text = out.get("text_config")
    if out.get("vocab_size") is None and isinstance(text, dict) and "vocab_size" in text:
        out["text_config"] = {**text, "vocab_size": size}
    else:
        out["vocab_size"] = size
    return out


def _chat_template(config: MergeConfig, models: list[ResolvedModel]) -> str | None:
    """The chat template the output tokenizer gets (None: its own is kept); ``auto`` reads the models'
    tokenizers (the reference first; a model whose tokenizer cannot be read is skipped, as in mergekit)."""
    from .chat_templates import choose_chat_template

    if config.chat_template is None:
        return None

    def tokenizers() -> Iterator[Any]:
        from .vocab import load_tokenizer

        for m in models:
            try:
                yield load_tokenizer(m.path, m.ref.raw)
            except ConfigError:
                continue

    return choose_chat_template(config.chat_template, tokenizers())


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA device is available")
    return dev


@dataclass
class _TensorReads:
    """One tensor's inputs as read from the checkpoints (see :meth:`_Merger.read`)."""

    base: torch.Tensor | None
    models: torch.Tensor | Iterable[torch.Tensor]


class _Merger:
    """Produces the merged tensors one at a time from open checkpoints."""

    def __init__(
        self,
        plan: MergePlan,
        stack: contextlib.ExitStack,
        device: torch.device,
        coeffs: LearnedCoefficients | None,
    ):
        opts = plan.options
        self.plan, self.device, self.coeffs = plan, device, coeffs
        self.config = plan.config
        self.base = stack.enter_context(open_model(plan.base, opts)) if plan.base else None
        self.models = [stack.enter_context(open_model(m, opts)) for m in plan.models]
        self.reference = self.base or self.models[0]
        self.cdtype = DTYPES[self.config.dtype]
        self.odtype = DTYPES[self.config.output_dtype]
        self.method = self.config.method
        self.settings = tensor_settings(self.config, plan.specs, plan.tensor_names)
        self.vocab = plan.vocab
        self.vocab_names = set(plan.vocab.names) if plan.vocab is not None else set()

    def shape(self, name: str) -> tuple[int, ...]:
        """The output shape of ``name`` (a vocabulary tensor has the output vocabulary's rows)."""
        shape = self.reference.shape(name)
        if name in self.vocab_names:
            assert self.vocab is not None
            return (self.vocab.size, *shape[1:])
        return shape

    def spec(self, name: str) -> TensorSpec:
        dtype = self.reference.dtype(name)
        return TensorSpec(name, self.shape(name), self.odtype if dtype.is_floating_point else dtype)

    def input_bytes(self, name: str) -> int:
        """What reading ``name``'s inputs (base and task models, compute dtype) allocates."""
        n = math.prod(self.shape(name))
        return n * (len(self.models) + 1) * torch.empty((), dtype=self.cdtype).element_size()

    def read(self, name: str, whole: bool = False) -> _TensorReads | None:
        """Read ``name``'s inputs (None for integer/bool buffers, which are copied, never merged).

        ``whole``: every model's copy is read now (a prefetch); otherwise a streaming method gets a
        generator refilling one buffer, read as the method consumes it.
        """
        if not self.reference.dtype(name).is_floating_point:
            return None
        if name in self.vocab_names:
            return self._read_vocab(name)
        use_base = self.base is not None and (self.coeffs is not None or self.method.base != "unused")
        base = self.base.get(name, self.cdtype, self.device) if use_base else None
        shape = self.reference.shape(name)
        models: torch.Tensor | Iterable[torch.Tensor]
        if (self.coeffs is not None or self.method.streams) and not whole:
            # one model at a time, read into one reused buffer: memory stays at ~4 tensors whatever K
            models = self._stream(name, shape)
        else:  # the K tensors read straight into one [K, ...] tensor that the method then works in
            models = torch.empty((len(self.models), *shape), dtype=self.cdtype, device=self.device)
            for m, row in zip(self.models, models, strict=True):
                m.get_into(name, row)
        return _TensorReads(base, models)

    def _read_vocab(self, name: str) -> _TensorReads:
        """A vocabulary tensor: every model's copy (the base's too, when there is one, as mergekit reads it
        for the rows of tokens other models lack), rows permuted into the output vocabulary."""
        assert self.vocab is not None
        opened = ([(self.plan.base, self.base)] if self.base is not None else []) + list(
            zip(self.plan.models, self.models, strict=True)
        )
        raw: dict[str, torch.Tensor] = {}
        for model, ckpt in opened:
            if model.ref.raw not in raw:
                raw[model.ref.raw] = ckpt.get(name, self.cdtype, self.device)
        rows = self.vocab.permute(raw)
        del raw
        use_base = self.base is not None and (self.coeffs is not None or self.method.base != "unused")
        base = rows[self.plan.base.ref.raw] if use_base and self.plan.base is not None else None
        return _TensorReads(base, torch.stack([rows[m.ref.raw] for m in self.plan.models]))

    def merge(self, name: str, reads: _TensorReads | None = None) -> torch.Tensor:
        """Merge tensor ``name`` from ``reads`` (from :meth:`read`; read now when not given)."""
        if reads is None:
            reads = self.read(name)
        if reads is None:
            return self.reference.get(name)
        base, models = reads.base, reads.models
        if self.coeffs is not None:
            assert base is not None  # a learned method always reads the base (see read)
            return merged_tensor(self.coeffs, name, base, models)
        method = self.method
        assert method.merge is not None
        params, per_model = self.settings.for_tensor(name)
        generator = None
        if method.random:
            generator = torch.Generator(device=self.device).manual_seed(tensor_seed(params["seed"], name))
        return method.merge(TensorInputs(name, base, models, per_model, params, generator))

    def _stream(self, name: str, shape: tuple[int, ...]) -> Iterator[torch.Tensor]:
        """Each model's copy of ``name`` in turn, in the same buffer (consume one before the next)."""
        buf = torch.empty(shape, dtype=self.cdtype, device=self.device)
        for m in self.models:
            yield m.get_into(name, buf)


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or inf in ``t``: one reduction pass (a finite sum), the exact element test only when the
    sum is not finite (NaN/inf in ``t``, or finite values whose sum overflows)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def write_weights(
    plan: MergePlan,
    folder: Path,
    device: torch.device,
    reporter: Reporter,
    coeffs: LearnedCoefficients | None = None,
) -> list[str]:
    """Stream the merged tensors into sharded safetensors in ``folder``; return the files written."""
    if plan.layout is not None:
        return write_relayered(plan, folder, device, reporter)
    with contextlib.ExitStack() as stack, torch.inference_mode():
        merger = _Merger(plan, stack, device, coeffs)
        names = plan.tensor_names
        writer = stack.enter_context(
            ShardedSafetensorsWriter(folder, [merger.spec(n) for n in names], plan.options.max_shard_size)
        )
        reader = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="divmerge-read"))
        stack.enter_context(_intra_op_threads(torch.get_num_threads() - 1))  # a core for the reader
        total = len(names)
        reporter.report("write", 0, total)
        pending: Future[_TensorReads | None] | None = None
        for i, name in enumerate(names):
            reporter.check()
            reads = pending.result() if pending is not None else merger.read(name)
            pending = None
            following = names[i + 1] if i + 1 < total else None
            if following is not None and merger.input_bytes(following) <= PREFETCH_BYTES:
                pending = reader.submit(_read_ahead, merger, following)
            out = merger.merge(name, reads).to(merger.spec(name).dtype)
            del reads
            if out.is_floating_point() and not all_finite(out):
                what = "overflows the output dtype" if merger.odtype != merger.cdtype else "is not finite"
                raise NumericalError(f"merged tensor {name!r} has NaN or inf values (the merge {what})")
            writer.write(name, out)
            del out
            reporter.report("write", i + 1, total, message=name)
        return writer.close()


#: The next tensor's inputs are read in a background thread while the current one merges (reads and
#: arithmetic overlap on two cores) when they take at most this many bytes; larger ones (embeddings)
#: are read when their turn comes, one model at a time for the streaming methods, so peak memory stays
#: that of one large tensor's inputs.
PREFETCH_BYTES = 128 << 20


@contextlib.contextmanager
def _intra_op_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` (at least 1) inside the block.

    The merge arithmetic is memory-bound: more threads than cores makes every small op wait at
    OpenMP barriers for descheduled threads (measured on 2 shared cores: half the CPU time and a
    third of the wall time of a TIES merge with 1 thread instead of 2).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _read_ahead(merger: _Merger, name: str) -> _TensorReads | None:
    with torch.inference_mode():
        return merger.read(name, whole=True)


def write_metadata(
    plan: MergePlan,
    folder: Path,
    coeffs: LearnedCoefficients | None,
    evaluation: dict[str, Any] | None = None,
) -> list[str]:
    """config.json, tokenizer files, README.md model card, merge_config.yaml, coefficients.json and, with
    ``evaluation``, evaluation.json."""
    files = [write_model_config(plan.model_config, folder, plan.config.output_dtype)]
    if plan.vocab is not None:  # the built tokenizer; generation_config.json still the reference's
        files += save_tokenizer(plan.vocab.tokenizer, folder, plan.chat_template)
        files += copy_tokenizer_files(
            plan.reference.path, folder, plan.reference.allowed, ("generation_config.json",)
        )
    else:
        files += copy_tokenizer_files(plan.reference.path, folder, plan.reference.allowed)
        if plan.chat_template is not None:  # re-saved with the template, as mergekit does
            from .vocab import load_tokenizer

            tokenizer = load_tokenizer(folder, f"the tokenizer of {plan.reference.ref.raw!r}")
            files = list(dict.fromkeys(files + save_tokenizer(tokenizer, folder, plan.chat_template)))
    (folder / "README.md").write_text(render_model_card(plan, coeffs, evaluation), encoding="utf-8")
    (folder / "merge_config.yaml").write_text(plan.config.to_yaml(), encoding="utf-8")
    files += ["README.md", "merge_config.yaml"]
    if coeffs is not None:
        text = json.dumps(coeffs.to_json(), indent=2) + "\n"
        (folder / "coefficients.json").write_text(text, encoding="utf-8")
        files.append("coefficients.json")
    if evaluation is not None:
        text = json.dumps(evaluation, indent=2) + "\n"
        (folder / "evaluation.json").write_text(text, encoding="utf-8")
        files.append("evaluation.json")
    return files


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


@contextlib.contextmanager
def _into(out: Path) -> Iterator[Path]:
    """The caller's own staging folder, written in place (``run_merge(staged=False)``)."""
    out.mkdir(parents=True, exist_ok=True)
    yield out


def run_merge(
    config: MergeConfig,
    out_dir: str | Path,
    *,
    options: EngineOptions | None = None,
    device: str | torch.device = "auto",
    progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
    force: bool = False,
    plan: MergePlan | None = None,
    devices: int = 1,
    staged: bool = True,
) -> MergeResult:
    """Run a whole merge into ``out_dir`` (built aside and renamed into place only when complete).

    ``staged=False``: ``out_dir`` is already the caller's own staging folder (absent or empty; the service
    worker's hidden sibling of the destination); the files are written straight into it and the caller
    renames it into place, or removes it on failure.

    ``force`` replaces an existing non-empty ``out_dir``. ``plan``, from an earlier :func:`prepare` of the
    same config, skips resolving and validating again. ``devices`` > 1 learns the coefficients of a learned
    method with that many processes as one data-parallel job (``learned.distributed``); under ``torchrun``
    every process calls this and only rank 0 writes ``out_dir``. Raises a :class:`DivMergeError` on any
    failure, leaving nothing at ``out_dir``.
    """
    start = time.perf_counter()
    options = options or EngineOptions()
    reporter = Reporter(progress, should_stop)
    out = check_output_dir(out_dir, force)  # fail fast, before any download or optimisation
    dev = resolve_device(device)
    if plan is None:
        plan = prepare(config, options, reporter)
    elif plan.config is not config:
        raise ValueError("run_merge: the plan was prepared for another config")
    eval_sets = None
    if any(s.eval is not None for s in plan.specs):
        from .evaluation.sets import load_eval_sets

        eval_sets = load_eval_sets(plan, reporter)  # a bad label or answer fails here, before merging
    coeffs: LearnedCoefficients | None = None
    if config.method.learned:
        from .learned.distributed import torchrun_ranks

        ranks = torchrun_ranks()
        coeffs = learn(plan, dev, reporter, devices=devices)
        if ranks is not None and not ranks.is_main:  # rank 0 writes the outputs
            metrics = {"rank": ranks.rank, "wall_s": round(time.perf_counter() - start, 3)}
            return MergeResult(out, [], dict(plan.resolved), None, metrics)
    reporter.check()
    evaluation: dict[str, Any] | None = None
    with staged_output(out, force) if staged else _into(out) as tmp:
        files = write_weights(plan, tmp, dev, reporter, coeffs)
        files += write_metadata(plan, tmp, coeffs)
        if eval_sets is not None:
            from .evaluation.candidates import evaluate_output

            chosen = evaluate_output(plan, coeffs, tmp, files, eval_sets, dev, reporter)
            plan, coeffs, files, evaluation = chosen.plan, chosen.coeffs, chosen.files, chosen.evaluation
        reporter.check()
    resolved = dict(plan.resolved)
    coefficients: dict[str, Any] | None = None
    metrics: dict[str, Any] = {
        "wall_s": round(time.perf_counter() - start, 3),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "device": str(dev),
        "tensors": len(plan.tensor_names),
        "final_loss": None,
        "steps": 0,
    }
    if evaluation is not None and evaluation.get("wall_s") is not None:
        metrics["evaluate_s"] = evaluation["wall_s"]
    if coeffs is not None:
        resolved.update(coeffs.resolved_datasets)
        coefficients = {k: v for k, v in coeffs.to_json().items() if k not in ("group_of", "losses")}
        metrics["final_loss"] = coeffs.losses[-1] if coeffs.losses else None
        metrics["steps"] = len(coeffs.losses)
        metrics["placement"] = coeffs.placement
    reporter.report("done", 1, 1)
    return MergeResult(
        out_dir=out,
        files=files,
        resolved=resolved,
        coefficients=coefficients,
        metrics=metrics,
        evaluation=evaluation,
    )


def learn(plan: MergePlan, device: torch.device, reporter: Reporter, devices: int = 1) -> LearnedCoefficients:
    """A learned method's coefficients: under ``torchrun`` as one of its ranks, with ``devices`` > 1 as a
    data-parallel job of that many processes, else in this process. Refuses NaN or inf."""
    from .learned import learn_coefficients
    from .learned.distributed import learn_distributed, torchrun_ranks

    ranks = torchrun_ranks()
    if ranks is not None:
        coeffs = learn_coefficients(plan, device=device, reporter=reporter, ranks=ranks)
    elif devices > 1:
        coeffs = learn_distributed(plan, devices=devices, device=device, reporter=reporter)
    else:
        coeffs = learn_coefficients(plan, device=device, reporter=reporter)
    if any(not math.isfinite(v) for row in coeffs.values for v in row):
        raise NumericalError("the learned merge coefficients contain NaN or inf")
    return coeffs
