"""Settings of the SGLang rollout engine, and where its GPUs are."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from megatron_dapo.config.loader import ConfigError

SET_BY_US = ("model_path", "tp_size", "skip_tokenizer_init", "base_gpu_id", "mem_fraction_static",
             "enable_memory_saver")
"""ServerArgs the adapter sets itself; `server_args` may not repeat them."""


@dataclass(kw_only=True)
class SGLangEngineConfig:
    """The SGLang engine that each host starts on its node (`rollout.sglang` in the run config)."""

    tp_size: int = 1
    """GPUs of each engine (its tensor parallelism), all on its host's node."""
    base_gpu_id: int | None = None
    """First engine GPU on its host's node; None: GPU 0 colocated, the first after the trainer's disaggregated."""
    mem_fraction_static: float = 0.6
    """Share of the memory free when SGLang starts that its weights and KV cache take (per engine GPU)."""
    server_args: dict[str, Any] = field(default_factory=dict)
    """Further sglang ServerArgs keywords, e.g. {attention_backend: fa3, cuda_graph_max_bs: 256}."""

    def __post_init__(self) -> None:
        problems = []
        if self.tp_size < 1:
            problems.append(f"rollout.sglang.tp_size must be >= 1, got {self.tp_size}")
        if self.base_gpu_id is not None and self.base_gpu_id < 0:
            problems.append(f"rollout.sglang.base_gpu_id must be >= 0 or null, got {self.base_gpu_id}")
        if not 0 < self.mem_fraction_static < 1:
            problems.append(f"rollout.sglang.mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}")
        for key in sorted(set(self.server_args) & set(SET_BY_US)):
            problems.append(f"rollout.sglang.server_args.{key} is set by the trainer; use the rollout.sglang key "
                            "of that name where there is one, or remove it")
        for key in ("dp_size", "pp_size", "nnodes"):
            if self.server_args.get(key, 1) != 1:
                # SGLang takes weight updates with dp_size 1 only, and its workers' ranks in the update group
                # count TP ranks only; an engine spans one node.
                problems.append(f"rollout.sglang.server_args.{key}={self.server_args[key]!r}: the trainer's weight "
                                f"push needs an SGLang engine of one node, TP only; remove {key}, and for more "
                                "engines set rollout.engines")
        context = self.server_args.get("context_length")
        if context is not None and (not isinstance(context, int) or isinstance(context, bool) or context < 1):
            problems.append(f"rollout.sglang.server_args.context_length must be a whole number of tokens >= 1 or "
                            f"absent, got {context!r}")
        if self.server_args.get("load_format") == "dummy":
            problems.append("rollout.sglang.server_args.load_format=dummy: the engines generate from model.path's "
                            "weights before the first push, so they must load them; remove load_format")
        if problems:
            raise ConfigError(problems)

    def model_problems(self, arch) -> list[str]:
        """What SGLang's tensor parallelism refuses of the model (`arch`: a ModelArch) at this tp_size, when it
        loads it: its attention heads split evenly, its KV heads split or replicated evenly, its MLP width split
        evenly (sglang 0.5.23, layers/linear.py and models/qwen2.py). Found before the trainer's start-up."""
        def misfits(tp: int) -> list[str]:
            problems = []
            if arch.num_heads % tp:
                problems.append(f"the model's {arch.num_heads} attention heads")
            if arch.num_kv_heads % tp and tp % arch.num_kv_heads:
                problems.append(f"its {arch.num_kv_heads} KV heads (nor is tp_size a multiple of them)")
            if arch.intermediate_size % tp:
                problems.append(f"its MLP width {arch.intermediate_size}")
            return problems

        problems = misfits(self.tp_size)
        if not problems:
            return []
        fitting = ", ".join(str(tp) for tp in range(1, 17) if not misfits(tp))
        return [f"rollout.sglang.tp_size={self.tp_size} does not divide {' or '.join(problems)}: choose a tp_size "
                f"that does (up to 16: {fitting})"]

    def gpus(self, mode: Literal["colocated", "disaggregated"], *, local_world_size: int, visible_gpus: int) -> range:
        """An engine's GPU ids on its host's node (the host is a node's first rank); ConfigError (naming the keys)
        when they do not exist or clash.

        Colocated: the engine shares the trainer's GPUs (its memory is released while the trainer runs).
        Disaggregated: it needs GPUs of its own, after the `local_world_size` GPUs of the trainer's ranks.
        The answer is the same on every rank, so every rank can check it.
        """
        if visible_gpus == 0:
            raise ConfigError("rollout.name=sglang needs CUDA GPUs and this machine has none visible; "
                              "set rollout.name=embedded (the embedded engine runs on CPU)")
        colocated = mode == "colocated"
        first = self.base_gpu_id if self.base_gpu_id is not None else (0 if colocated else local_world_size)
        gpus = range(first, first + self.tp_size)
        if gpus.stop > visible_gpus:
            raise ConfigError(
                f"the SGLang engine needs GPUs {gpus.start}..{gpus.stop - 1} (rollout.sglang.base_gpu_id="
                f"{first if self.base_gpu_id is not None else f'null, so {first}'}, "
                f"rollout.sglang.tp_size={self.tp_size}) but this node has {visible_gpus}"
                + ("" if colocated else f"; in disaggregated mode the trainer's {local_world_size} ranks use GPUs "
                   f"0..{local_world_size - 1}: start fewer ranks per node (torchrun --nproc-per-node) or lower "
                   "rollout.sglang.tp_size"))
        if not colocated and gpus.start < local_world_size:
            raise ConfigError(
                f"rollout.mode=disaggregated: the SGLang engine's GPUs {gpus.start}..{gpus.stop - 1} overlap the "
                f"trainer's GPUs 0..{local_world_size - 1}; set rollout.sglang.base_gpu_id >= {local_world_size} or "
                "rollout.mode=colocated")
        return gpus
