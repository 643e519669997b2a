"""The generic loop: for each (combination, method) merge with the engine, evaluate, cache a JSON.

Work is ordered combination-slot first (slot 0 of every k, then slot 1, ...), so a run cut short by its
deadline still covers every k. Finished items are cached per (method, combination) and skipped on rerun;
failed ones are retried.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from .methods import MethodSpec, Mode
from .metrics import anp


class Track(Protocol):
    """What the harness needs from a benchmark track (classification or causal LM)."""

    name: str
    base: Path
    experts: dict[str, Path]

    def data_spec(self, task: str, num_samples: int, own_labels: bool = False) -> dict[str, Any]: ...

    def evaluate(self, folder: Path, tasks: list[str]) -> dict[str, list[bool]]: ...

    def fingerprint(self) -> str: ...


def merge_config(track: Track, spec: MethodSpec, combo: tuple[str, ...], mode: Mode) -> dict[str, Any]:
    """The engine config (a dict for :func:`divmerge_core.config.parse_config`) of one merge."""
    models = []
    for t in combo:
        m: dict[str, Any] = {"model": str(track.experts[t])}
        if spec.learned:
            m["data"] = track.data_spec(t, mode.samples_for(spec), own_labels=spec.own_labels)
        models.append(m)
    cfg: dict[str, Any] = {
        "merge_method": spec.merge_method,
        "models": models,
        "parameters": dict(spec.parameters),
    }
    if spec.with_base:
        cfg["base_model"] = str(track.base)
    return cfg


def expert_accuracies(track: Track, mode: Mode, cache: Path) -> dict[str, dict[str, Any]]:
    """Each expert's accuracy (and correctness vector) on its own eval split, cached."""
    out = {}
    for t in mode.tasks:
        path = cache / "evals" / f"{track.experts[t].name}-n{mode.eval_n}-s{mode.seed}.json"
        if path.is_file():
            out[t] = json.loads(path.read_text())
            continue
        t0 = time.time()
        correct = track.evaluate(track.experts[t], [t])[t]
        rec = {
            "acc": sum(correct) / len(correct),
            "n": len(correct),
            "correct": [int(c) for c in correct],
            "eval_s": round(time.time() - t0, 1),
        }
        if hasattr(track, "eval_details"):
            rec["eval_details"] = track.eval_details()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec))
        out[t] = rec
    return out


def run_key(track: Track, mode: Mode) -> str:
    parts: list[Any] = [track.fingerprint(), mode.eval_n, mode.num_samples, mode.learned, mode.seed]
    if mode.layer_num_samples is not None:  # appended only when set: the other tracks' keys stay as they were
        parts.append(mode.layer_num_samples)
    blob = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def run_items(
    track: Track,
    mode: Mode,
    specs: list[MethodSpec],
    cache: Path,
    *,
    deadline: float | None = None,
    shard: tuple[int, int] = (0, 1),
    run_new: bool = True,
    device: str = "cpu",
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run every (combination, method) not cached yet; return all item records (cached and new).

    ``shard=(i, n)`` runs only every n-th item starting at i, so n processes can share the work (and the
    cache); ``run_new=False`` only collects cached records (to report after sharded runs).
    """
    from divmerge_core.config import parse_config
    from divmerge_core.pipeline import run_merge

    experts = expert_accuracies(track, mode, cache)
    expert_acc = {t: r["acc"] for t, r in experts.items()}
    run_dir = cache / "runs" / f"{track.name}-{run_key(track, mode)}"
    per_k = {k: mode.combos(k) for k in mode.ks}
    n_slots = max(len(c) for c in per_k.values())
    records = []
    stopped = False
    index = -1
    for slot in range(n_slots):
        for k in mode.ks:
            if slot >= len(per_k[k]):
                continue
            combo = per_k[k][slot]
            for spec in specs:
                index += 1
                path = run_dir / spec.name / ("+".join(combo) + ".json")
                if path.is_file():
                    rec = json.loads(path.read_text())
                    if rec.get("status") == "ok":
                        records.append(rec)
                        continue
                if not run_new or index % shard[1] != shard[0]:
                    continue
                if stopped or (deadline is not None and time.time() > deadline):
                    stopped = True
                    continue
                rec = run_one(
                    track, mode, spec, combo, run_dir / "tmp", expert_acc, run_merge, parse_config, device
                )
                rec["slot"] = slot
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(rec))
                if rec["status"] == "ok":
                    records.append(rec)
                    log(
                        f"k={k} {'+'.join(combo)} {spec.name}: ANP {rec['anp']:.1f} "
                        f"(merge {rec['merge_s']:.0f}s, eval {rec['eval_s']:.0f}s)"
                    )
                else:
                    log(f"k={k} {'+'.join(combo)} {spec.name}: FAILED {rec['error'].splitlines()[-1]}")
    if stopped:
        log("deadline reached: remaining items were not run")
    return records


def run_one(
    track: Track,
    mode: Mode,
    spec: MethodSpec,
    combo: tuple[str, ...],
    tmp: Path,
    expert_acc: dict[str, float],
    run_merge: Callable[..., Any],
    parse_config: Callable[[Any], Any],
    device: str = "cpu",
) -> dict[str, Any]:
    """Merge one combination with one method, evaluate it, and return the item record."""
    rec: dict[str, Any] = {"method": spec.name, "combo": list(combo), "k": len(combo), "spec": asdict(spec)}
    out = tmp / f"{spec.name}-{'+'.join(combo)}"
    shutil.rmtree(out, ignore_errors=True)
    try:
        t0 = time.time()
        losses: list[float] = []
        stage_s: dict[str, float] = {}

        def progress(ev: Any) -> None:  # profile: first time each stage is reported, and the loss curve
            stage_s.setdefault(ev.stage, round(time.time() - t0, 2))
            if ev.stage == "optimise" and ev.loss is not None:
                losses.append(float(ev.loss))

        config = parse_config(merge_config(track, spec, combo, mode))
        with PeakRss() as rss:
            result = run_merge(config, out, device=device, progress=progress)
        rec["merge_peak_rss_mb"], rec["rss_before_mb"] = rss.peak_mb, rss.before_mb
        rec["losses"], rec["stage_s"] = losses, stage_s
        rec["merge_s"] = round(time.time() - t0, 2)
        t1 = time.time()
        correct = track.evaluate(out, list(combo))
        rec["eval_s"] = round(time.time() - t1, 2)
        rec["acc"] = {t: sum(c) / len(c) for t, c in correct.items()}
        rec["correct"] = {t: [int(x) for x in c] for t, c in correct.items()}
        if hasattr(track, "eval_details"):  # e.g. the llm track's share of unparseable answers
            rec["eval_details"] = track.eval_details()
        rec["anp"] = anp(rec["acc"], expert_acc)
        rec["coefficients"] = result.coefficients
        rec["engine_metrics"] = _jsonable(result.metrics)
        rec["status"] = "ok"
    except Exception as err:  # noqa: BLE001 - one failed merge must not stop the table
        rec["status"] = "failed"
        rec["error"] = f"{type(err).__name__}: {err}\n" + traceback.format_exc(limit=3)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return rec


class PeakRss:
    """The process's peak resident memory while the block runs (sampled every 50 ms by a thread: the merge
    runs in this process, so ``ru_maxrss`` would be the peak of the whole benchmark), in MiB."""

    def __init__(self, every_s: float = 0.05):
        import psutil

        self._proc, self._every = psutil.Process(), every_s
        self.before_mb = self.peak_mb = 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self._every):
            self.peak_mb = max(self.peak_mb, self._proc.memory_info().rss / 2**20)

    def __enter__(self) -> PeakRss:
        self.before_mb = self.peak_mb = self._proc.memory_info().rss / 2**20
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = round(max(self.peak_mb, self._proc.memory_info().rss / 2**20), 1)
        self.before_mb = round(self.before_mb, 1)


def _jsonable(obj: Any) -> Any:
    try:
        json.dumps(obj)
        return obj
    except TypeError:
        if isinstance(obj, dict):
            return {str(k): _jsonable(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return [_jsonable(v) for v in obj]
        return repr(obj)
