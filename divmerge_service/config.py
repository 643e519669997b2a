"""Service settings: every knob is an environment variable with the ``DIVMERGE_`` prefix.

With no configuration the service runs embedded (SQLite in ``DIVMERGE_HOME`` and a worker process polling
it). Setting ``DIVMERGE_DATABASE_URL`` (PostgreSQL) and ``DIVMERGE_BROKER_URL`` (Redis) selects the
production topology: API replicas, Celery workers, Postgres as the source of truth.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from divmerge_core.io.paths import real_roots
from divmerge_core.methods import registry
from divmerge_core.options import EngineOptions


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DIVMERGE_", extra="ignore", env_ignore_empty=True)

    # --- where things live
    home: Path = Field(Path("~/.divmerge"), description="embedded DB, local outputs and temp files")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default sqlite:///$DIVMERGE_HOME/divmerge.db (embedded)"
    )
    broker_url: str | None = Field(None, description="Celery broker (redis://...); unset = embedded worker")
    local_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="os.pathsep-separated directories specs may name; DIVMERGE_HOME is always included",
    )

    # --- engine
    allow_pickle: bool = Field(False, description="allow pickle .bin checkpoints (weights_only load)")
    hf_token: SecretStr | None = Field(None, description="Hub read token for downloads")
    hub_token: SecretStr | None = Field(None, description="deployment-wide Hub write token for uploads")
    team_hub_tokens: dict[str, SecretStr] = Field(
        default_factory=dict, description='per-team Hub write tokens, JSON: {"team": "hf_..."}'
    )
    hf_cache_dir: Path | None = Field(None, description="HF cache for workers (default: HF_HOME's)")
    device: str = Field("auto", description="worker device: auto (cuda if present), cpu, cuda, cuda:N")
    teacher_cache_dir: Path | None = Field(
        None,
        description="learned merges' teacher-output cache, shared by the jobs of a worker ($DIVMERGE_HOME/cache/teachers)",
    )
    teacher_cache_bytes: int | None = Field(
        None, ge=0, description="teacher cache bound, LRU-evicted (default: the engine's, 16 GiB)"
    )
    devices_per_job: int = Field(
        1,
        ge=1,
        description="learned merges: processes (GPUs with a cuda device) one job runs on, data-parallel",
    )
    hub_uploader: str = Field(
        "divmerge_worker.upload:HubUploader",
        description="'module:Class' of the Hub uploader (tests swap a double)",
    )

    # --- limits (413 for the body, 422 for the rest)
    max_body_bytes: int = Field(1_000_000, description="request body limit in bytes (413)")
    max_models: int = Field(16, description="models per spec")
    max_num_samples: int = Field(5000, description="upper bound of data.num_samples per model")
    max_new_tokens: int = Field(512, description="upper bound of parameters.max_new_tokens")
    max_epochs: int = Field(100, description="upper bound of parameters.epochs")
    max_length: int = Field(8192, description="upper bound of parameters.max_length (tokens)")
    max_batch_size_per_task: int = Field(256, description="upper bound of parameters.batch_size_per_task")
    max_running_per_team: int = Field(
        0, description="most jobs of one team running at once (0: no cap); the others wait their turn"
    )
    max_job_s: float = Field(
        24 * 3600.0, description="a job still running after this many seconds fails with code 'timeout'"
    )
    max_inline_texts: int = Field(5000, description="inline data.texts, all models together")
    max_inline_text_bytes: int = Field(500_000, description="inline text bytes, all models together (413)")
    list_limit_max: int = Field(100, description="largest limit of GET /v1/merges")

    # --- jobs, leases, queues
    max_attempts: int = Field(3, description="runs per job (worker loss and transient errors count)")
    lease_s: float = Field(60.0, description="a running job's lease; renewed every heartbeat_s")
    heartbeat_s: float = Field(10.0, description="lease renewal and cancel poll interval")
    progress_interval_s: float = Field(2.0, description="minimum seconds between progress writes")
    retry_backoff_s: float = Field(10.0, description="first retry delay for transient errors (doubles)")
    delivery_attempts: int = Field(5, ge=1, description="tries to deliver a finished merge (Hub or local)")
    delivery_backoff_s: float = Field(
        5.0, description="first wait between delivery tries (doubles, at most delivery_backoff_max_s)"
    )
    delivery_backoff_max_s: float = Field(300.0, description="longest wait between delivery tries")
    keep_result_s: float = Field(
        7 * 24 * 3600.0, description="how long a merged result whose delivery failed is kept for POST /retry"
    )
    max_stored_losses: int = Field(
        10_000, description="losses per job kept for /coefficients (first N steps)"
    )
    validate_timeout_s: float = Field(120.0, description="POST /v1/merges/validate gives up after this long")
    reconcile_interval_s: float = Field(30.0, description="how often workers look for lost jobs")
    queued_stale_s: float = Field(300.0, description="re-enqueue a job still queued after this long")
    visibility_timeout_s: int = Field(
        6 * 3600, description="Redis visibility timeout; must exceed the longest job"
    )
    db_wait_s: float = Field(
        600.0, description="a worker whose claim meets a database outage waits this long before giving back"
    )
    db_retry_max_s: float = Field(2.0, description="longest pause between retries while the database is down")
    embedded_poll_s: float = Field(1.0, description="embedded worker's DB poll interval")
    gpu_queue: str = Field("gpu", description="queue of the GPU workers (learned methods)")
    cpu_queue: str = Field("cpu", description="queue of the CPU workers (classic methods)")
    cpu_methods: Annotated[list[str], NoDecode] = Field(
        default_factory=registry.cpu_methods,
        description="methods routed to the cpu queue (comma-separated); the rest go to the gpu queue "
        "(default: each method's own queue, from divmerge_core.methods.registry)",
    )
    step_delay_s: float = Field(0.0, description="testing only: sleep this long at each progress event")

    # --- scheduling by capability (docs/service.md#scheduling-by-capability)
    dispatch: Literal["method", "capability"] = Field(
        "method",
        description="learned jobs' queue: method (the gpu queue) or capability (the queue of the smallest "
        "live worker class their memory estimate fits; 422 insufficient_memory when none does)",
    )
    worker_devices: str | None = Field(
        None,
        description="a worker's devices instead of detecting them: 'cuda:80GiB,cuda:80GiB' (total[/free] "
        "each) or JSON [{kind, total, free}]",
    )
    worker_host_memory: str | None = Field(
        None, description="a worker's host memory instead of /proc/meminfo: '256GiB' (total[/available])"
    )
    worker_heartbeat_s: float = Field(
        15.0, gt=0, description="how often a worker reports its devices and memory (the workers table)"
    )
    worker_stale_s: float = Field(
        60.0,
        gt=0,
        description="a worker not heard from for this long is not live (dispatch, GET /v1/workers)",
    )
    max_devices_per_job: int = Field(8, ge=1, description="upper bound of a job's devices_per_job")
    max_placement_requeues: int = Field(
        20,
        ge=0,
        description="a job its workers gave back this many times (it did not fit them) fails with "
        "insufficient_memory",
    )

    # --- webhooks (docs/service.md#webhooks)
    webhook_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="hosts (exact host or host:port, comma-separated) webhooks may be sent to; "
        "unset: every notify is refused",
    )
    webhook_secret_key: SecretStr | None = Field(
        None,
        description="encrypts the teams' webhook secrets at rest (Fernet, key derived from it with HKDF-SHA256); unset: they are stored as is",
    )
    webhook_timeout_s: float = Field(
        5.0, gt=0, description="a webhook POST's connect, write and read timeouts (each)"
    )
    webhook_attempts: int = Field(8, ge=1, description="tries per webhook delivery before it is given up")
    webhook_backoff_s: float = Field(
        10.0,
        description="first wait between webhook tries (doubles, jittered, at most webhook_backoff_max_s)",
    )
    webhook_backoff_max_s: float = Field(3600.0, description="longest wait between webhook tries")
    webhook_poll_s: float = Field(2.0, description="how often a worker looks for due webhook deliveries")
    webhook_concurrency: int = Field(4, ge=1, description="webhook POSTs one worker process sends at once")

    @field_validator("local_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [Path(p) for p in value.split(os.pathsep) if p.strip()]
        return value

    @field_validator("webhook_allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [h.strip().lower() for h in value.split(",") if h.strip()]
        return value

    @field_validator("cpu_methods", mode="before")
    @classmethod
    def _split_methods(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [m.strip() for m in value.split(",") if m.strip()]
        return value

    @field_validator("home", mode="after")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return Path(os.path.expanduser(value)).absolute()

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'divmerge.db'}"

    @property
    def embedded(self) -> bool:
        """No broker configured: jobs are picked up by the embedded worker polling the database."""
        return not self.broker_url

    @property
    def roots(self) -> tuple[Path, ...]:
        """Allow-listed local roots, real paths, DIVMERGE_HOME included."""
        return real_roots([self.home, *self.local_roots]) or ()

    @property
    def teacher_cache(self) -> Path:
        return self.teacher_cache_dir or self.home / "cache" / "teachers"

    def engine_options(self) -> EngineOptions:
        """The options the engine runs with on this deployment: the workers' merges and the API's dry runs
        (built here only, so that the two cannot drift)."""
        return EngineOptions(
            allow_pickle=self.allow_pickle,
            local_roots=self.roots,
            hf_token=self.hf_token.get_secret_value() if self.hf_token else None,
            cache_dir=self.hf_cache_dir,
            teacher_cache_dir=self.teacher_cache,
            teacher_cache_bytes=self.teacher_cache_bytes,
        )

    def hub_write_token(self, team: str) -> str | None:
        tok = self.team_hub_tokens.get(team) or self.hub_token
        return tok.get_secret_value() if tok is not None else None

    def queue_for(self, *methods: str, evaluates: bool = False) -> str:
        """The cpu queue when every method the job runs is a cpu method and it evaluates nothing (the
        evaluation runs the models, as the learned methods do); else the gpu queue."""
        cpu = not evaluates and all(m in self.cpu_methods for m in methods)
        return self.cpu_queue if cpu else self.gpu_queue


@lru_cache
def get_settings() -> Settings:
    return Settings()


def settings_table() -> str:
    """The settings as a markdown table (environment variable, default, meaning), for docs/service.md."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        if field.default_factory is not None:
            default = field.default_factory()
            default = ",".join(map(str, default)) if isinstance(default, list) else (default or "")
        else:
            default = "" if field.default is None else field.default
        rows.append(
            f"| `DIVMERGE_{name.upper()}` | `{default}` | {field.description or ''} |".replace("``", "unset")
        )
    return "\n".join(rows)


if __name__ == "__main__":  # python -m divmerge_service.config: print the settings table
    print(settings_table())
