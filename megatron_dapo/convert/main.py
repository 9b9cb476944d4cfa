"""`megatron-dapo convert` / tools/convert_checkpoint.py: Hugging Face <-> megatron-core checkpoints."""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from megatron_dapo.actor.checkpoint import CheckpointError
from megatron_dapo.convert.dcp_io import CheckpointFormatError
from megatron_dapo.models.arch import ModelError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[unit])


def build_parser(prog: str = "megatron-dapo convert") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Convert checkpoints between Hugging Face and megatron-core")
    commands = parser.add_subparsers(dest="direction", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--out", required=True, help="output folder (written as OUT.partial, renamed when complete)")
        sub.add_argument("--overwrite", action="store_true", help="replace an output folder that is not empty")
        sub.add_argument("--verify", action="store_true",
                         help="compare log-probs of both sides on a few sequences before putting the output in place "
                              "(loads both models in fp32)")
        sub.add_argument("--tolerance", type=float, default=1e-3, help="largest log-prob difference --verify accepts")
        sub.add_argument("--quiet", action="store_true", help="no progress line")

    to_mcore = commands.add_parser("hf-to-mcore", help="Hugging Face folder -> megatron-core dist checkpoint")
    to_mcore.add_argument("--hf", required=True, help="Hugging Face folder: config.json and safetensors")
    to_mcore.add_argument("--dtype", choices=sorted(DTYPES), help="stored dtype (default: as in the source)")
    common(to_mcore)

    to_hf = commands.add_parser("mcore-to-hf", help="megatron-core dist checkpoint (any layout) -> Hugging Face folder")
    to_hf.add_argument("--mcore", required=True, help="checkpoint folder (a run's checkpoints/step_N or a converted one)")
    to_hf.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="output dtype (default bf16)")
    to_hf.add_argument("--hf-template", help="Hugging Face folder whose tokenizer, generation config and config.json "
                                             "to use (needed when the checkpoint does not record config.json)")
    to_hf.add_argument("--tokenizer", help="folder whose tokenizer files to write over the template's (a run's "
                                           "model.tokenizer_path or model.path)")
    to_hf.add_argument("--shard-size", type=parse_size, default="5GB", help="largest safetensors shard (default 5GB)")
    common(to_hf)
    return parser


def main(argv: list[str] | None = None, prog: str = "megatron-dapo convert") -> int:
    from megatron_dapo.convert.hf_to_mcore import hf_to_mcore
    from megatron_dapo.convert.mcore_to_hf import TOKENIZER_FILES, has_tokenizer, mcore_to_hf
    from megatron_dapo.convert.output import ConversionError

    args = build_parser(prog).parse_args(argv)
    tolerance = args.tolerance if args.verify else None
    try:
        if args.direction == "hf-to-mcore":
            summary = hf_to_mcore(args.hf, args.out, dtype=DTYPES.get(args.dtype), overwrite=args.overwrite,
                                  verify_tolerance=tolerance, progress=not args.quiet)
        else:
            if args.tokenizer is not None and not has_tokenizer(Path(args.tokenizer)):
                raise ConversionError(f"--tokenizer {args.tokenizer}: "
                                      + (f"holds none of {', '.join(TOKENIZER_FILES)}" if Path(args.tokenizer).is_dir()
                                         else "no such folder"))
            summary = mcore_to_hf(args.mcore, args.out, dtype=DTYPES[args.dtype], hf_template=args.hf_template,
                                  shard_size_bytes=args.shard_size, overwrite=args.overwrite,
                                  verify_tolerance=tolerance, progress=not args.quiet, tokenizer=args.tokenizer)
    except (ModelError, CheckpointFormatError, CheckpointError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 1
    line = f"wrote {args.out}: {summary['tensors']} tensors, {summary['bytes'] / 1e9:.3f} GB"
    if "shards" in summary:
        line += f" in {summary['shards']} shard(s)"
    if "logp_max_diff" in summary:
        line += f"; verified: max |log-prob difference| = {summary['logp_max_diff']:.3g} <= {args.tolerance:g}"
    print(line)
    if summary.get("tokenizer") is False:
        print(f"note: {args.out} has no tokenizer files, so transformers' AutoTokenizer, SGLang and a run's model.path "
              "cannot use it as it is; convert again with --tokenizer DIR (the model folder the run started from) "
              "or --hf-template DIR")
    for note in dtype_notes(summary.get("source_dtype"), DTYPES.get(args.dtype), args.direction):
        print(f"note: {note}")
    return 0


def dtype_notes(source: torch.dtype | None, target: torch.dtype | None, direction: str) -> list[str]:
    """What writing weights stored as `source` as `target` does to them (None: written as stored)."""
    if source is None or target is None or source == target:
        return []
    name = str(source).replace("torch.", "")
    given = next(key for key, dtype in DTYPES.items() if dtype == target)
    overflow = " and turns any beyond fp16's range (65504) into inf" if target == torch.float16 else ""
    if source == torch.float64:  # wider than every --dtype: each rounds; hf-to-mcore without one writes them as stored
        keep = " (leave out --dtype to keep them exact)" if direction == "hf-to-mcore" else ""
        return [f"the checkpoint's model weights are float64; the {given} copy rounds them{overflow}{keep}"]
    if target == torch.float32:  # every fp16 and bf16 value is an fp32 value
        if direction != "mcore-to-hf":
            return []
        return [f"the checkpoint's model weights are {name}, so the {given} copy holds their values exactly, no "
                "more precise (a bf16 run keeps its fp32 master weights in the optimizer state, which is not "
                "converted)"]
    keep = next((key for key, dtype in DTYPES.items() if dtype == source), "fp32")
    return [f"the checkpoint's model weights are {name}; the {given} copy rounds them{overflow} (pass --dtype {keep} "
            "to keep them exact)"]
