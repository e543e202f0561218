"""The adapter store: immutable, complete-before-visible LoRA versions.

Layout of ``DirectoryAdapterStore(root)``::

    <root>/<tenant>/v<version>/adapter_config.json        PEFT LoraConfig
    <root>/<tenant>/v<version>/adapter_model.safetensors  PEFT key names
    <root>/<tenant>/v<version>/DIGEST                     sha256, written last

A version is written into a temporary directory, renamed into place, then
marked complete by its ``DIGEST`` file (sha256 over the other files, name and
bytes, in name order). Readers only trust a directory that has a ``DIGEST``
matching its files, so a crash at any moment leaves either nothing or an
incomplete directory that the next writer replaces. Versions are immutable:
writing a version that is already complete is a no-op that returns the
existing digest. Version 0 is the base model and has no files.

Tensor names are PEFT's saved names, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` ``[r, in]``
and ``...lora_B.weight`` ``[out, r]``, so ``peft.PeftModel.from_pretrained``
and vLLM's ``LoRARequest`` load a version directory directly.

``AdapterStore`` is the interface (object storage can implement it later);
``AdapterStore(root)`` is shorthand for ``DirectoryAdapterStore(root)``.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from shared.engine import LoraSignature

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
DIGEST_FILE = "DIGEST"
HASHED_FILES = (CONFIG_FILE, WEIGHTS_FILE)
_VERSION_DIR = re.compile(r"^v(\d+)$")
# Tenant names become directory names: no separators, no leading dot.
_TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")
_HASH_CHUNK_BYTES = 1 << 20


class AdapterStoreError(RuntimeError):
    """A version that cannot be written or read as asked."""


class IncompleteAdapter(AdapterStoreError):
    """The directory has no DIGEST (still being written, or a crashed write)."""


class DigestMismatch(AdapterStoreError):
    """The files do not hash to the recorded DIGEST."""


def peft_config_dict(signature: LoraSignature, base_model: str) -> dict:
    """An ``adapter_config.json`` that PEFT's ``PeftModel.from_pretrained`` and
    vLLM accept for an adapter of ``signature`` on ``base_model``."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": signature.rank,
        "lora_alpha": signature.alpha,
        "target_modules": sorted(signature.target_modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "init_lora_weights": True,
    }


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
    if not _TENANT_NAME.match(tenant):
        raise AdapterStoreError(f"tenant name {tenant!r} cannot be a directory name")
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
        returning the existing ones when that version is already complete."""

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
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = final.parent / f".tmp-v{version}-{uuid.uuid4().hex[:8]}"
        try:
            _write_files(staging, tensors, peft_config_dict(signature, base_model))
            digest = files_digest(staging)
            if final.exists():  # a crashed earlier write: incomplete, so never read
                shutil.rmtree(final)
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _write_atomic(final / DIGEST_FILE, digest.encode())
        _fsync_dir(final.parent)
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
        tenant_dir = self.root / check_tenant_name(tenant)
        if not tenant_dir.is_dir():
            return 0
        versions = [
            int(match.group(1))
            for entry in tenant_dir.iterdir()
            if (match := _VERSION_DIR.match(entry.name)) and recorded_digest(entry) is not None
        ]
        return max(versions, default=0)

    def load_tensors(self, path: Path | str, verify: bool = True) -> dict[str, torch.Tensor]:
        path = Path(path)
        if verify:
            self.verify(path)
        return load_file(str(path / WEIGHTS_FILE), device="cpu")


def _write_files(staging: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    staging.mkdir()
    cpu_tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    save_file(cpu_tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
    _write_atomic(staging / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True).encode())
    _fsync_file(staging / WEIGHTS_FILE)


def _write_atomic(path: Path, payload: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = [
    "AdapterStore", "DirectoryAdapterStore", "AdapterStoreError", "IncompleteAdapter",
    "DigestMismatch", "peft_config_dict", "files_digest", "recorded_digest",
    "check_tenant_name", "CONFIG_FILE", "WEIGHTS_FILE", "DIGEST_FILE",
]
