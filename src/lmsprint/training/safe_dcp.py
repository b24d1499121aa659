"""Reading a Distributed Checkpoint (the ``dcp/`` folder of a sharded run's checkpoint) without running its code.

torch.distributed.checkpoint unpickles two things as it loads: the ``.metadata`` file (a plain ``pickle.load``, which
runs whatever a planted pickle says) and every non-tensor value (``torch.load(weights_only=False)``, e.g. the
optimizer's hyperparameters). Here the first goes through an unpickler that builds only DCP's own metadata classes
and the second through ``torch.load(weights_only=True)``; tensors were read with ``weights_only=True`` already.
A checkpoint that needs anything else is refused (``pickle.UnpicklingError``), whatever its checksums say.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

_METADATA = "torch.distributed.checkpoint.metadata"
ALLOWED = {
    (_METADATA, name) for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                   "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                                   "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a torch.layout by its name
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}
"""The globals a DCP ``.metadata`` file may name (torch dtypes too, see :meth:`_MetadataUnpickler.find_class`)."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's DCP metadata")


def read_metadata(path: Path) -> Metadata:
    """The ``.metadata`` of the Distributed Checkpoint at ``path``, unpickled through the allow-list."""
    with open(path / ".metadata", "rb") as f:
        metadata = _MetadataUnpickler(f).load()
    if not isinstance(metadata, Metadata):
        raise pickle.UnpicklingError(f"{path / '.metadata'} holds no DCP metadata")
    return metadata


class SafeReader(FileSystemReader):
    """DCP's file-system reader with :func:`read_metadata` in place of its ``pickle.load``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, non-tensor values read with ``torch.load(weights_only=True)``: plain Python
    values (an optimizer's hyperparameters) load, pickled objects that would run code do not."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        value.seek(0)
        obj = torch.load(value, weights_only=True)
        super().load_bytes(read_item, _saved(obj))


def _saved(obj: Any) -> io.BytesIO:
    """``obj`` serialised again for the base class's ``load_bytes`` (which then reads it back: a value that already
    passed the weights-only unpickler)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf
