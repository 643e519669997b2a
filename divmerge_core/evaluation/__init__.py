"""Built-in evaluation: how much of each expert a merge keeps, on the tasks' own held-out examples.

A model's ``eval`` block (:class:`~divmerge_core.config.EvalSpec`) names its evaluation set. After the merge
the stage (:mod:`.stage`) scores the experts (once per weights and set: :mod:`.cache`), optionally the base,
and every merge candidate (the job's own and those of ``evaluation.compare``, run by :mod:`.candidates`)
with one module (:mod:`.scoring`), and writes ``evaluation.json`` (:mod:`.report`) beside the weights;
:mod:`.table` renders it as text and as the model card's ``model-index``. The CLI, the library, the
service worker and the quality benchmarks all score through this package.

Import from the submodules: this one imports nothing, so that :mod:`.table` loads without torch.
"""

EVALUATION_FILE = "evaluation.json"
