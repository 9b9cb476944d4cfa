"""Read and write the tensors of a megatron-core dist checkpoint ("torch_dist" format), one piece at a time.

A megatron-core checkpoint folder holds PyTorch Distributed Checkpoint files (`.metadata` and
`__<rank>_<n>.distcp`), megatron-core's `metadata.json` (which backend wrote it) and `common.pt`
(the non-tensor state). Every tensor is stored at its global shape, cut into chunks (one per rank
that saved a piece of it); the decoder's layers are stacked under one key with a leading layer axis.

Both directions here stream: the writer asks for each chunk's data only when the file writer
reaches it, and the reader reads only the chunks that overlap the slice asked for, so neither
ever holds a whole model.
"""
from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_dapo.models.arch import ModelError, read_json_object

MEGATRON_METADATA = "metadata.json"
COMMON = "common.pt"
DCP_METADATA = ".metadata"
_BACKENDS = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
             "common_backend": "torch", "common_backend_version": 1}


class CheckpointFormatError(ValueError):
    """A megatron-core checkpoint that cannot be read; the message names the file or key."""


@dataclass(frozen=True)
class Chunk:
    """One stored piece of a tensor: its place in the global tensor and how to make its data."""

    key: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]
    """Called once, when the file writer reaches this chunk; returns a CPU tensor of `shape`."""


@dataclass(frozen=True)
class ExtraState:
    """A megatron-core ShardedObject (a module's `_extra_state`): one pickled object per layer."""

    key: str
    index: int
    count: int
    value: object = None

    @property
    def unique_key(self) -> str:
        return f"{self.key}/shard_{self.index}_{self.count}"


@contextmanager
def _single_process():
    """Without torch.distributed, DCP warns on every call that it runs in one process, which is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class _StreamingSavePlanner(SavePlanner):
    """Plans one write item per chunk and produces each chunk's data only when it is written."""

    def __init__(self, chunks: list[Chunk], objects: list[ExtraState]):
        self.chunks = {(c.key, c.offsets): c for c in chunks}
        self.objects = {o.unique_key: o for o in objects}
        self.on_written: Callable[[Chunk, torch.Tensor], None] = lambda chunk, data: None

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator: bool = False) -> None:
        pass

    def create_local_plan(self) -> SavePlan:
        items = [WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO) for key in self.objects]
        for chunk in self.chunks.values():
            items.append(WriteItem(
                index=MetadataIndex(chunk.key, chunk.offsets),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(chunk.offsets), sizes=torch.Size(chunk.shape)),
                    properties=TensorProperties(dtype=chunk.dtype),
                    size=torch.Size(chunk.global_shape),
                ),
            ))
        return SavePlan(items)

    def create_global_plan(self, all_plans):
        return create_default_global_save_plan(all_plans, rewrite_index_hints=False)

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        return new_plan

    def resolve_data(self, write_item: WriteItem):
        index = write_item.index
        if write_item.type == WriteItemType.BYTE_IO:
            buffer = io.BytesIO()
            torch.save([self.objects[index.fqn].value], buffer)
            buffer.seek(0)
            return buffer
        chunk = self.chunks[(index.fqn, tuple(index.offset))]
        data = chunk.load()
        if tuple(data.shape) != chunk.shape:
            raise CheckpointFormatError(f"{chunk.key}: made a chunk of shape {tuple(data.shape)}, expected {chunk.shape}")
        data = data.to(chunk.dtype).contiguous()
        self.on_written(chunk, data)
        return data


def _unwrapped(err: BaseException, what: str) -> BaseException:
    """The error to raise for `err` from a one-process DCP save or load: the project's own error it wrapped as it
    was (it names the tensor or file), anything else as a CheckpointFormatError saying `what` and why."""
    original = err
    if isinstance(err, CheckpointException):
        failures = [f[0] if isinstance(f, tuple) else f for f in err.failures.values()]
        original = next((f for f in failures if isinstance(f, BaseException)), err)
    if isinstance(original, (ModelError, CheckpointFormatError)):
        return original
    return CheckpointFormatError(f"{what}: {type(original).__name__}: {original}")


def write_checkpoint(folder: Path, chunks: list[Chunk], objects: list[ExtraState], common: dict,
                     on_written: Callable[[Chunk, torch.Tensor], None] | None = None) -> None:
    """Write a megatron-core "torch_dist" checkpoint into `folder` (which must exist), one chunk at a time."""
    planner = _StreamingSavePlanner(chunks, objects)
    if on_written is not None:
        planner.on_written = on_written
    writer = FileSystemWriter(folder, single_file_per_rank=True, thread_count=1)
    try:
        with _single_process():
            dcp_save({}, storage_writer=writer, planner=planner, no_dist=True)
    except CheckpointException as err:  # torch wraps what a chunk's reading raised (a damaged shard, say)
        raise _unwrapped(err, f"{folder}: writing the checkpoint failed") from None
    torch.save(common, folder / COMMON)
    (folder / MEGATRON_METADATA).write_text(json.dumps(_BACKENDS))


class _SliceLoadPlanner(LoadPlanner):
    """Reads slices of stored tensors into given tensors (no state dict)."""

    def __init__(self, requests: list[tuple[str, tuple[int, ...], torch.Tensor]]):
        self.requests = requests

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items = []
        for slot, (key, offsets, target) in enumerate(self.requests):
            stored = self.metadata.state_dict_metadata[key]
            wanted = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=target.shape)
            for item in create_read_items_for_chunk_list(key, stored, [wanted]):
                items.append(_with_slot(item, slot))
        return LoadPlan(items)

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan):
        return central_plan

    def load_bytes(self, read_item, value) -> None:
        raise CheckpointFormatError(f"unexpected object read for {read_item.dest_index.fqn}")

    def resolve_tensor(self, read_item):
        target = self.requests[read_item.dest_index.index][2]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            target = target.narrow(dim, start, length)
        return target

    def commit_tensor(self, read_item, tensor) -> None:
        pass


def _with_slot(item, slot: int):
    """The read item with the request's position as its destination index (to find its target tensor)."""
    from dataclasses import replace

    return replace(item, dest_index=MetadataIndex(item.dest_index.fqn, item.dest_index.offset, slot))


class CheckpointReader:
    """The tensors of a megatron-core dist checkpoint: their global shapes and dtypes, and any slice of them."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not (self.folder / DCP_METADATA).is_file():
            what = "a Hugging Face folder" if (self.folder / "config.json").is_file() else "not a checkpoint"
            raise CheckpointFormatError(
                f"{self.folder}: no {DCP_METADATA} file, so this is not a megatron-core dist checkpoint ({what})"
            )
        backend = self.folder / MEGATRON_METADATA
        if backend.is_file():
            try:
                found = read_json_object(backend).get("sharded_backend")
            except ModelError as err:  # cut short by a crash, edited: named, not a JSONDecodeError
                raise CheckpointFormatError(str(err)) from None
            if found != "torch_dist":
                raise CheckpointFormatError(f"{backend}: sharded_backend {found!r} is not supported (only 'torch_dist')")
        self._reader = FileSystemReader(self.folder)
        try:
            self.metadata = self._reader.read_metadata()
        except Exception as err:
            raise CheckpointFormatError(f"{self.folder / DCP_METADATA}: cannot be read: {err}") from None
        self.tensors = {k: v for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
        self.objects = {k for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
        needed: dict[str, int] = {}  # the bytes each data file must hold: where its last item ends
        for info in self.metadata.storage_data.values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
        missing = [f for f in sorted(needed) if not (self.folder / f).is_file()]
        if missing:
            raise CheckpointFormatError(f"{self.folder}: file(s) listed in {DCP_METADATA} are missing: {', '.join(missing)}")
        short = [f"{f} ({size} bytes of {needed[f]})" for f in sorted(needed)
                 if (size := (self.folder / f).stat().st_size) < needed[f]]
        if short:  # a copy or a write cut off: torch would fail on it deep inside a load, naming no file
            raise CheckpointFormatError(f"{self.folder}: file(s) cut short: {', '.join(short)}")

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._stored(key).size)

    def dtype(self, key: str) -> torch.dtype:
        return self._stored(key).properties.dtype

    def read(self, key: str, offsets: tuple[int, ...] | None = None, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The slice of `key` starting at `offsets` with `shape` (the whole tensor by default)."""
        stored = self._stored(key)
        offsets = offsets or (0,) * len(stored.size)
        shape = shape or tuple(stored.size)
        target = torch.empty(shape, dtype=stored.properties.dtype)
        self.read_many([(key, offsets, target)])
        return target

    def read_many(self, requests: list[tuple[str, tuple[int, ...], torch.Tensor]]) -> None:
        """Fill each target tensor with the slice of its key at its offsets, in one pass over the files."""
        for key, offsets, target in requests:
            size = self._stored(key).size
            if len(offsets) != len(size) or any(o + n > s for o, n, s in zip(offsets, target.shape, size)):
                raise CheckpointFormatError(
                    f"{self.folder}: slice at {offsets} of shape {tuple(target.shape)} is outside tensor {key!r} "
                    f"of shape {tuple(size)}"
                )
        try:
            with _single_process():
                dcp_load({}, storage_reader=self._reader, planner=_SliceLoadPlanner(requests), no_dist=True)
        except CheckpointFormatError:
            raise
        except (Exception, CheckpointException) as err:  # the latter a BaseException
            keys = ", ".join(sorted({key for key, _, _ in requests}))
            raise _unwrapped(err, f"{self.folder}: reading {keys} failed") from None

    def _stored(self, key: str) -> TensorStorageMetadata:
        stored = self.tensors.get(key)
        if stored is None:
            raise CheckpointFormatError(f"{self.folder}: the checkpoint has no tensor {key!r}")
        return stored
