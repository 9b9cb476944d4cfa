"""Read Hugging Face safetensors checkpoints: one tensor by name, or every tensor shard by shard."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from megatron_dapo.models.arch import ModelError, read_json_object

INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)
"""Non-parameter buffers some older checkpoints carry; every model here computes them itself."""


SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


class HFCheckpointReader:
    """Maps each tensor name to its shard; `get(name)` reads one tensor, `iter_shards()` all of them.

    The shards are those of the index when there is one, else model.safetensors, else every
    *.safetensors file in the folder.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            weight_map = read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ModelError(f"{index}: no weight_map")
            bad = next(((name, f) for name, f in weight_map.items() if not isinstance(f, str) or not f), None)
            if bad is not None:
                raise ModelError(f"{index}: weight_map gives tensor {bad[0]!r} the file {bad[1]!r}, not a file name")
            missing = sorted({f for f in weight_map.values() if not (self.folder / f).is_file()})
            if missing:
                raise ModelError(f"{index} lists shard(s) that are missing: {', '.join(missing)}")
            self.weight_map = dict(weight_map)
        else:
            single = self.folder / SINGLE_FILE
            shards = [single] if single.is_file() else sorted(self.folder.glob("*.safetensors"))
            if not shards:
                raise ModelError(
                    f"{self.folder}: no *.safetensors files and no {INDEX} (.bin checkpoints are not supported)"
                )
            self.weight_map = {}
            for shard in shards:
                try:
                    with safe_open(shard, framework="pt") as f:
                        names = list(f.keys())
                except Exception as err:  # safetensors' own error names no file
                    raise ModelError(f"{shard}: not a readable safetensors file ({err})") from None
                for name in names:
                    if name in self.weight_map:  # which copy is meant? (a leftover shard of another save)
                        raise ModelError(f"{self.folder}: tensor {name!r} is in both {self.weight_map[name]} and "
                                         f"{shard.name}, and no {INDEX} says which to read")
                    self.weight_map[name] = shard.name
        self.weight_map = {k: v for k, v in self.weight_map.items() if not k.endswith(SKIPPED_SUFFIXES)}

    def names(self) -> list[str]:
        return list(self.weight_map)

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) of one tensor, read from its shard's header (no tensor data is read)."""
        shard = self.weight_map.get(name)
        if shard is None:
            raise ModelError(f"{self.folder}: tensor {name!r} is not in the checkpoint")
        try:
            with safe_open(self.folder / shard, framework="pt") as handle:
                piece = handle.get_slice(name)
                found, code = tuple(piece.get_shape()), piece.get_dtype()
        except Exception as err:  # a shard whose contents disagree with the index
            raise ModelError(f"{self.folder / shard}: cannot read tensor {name!r}: {err}") from None
        dtype = SAFETENSORS_DTYPES.get(code)
        if dtype is None:
            raise ModelError(f"{self.folder / shard}: tensor {name!r} has dtype {code}, "
                             f"expected one of {', '.join(SAFETENSORS_DTYPES)}")
        return found, dtype

    def check_tied_head(self, tied: bool) -> None:
        """ModelError when config.json ties the embeddings but the checkpoint also holds an lm_head.weight that is
        not the embedding (some tied checkpoints carry an equal copy): which one a loader took would decide."""
        if tied and "lm_head.weight" in self.weight_map and "model.embed_tokens.weight" in self.weight_map:
            if not torch.equal(self.get("lm_head.weight"), self.get("model.embed_tokens.weight")):
                raise ModelError(f"{self.shard_of('lm_head.weight')}: tensor 'lm_head.weight' differs from "
                                 "'model.embed_tokens.weight' but config.json sets tie_word_embeddings: true")

    def shard_of(self, name: str) -> Path:
        return self.folder / self.weight_map[name]

    def get(self, name: str) -> torch.Tensor:
        shard = self.weight_map.get(name)
        if shard is None:
            raise ModelError(f"{self.folder}: tensor {name!r} is not in the checkpoint")
        # A handle per read: safetensors maps the whole shard, and the pages a read touches stay resident
        # for as long as the mapping is open; closing it keeps a converter's memory to the tensors in hand.
        with self._open(shard) as handle:
            return self._read(handle, shard, name)

    def iter_shards(self) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Every tensor as (name, CPU tensor), one list per shard, so a loader holds one shard at a time."""
        by_shard: dict[str, list[str]] = {}
        for name, shard in self.weight_map.items():
            by_shard.setdefault(shard, []).append(name)
        for shard in sorted(by_shard):
            with self._open(shard) as f:
                yield [(name, self._read(f, shard, name)) for name in by_shard[shard]]

    def _open(self, shard: str):
        try:
            return safe_open(self.folder / shard, framework="pt")
        except Exception as err:  # safetensors' own error names no file (a download cut short)
            raise ModelError(f"{self.folder / shard}: not a readable safetensors file ({err})") from None

    def _read(self, handle, shard: str, name: str) -> torch.Tensor:
        try:
            tensor = handle.get_tensor(name)
        except Exception as err:  # a shard whose contents disagree with the index
            raise ModelError(f"{self.folder / shard}: cannot read tensor {name!r}: {err}") from None
        if tensor.dtype not in SAFETENSORS_DTYPES.values():  # fp8 or int weights: a quantized checkpoint
            raise ModelError(f"{self.folder / shard}: tensor {name!r} has dtype {tensor.dtype}, expected one of "
                             f"{', '.join(SAFETENSORS_DTYPES)}")
        return tensor
