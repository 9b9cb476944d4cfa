"""The `megatron-dapo` command."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import traceback
from pathlib import Path

from megatron_dapo.config.loader import ConfigError
from megatron_dapo.config.root import dump_config, load_config
from megatron_dapo.models.arch import ModelError, read_json_object
from megatron_dapo.trainer.lock import RunFolderInUse


def _config(args: argparse.Namespace) -> int:
    world_size = args.world_size if args.world_size is not None else _env_world_size()
    config = load_config(args.config, args.overrides, world_size=world_size)
    if args.get is not None:  # one setting's resolved value, for a script (the sbatch scripts' run folder)
        value = config
        for part in args.get.split("."):
            if not dataclasses.is_dataclass(value) or part not in {f.name for f in dataclasses.fields(value)}:
                raise ConfigError(f"--get {args.get!r}: no such setting")
            value = getattr(value, part)
        if dataclasses.is_dataclass(value):
            raise ConfigError(f"--get {args.get}: a section; name one of its settings ({args.get}.KEY)")
        print(value if isinstance(value, str) else json.dumps(value))  # text as it is; the rest as JSON (null, true)
        return 0
    print(dump_config(config), end="")
    if world_size is not None:
        print(f"# layout: {config.parallel.layout(world_size).describe()}")
    return 0


def _check_config(args: argparse.Namespace) -> int:
    from megatron_dapo.models.arch import ModelArch
    from megatron_dapo.parallel.preflight import check_allocation

    config = load_config(args.config, args.overrides)
    arch = None
    if args.model_config:
        path = Path(args.model_config)
        if not path.is_file():
            raise ModelError(f"--model-config {path}: no such file")
        arch = ModelArch.from_hf_config(read_json_object(path, " (--model-config)"), source=str(path))
    report = check_allocation(config, args.nodes, args.gpus_per_node, args.gpu_memory_gb, arch=arch)
    print(report.render())
    return 0 if report.fits else 1


KNOWN_NOISE = (
    # megatron-core's imports and model build without Transformer Engine / apex: the trainer uses the local
    # layer spec (torch norms) and torch's AdamW then, by design; the trainer's first lines say which.
    (UserWarning, r"(Transformer Engine and )?Apex (is|are) not installed"),
    (UserWarning, r"full scope is deprecated"),  # TransformerConfig's own default cuda_graph_scope
    # DistributedOptimizer zeroes the .grad of its float32 shard views (non-leaf views of the parameters);
    # only megatron-core's accesses are left out.
    (UserWarning, r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed", r"megatron\."),
    # megatron-core 0.16 calls the collectives torch 2.13 renamed.
    (FutureWarning, r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated"),
)
"""Warnings every rank of every run printed, about nothing the run can change: left out of `train`'s output."""


def _quiet_known_noise() -> None:
    import warnings

    for category, message, *module in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category, module=module[0] if module else "")


def _train(args: argparse.Namespace) -> int:
    _quiet_known_noise()
    from megatron_dapo.parallel.init import shutdown_distributed
    from megatron_dapo.trainer.loop import Trainer

    try:
        Trainer(load_config(args.config, args.overrides)).train()
    except BaseException:
        shutdown_distributed(failed=True)
        raise
    shutdown_distributed()
    return 0


def _plot(args: argparse.Namespace) -> int:
    from megatron_dapo.metrics.plot import plot_run

    try:
        print(plot_run(args.run_dir, args.out))
    except FileNotFoundError as err:  # not a run folder: the message says which file is missing
        print(f"megatron-dapo: {err}", file=sys.stderr)
        return 2
    return 0


def _bench(args: argparse.Namespace) -> int:
    from megatron_dapo.bench.kernels import main as bench_kernels

    return bench_kernels(args.options)


def _convert(args: argparse.Namespace) -> int:
    from megatron_dapo.convert.main import main as convert

    return convert(args.options)


def _env_world_size() -> int | None:
    value = os.environ.get("WORLD_SIZE")
    return int(value) if value and value.isdigit() else None


def _at_least_one(text: str) -> int:
    """An allocation's count (--nodes, --gpus-per-node): a whole number >= 1, else argparse's usage error (exit 2),
    which is not check-config's "does not fit" (exit 1)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _gigabytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number of GB")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-dapo", description="DAPO reinforcement learning on megatron-core")
    commands = parser.add_subparsers(dest="command", required=True)

    config = commands.add_parser("config", help="print the resolved, validated config")
    config.add_argument("config", help="YAML config file")
    config.add_argument("overrides", nargs="*", help="dotted overrides, e.g. actor.clip_ratio_high=0.28")
    config.add_argument("--world-size", type=_at_least_one, help="check the parallel layout for this many ranks")
    config.add_argument("--get", metavar="KEY", help="print only this setting's value, e.g. trainer.run_dir")
    config.set_defaults(run=_config)

    check = commands.add_parser("check-config", help="will this config fit an allocation? (no GPU needed)")
    check.add_argument("config", help="YAML config file")
    check.add_argument("overrides", nargs="*", help="dotted overrides")
    check.add_argument("--nodes", type=_at_least_one, required=True, help="nodes in the allocation")
    check.add_argument("--gpus-per-node", type=_at_least_one, required=True, help="GPUs (ranks) per node")
    check.add_argument("--gpu-memory-gb", type=_gigabytes, default=80.0, help="memory of one GPU (default 80, an H100)")
    check.add_argument("--model-config", help="the model's config.json, when model.path is not readable here")
    check.set_defaults(run=_check_config)

    train = commands.add_parser("train", help="run DAPO training (also under torchrun)")
    train.add_argument("config", help="YAML config file")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.total_training_steps=10")
    train.set_defaults(run=_train)

    plot = commands.add_parser("plot", help="write PNG curves of a run's main metrics")
    plot.add_argument("run_dir", help="run folder (holds metrics.jsonl)")
    plot.add_argument("--out", help="PNG path (default RUN_DIR/metrics.png)")
    plot.set_defaults(run=_plot)

    convert = commands.add_parser("convert", add_help=False,
                                  help="checkpoint conversion: `convert hf-to-mcore ...` or `convert mcore-to-hf ...`")
    convert.add_argument("options", nargs=argparse.REMAINDER, help="see `megatron-dapo convert --help`")
    convert.set_defaults(run=_convert)

    bench = commands.add_parser("bench", help="benchmarks: `bench kernels [--out DIR ...]` (needs a GPU)")
    bench.add_argument("what", choices=["kernels"], help="kernels: the fused kernels against the pure-torch ops")
    bench.add_argument("options", nargs=argparse.REMAINDER, help="options of tools/bench_kernels.py")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse takes positional overrides only before the options (`check-config C --nodes 2 a.b=1` leaves a.b=1
    # over): dotted overrides after them belong to the overrides too.
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra and hasattr(args, "options"):  # `convert --help`: REMAINDER leaves an option it starts with over
        args.options = [*extra, *args.options]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.run(args)
    except ConfigError as err:
        print(f"megatron-dapo: config error: {err}", file=sys.stderr)
        return 2
    except ModelError as err:  # a model folder or layout that cannot work: the message says what to change
        print(f"megatron-dapo: {err}", file=sys.stderr)
        return 2
    except RunFolderInUse as err:  # another training holds trainer.run_dir: the message names it
        print(f"megatron-dapo: {err}", file=sys.stderr)
        return 2
    except Exception:
        if args.run is not _check_config:
            raise
        # Exit 1 is check-config's "does not fit": a failure of the check itself must not read as a verdict.
        traceback.print_exc()
        print("megatron-dapo check-config: the check itself failed (above); this is no verdict on the config",
              file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
