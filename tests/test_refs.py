"""Model references: parsing, allow-listed roots, and how Hub failures are classified."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from divmerge_core.errors import ModelNotFoundError, PathNotAllowedError
from divmerge_core.io.refs import parse_model_ref, resolve_model
from divmerge_core.options import EngineOptions


def test_parse_hub_and_local_refs():
    ref = parse_model_ref("org/name@v1.0")
    assert (ref.repo_id, ref.revision, ref.is_local) == ("org/name", "v1.0", False)
    assert parse_model_ref("org/name").revision is None
    assert parse_model_ref("./models/a").path == Path("models/a")
    assert parse_model_ref("file:///srv/m").path == Path("/srv/m")


def test_local_path_outside_roots_is_refused(tmp_path):
    inside, outside = tmp_path / "root" / "m", tmp_path / "elsewhere"
    inside.mkdir(parents=True)
    outside.mkdir()
    opts = EngineOptions(local_roots=(tmp_path / "root",))
    assert resolve_model(str(inside), opts).path == inside.resolve()
    with pytest.raises(PathNotAllowedError):
        resolve_model(str(outside), opts)
    with pytest.raises(PathNotAllowedError):  # '..' cannot climb out of a root
        resolve_model(str(inside) + "/../../elsewhere", opts)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "root" / "missing"), opts)


_PROBE = """
from divmerge_core.io.refs import resolve_model
from divmerge_core.options import EngineOptions
try:
    resolve_model("acme/never-cached", EngineOptions())
except Exception as err:
    print(type(err).__name__, err.transient)
"""


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "TransientError True"),  # nothing listens: retry later
        ({"HF_HUB_OFFLINE": "1"}, "ModelNotFoundError False"),  # offline and not cached: final
    ],
)
def test_uncached_hub_model_is_transient_unless_offline(tmp_path, env, expected):
    full_env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT")}
    full_env.update(HF_HOME=str(tmp_path), **env)
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=full_env, capture_output=True, text=True, timeout=120
    )
    assert out.stdout.strip() == expected, out.stderr


def test_the_api_and_the_engine_agree_on_what_is_local(tmp_path, monkeypatch):
    """A bare name that is a folder of the current directory is local for the engine (as in mergekit), so
    the API's submit checks apply the allow-list to it (it used to pass as a Hub id and fail in the job)."""
    from divmerge_api import spec
    from divmerge_api.errors import ApiError
    from divmerge_core.config import parse_config
    from divmerge_service.config import Settings

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-expert").mkdir()
    config = parse_config(
        {"merge_method": "task_arithmetic", "base_model": "org/base", "models": [{"model": "my-expert"}]}
    )
    assert parse_model_ref("my-expert").is_local and not parse_model_ref("org/base").is_local
    with pytest.raises(ApiError) as err:
        spec.check_paths(config, Settings(home=tmp_path / "home", local_roots=[tmp_path]))
    assert (err.value.status, err.value.code, err.value.field) == (422, "path_not_allowed", "models.0.model")
