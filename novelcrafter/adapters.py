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

Publishing has two halves. :func:`stage_adapter` uploads the files and the meta.json they will
have into a staging folder; :func:`commit_adapter` checks them against it, copies them into
the version's folder (inside the store), writes ``meta.json`` and moves ``latest``. A trainer
only stages, into its lease's folder (``jobs/<job>/parts/<NN>/publish/<epoch>/``); the
coordinator commits in CompletePart, in the same transaction that checks the lease is still
live and the job not cancelled, so a worker whose lease expired or whose job was cancelled
can never publish, and never touch the files of the version another worker committed.
:func:`publish_adapter` does both in one, for callers that have no coordinator.

This module is the one reader and writer of ``meta.json`` and ``latest`` (keys from
:mod:`novelcrafter.layout`): :func:`read_meta` and :func:`latest_version` for clients, which
want domain errors; :func:`load_meta` and :func:`load_latest` for the inference registry,
which tells an unusable object (rejected, logged) from a missing one.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from novelcrafter import layout
from novelcrafter.errors import FailedPrecondition, InvalidArgument, NotFound, StoreError
from novelcrafter.store import Store, file_sha256, validate_key
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


def stage_adapter(
    store: Store,
    local_dir: Path,
    staged_prefix: str,
    *,
    book_id: str,
    job_id: str,
    part: int,
    base_model: str,
    metrics: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    started_from: str = "",
) -> AdapterMeta:
    """Upload a saved PEFT adapter directory to ``staged_prefix``, the first half of publishing:
    the version's files and, last, the ``meta.json`` the version will have (``published_at``
    0 until committed). Nothing is visible to readers of ``adapters/``: :func:`commit_adapter`
    publishes it. A trainer stages into its lease's folder
    (:func:`~novelcrafter.layout.part_publish_prefix`) and its CompletePart commits.

    ``local_dir`` is completed first, so that it then holds exactly the published files: its
    ``adapter_config.json`` gets the canonical base model id and a model card (``README.md``,
    from the metrics, the book's manifest and the training ``settings``) replaces whatever
    was there. Staging again into the same folder simply rewrites it.
    """
    local_dir = Path(local_dir)
    _check_staged_prefix(staged_prefix)
    layout.check_book_id(book_id)
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
        store.put_file(staged_prefix + name, path)
    store.put_json(staged_prefix + META, asdict(meta))
    return meta


def read_staged(store: Store, staged_prefix: str) -> AdapterMeta:
    """The meta staged at ``staged_prefix``: :class:`FailedPrecondition` when nothing complete is
    staged there or the meta is not one (unknown fields, a file list that is not a version's)."""
    _check_staged_prefix(staged_prefix)
    try:
        data = json.loads(store.get(staged_prefix + META))
        meta = AdapterMeta(**data)
    except NotFound:
        raise FailedPrecondition(f"no adapter staged at {staged_prefix} (no {META}): stage it, then complete")
    except (TypeError, ValueError) as exc:
        raise FailedPrecondition(f"the adapter staged at {staged_prefix} has an invalid {META}: {exc}")
    _check_meta(meta, staged_prefix)
    return meta


def verify_staged(store: Store, staged_prefix: str, meta: AdapterMeta) -> None:
    """Every file of ``meta`` is staged at ``staged_prefix`` with its recorded size and sha256
    (read through once); :class:`FailedPrecondition` naming the first that is not."""
    for name, expected in sorted(meta.files.items()):
        key = staged_prefix + name
        try:
            size = store.stat(key).size
            digest = hashlib.sha256()
            if size == expected["size"]:
                for chunk in store.stream(key):
                    digest.update(chunk)
        except NotFound:
            raise FailedPrecondition(f"adapter {meta.version}: {name} is not staged at {staged_prefix}")
        if size != expected["size"] or digest.hexdigest() != expected["sha256"]:
            raise FailedPrecondition(
                f"adapter {meta.version}: the staged {name} does not match its checksum in {META}"
            )


def commit_adapter(
    store: Store,
    staged_prefix: str,
    meta: AdapterMeta | None = None,
    *,
    move_latest: bool = True,
    verify: bool = True,
) -> AdapterMeta:
    """Publish the version staged at ``staged_prefix`` (the second half of publishing): check the
    staged files against the staged meta (``meta``: what was staged; read from the store when
    None), copy them into ``adapters/<book>/<version>/``, write its ``meta.json`` with
    ``published_at`` (this makes the version visible), then move ``latest``. Returns the meta
    as published.

    The coordinator commits a trainer's version inside CompletePart, under the part's live
    lease. Committing the same files again (a retried CompletePart) changes nothing a reader
    sees (``published_at`` is kept). Should different files arrive for a version that already
    has a meta.json, the meta goes first, so no reader ever pairs it with other files.
    ``verify=False``: the caller has just run :func:`verify_staged` itself.
    """
    staged = read_staged(store, staged_prefix) if meta is None else meta
    _check_meta(staged, staged_prefix)
    if verify:
        verify_staged(store, staged_prefix, staged)
    meta_key = layout.adapter_meta_key(staged.book_id, staged.version)
    try:
        existing: AdapterMeta | None = load_meta(store, staged.book_id, staged.version)
    except NotFound:
        existing = None
    except (TypeError, ValueError):  # unusable: replaced below
        existing = AdapterMeta(staged.book_id, staged.version, staged.job_id, staged.part, "")
    same = existing is not None and existing.files == staged.files and existing.published_at > 0
    if existing is not None and not same:
        store.delete(meta_key)
    for name in sorted(staged.files):
        store.copy(staged_prefix + name, staged.prefix + name)
    published = replace(
        staged,
        files={name: dict(info) for name, info in staged.files.items()},
        metrics=dict(staged.metrics),
        published_at=existing.published_at if same and existing is not None else time.time(),
    )
    store.put_json(meta_key, asdict(published))
    if move_latest:
        store.put_json(
            layout.latest_key(published.book_id),
            {"version": published.version, "published_at": published.published_at},
        )
    return published


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
    """Stage and commit in one (see :func:`stage_adapter`, :func:`commit_adapter`), for callers
    that publish without a coordinator: tests' fixtures, benchmarks, tools. A trainer worker
    never calls this: it stages under its lease and its CompletePart commits.

    Stages into the part's epoch-0 folder and removes it once committed.
    """
    staged_prefix = layout.part_publish_prefix(job_id, part, 0)
    meta = stage_adapter(
        store,
        local_dir,
        staged_prefix,
        book_id=book_id,
        job_id=job_id,
        part=part,
        base_model=base_model,
        metrics=metrics,
        settings=settings,
        started_from=started_from,
    )
    published = commit_adapter(store, staged_prefix, meta, move_latest=move_latest)
    store.delete_prefix(staged_prefix)
    return published


def _check_staged_prefix(prefix: str) -> str:
    validate_key(prefix, prefix=True)
    if not prefix.endswith("/"):
        raise InvalidArgument(f"a staging prefix is a folder ending in '/' (got {prefix[:120]!r})")
    return prefix


_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def _check_meta(meta: AdapterMeta, where: str) -> None:
    """A version's meta as staging writes it: valid ids, the version of (job, part), and a file
    list of version files (the adapter's own always) with sizes and sha256."""
    problem = _meta_problem(meta)
    if problem:
        raise FailedPrecondition(f"the adapter meta at {where} is invalid: {problem}")


def _meta_problem(meta: AdapterMeta) -> str:
    try:
        layout.check_book_id(meta.book_id)
        if meta.version != layout.adapter_version_id(meta.job_id, meta.part):
            return f"version {meta.version!r} is not that of job {meta.job_id} part {meta.part}"
    except InvalidArgument as exc:
        return exc.message
    if not isinstance(meta.files, dict) or not isinstance(meta.metrics, dict):
        return "files and metrics must be objects"
    if not isinstance(meta.base_model, str):
        return "base_model must be a string"
    if not set(ADAPTER_FILES) <= set(meta.files) <= set(VERSION_FILES):
        return f"files must be {', '.join(ADAPTER_FILES)} (and {CARD}), not {sorted(meta.files)}"
    for name, info in meta.files.items():
        size = info.get("size") if isinstance(info, dict) else None
        digest = info.get("sha256") if isinstance(info, dict) else None
        if (
            not isinstance(size, int)
            or size < 0
            or not isinstance(digest, str)
            or not _SHA256_RE.fullmatch(digest)
        ):
            return f"{name} needs a size and a sha256"
    return ""


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
