"""The output directory: built in a temporary sibling, renamed into place only when complete.

On any error, cancellation or interrupt the temporary directory is removed, so a reader never sees a
half-written model at the output path.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import OutputExistsError
from .paths import check_file

#: Tokenizer and generation files copied from the reference (base) model.
TOKENIZER_PATTERNS = (
    "tokenizer*.json",
    "tokenizer*.model",
    "*.model",
    "vocab*",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
)


def check_output_dir(out_dir: str | Path, force: bool = False) -> Path:
    """Refuse an existing file, or an existing non-empty directory unless ``force``. Returns the path."""
    out = Path(out_dir).expanduser().absolute()
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise OutputExistsError(f"output path {str(out)!r} exists and is not a directory")
        if any(out.iterdir()) and not force:
            raise OutputExistsError(
                f"output directory {str(out)!r} exists and is not empty (use --force to replace it)"
            )
    return out


@contextlib.contextmanager
def staged_output(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``out`` (a path :func:`check_output_dir` returned); on
    success it replaces ``out``.

    ``out`` is checked again just before the rename only (someone may have written there meanwhile). The
    rename is atomic when ``out`` does not exist (or is empty). With ``force``, the old contents are moved
    aside first and deleted only after the new directory is in place.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.divmerge-tmp-", dir=out.parent))
    try:
        yield tmp
        out = check_output_dir(out, force)  # someone may have written there meanwhile
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.divmerge-old-", dir=out.parent))
            os.rename(out, old / "old")
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.chmod(out, 0o755 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def copy_tokenizer_files(
    src: Path,
    dst: Path,
    allowed: Sequence[Path] | None = None,
    patterns: Sequence[str] = TOKENIZER_PATTERNS,
) -> list[str]:
    """Copy the reference model's tokenizer and generation files; each must resolve under ``allowed``
    (checked again at copy time: the folder may have changed since it was resolved)."""
    copied: list[str] = []
    for pattern in patterns:
        for path in sorted(src.glob(pattern)):
            if path.is_file() and path.name not in copied:
                real = check_file(path, allowed, "tokenizer file")
                shutil.copyfile(real, dst / path.name)
                copied.append(path.name)
    return copied


def save_tokenizer(tokenizer: Any, dst: Path, chat_template: str | None = None) -> list[str]:
    """Save a transformers tokenizer into ``dst`` (with ``chat_template`` when given); the files written."""
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    written = tokenizer.save_pretrained(str(dst))
    return [Path(p).name for p in written if Path(p).is_file()]


def write_model_config(config: dict[str, Any], dst: Path, out_dtype: str) -> str:
    """Write ``config.json`` with the output dtype (``dtype`` for transformers >= 4.56, ``torch_dtype`` before)."""
    config = dict(config)
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype", "torch_dtype"]
    for key in keys:
        config[key] = out_dtype
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return "config.json"
