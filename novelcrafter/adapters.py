"""Published adapters in the store: the contract between trainers and inference.

A version is immutable and lives under ``adapters/<book_id>/<version>/``::

    adapter_model.safetensors   PEFT LoRA weights
    adapter_config.json         PEFT config (rank, target modules; base_model_name_or_path is
                                the base model's canonical id, never a local path)
    README.md                   the model card (see novelcrafter.modelcard); versions
                                published before cards existed have none
    meta.json                   written LAST: marks the version complete; sizes and
                                sha256 of the files above, job, part, base model, metrics

``adapters/<book_id>/latest`` is a JSON pointer ``{"version": …}`` written after
``meta.json``, so a reader that follows ``latest`` always finds a complete version.

This module is the one reader and writer of ``meta.json`` and ``latest`` (keys from
:mod:`novelcrafter.layout`): :func:`read_meta` and :func:`latest_version` for clients, which
want domain errors; :func:`load_meta` and :func:`load_latest` for the inference registry,
which tells an unusable object (rejected, logged) from a missing one.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from novelcrafter import layout
from novelcrafter.errors import FailedPrecondition, NotFound, StoreError
from novelcrafter.store import Store, file_sha256
from novelcrafter.v1 import common_pb2

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
CARD = "README.md"
VERSION_FILES = (*ADAPTER_FILES, CARD)  # what a version publishes besides meta.json
META = layout.ADAPTER_META


@dataclass
class AdapterMeta:
    book_id: str
    version: str
    job_id: str
    part: int
    base_model: str
    published_at: float = 0.0
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {size, sha256}
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return layout.adapter_prefix(self.book_id, self.version)

    def to_proto(self) -> common_pb2.AdapterVersion:
        """The version as the gRPC API names it (responses, job parts)."""
        return common_pb2.AdapterVersion(
            book_id=self.book_id,
            version=self.version,
            job_id=self.job_id,
            part=self.part,
            key=self.prefix,
            published_at=self.published_at,
        )


def publish_adapter(
    store: Store,
    local_dir: Path,
    *,
    book_id: str,
    job_id: str,
    part: int,
    base_model: str,
    metrics: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    started_from: str = "",
    move_latest: bool = True,
) -> AdapterMeta:
    """Upload a saved PEFT adapter directory as an immutable version, then move ``latest``.

    ``local_dir`` is completed first, so that it then holds exactly the published files: its
    ``adapter_config.json`` gets the canonical base model id and a model card (``README.md``,
    from the metrics, the book's manifest and the training ``settings``) replaces whatever
    was there. Idempotent for a retried publish of the same (job, part): the files are simply
    rewritten before ``meta.json``; nobody reads a version before its meta exists.
    """
    local_dir = Path(local_dir)
    version = layout.adapter_version_id(job_id, part)
    meta = AdapterMeta(book_id, version, job_id, part, base_model, metrics=dict(metrics or {}))
    for name in ADAPTER_FILES:
        if not (local_dir / name).exists():
            raise FailedPrecondition(f"adapter directory {local_dir} lacks {name}")
    config = canonicalize_config(local_dir, base_model)
    write_card(local_dir, meta, config, read_manifest(store, book_id), settings, started_from)
    for name in VERSION_FILES:
        path = local_dir / name
        meta.files[name] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
        store.put_file(meta.prefix + name, path)
    meta.published_at = time.time()
    store.put_json(layout.adapter_meta_key(book_id, version), asdict(meta))
    if move_latest:
        store.put_json(layout.latest_key(book_id), {"version": version, "published_at": meta.published_at})
    return meta


def canonicalize_config(adapter_dir: Path, base_model: str) -> dict[str, Any]:
    """Point ``adapter_config.json`` at the base model's canonical id (PEFT writes the local
    directory the trainer loaded); returns the config. Only that one field changes."""
    from novelcrafter.modelcard import canonical_base_model

    path = Path(adapter_dir) / "adapter_config.json"
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise FailedPrecondition(f"{path} is not valid JSON: {exc}")
    if not isinstance(config, dict):
        raise FailedPrecondition(f"{path} is not a JSON object")
    canonical = canonical_base_model(base_model or str(config.get("base_model_name_or_path") or ""))
    if canonical and config.get("base_model_name_or_path") != canonical:
        config["base_model_name_or_path"] = canonical
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


def read_manifest(store: Store, book_id: str) -> dict[str, Any] | None:
    """The book's ingest manifest, or None when the store has none (the card then says so)."""
    try:
        manifest = store.get_json(layout.manifest_key(book_id))
    except (NotFound, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def write_card(
    adapter_dir: Path,
    meta: AdapterMeta,
    config: dict[str, Any],
    manifest: dict[str, Any] | None,
    settings: dict[str, Any] | None = None,
    started_from: str = "",
) -> Path:
    from novelcrafter.modelcard import build_card

    card = build_card(meta, config, manifest=manifest, settings=settings, started_from=started_from)
    path = Path(adapter_dir) / CARD
    path.write_text(str(card), encoding="utf-8")
    return path


def load_meta(store: Store, book_id: str, version: str) -> AdapterMeta:
    """A version's ``meta.json`` as stored: :class:`NotFound` when it has none (absent or not
    complete yet), ``ValueError`` (not JSON) or ``TypeError`` (not a meta) when it is unusable."""
    return AdapterMeta(**json.loads(store.get(layout.adapter_meta_key(book_id, version))))


def read_meta(store: Store, book_id: str, version: str) -> AdapterMeta:
    """A complete version's meta: :class:`NotFound` naming the version when there is none,
    :class:`StoreError` when its JSON is corrupt."""
    try:
        return load_meta(store, book_id, version)
    except NotFound:
        raise NotFound(f"adapter version {version} of book {book_id} not found")
    except ValueError as exc:
        raise StoreError(f"corrupt JSON object {layout.adapter_meta_key(book_id, version)}: {exc}") from exc


def meta_at(store: Store, prefix: str) -> AdapterMeta | None:
    """The meta of the version folder at store ``prefix`` (a job's starting adapter), or None
    when the folder has no ``meta.json``."""
    try:
        data = store.get_json(prefix + META)
    except NotFound:
        return None
    return AdapterMeta(**data)


def load_latest(store: Store, book_id: str) -> str | None:
    """The version ``latest`` names as stored: None when there is no pointer; ``ValueError``
    (not a JSON object) or :class:`~novelcrafter.errors.InvalidArgument` (no valid version)
    when it is unusable."""
    try:
        data = json.loads(store.get(layout.latest_key(book_id)))
    except NotFound:
        return None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return layout.check_version(str(data.get("version", "")))


def latest_version(store: Store, book_id: str) -> str | None:
    """The version ``latest`` points to, or None when nothing is published; :class:`StoreError`
    when the pointer is corrupt."""
    try:
        return load_latest(store, book_id)
    except ValueError as exc:
        raise StoreError(f"corrupt JSON object {layout.latest_key(book_id)}: {exc}") from exc


def list_versions(store: Store, book_id: str) -> list[AdapterMeta]:
    """Complete versions of a book (those with meta.json), oldest first."""
    metas = []
    for key in store.list(layout.adapters_prefix(book_id)):
        found = layout.version_of_meta_key(key)
        if found is not None:
            try:
                metas.append(read_meta(store, *found))
            except (NotFound, TypeError, ValueError):
                continue
    return sorted(metas, key=lambda m: (m.published_at, m.version))


def download_adapter(store: Store, meta: AdapterMeta, dest: Path, *, verify: bool = True) -> Path:
    """Fetch a version's files into ``dest``, checking sizes and sha256 against meta.json.

    The model card comes too when the version has one (older versions have none)."""
    dest.mkdir(parents=True, exist_ok=True)
    names = [*ADAPTER_FILES, *(n for n in VERSION_FILES if n in meta.files and n not in ADAPTER_FILES)]
    for name in names:
        path = store.download(meta.prefix + name, dest / name)
        if verify:
            expected = meta.files.get(name, {})
            if expected and (
                path.stat().st_size != expected.get("size") or file_sha256(path) != expected.get("sha256")
            ):
                raise FailedPrecondition(
                    f"adapter {meta.version}: {name} does not match its published checksum"
                )
    json.loads((dest / "adapter_config.json").read_text())  # must parse
    return dest
