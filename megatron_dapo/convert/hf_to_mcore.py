"""Hugging Face folder -> megatron-core dist checkpoint that the actor loads at any TP x PP.

Every tensor is checked against the family table and config.json before anything is written. The
checkpoint stores each weight at its TP=1 shape (q/k/v interleaved per query group, gate/up
stacked, layers stacked on a leading axis, the vocabulary unpadded); megatron-core cuts it for
whatever layout loads it. Only one fused layer tensor is in memory at a time.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_dapo.actor.checkpoint import MARKER, reading_unfinished
from megatron_dapo.convert import dcp_io
from megatron_dapo.convert.verify import check_logprobs
from megatron_dapo.convert.output import ConversionError, Progress, output_folder, unfinished
from megatron_dapo.models import families
from megatron_dapo.models.arch import ModelArch, read_json_object
from megatron_dapo.models.hf_io import HFCheckpointReader


def _check_tensors(reader: HFCheckpointReader, arch: ModelArch) -> None:
    """Every tensor the table needs is there with the shape config.json implies; nothing else is."""
    expected = families.hf_tensor_shapes(arch)
    present = set(reader.names())
    if arch.tie_word_embeddings and "lm_head.weight" in present:
        reader.check_tied_head(tied=True)  # some tied checkpoints carry lm_head.weight too: it must be the embedding
        present.discard("lm_head.weight")
    unknown = sorted(present - set(expected))
    if unknown:
        shown = ", ".join(f"{name!r} (in {reader.shard_of(name).name})" for name in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise ConversionError(f"{reader.folder}: tensor {shown}{more} is not in the {arch.family} table "
                              f"({arch.architecture} with this config.json has no such parameter)")
    missing = [name for name in expected if name not in present]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ConversionError(f"{reader.folder}: tensor(s) {', '.join(map(repr, missing[:5]))}{more} are missing")
    for name, shape in expected.items():
        found, _ = reader.info(name)
        if found != shape:
            raise ConversionError(f"{reader.shard_of(name)}: tensor {name!r} has shape {found}, "
                                  f"expected {shape} from config.json")


def plan_chunks(reader: HFCheckpointReader, arch: ModelArch, dtype: torch.dtype | None) -> list[dcp_io.Chunk]:
    """One chunk per (rule, layer): its key, place in the stacked global tensor, and how to read and fuse it."""
    chunks = []
    for rule, layer in families.hf_export_rules(arch):
        names = families.hf_names(rule, layer)
        shape = families.megatron_shape(rule, arch)
        chunk_dtype = dtype or reader.info(names[0])[1]

        def load(rule=rule, names=names, layer=layer):
            full = families.fuse(rule, [reader.get(name) for name in names], arch)
            return full if layer is None else full[None]

        if layer is None:
            chunks.append(dcp_io.Chunk(families.checkpoint_key(rule), shape, (0,) * len(shape), shape, chunk_dtype, load))
        else:
            chunks.append(dcp_io.Chunk(families.checkpoint_key(rule), (arch.num_layers, *shape),
                                       (layer, *(0,) * len(shape)), (1, *shape), chunk_dtype, load))
    return chunks


def extra_states(arch: ModelArch) -> list[dcp_io.ExtraState]:
    """The per-layer `_extra_state` objects megatron-core's layers save (None: no FP8 scaling state)."""
    return [dcp_io.ExtraState(f"decoder.layers.{module}._extra_state", layer, arch.num_layers)
            for module in families.LINEAR_MODULES for layer in range(arch.num_layers)]


def hf_to_mcore(hf_dir: str | Path, out: str | Path, *, dtype: torch.dtype | None = None, overwrite: bool = False,
                verify_tolerance: float | None = None, progress: bool = True) -> dict:
    """Convert; returns a summary (tensors, bytes, GB/s, and the log-prob difference when verified).

    dtype: of the stored weights (default: as in the source). verify_tolerance: compare log-probs of
    both sides before the output is put in place, and fail above this difference.
    """
    hf_dir = Path(hf_dir)
    if problem := unfinished(hf_dir, "--hf"):
        raise ConversionError(problem)
    arch = ModelArch.from_pretrained(hf_dir)
    hf_config = read_json_object(hf_dir / "config.json")
    reader = HFCheckpointReader(hf_dir)
    _check_tensors(reader, arch)
    chunks = plan_chunks(reader, arch, dtype)
    total = sum(torch.Size(c.shape).numel() * c.dtype.itemsize for c in chunks)
    bar = Progress("hf-to-mcore", len(chunks), total, quiet=not progress)
    with output_folder(out, overwrite, sources=(hf_dir,)) as partial:
        dcp_io.write_checkpoint(partial, chunks, extra_states(arch), common={"actor_steps": 0},
                                on_written=lambda chunk, data: bar.update(1, data.nbytes))
        rate = bar.close()
        marker = {"actor_steps": 0, "weights_only": True, "converted_from": str(hf_dir.resolve()),
                  "dtype": str(dtype or "as in the source").replace("torch.", ""), "hf_config": hf_config}
        (partial / MARKER).write_text(json.dumps(marker, indent=1))
        summary = {"tensors": len(chunks), "bytes": total, "gb_per_s": rate,
                   "source_dtype": reader.info(families.EMBEDDING.hf[0])[1]}
        if verify_tolerance is not None:
            with reading_unfinished(partial):  # the one read of a .partial folder: complete, not yet verified
                summary["logp_max_diff"] = check_logprobs(hf_dir, partial, verify_tolerance, round_to=dtype)
    return summary

