"""The job record and its states: plain, serialisable data with no behaviour of its own.

Where a job lives, its event log and who is told about new events belong to the store
(``aiotranscribe.store``); the service decides what happens to a job next.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

PENDING, PROCESSING, COMPLETED, FAILED, CANCELLED = (
    "pending",
    "processing",
    "completed",
    "failed",
    "cancelled",
)
TERMINAL = frozenset({COMPLETED, FAILED, CANCELLED})
# A webhook's delivery states: still to be delivered (also while the job runs), delivered
# (a 2xx), failed (given up: a non-retryable answer, a refused URL or the retry window).
WEBHOOK_PENDING, WEBHOOK_DELIVERED, WEBHOOK_FAILED = "pending", "delivered", "failed"


def utcnow_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Job:
    id: str
    filename: str
    model: str
    kind: str = ""
    """The upload's sniffed container (``wav``, ``mp3``...): conversion needs it again after
    a restart."""
    language: str | None = None
    include_timestamps: bool = True
    task: str = "transcribe"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Decoding options the model gets (language, task, target_language, punctuation):
    empty for models that take no prompt."""
    upload_bytes: int = 0
    created_at: str = dataclasses.field(default_factory=utcnow_iso)
    status: str = PENDING
    stage: str = "queued"
    completed_at: str | None = None
    finished_at: float | None = None
    """Wall-clock time (Unix seconds) the job ended; retention counts from it."""
    error: str | None = None
    error_code: str | None = None
    error_status: int = 500
    result: dict[str, Any] | None = None
    progress: float = 0.0
    duration_s: float | None = None
    """Audio length once converted."""
    slices_emitted: int = 0
    """Slices whose segments have been published, in file order."""
    segments_emitted: int = 0
    cancel_requested: bool = False
    cancel_reason: str | None = None
    last_seq: int = 0
    """Seq of the job's newest event (kept by the store)."""
    tenant: str | None = None
    """The API key's tenant that submitted it (None without keys): only it may see the job."""
    callback_url: str | None = None
    """Where the job's end is POSTed (``webhooks``); None: nowhere."""
    webhook: dict[str, Any] | None = None
    """The delivery state to ``callback_url`` (``webhooks.new_delivery``), shown in the job's
    status; it still changes after the job has ended."""

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def webhook_pending(self) -> bool:
        return self.webhook is not None and self.webhook.get("state") == WEBHOOK_PENDING

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def info(self) -> dict[str, Any]:
        """The seed clients' ``JobInfo``."""
        return {
            "job_id": self.id,
            "status": self.status,
            "filename": self.filename,
            "created_at": self.created_at,
            "completed_at": self.completed_at,
            "error": self.error,
            "result": self.result,
            "stage": self.stage,
            "progress": round(self.progress, 4),
            "model": self.model,
            "webhook": dict(self.webhook) if self.webhook is not None else None,
        }
