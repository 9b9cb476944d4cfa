"""Read Hugging Face safetensors checkpoints tensor by tensor (one shard open at a time)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from megatron_dapo.models.arch import ModelError

INDEX = "model.safetensors.index.json"


class HFCheckpointReader:
    """Maps each tensor name to its shard; `get(name)` reads one tensor."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ModelError(f"{index}: no weight_map")
            missing = sorted({f for f in weight_map.values() if not (self.folder / f).is_file()})
            if missing:
                raise ModelError(f"{index} lists shard(s) that are missing: {', '.join(missing)}")
            self.weight_map = dict(weight_map)
        else:
            shards = sorted(self.folder.glob("*.safetensors"))
            if not shards:
                raise ModelError(f"{self.folder}: no *.safetensors files and no {INDEX}")
            self.weight_map = {}
            for shard in shards:
                with safe_open(shard, framework="pt") as f:
                    for name in f.keys():
                        self.weight_map[name] = shard.name
        self._open_name: str | None = None
        self._open = None

    def names(self) -> list[str]:
        return list(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        shard = self.weight_map.get(name)
        if shard is None:
            raise ModelError(f"{self.folder}: tensor {name!r} is not in the checkpoint")
        if shard != self._open_name:
            self._open = safe_open(self.folder / shard, framework="pt")
            self._open_name = shard
        try:
            return self._open.get_tensor(name)
        except Exception as err:  # a shard whose contents disagree with the index
            raise ModelError(f"{self.folder / shard}: cannot read tensor {name!r}: {err}") from None
