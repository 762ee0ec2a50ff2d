"""Object-store layout and identifiers: the one place that knows where things live.

Every key a client can influence is built from validated identifiers, so nothing
a client sends can address a key outside its place in the store.
"""

from __future__ import annotations

import hashlib
import re
import uuid

from novelcrafter.errors import InvalidArgument

BOOK_ID_RE = re.compile(r"^[0-9a-f]{16}$")
JOB_ID_RE = re.compile(r"^j-[0-9a-f]{12}$")
VERSION_RE = re.compile(r"^j-[0-9a-f]{12}-p[0-9]{2,4}$")
PART_ALIAS_RE = re.compile(r"^part-([0-9]{1,4})$")
MAX_PARTS = 1000
# A book's title and upload file name, as IngestBook accepts them (the console cuts to these).
MAX_TITLE_CHARS = 500
MAX_FILENAME_BYTES = 255  # UTF-8, as most file systems limit a name


def book_id_for(pdf_bytes: bytes) -> str:
    """The book id: the first 16 hex digits of the PDF's SHA-256 (same PDF, same book)."""
    return hashlib.sha256(pdf_bytes).hexdigest()[:16]


def new_job_id() -> str:
    return f"j-{uuid.uuid4().hex[:12]}"


def adapter_version_id(job_id: str, part: int) -> str:
    """Immutable adapter version id: (job, part). The book is the folder it lives in."""
    check_job_id(job_id)
    check_part(part)
    return f"{job_id}-p{part:02d}"


def parse_version(version: str) -> tuple[str, int]:
    check_version(version)
    job, _, part = version.rpartition("-p")
    return job, int(part)


def _check(value: str, pattern: re.Pattern[str], what: str, example: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):  # fullmatch: "$" passes a final "\n"
        shown = repr(value)[:80]
        raise InvalidArgument(f"invalid {what} {shown}: expected something like {example!r}")
    return value


def check_book_id(book_id: str) -> str:
    return _check(book_id, BOOK_ID_RE, "book id", "3f2a9c1d0b7e4a65")


def check_job_id(job_id: str) -> str:
    return _check(job_id, JOB_ID_RE, "job id", "j-0123456789ab")


def check_version(version: str) -> str:
    return _check(version, VERSION_RE, "adapter version", "j-0123456789ab-p03")


def check_part(part: int) -> int:
    if not isinstance(part, int) or part < 0 or part >= MAX_PARTS:
        raise InvalidArgument(f"invalid part index {part!r}: expected 0..{MAX_PARTS - 1}")
    return part


# The top-level folders, for listings.
BOOKS = "books/"
JOBS = "jobs/"
ADAPTERS = "adapters/"

# --- books -------------------------------------------------------------------------------------


def book_prefix(book_id: str) -> str:
    return f"{BOOKS}{check_book_id(book_id)}/"


def source_key(book_id: str) -> str:
    return book_prefix(book_id) + "source.pdf"


def manifest_key(book_id: str) -> str:
    return book_prefix(book_id) + "manifest.json"


def is_manifest_key(key: str) -> bool:
    """Whether ``key`` is a book's ``books/<book>/manifest.json`` (a complete book)."""
    parts = key.split("/")
    return len(parts) == 3 and parts[0] == "books" and parts[2] == "manifest.json"


def text_key(book_id: str) -> str:
    return book_prefix(book_id) + "text.txt"


def part_train_key(book_id: str, part: int) -> str:
    return book_prefix(book_id) + f"parts/{check_part(part):02d}/train.jsonl"


def part_test_key(book_id: str, part: int) -> str:
    return book_prefix(book_id) + f"parts/{check_part(part):02d}/test.jsonl"


# --- jobs --------------------------------------------------------------------------------------


def job_prefix(job_id: str) -> str:
    return f"{JOBS}{check_job_id(job_id)}/"


def job_key(job_id: str) -> str:
    return job_prefix(job_id) + "job.json"  # job_of_job_key() reads it back


def job_events_key(job_id: str) -> str:
    return job_prefix(job_id) + "events.jsonl"


def part_prefix(job_id: str, part: int) -> str:
    return job_prefix(job_id) + f"parts/{check_part(part):02d}/"


def part_checkpoints_prefix(job_id: str, part: int) -> str:
    """The folder holding all checkpoints of a part (step folders and the last.json pointer)."""
    return part_prefix(job_id, part) + "checkpoints/"


def checkpoint_prefix(job_id: str, part: int, step: int) -> str:
    return part_prefix(job_id, part) + f"checkpoints/step-{step:07d}/"


def last_checkpoint_key(job_id: str, part: int) -> str:
    """Pointer to the last complete (verified) checkpoint of a part."""
    return part_prefix(job_id, part) + "checkpoints/last.json"


def part_metrics_key(job_id: str, part: int) -> str:
    return part_prefix(job_id, part) + "metrics.json"


def part_publish_prefix(job_id: str, part: int, epoch: int) -> str:
    """The staging folder of the worker holding the part's lease of fencing ``epoch``: it uploads
    the adapter it would publish here (files and the meta.json they will have), and the
    coordinator's CompletePart copies it into ``adapters/<book>/<version>/`` only under that
    live lease. Every lease stages in its own folder, so a late worker never touches the
    files another committed. (Epoch 0: publishing without a coordinator.)"""
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise InvalidArgument(f"invalid lease epoch {epoch!r}: expected an integer >= 0")
    return part_prefix(job_id, part) + f"publish/{epoch}/"


# --- adapters ----------------------------------------------------------------------------------


def adapters_prefix(book_id: str) -> str:
    return f"{ADAPTERS}{check_book_id(book_id)}/"


def adapter_prefix(book_id: str, version: str) -> str:
    return adapters_prefix(book_id) + check_version(version) + "/"


ADAPTER_META = "meta.json"  # written last: a version is complete once its folder has it


def adapter_meta_key(book_id: str, version: str) -> str:
    return adapter_prefix(book_id, version) + ADAPTER_META


def latest_key(book_id: str) -> str:
    """The `latest` pointer: JSON naming the newest complete version. Written last."""
    return adapters_prefix(book_id) + "latest"


def version_of_adapter_prefix(prefix: str) -> str:
    """The version of an adapter version folder ``adapters/<book_id>/<version>/``."""
    return prefix.rstrip("/").rsplit("/", 1)[-1]


def book_of_adapter_key(key: str) -> str | None:
    """The book of a key inside a book's adapters folder (``adapters/<book_id>/…``), else None."""
    parts = key.split("/")
    if len(parts) < 3 or parts[0] != "adapters" or not BOOK_ID_RE.match(parts[1]):
        return None
    return parts[1]


def version_of_meta_key(key: str) -> tuple[str, str] | None:
    """``(book_id, version)`` when ``key`` is a version's ``adapters/<book_id>/<version>/meta.json``."""
    parts = key.split("/")
    if len(parts) != 4 or parts[3] != ADAPTER_META or book_of_adapter_key(key) is None:
        return None
    return (parts[1], parts[2]) if VERSION_RE.match(parts[2]) else None


def job_of_job_key(key: str) -> str | None:
    """The job id when ``key`` is a job's ``jobs/<job_id>/job.json``, else None."""
    parts = key.split("/")
    if len(parts) != 3 or parts[0] != "jobs" or parts[2] != "job.json" or not JOB_ID_RE.match(parts[1]):
        return None
    return parts[1]


# --- base models -------------------------------------------------------------------------------

MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_model_name(name: str) -> str:
    return _check(name, MODEL_NAME_RE, "model name", "llama-3.2-1b-instruct")


def model_prefix(name: str) -> str:
    """A base model uploaded to the store (``--base-model store:<name>``): its files, flat."""
    return f"models/{check_model_name(name)}/"


MODEL_MANIFEST = "model.json"  # the store's own file in a model folder, never one of the model's


def model_manifest_key(name: str) -> str:
    """The model's file list with sizes and sha256. Written last: the model exists once it does."""
    return model_prefix(name) + MODEL_MANIFEST
