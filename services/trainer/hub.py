"""Optional push of each part's adapter to the Hugging Face Hub, off the training path.

Only the published version's files (``adapter_model.safetensors``, ``adapter_config.json`` and
the model card ``README.md``) go up — never the base model, never checkpoints — each part to
its own branch (``part-03``) of the job's repo, and then to ``main``, so the repo's front page
shows the newest part. ``main`` never goes back: a push of an older part of the same job than
the one ``main``'s card names (a retry that finished late) leaves it alone. Pushes run one at
a time in a background thread with retries; a push that keeps failing is logged and dropped:
it never blocks, slows or fails training. The endpoint is ``HF_ENDPOINT`` (what
huggingface_hub reads), so a test can run its own.
"""

from __future__ import annotations

import queue
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from novelcrafter.adapters import ADAPTER_FILES, CARD
from novelcrafter.config import get_settings
from novelcrafter.logs import get_logger, kv
from novelcrafter.retry import hub_push_backoff

log = get_logger(__name__)


def branch_for(part: int) -> str:
    return f"part-{part:02d}"


@dataclass
class PushTask:
    repo_id: str
    part: int
    folder: Path  # owned by the pusher: deleted after the push (or after giving up)
    message: str
    attempts: int = 0


@dataclass
class PushOutcome:
    repo_id: str
    branch: str
    ok: bool
    attempts: int
    error: str = ""


@dataclass
class HubPusher:
    token: str
    endpoint: str | None = None
    retries: int = 4
    backoff_seconds: float = 2.0
    outcomes: list[PushOutcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.endpoint = self.endpoint or get_settings().hf_endpoint or None
        self._queue: queue.Queue[PushTask | None] = queue.Queue()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hub-push", daemon=True)
        self._thread.start()

    def push(self, repo_id: str, part: int, adapter_dir: Path, message: str = "") -> None:
        """Queue a push of the version's files (copied now) to branch ``part-NN`` and ``main``;
        returns at once."""
        folder = Path(tempfile.mkdtemp(prefix="nc-hub-"))
        for name in (*ADAPTER_FILES, CARD):
            if name in ADAPTER_FILES or (Path(adapter_dir) / name).exists():
                shutil.copy2(Path(adapter_dir) / name, folder / name)
        self._queue.put(PushTask(repo_id, part, folder, message or f"NovelCrafter adapter, part {part:02d}"))

    def pending(self) -> int:
        return self._queue.unfinished_tasks

    def close(self, timeout: float = 30.0) -> None:
        """Let queued pushes finish for up to ``timeout`` seconds, then give up on the rest."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.1)
        self._closing.set()
        self._queue.put(None)
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()) + 1)
        if self._queue.unfinished_tasks:
            log.warning("hub pushes abandoned at shutdown", extra=kv(pending=self._queue.unfinished_tasks))

    # -- the background thread -------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            task = self._queue.get()
            try:
                if task is None:
                    return
                self._push_with_retries(task)
            finally:
                self._queue.task_done()

    def _push_with_retries(self, task: PushTask) -> None:
        branch = branch_for(task.part)
        error = ""
        try:
            delays = hub_push_backoff(self.backoff_seconds).delays()
            for attempt in range(1, self.retries + 1):
                task.attempts = attempt
                try:
                    self._push_once(task, branch)
                    self.outcomes.append(PushOutcome(task.repo_id, branch, True, attempt))
                    log.info("adapter pushed to the Hub", extra=kv(repo=task.repo_id, branch=branch))
                    return
                except Exception as exc:  # any failure of the Hub is logged, never raised
                    error = f"{type(exc).__name__}: {exc}"[:500]
                    log.warning(
                        "hub push failed",
                        extra=kv(repo=task.repo_id, branch=branch, attempt=attempt, error=error),
                    )
                if attempt < self.retries and self._closing.wait(next(delays)):
                    break
            self.outcomes.append(PushOutcome(task.repo_id, branch, False, task.attempts, error))
            log.error("hub push given up", extra=kv(repo=task.repo_id, branch=branch, error=error))
        finally:
            shutil.rmtree(task.folder, ignore_errors=True)

    def _push_once(self, task: PushTask, branch: str) -> None:
        from huggingface_hub import CommitOperationAdd, HfApi

        api = HfApi(endpoint=self.endpoint, token=self.token)
        api.create_repo(task.repo_id, private=True, exist_ok=True)
        api.create_branch(task.repo_id, branch=branch, exist_ok=True)

        def files() -> list[CommitOperationAdd]:  # one list per commit: an operation is single-use
            return [CommitOperationAdd(p.name, str(p)) for p in sorted(task.folder.iterdir())]

        api.create_commit(task.repo_id, operations=files(), commit_message=task.message, revision=branch)
        if self._newer_on_main(api, task):
            log.info("main keeps a newer part", extra=kv(repo=task.repo_id, branch=branch))
            return
        api.create_commit(
            task.repo_id, operations=files(), commit_message=f"{task.message} (latest)", revision="main"
        )

    @staticmethod
    def _newer_on_main(api: Any, task: PushTask) -> bool:
        """True when ``main``'s card names a later part of the same job than this push's card."""
        from huggingface_hub import ModelCard

        from novelcrafter.modelcard import card_version

        card = task.folder / CARD
        ours = card_version(ModelCard(card.read_text(encoding="utf-8")).data) if card.exists() else {}
        if not ours:
            return False
        theirs = card_version(api.model_info(task.repo_id, revision="main").card_data)
        return theirs.get("job_id") == ours.get("job_id") and int(theirs.get("part", -1)) > task.part
