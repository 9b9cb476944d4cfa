"""megatron-core dist checkpoint (any layout, a run's or a converted one) -> Hugging Face folder.

Sharded safetensors with their index, config.json, generation_config.json and the tokenizer files
of a template folder; transformers' `from_pretrained` loads the result. The architecture comes from
the checkpoint's marker (the trainer records the model's config.json there) or the template. One
layer is read at a time, and each tensor is written to its shard as soon as it is made.
"""
from __future__ import annotations

import fnmatch
import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron_dapo.actor.checkpoint import MARKER, SHAPE_FIELDS, read_marker
from megatron_dapo.convert import dcp_io
from megatron_dapo.convert.verify import check_logprobs
from megatron_dapo.convert.output import ConversionError, Progress, output_folder, unfinished
from megatron_dapo.models import families
from megatron_dapo.models.arch import ModelArch, read_json_object
from megatron_dapo.models.hf_io import INDEX, SAFETENSORS_DTYPES, SINGLE_FILE

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")
OPTIMIZER_PREFIX = "optimizer."


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]
    shard: int = 0


class _ShardWriter:
    """One safetensors file written tensor by tensor: the header (every name, dtype, shape and offset)
    first, then each tensor's bytes as it arrives, so a shard is never held in memory whole."""

    def __init__(self, path: Path, tensors: list[_Tensor], dtype: torch.dtype):
        code = {v: k for k, v in SAFETENSORS_DTYPES.items()}[dtype]
        header, offset = {}, 0
        for t in tensors:
            size = torch.Size(t.shape).numel() * dtype.itemsize
            header[t.name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [offset, offset + size]}
            offset += size
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self.path, self.dtype, self.names = path, dtype, [t.name for t in tensors]
        self.header = struct.pack("<Q", len(raw)) + raw
        self.file = None  # opened at the first tensor: one shard file open at a time

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name != self.names[0] or tensor.dtype != self.dtype:
            raise RuntimeError(f"{self.path}: got {name} ({tensor.dtype}), expected {self.names[0]} ({self.dtype})")
        if self.file is None:
            self.file = open(self.path, "wb")
            self.file.write(self.header)
        self.file.write(tensor.contiguous().view(torch.uint8).numpy().data)
        self.names.pop(0)
        if not self.names:
            self.file.close()


def _hf_config(mcore_dir: Path, marker: dict, template: Path | None) -> dict:
    if template is not None:
        path = template / "config.json"
        if not path.is_file():
            raise ConversionError(f"--hf-template {template}: no config.json")
        config = read_json_object(path, " (--hf-template's config.json)")
        if "hf_config" in marker:  # the rows of a vocabulary a size off would otherwise be cut or padded silently
            saved = ModelArch.from_hf_config(marker["hf_config"], source=f"{mcore_dir / MARKER}")
            given = ModelArch.from_hf_config(config, source=str(path))
            # The shapes, and what the layers compute with them: a template's other RoPE or norm epsilon would
            # publish another function of the same weights, which --verify (built from the written config) passes.
            differ = [f"{name}: checkpoint {getattr(saved, name)}, template {getattr(given, name)}"
                      for name in (*SHAPE_FIELDS, "rms_norm_eps", "rope_theta", "rope_scaling")
                      if getattr(saved, name) != getattr(given, name)]
            if differ:
                raise ConversionError(f"--hf-template {template} is another model than the one {mcore_dir} was made "
                                      f"from ({'; '.join(differ)}): pass the folder the run started from")
        return config
    if "hf_config" not in marker:
        raise ConversionError(f"{mcore_dir / MARKER} does not record the model's config.json; pass --hf-template DIR "
                              "(the Hugging Face folder the run started from)")
    return marker["hf_config"]


def _check_keys(reader: dcp_io.CheckpointReader, arch: ModelArch) -> None:
    """Every key the table needs is there with a shape that fits config.json; no model key is unknown."""
    expected = {}
    for rule, layer in families.hf_export_rules(arch):
        shape = families.megatron_shape(rule, arch)
        expected[families.checkpoint_key(rule)] = shape if layer is None else (arch.num_layers, *shape)
    if arch.tie_word_embeddings:
        expected.setdefault("output_layer.weight", None)  # a copy of the embedding; some layouts save it
    model_keys = [k for k in reader.tensors if not k.startswith(OPTIMIZER_PREFIX)]
    unknown = sorted(set(model_keys) - set(expected))
    if unknown:
        raise ConversionError(f"{reader.folder}: tensor(s) {', '.join(map(repr, unknown[:5]))} are not in the "
                              f"{arch.family} table ({arch.architecture} with this config.json has no such parameter)")
    for key, shape in expected.items():
        if shape is None:
            continue
        if key not in reader.tensors:
            raise ConversionError(f"{reader.folder}: the checkpoint has no tensor {key!r}")
        found = reader.shape(key)
        vocab_rows = key in ("embedding.word_embeddings.weight", "output_layer.weight")
        fits = found[1:] == shape[1:] and found[0] >= shape[0] if vocab_rows else found == shape
        if not fits:
            what = f"at least {shape[0]} rows of {shape[1:]}" if vocab_rows else str(shape)
            raise ConversionError(f"{reader.folder}: tensor {key!r} has shape {found}, expected {what} "
                                  "from config.json")


def _plan_shards(arch: ModelArch, itemsize: int, shard_bytes: int) -> tuple[list[_Tensor], int]:
    """Every output tensor in Hugging Face order, each assigned to a shard of at most shard_bytes."""
    tensors, shard, filled = [], 0, 0
    for name, shape in families.hf_tensor_shapes(arch).items():
        size = torch.Size(shape).numel() * itemsize
        if filled and filled + size > shard_bytes:
            shard, filled = shard + 1, 0
        tensors.append(_Tensor(name, shape, shard))
        filled += size
    return tensors, shard + 1


def _groups(arch: ModelArch):
    """(rule, layer) lists read together: the embedding, each layer, then the final norm and output."""
    rules = families.hf_export_rules(arch)
    yield [r for r in rules if r[1] is None and r[0] is families.EMBEDDING]
    for layer in range(arch.num_layers):
        yield [r for r in rules if r[1] == layer]
    yield [r for r in rules if r[1] is None and r[0] is not families.EMBEDDING]


def _read_group(reader: dcp_io.CheckpointReader, arch: ModelArch, group) -> list[tuple[str, torch.Tensor]]:
    requests, targets = [], []
    for rule, layer in group:
        key, shape = families.checkpoint_key(rule), families.megatron_shape(rule, arch)
        if layer is None:
            target = torch.empty(shape, dtype=reader.dtype(key))  # the vocabulary's padding rows are not read
            requests.append((key, (0,) * len(shape), target))
        else:
            target = torch.empty((1, *shape), dtype=reader.dtype(key))
            requests.append((key, (layer, *(0,) * len(shape)), target))
            target = target[0]
        targets.append((rule, layer, target))
    reader.read_many(requests)
    named = []
    for rule, layer, full in targets:
        named += zip(families.hf_names(rule, layer), families.unfuse(rule, full, arch))
    return named


def _check_tied_head(reader: dcp_io.CheckpointReader, arch: ModelArch, rows_per_read: int = 8192) -> None:
    """With tied embeddings, an output layer the checkpoint holds too must be the embedding: the Hugging Face
    model keeps one of them, and which one would decide. Read in blocks of rows, never a whole copy."""
    embedding, head = families.checkpoint_key(families.EMBEDDING), "output_layer.weight"
    if not arch.tie_word_embeddings or head not in reader.tensors:
        return
    rows, width = arch.vocab_size, reader.shape(embedding)[1]  # padded rows past vocab_size are dropped on export
    for start in range(0, rows, rows_per_read):
        shape = (min(rows_per_read, rows - start), width)
        if not torch.equal(reader.read(embedding, (start, 0), shape), reader.read(head, (start, 0), shape)):
            raise ConversionError(f"{reader.folder}: tensor {head!r} differs from {embedding!r} (from row {start}) but "
                                  "the config.json sets tie_word_embeddings: true; is it the config of this model?")


def _copy_template(template: Path | None, partial: Path, tokenizer_only: bool = False,
                   tokenizer_elsewhere: bool = False) -> None:
    """Tokenizer files, chat template, generation config: everything of the template but its weights and
    config (tokenizer_only: not its generation config either, which the model's template gives;
    tokenizer_elsewhere: not its tokenizer's files either, which another folder gives whole: a file of the
    template's that folder lacks, a slow tokenizer's vocabulary or a special-tokens map, would be read beside
    the other tokenizer)."""
    if template is None:
        return
    skipped = (INDEX, "config.json", "generation_config.json") if tokenizer_only else (INDEX, "config.json")
    for path in template.iterdir():
        weights = path.name.removesuffix(".index.json").endswith(WEIGHT_SUFFIXES)  # pytorch_model.bin.index.json too
        tokenizer = tokenizer_elsewhere and any(fnmatch.fnmatch(path.name, p) for p in TOKENIZER_PATTERNS)
        if path.is_file() and not weights and not tokenizer and path.name not in skipped:
            shutil.copy2(path, partial / path.name)


TOKENIZER_PATTERNS = ("tokenizer*", "vocab*", "merges.txt", "added_tokens.json", "special_tokens_map.json",
                      "chat_template*", "*.tiktoken", "spiece.model", "sentencepiece*")
"""The files of a tokenizer (fast or slow, its special tokens and chat template) that a Hugging Face folder holds."""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
"""What a folder holds when transformers' AutoTokenizer can load from it (any one of them)."""


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def _generation_config(config: dict) -> dict:
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {"_from_model_config": True, **{k: config[k] for k in keys if config.get(k) is not None}}


def mcore_to_hf(mcore_dir: str | Path, out: str | Path, *, dtype: torch.dtype = torch.bfloat16,
                hf_template: str | Path | None = None, shard_size_bytes: int = 5 * 10**9, overwrite: bool = False,
                verify_tolerance: float | None = None, progress: bool = True,
                tokenizer: str | Path | None = None) -> dict:
    """Convert; returns a summary (tensors, bytes, shards, GB/s, and the log-prob difference when verified).

    tokenizer: a folder whose tokenizer files are written over the template's (a run's model.tokenizer_path).

    verify_tolerance: compare log-probs of both sides before the output is put in place, and fail above
    this difference.
    """
    mcore_dir = Path(mcore_dir)
    template = Path(hf_template) if hf_template is not None else None
    for path, what in ((mcore_dir, "--mcore"), (template, "--hf-template"), (tokenizer, "--tokenizer")):
        if path is not None and (problem := unfinished(path, what)):
            raise ConversionError(problem)
    reader = dcp_io.CheckpointReader(mcore_dir)
    if not (mcore_dir / MARKER).is_file():
        raise ConversionError(f"{mcore_dir}: no {MARKER}, so the save that wrote it did not finish; "
                              "convert an earlier, complete checkpoint")
    marker = read_marker(mcore_dir)
    config = _hf_config(mcore_dir, marker, template)
    arch = ModelArch.from_hf_config(config, source=f"the model config of {mcore_dir}")
    _check_keys(reader, arch)
    _check_tied_head(reader, arch)
    plan, shards = _plan_shards(arch, dtype.itemsize, shard_size_bytes)
    shard_of = {t.name: t.shard for t in plan}
    files = [SINGLE_FILE] if shards == 1 else [f"model-{s + 1:05d}-of-{shards:05d}.safetensors" for s in range(shards)]
    total = sum(torch.Size(t.shape).numel() for t in plan) * dtype.itemsize
    bar = Progress("mcore-to-hf", len(plan), total, quiet=not progress)
    with output_folder(out, overwrite, sources=(mcore_dir, template, tokenizer)) as partial:
        writers = [_ShardWriter(partial / files[s], [t for t in plan if t.shard == s], dtype) for s in range(shards)]
        for group in _groups(arch):
            for name, tensor in _read_group(reader, arch, group):
                tensor = tensor.to(dtype)
                writers[shard_of[name]].write(name, tensor)
                bar.update(1, tensor.nbytes)
        if shards > 1:
            index = {"metadata": {"total_size": total}, "weight_map": {t.name: files[t.shard] for t in plan}}
            (partial / INDEX).write_text(json.dumps(index, indent=2))
        _copy_template(template, partial, tokenizer_elsewhere=tokenizer is not None)
        # Without a template, --tokenizer is the model's folder (the command's own advice): its generation config
        # holds the stop ids and sampling defaults, which a config.json-made one would lose.
        _copy_template(Path(tokenizer) if tokenizer is not None else None, partial,
                       tokenizer_only=template is not None)
        # A config.json read by its model_type alone gets its class named: SGLang and vLLM pick the model by it.
        # Both keys: transformers since 4.56 reads "dtype", older ones and other loaders "torch_dtype".
        config = {**config, "dtype": str(dtype).replace("torch.", ""), "torch_dtype": str(dtype).replace("torch.", "")}
        if not config.get("architectures"):  # absent, null or []: ModelArch read the family from model_type
            config["architectures"] = [arch.architecture]
        config.setdefault("model_type", arch.family)
        (partial / "config.json").write_text(json.dumps(config, indent=2))
        if not (partial / "generation_config.json").is_file():
            (partial / "generation_config.json").write_text(json.dumps(_generation_config(config), indent=2))
        summary = {"tensors": len(plan), "bytes": total, "shards": shards, "gb_per_s": bar.close(),
                   "source_dtype": reader.dtype(families.checkpoint_key(families.EMBEDDING)),
                   "tokenizer": has_tokenizer(partial)}
        if verify_tolerance is not None:
            summary["logp_max_diff"] = check_logprobs(partial, mcore_dir, verify_tolerance, round_to=dtype)
    return summary
