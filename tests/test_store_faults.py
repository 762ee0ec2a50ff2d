"""The local store under disk-full and permission-denied: a clear error, no partial objects."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from novelcrafter.errors import StoreError
from novelcrafter.store import LocalStore


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB filesystem (tmpfs), so writes hit a genuine ENOSPC."""
    mnt = tmp_path / f"tiny-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to simulate a full disk here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_is_clear_and_leaves_nothing_partial(tiny_disk: Path) -> None:
    store = LocalStore(tiny_disk / "store")
    store.put("books/b/manifest.json", b"old")
    with pytest.raises(StoreError, match="no space left on device"):
        store.put("books/b/manifest.json", os.urandom(2 * 1024 * 1024))
    assert store.get("books/b/manifest.json") == b"old"  # the previous version survives intact
    with pytest.raises(StoreError, match="no space left on device"):
        store.put("books/b/new.bin", os.urandom(2 * 1024 * 1024))
    assert store.list("") == ["books/b/manifest.json"]  # no partial object, no temporary file
    assert not [p for p in (tiny_disk / "store" / "books" / "b").iterdir() if p.name != "manifest.json"]
    with pytest.raises(StoreError, match="no space left on device"):
        store.put_if_absent("books/b/claim", os.urandom(2 * 1024 * 1024))
    assert not store.exists("books/b/claim")


def test_permission_denied_is_clear(tmp_path: Path) -> None:
    """Run the store as an unprivileged user (root bypasses permissions) against a read-only folder."""
    root = tmp_path / "store"
    LocalStore(root).put("books/b/manifest.json", "old")
    os.chmod(tmp_path, 0o755)
    for folder in (root, root / "books", root / "books" / "b"):
        os.chmod(folder, 0o555)
    script = textwrap.dedent(
        f"""
        import os, sys
        from novelcrafter.store import LocalStore
        from novelcrafter.errors import StoreError
        store = LocalStore({str(root)!r})
        os.setgid(65534); os.setuid(65534)  # after imports: the interpreter lives under /root
        try:
            store.put("books/b/manifest.json", "new")
        except StoreError as exc:
            print(exc.message); sys.exit(3)
        """
    )
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert res.returncode == 3, res.stderr
    assert "permission denied" in res.stdout and "books/b/manifest.json" in res.stdout
    assert (root / "books" / "b" / "manifest.json").read_text() == "old"
    assert sorted(p.name for p in (root / "books" / "b").iterdir()) == ["manifest.json"]
