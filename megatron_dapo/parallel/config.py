"""The parallel layout: one validated object, built once from the config and the world size."""
from __future__ import annotations

from dataclasses import dataclass

from megatron_dapo.config.loader import ConfigError


@dataclass(kw_only=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    """TP: each layer's weights split across this many ranks."""
    pipeline_model_parallel_size: int = 1
    """PP: the layers split into this many consecutive stages."""
    virtual_pipeline_model_parallel_size: int | None = None
    """Interleaved pipeline: model chunks per PP rank; None for the plain 1F1B schedule."""
    sequence_parallel: bool = False
    """SP: activations outside attention/MLP split along the sequence across the TP ranks (TP > 1 only)."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state across data-parallel ranks."""

    def __post_init__(self) -> None:
        problems = []
        if self.tensor_model_parallel_size < 1:
            problems.append(f"parallel.tensor_model_parallel_size must be >= 1, got {self.tensor_model_parallel_size}")
        if self.pipeline_model_parallel_size < 1:
            problems.append(
                f"parallel.pipeline_model_parallel_size must be >= 1, got {self.pipeline_model_parallel_size}"
            )
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and (vpp < 1 or self.pipeline_model_parallel_size < 2):
            problems.append(
                "parallel.virtual_pipeline_model_parallel_size needs parallel.pipeline_model_parallel_size >= 2 "
                f"and a value >= 1 (got vpp={vpp}, pp={self.pipeline_model_parallel_size}); set it to null otherwise"
            )
        if problems:
            raise ConfigError(problems)

    def layout(self, world_size: int) -> ParallelLayout:
        """The layout for `world_size` ranks; DP is what remains after TP x PP."""
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        if world_size < 1 or world_size % (tp * pp):
            raise ConfigError(
                f"parallel.tensor_model_parallel_size ({tp}) x parallel.pipeline_model_parallel_size ({pp}) = {tp * pp} "
                f"does not divide the world size {world_size}: launch a multiple of {tp * pp} ranks or change TP/PP"
            )
        return ParallelLayout(
            world_size=world_size,
            tp=tp,
            pp=pp,
            dp=world_size // (tp * pp),
            vpp=self.virtual_pipeline_model_parallel_size,
            # As in Megatron-LM, sequence parallelism is a no-op without tensor parallelism.
            sequence_parallel=self.sequence_parallel and tp > 1,
            distributed_optimizer=self.use_distributed_optimizer,
        )


@dataclass(frozen=True, kw_only=True)
class ParallelLayout:
    """TP x PP x DP over `world_size` ranks (validated; build it with ParallelConfig.layout)."""

    world_size: int
    tp: int
    pp: int
    dp: int
    vpp: int | None
    sequence_parallel: bool
    distributed_optimizer: bool

    def describe(self) -> str:
        sp = "+SP" if self.sequence_parallel else ""
        vpp = f" (vpp {self.vpp})" if self.vpp else ""
        return f"TP{self.tp}{sp} x PP{self.pp}{vpp} x DP{self.dp} = {self.world_size} ranks"
