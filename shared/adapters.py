"""The adapter store: immutable, complete-before-visible LoRA versions.

Layout of ``DirectoryAdapterStore(root)``::

    <root>/<tenant>/v<version>/adapter_config.json        PEFT LoraConfig
    <root>/<tenant>/v<version>/adapter_model.safetensors  PEFT key names
    <root>/<tenant>/v<version>/DIGEST                     sha256, written last

A version is written into a temporary directory, renamed into place, then
marked complete by its ``DIGEST`` file (sha256 over the other files, name and
bytes, in name order). Readers only trust a directory that has a ``DIGEST``
matching its files, so a crash at any moment leaves either nothing or an
incomplete directory that the next writer replaces. Every file and directory
entry is fsynced before the rename that publishes it, so a power loss cannot
leave a ``DIGEST`` naming files that never reached the disk. Versions are
immutable: writing a version that is already complete is a no-op that returns
the existing digest. Version 0 is the base model and has no files.

Retention: ``prune(tenant, keep_newest, keep)`` deletes a tenant's versions
older than its newest ``keep_newest`` (never the newest, never one in
``keep``). A pruned version is first renamed out of the ``v<n>`` namespace,
so a reader sees it complete or not at all.

Tenant names are experiment ids (``[a-z0-9][a-z0-9_-]{0,63}``, the whole
string): they become directory names, so nothing else may reach a path.

The two adapter files are PEFT's format, written and read by
``shared.peft_files`` (file names, config, tensor names), so
``peft.PeftModel.from_pretrained`` and vLLM's ``LoRARequest`` load a version
directory directly.

``AdapterStore`` is the interface (object storage can implement it later);
``AdapterStore(root)`` is shorthand for ``DirectoryAdapterStore(root)``.
"""

from __future__ import annotations

import abc
import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

import torch

from shared.engine import LoraSignature
from shared.messages import EXPERIMENT_ID_PATTERN, is_experiment_id
from shared.peft_files import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    PeftFormatError,
    peft_config_dict,
    read_config,
    read_weights,
    shape_from_peft_config,
    write_peft_dir,
)

DIGEST_FILE = "DIGEST"
HASHED_FILES = (CONFIG_FILE, WEIGHTS_FILE)
_VERSION_DIR = re.compile(r"v(\d+)")  # fullmatch: "v3\n" is not a version
_PRUNED_PREFIX = ".pruned-"
_HASH_CHUNK_BYTES = 1 << 20


class AdapterStoreError(RuntimeError):
    """A version that cannot be written or read as asked."""


class IncompleteAdapter(AdapterStoreError):
    """The directory has no DIGEST (still being written, or a crashed write)."""


class DigestMismatch(AdapterStoreError):
    """The files do not hash to the recorded DIGEST."""


def files_digest(path: Path) -> str:
    """sha256 over the hashed files of a version directory (name, size, bytes)."""
    digest = hashlib.sha256()
    for name in HASHED_FILES:
        file_path = path / name
        digest.update(name.encode() + b"\0" + str(file_path.stat().st_size).encode() + b"\0")
        with open(file_path, "rb") as handle:
            while chunk := handle.read(_HASH_CHUNK_BYTES):
                digest.update(chunk)
    return digest.hexdigest()


def recorded_digest(path: Path) -> str | None:
    """The DIGEST of a version directory, None while it is incomplete."""
    try:
        return (Path(path) / DIGEST_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None


def check_tenant_name(tenant: str) -> str:
    """``tenant`` if it is a valid experiment id, else ``AdapterStoreError``."""
    if not is_experiment_id(tenant):
        raise AdapterStoreError(f"tenant name {tenant!r} is not an experiment id "
                                f"({EXPERIMENT_ID_PATTERN.pattern}) and cannot be a directory name")
    return tenant


class AdapterStore(abc.ABC):
    """Where adapter versions live. Versions >= 1 only (0 is the base)."""

    def __new__(cls, *args, **kwargs):
        if cls is AdapterStore:  # AdapterStore(root): the default, directory store
            return super().__new__(DirectoryAdapterStore)
        return super().__new__(cls)

    @abc.abstractmethod
    def write_version(
        self,
        tenant: str,
        version: int,
        tensors: dict[str, torch.Tensor],
        signature: LoraSignature,
        base_model: str,
    ) -> tuple[Path, str]:
        """Write ``version`` completely and return ``(path, digest)``; a no-op
        returning the existing ones when that version is already complete.
        ``signature`` is the adapter's own shape (the tenant's rank, alpha and
        targets): its ``adapter_config.json`` says it, ``tensors`` have it."""

    @abc.abstractmethod
    def path(self, tenant: str, version: int) -> Path:
        """Where ``version`` of ``tenant`` lives (whether or not it exists)."""

    @abc.abstractmethod
    def is_complete(self, tenant: str, version: int) -> bool: ...

    @abc.abstractmethod
    def verify(self, path: Path | str) -> str:
        """Recompute the digest of a version directory; raise
        ``IncompleteAdapter`` or ``DigestMismatch``; return the digest."""

    @abc.abstractmethod
    def latest_version(self, tenant: str) -> int:
        """The highest complete version of ``tenant``, 0 (base) if none."""

    @abc.abstractmethod
    def load_tensors(self, path: Path | str, verify: bool = True) -> dict[str, torch.Tensor]:
        """The PEFT-named tensors of a version directory (on CPU)."""

    @abc.abstractmethod
    def load_shape(self, path: Path | str) -> LoraSignature:
        """The LoRA shape (rank, alpha, target modules) a version directory was
        written with: its own ``adapter_config.json``."""

    @abc.abstractmethod
    def versions(self, tenant: str) -> list[int]:
        """The complete versions of ``tenant``, oldest first."""

    @abc.abstractmethod
    def prune(self, tenant: str, keep_newest: int, keep: Iterable[int] = ()) -> list[int]:
        """Delete the versions of ``tenant`` older than its newest
        ``keep_newest`` (at least 1: the newest always stays), except those in
        ``keep``; return the versions deleted."""

    def digest(self, tenant: str, version: int) -> str:
        """The recorded digest of a complete version."""
        digest = recorded_digest(self.path(tenant, version))
        if digest is None:
            raise IncompleteAdapter(f"{tenant} v{version} is not complete")
        return digest


class DirectoryAdapterStore(AdapterStore):
    """An ``AdapterStore`` on a local or shared filesystem."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def path(self, tenant: str, version: int) -> Path:
        if version < 1:
            raise AdapterStoreError(f"version {version}: version 0 is the base model and has no files")
        return self.root / check_tenant_name(tenant) / f"v{version}"

    def is_complete(self, tenant: str, version: int) -> bool:
        return version >= 1 and recorded_digest(self.path(tenant, version)) is not None

    def write_version(self, tenant, version, tensors, signature, base_model) -> tuple[Path, str]:
        final = self.path(tenant, version)
        existing = recorded_digest(final)
        if existing is not None:
            return final, existing
        _make_durable_dir(final.parent)
        staging = final.parent / f".tmp-v{version}-{uuid.uuid4().hex[:8]}"
        try:
            _write_files(staging, tensors, peft_config_dict(signature, base_model))
            digest = files_digest(staging)
            if final.exists():  # a crashed earlier write: incomplete, so never read
                shutil.rmtree(final)
            os.rename(staging, final)
            fsync_dir(final.parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        write_durable(final / DIGEST_FILE, digest.encode())  # last: only now is the version complete
        return final, digest

    def verify(self, path: Path | str) -> str:
        path = Path(path)
        expected = recorded_digest(path)
        if expected is None:
            raise IncompleteAdapter(f"{path} has no {DIGEST_FILE}")
        actual = files_digest(path)
        if actual != expected:
            raise DigestMismatch(f"{path}: files hash to {actual[:12]}, DIGEST says {expected[:12]}")
        return actual

    def latest_version(self, tenant: str) -> int:
        return max(self.versions(tenant), default=0)

    def versions(self, tenant: str) -> list[int]:
        return sorted(version for version, entry in self._version_dirs(tenant) if recorded_digest(entry) is not None)

    def prune(self, tenant: str, keep_newest: int, keep: Iterable[int] = ()) -> list[int]:
        complete = self.versions(tenant)
        if not complete:
            return []
        # Incomplete directories below the newest complete version are crashed writes: garbage too.
        cutoff = complete[-max(1, keep_newest):][0]
        protected = set(keep)
        doomed = [(version, entry) for version, entry in self._version_dirs(tenant)
                  if version < cutoff and version not in protected]
        for version, entry in doomed:
            # Out of the v<n> namespace first (one atomic rename), then delete at leisure.
            graveyard = entry.with_name(f"{_PRUNED_PREFIX}v{version}-{uuid.uuid4().hex[:8]}")
            os.rename(entry, graveyard)
            shutil.rmtree(graveyard)
        tenant_dir = self.root / tenant
        for leftover in tenant_dir.glob(_PRUNED_PREFIX + "*"):  # a prune that crashed mid-delete
            shutil.rmtree(leftover, ignore_errors=True)
        if doomed:
            fsync_dir(tenant_dir)
        return sorted(version for version, _ in doomed)

    def _version_dirs(self, tenant: str) -> list[tuple[int, Path]]:
        tenant_dir = self.root / check_tenant_name(tenant)
        if not tenant_dir.is_dir():
            return []
        return [(int(match.group(1)), entry) for entry in tenant_dir.iterdir()
                if (match := _VERSION_DIR.fullmatch(entry.name)) and int(match.group(1)) >= 1]

    def load_tensors(self, path: Path | str, verify: bool = True) -> dict[str, torch.Tensor]:
        path = Path(path)
        if verify:
            self.verify(path)
        return read_weights(path)

    def load_shape(self, path: Path | str) -> LoraSignature:
        try:
            return shape_from_peft_config(read_config(Path(path)), path)
        except PeftFormatError as exc:
            raise AdapterStoreError(str(exc)) from exc


def _write_files(staging: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Both files of a version, each fsynced, and the staging directory's
    entries fsynced, so the rename that follows publishes durable files."""
    staging.mkdir()
    for written in write_peft_dir(staging, tensors, config):
        fsync_file(written)
    fsync_dir(staging)


def write_durable(path: Path, payload: bytes) -> None:
    """Write ``path`` atomically (temp file, fsync, rename) and fsync its
    directory, so after return the file is whole on disk or a crash left the
    old one."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    fsync_dir(path.parent)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    """Persist a directory's entries (files created or renamed in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_durable_dir(path: Path) -> None:
    """``mkdir -p`` whose new entries survive a power loss."""
    if path.is_dir():
        return
    _make_durable_dir(path.parent)
    path.mkdir(exist_ok=True)
    fsync_dir(path.parent)


__all__ = [
    "AdapterStore", "DirectoryAdapterStore", "AdapterStoreError", "IncompleteAdapter",
    "DigestMismatch", "peft_config_dict", "files_digest", "recorded_digest",
    "check_tenant_name", "write_durable", "fsync_file", "fsync_dir", "CONFIG_FILE", "WEIGHTS_FILE", "DIGEST_FILE",
]
