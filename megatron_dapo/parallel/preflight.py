"""`megatron-dapo check-config`: will this config fit this allocation? Answered without a GPU.

Checks the parallel layout against the allocation (TP x PP divides the ranks, TP stays inside a
node), the model against the layout (heads, KV heads, MLP width by TP; layers by PP), the batch
sizes against data parallelism, the sequence length against the model, and estimates the memory
of the busiest GPU:

- weights bf16 (2 bytes per parameter), gradients fp32 (4: they are reduced in fp32), Adam state
  fp32 (12: master weights and two moments), divided by DP with the distributed optimizer;
- activations of the micro-batches in flight (1F1B keeps up to PP of them on the first stage): per
  layer and token, the bf16 tensors its backward reads (`layer_activation_bytes`, counted as in
  Korthikanti et al., 2022, with fused attention and no dropout, for the SwiGLU MLP and grouped
  query attention of the supported families), and only the layer inputs (2 x hidden bytes a token)
  plus one layer when activations are recomputed;
- the logits of one micro-batch, bf16 with their gradient (4 x tokens x vocab / TP, with the fused kernels);
- a fixed 4 GB for the CUDA context, communication buffers and fragmentation;
- on each engine's host (rank 0 first), the embedded rollout engine when it runs on the GPU: its
  weights and a KV cache for rollout.embedded.max_batch_size full-length sequences (colocated, the
  cache is freed while the actor trains, so it counts only where it outgrows the activations and logits).

SGLang (rollout.name=sglang) takes rollout.sglang.mem_fraction_static of the memory free when it
starts, and gives it back while the actor trains; while it generates, the actor's weights, gradients
and optimizer state stay where they are: colocated, the engine's share must fit next to them
(including the Adam moments that arrive after SGLang has sized itself). With actor.offload the actor
is in host memory when SGLang starts and while it generates, and what must fit is the actor next to
the engine's weights during the push. Disaggregated,
every node starts --gpus-per-node minus rollout.sglang.tp_size trainer ranks, and each host node's last
rollout.sglang.tp_size GPUs run its engine. Either way the engine's share must hold its bf16
weights (split over its TP) with room left for a KV cache.

An estimate: it says what to change when the total passes the GPU's memory, not that a total below
it is certain to run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from megatron_dapo.config.loader import ConfigError
from megatron_dapo.config.root import DAPOConfig
from megatron_dapo.models import families
from megatron_dapo.models.arch import ModelArch, ModelError, read_json_object

GB = 1e9
OVERHEAD_GB = 4.0
PEER_CONTEXT_GB = 0.5
"""A CUDA context that each SGLang TP worker but the first holds on the node's first GPU once it has read a
colocated weight bucket there (docs/rollout.md): after SGLang sized itself, so not in its share."""


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    """What was checked, for the log."""
    problems: list[str] = field(default_factory=list)
    """Each one says what to change."""
    notes: list[str] = field(default_factory=list)
    """Worth knowing; the run can start anyway."""
    model_checked: bool = True
    """False when the model's config.json was not at hand: layout and batches only, no memory estimate."""

    @property
    def fits(self) -> bool:
        return not self.problems

    def render(self) -> str:
        out = list(self.lines)
        out += [f"note: {n}" for n in self.notes]
        out += [f"problem: {p}" for p in self.problems]
        if not self.fits:
            out.append(f"does not fit this allocation: {len(self.problems)} problem(s) above")
        else:
            out.append("fits this allocation" if self.model_checked else
                       "the layout and batches fit this allocation; the model and its memory were not checked")
        return "\n".join(out)


def parameter_counts(arch: ModelArch) -> tuple[int, int, int]:
    """(one decoder layer, the embedding, the output layer) parameter counts; output 0 when tied."""
    def count(rule):
        total = 0
        for shape in families.hf_shapes(rule, arch):
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    layer = sum(count(rule) for rule in families.LAYER_RULES[arch.family])
    embedding = count(families.EMBEDDING)
    output = 0 if arch.tie_word_embeddings else count(families.OUTPUT)
    return layer, embedding, output


def layer_activation_bytes(arch: ModelArch, tp: int = 1, sequence_parallel: bool = False) -> float:
    """Bytes a token's activations take in one decoder layer between its forward and its backward (bf16).

    Replicated over tensor parallelism unless sequence parallel: the inputs of the two RMSNorms and of
    the two column-parallel linears (QKV, gate/up), 2 x hidden bytes each. Split by it: queries, keys
    and values as fused attention keeps them, its output (the output projection's input), the SwiGLU
    MLP's tensors (`mlp_activation_bytes`), and the q/k norms' inputs. Llama 3 8B gives 48 x hidden;
    Qwen2.5's wider MLPs give about 67.
    """
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    replicated = 4 * 2 * arch.hidden_size
    split = 2 * (q + 2 * kv) + 2 * q + mlp_activation_bytes(arch) + (2 * (q + kv) if arch.qk_norm else 0)
    return (replicated + split) / tp if sequence_parallel else replicated + split / tp


def mlp_activation_bytes(arch: ModelArch) -> int:
    """Bytes a token's SwiGLU MLP keeps for its backward past its input (bf16, before tensor parallelism), as
    megatron-core's unfused SwiGLU (bias_activation_fusion off, as the actor builds it) computes
    silu(gate) * (up + 0): the gate/up output (2 x MLP width values), silu(gate), the sum and the product (the
    down projection's input), 10 x the MLP width in all (tests/parallel/test_preflight.py measures it)."""
    f = arch.intermediate_size
    return 2 * (2 * f) + 3 * (2 * f)


def check_allocation(config: DAPOConfig, nodes: int, gpus_per_node: int, gpu_memory_gb: float = 80.0,
                     arch: ModelArch | None = None) -> Report:
    report = Report()
    if nodes < 1 or gpus_per_node < 1:
        report.problems.append(f"--nodes ({nodes}) and --gpus-per-node ({gpus_per_node}) must be >= 1")
        return report
    par = config.parallel
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    rollout = config.rollout
    engine_gpus = rollout.sglang.tp_size if rollout.name == "sglang" and rollout.mode == "disaggregated" else 0
    if engine_gpus >= gpus_per_node:
        report.problems.append(
            f"rollout.mode=disaggregated: the SGLang engine's rollout.sglang.tp_size ({engine_gpus}) GPUs leave none "
            f"of a node's {gpus_per_node} for the trainer: lower rollout.sglang.tp_size or use rollout.mode=colocated")
        return report
    if rollout.name == "sglang" and rollout.mode == "colocated" and rollout.sglang.tp_size > gpus_per_node:
        report.problems.append(f"rollout.sglang.tp_size ({rollout.sglang.tp_size}) is more than a node's "
                               f"{gpus_per_node} GPUs: an engine runs on one node; lower it")
        return report
    if rollout.name == "sglang":
        try:  # where the trainer puts the engine (rollout.sglang.base_gpu_id included), checked as it checks it
            engine_range = rollout.sglang.gpus(rollout.mode, local_world_size=gpus_per_node - engine_gpus,
                                               visible_gpus=gpus_per_node)
        except ConfigError as err:
            report.problems.extend(err.problems)
            return report
    world = nodes * (gpus_per_node - engine_gpus)
    report.lines.append(f"allocation: {nodes} node(s) x {gpus_per_node} GPU(s) = {world} ranks"
                        + (f" ({gpus_per_node - engine_gpus} per node; GPUs {engine_range.start}.."
                           f"{engine_range.stop - 1} of each node are SGLang's)"
                           if engine_gpus else "") + f", {gpu_memory_gb:g} GB each")
    if world % (tp * pp):
        report.problems.append(
            f"parallel.tensor_model_parallel_size ({tp}) x parallel.pipeline_model_parallel_size ({pp}) = {tp * pp} "
            f"does not divide {world} ranks: use a number of nodes that makes nodes x {gpus_per_node - engine_gpus} "
            "a multiple of "
            f"{tp * pp}, or change TP / PP")
        return report
    layout = par.layout(world)
    report.lines.append(f"layout: {layout.describe()}")
    per_node = gpus_per_node - engine_gpus
    if tp > per_node or per_node % tp:
        where = f"the {per_node} trainer ranks per node" if engine_gpus else f"--gpus-per-node ({gpus_per_node})"
        report.problems.append(
            f"parallel.tensor_model_parallel_size ({tp}) must divide {where}: a TP group "
            "exchanges activations in every layer and must stay inside one node; move the rest to "
            "parallel.pipeline_model_parallel_size")
    _check_batches(config, layout.dp, report)
    _check_engines(config, layout, gpus_per_node - engine_gpus, report)
    if not config.model.path:
        report.problems.append("model.path is not set: the training refuses to start without it")
    if not config.data.train_files:  # an example's launcher may add them (examples/trading/run.py makes its own)
        report.notes.append("data.train_files is not set: the training needs it, from this file or the command line")
    if arch is None and config.model.path:  # not ./config.json
        arch = _arch_from_config(config, report)
    elif arch is None:
        report.model_checked = False
    if arch is not None:
        _check_model(config, arch, layout, report)
        _check_memory(config, arch, layout, gpu_memory_gb, report, ranks_per_node=per_node)
    return report


def _check_engines(config: DAPOConfig, layout, ranks_per_node: int, report: Report) -> None:
    """rollout.engines against the replicas, and SGLang's hosts against the nodes (megatron-core's rank order:
    tensor-parallel ranks next to each other, then data-parallel replicas, then pipeline stages)."""
    engines = config.rollout.engines
    if engines > layout.dp:
        report.problems.append(f"rollout.engines ({engines}) is more than the {layout.dp} data-parallel replicas: "
                               "each engine takes its weights from a replica of its own; lower it")
        return
    hosts = [i * (layout.dp // engines) * layout.tp for i in range(engines)]
    report.lines.append(f"rollout: {engines} engine(s) on rank(s) {', '.join(map(str, hosts[:8]))}"
                        + (", ..." if engines > 8 else ""))
    elsewhere = [rank for rank in hosts if rank % ranks_per_node]
    if config.rollout.name == "sglang" and elsewhere:
        report.problems.append(
            f"rollout.engines ({engines}) puts SGLang engines on ranks {elsewhere[:4]}, which are not the first rank "
            f"of their node: choose rollout.engines so that each engine's replicas fill whole nodes")


def _arch_from_config(config: DAPOConfig, report: Report) -> ModelArch | None:
    path = Path(config.model.path) / "config.json"
    if not path.is_file():
        report.notes.append(f"{path} is not readable here: the model's checks (heads and layers against TP / PP, "
                            "sequence length, memory) were skipped; pass --model-config to run them")
        report.model_checked = False
        return None
    return ModelArch.from_hf_config(read_json_object(path, " (model.path's config.json)"), source=str(path))


def _check_batches(config: DAPOConfig, dp: int, report: Report) -> None:
    per_step = config.actor.ppo_mini_batch_size * config.rollout.n
    report.lines.append(f"batches: {config.data.train_batch_size} prompt groups x {config.rollout.n} responses per "
                        f"step, {per_step} sequences per optimizer step over DP {dp}")
    if per_step < dp:  # the actor runs it (a rank without a sequence computes a masked one), at a loss
        report.notes.append(
            f"actor.ppo_mini_batch_size x rollout.n = {per_step} sequences per optimizer step is less than the "
            f"{dp} data-parallel ranks: {dp - per_step} rank(s) idle at every optimizer step; raise "
            "actor.ppo_mini_batch_size or use more TP / PP and fewer DP ranks")
    elif per_step % dp:
        report.notes.append(f"{per_step} sequences per optimizer step do not split evenly over DP {dp}: "
                            "some ranks get one more sequence than others")
    if decay_note := config.unreached_decay():
        report.notes.append(decay_note)


def _check_model(config: DAPOConfig, arch: ModelArch, layout, report: Report) -> None:
    layer, embedding, output = parameter_counts(arch)
    total = layer * arch.num_layers + embedding + output + arch.hidden_size
    report.lines.append(f"model: {arch.architecture}, {total / 1e9:.2f}B parameters, {arch.num_layers} layers, "
                        f"{arch.num_heads} heads / {arch.num_kv_heads} KV heads")
    try:
        families.check_layout(arch, layout.tp, layout.pp)
    except ModelError as err:
        report.problems.append(f"{err}: choose TP and PP that divide them")
    if config.rollout.name == "sglang":
        report.problems += config.rollout.sglang.model_problems(arch)
    longest = config.data.max_prompt_length + config.data.max_response_length
    held = config.rollout.held_back()
    spare = f" less the {held} tokens SGLang keeps back" if held else ""
    if longest > arch.max_position_embeddings - held:
        report.problems.append(
            f"data.max_prompt_length + data.max_response_length = {longest} tokens exceeds the model's "
            f"max_position_embeddings ({arch.max_position_embeddings}){spare}: lower them")
    engine_limit = config.rollout.length_limit()
    if engine_limit is not None and longest > engine_limit[1] - held:
        key, limit = engine_limit
        report.problems.append(
            f"data.max_prompt_length + data.max_response_length = {longest} tokens exceeds {key} ({limit}){spare}, "
            f"and the engine refuses a prompt it cannot extend by a full response: raise {key} or lower them")
    if longest > config.actor.ppo_max_token_len_per_gpu:
        report.notes.append(
            f"a full-length sequence ({longest} tokens) is longer than actor.ppo_max_token_len_per_gpu "
            f"({config.actor.ppo_max_token_len_per_gpu}): such sequences get a micro-batch of their own")


def _embedded_engine_bytes(config: DAPOConfig, arch: ModelArch) -> tuple[float, float] | None:
    """(weights, KV cache) bytes of an embedded engine when it runs on its host's GPU, else None."""
    rollout = config.rollout
    if rollout.name != "embedded" or rollout.embedded.device == "cpu":
        return None
    size = 4 if rollout.embedded.dtype == "float32" else 2
    layer, embedding, output = parameter_counts(arch)
    weights = size * (layer * arch.num_layers + embedding + output)
    tokens = rollout.embedded.max_batch_size * (config.data.max_prompt_length + config.data.max_response_length)
    cache = size * tokens * arch.num_layers * 2 * arch.num_kv_heads * arch.head_dim
    return weights, cache


def _sglang_on_first_gpu(arch: ModelArch, sglang) -> tuple[float, float]:
    """(bf16 weights, the other TP workers' CUDA contexts) of a colocated SGLang engine on its node's first GPU."""
    layer, embedding, output = parameter_counts(arch)
    return (2 * (layer * arch.num_layers + embedding + output) / sglang.tp_size,
            PEER_CONTEXT_GB * GB * (sglang.tp_size - 1))


def _check_sglang(config: DAPOConfig, arch: ModelArch, actor_resident: float, adam_moments: float,
                  actor_grads: float, gpu_memory_gb: float, report: Report, sharded_optimizer: bool = True) -> None:
    """The SGLang engine's share of its GPUs: its weights with room for a KV cache, and (colocated) next to the actor.

    SGLang sizes itself when it starts: weights and KV cache take rollout.sglang.mem_fraction_static of
    the memory free at that moment. Colocated, the actor is built first (its Adam moments come at the
    first step, after SGLang has sized itself) and stays resident while SGLang generates, unless
    actor.offload moves it to host memory (before SGLang starts, and whenever SGLang generates).
    """
    mode, sglang = config.rollout.mode, config.rollout.sglang
    colocated = mode == "colocated"
    offload = colocated and config.actor.offload
    weights, peers = _sglang_on_first_gpu(arch, sglang)
    memory = gpu_memory_gb * GB
    free = memory - OVERHEAD_GB * GB - (actor_resident - adam_moments if colocated and not offload else 0.0)
    if free <= 0:  # colocated: the actor's weights and gradients alone fill the GPU before SGLang starts
        report.problems.append(
            f"colocated SGLang finds no GPU memory free when it starts: the actor's weights and gradients take "
            f"{(actor_resident - adam_moments) / GB:.1f} GB of {gpu_memory_gb:g} GB per GPU already: set "
            "actor.offload=true, use rollout.mode=disaggregated, or use more nodes or a larger "
            "tensor/pipeline-parallel layout")
        return
    share = sglang.mem_fraction_static * free
    report.lines.append(f"SGLang engine ({mode}, {sglang.tp_size} GPU(s)): rollout.sglang.mem_fraction_static "
                        f"{sglang.mem_fraction_static:g} of the {free / GB:.1f} GB free when it starts = "
                        f"{share / GB:.1f} GB per GPU, bf16 weights {weights / GB:.1f} GB of it")
    if weights > 0.8 * share:
        report.problems.append(
            f"the SGLang engine's weights ({weights / GB:.1f} GB per GPU at rollout.sglang.tp_size {sglang.tp_size}) "
            f"leave less than a fifth of its {share / GB:.1f} GB share for the KV cache: raise "
            "rollout.sglang.tp_size or rollout.sglang.mem_fraction_static")
    if not colocated:
        return
    if peers:  # on the node's first GPU, whose figures these are
        report.lines.append(f"the other {sglang.tp_size - 1} SGLang TP workers' CUDA contexts on the node's first GPU "
                            f"(they read each weight bucket there): {peers / GB:.1f} GB, counted below")
    if offload:
        push = actor_resident + weights + OVERHEAD_GB * GB + peers
        report.lines.append(
            f"actor.offload: while SGLang generates, the actor's weights and optimizer state wait in host memory "
            f"({(actor_resident - actor_grads) / GB:.1f} GB per GPU; its gradients are dropped); during the push the "
            f"actor and SGLang's weights share the GPU: {push / GB:.1f} GB of {gpu_memory_gb:g} GB")
        if push > memory:
            report.problems.append(
                f"the weight push needs {push / GB:.1f} GB per GPU (the actor next to SGLang's weights): raise "
                "rollout.sglang.tp_size" + (", or use more nodes (the optimizer state is sharded over data "
                                            "parallelism)" if sharded_optimizer else
                                            ", or set parallel.use_distributed_optimizer=true"))
        return
    total = actor_resident + share + OVERHEAD_GB * GB + peers
    report.lines.append(f"while SGLang generates, its GPUs also hold the actor's weights, gradients and optimizer "
                        f"state ({actor_resident / GB:.1f} GB): {total / GB:.1f} GB of {gpu_memory_gb:g} GB")
    if total > memory:
        fit = math.floor(100 * (memory - actor_resident - OVERHEAD_GB * GB - peers) / free) / 100
        report.problems.append(
            f"colocated SGLang needs {total / GB:.1f} GB per GPU while it generates: "
            + (f"set actor.offload=true, or lower rollout.sglang.mem_fraction_static to {fit:.2f} or less" if fit >= 0.2
               else "set actor.offload=true, use rollout.mode=disaggregated, or "
               + ("use more nodes (the optimizer state is sharded over data parallelism)" if sharded_optimizer
                  else "set parallel.use_distributed_optimizer=true")))


def _check_memory(config: DAPOConfig, arch: ModelArch, layout, gpu_memory_gb: float, report: Report,
                  ranks_per_node: int = 1) -> None:
    layer, embedding, output = parameter_counts(arch)
    vocab = families.padded_vocab_size(arch.vocab_size, layout.tp)  # the actor's embedding and output are padded
    embedding += (vocab - arch.vocab_size) * arch.hidden_size
    output += (vocab - arch.vocab_size) * arch.hidden_size if output else 0
    per_stage = arch.num_layers // layout.pp if arch.num_layers % layout.pp == 0 else -(-arch.num_layers // layout.pp)
    dp_shard = layout.dp if layout.distributed_optimizer else 1
    tokens = max(config.actor.ppo_max_token_len_per_gpu, config.data.max_prompt_length + config.data.max_response_length)
    h, tp = arch.hidden_size, layout.tp
    full_layer = tokens * layer_activation_bytes(arch, tp, layout.sequence_parallel)

    def stage(params: float, in_flight: int, logits: float) -> dict[str, float]:
        """One GPU of a pipeline stage holding `params` parameters (before TP) and `in_flight` micro-batches'
        activations (1F1B: the first stage holds PP of them, the last one), with `logits` bytes of logits."""
        params /= tp
        if config.actor.recompute_activations:
            kept = tokens * h * 2 / (tp if layout.sequence_parallel else 1)
            activations = per_stage * kept * in_flight + full_layer
        else:
            activations = per_stage * full_layer * in_flight
        return {"params": params, "weights": 2 * params, "grads": 4 * params, "optimizer": 12 * params / dp_shard,
                "activations": activations, "logits": logits, "in_flight": in_flight}

    logits_bytes = 4 * tokens * vocab / tp
    if layout.pp == 1:  # one stage holds the embedding and the output layer
        stages = {"every GPU": stage(per_stage * layer + embedding + output, 1, logits_bytes)}
    else:  # the last stage keeps its own copy of a tied embedding; no GPU holds the first's and the last's peaks
        stages = {"first pipeline stage": stage(per_stage * layer + embedding, layout.pp, 0.0),
                  "last pipeline stage": stage(per_stage * layer + (output or embedding), 1, logits_bytes)}
    totals = {name: sum(part[k] for k in ("weights", "grads", "optimizer", "activations", "logits")) + OVERHEAD_GB * GB
              for name, part in stages.items()}
    busiest = max(totals, key=totals.get)
    weights, grads, optimizer, activations, logits = (stages[busiest][k] for k in
                                                     ("weights", "grads", "optimizer", "activations", "logits"))
    total = totals[busiest]
    others = "".join(f"; the {name}: {totals[name] / GB:.1f} GB" for name in totals if name != busiest)
    report.lines.append(
        "memory estimate for the busiest GPU" + (f" ({busiest}{others})" if layout.pp > 1 else "") +
        f": weights {weights / GB:.1f} GB + gradients {grads / GB:.1f} + "
        f"optimizer {optimizer / GB:.1f}" + (f" (sharded over DP {dp_shard})" if dp_shard > 1 else "") +
        f" + activations {activations / GB:.1f} ({tokens} tokens per micro-batch, "
        f"{stages[busiest]['in_flight']} in flight" + (", recomputed" if config.actor.recompute_activations else "") +
        f") + logits {logits / GB:.1f} + overhead {OVERHEAD_GB:.0f} = {total / GB:.1f} GB of {gpu_memory_gb:g} GB")
    params = max(part["params"] for part in stages.values())
    length = config.data.max_prompt_length + config.data.max_response_length
    scores = 12 * (arch.num_heads / tp) * length ** 2  # bf16 scores and probabilities, fp32 softmax in and out
    report.notes.append(
        f"the estimate assumes Transformer Engine's fused attention (pip install '.[te]'); without it megatron-core's "
        f"local attention also keeps each layer's attention scores, {scores / GB:.1f} GB per layer for one "
        f"{length}-token sequence" + (" (one layer at a time, recomputed)" if config.actor.recompute_activations
                                      else f" (x {per_stage} layers)"))
    report.notes.append(
        f"the logits' figure assumes the fused kernels (megatron_dapo._C, built where nvcc and a CUDA torch are); "
        f"without them the pure-torch log-prob's backward holds about five float32 copies of a micro-batch's "
        f"logits, {20 * tokens * vocab / tp / GB:.1f} GB more")
    heavy = max(stages.values(), key=lambda part: part["params"])
    resident = heavy["weights"] + heavy["grads"] + heavy["optimizer"]
    saving = None
    if layout.distributed_optimizer:
        # megatron-core's "fully_reshardable" save (what lets a checkpoint load at another layout) gathers each of
        # the three float32 states of a rank's TP x PP shard (master weights, two Adam moments) in turn from its
        # data-parallel group: on the device (the received shards and the flat buffer torch gathers them into,
        # 8 bytes per parameter, and the rank's own share sent), then into host memory, where the three gathered
        # states (12 bytes per parameter) stay until written, beside a state's copy and concatenation in transit
        # (8 more).
        gathered = 20 * params
        report.lines.append(
            f"host memory while a checkpoint is saved: each rank gathers its shard's optimizer state from its "
            f"data-parallel group, {gathered / GB:.1f} GB per rank, {gathered * ranks_per_node / GB:.0f} GB per node"
            + (" (on top of actor.offload's copies)" if config.actor.offload else ""))
        saving = (8 + 4 / layout.dp) * params
    if config.rollout.name == "sglang":  # an engine's GPUs may be any stage's: the larger actor state counts
        _check_sglang(config, arch, resident, heavy["optimizer"] * 8 / 12,
                      heavy["grads"], gpu_memory_gb, report,
                      sharded_optimizer=layout.distributed_optimizer)  # more nodes: more DP to shard over
    engine = _embedded_engine_bytes(config, arch)
    colocated = config.rollout.mode == "colocated"
    offload = colocated and config.actor.offload
    if saving is not None:  # the engine's KV cache is freed for a save, its weights stay (colocated)
        beside, what = 0.0, ""
        if colocated and config.rollout.name == "sglang":  # its weights, and its other workers' contexts
            beside = sum(_sglang_on_first_gpu(arch, config.rollout.sglang))
            what = "the rollout engine's weights (its KV cache freed) and its workers' contexts"
        elif engine:  # the embedded engine on its host's GPU: colocated, it frees its KV cache for the save
            beside = engine[0] if colocated else engine[0] + engine[1]
            what = "the rollout engine's weights" + (" (its KV cache freed)" if colocated else " and KV cache")
        save_total = resident + saving + beside + OVERHEAD_GB * GB
        report.lines.append(
            f"GPU memory while a checkpoint is saved: the actor's weights, gradients and optimizer state "
            f"{resident / GB:.1f} GB + a gathered optimizer state {saving / GB:.1f}"
            + (f" + {what} {beside / GB:.1f}" if beside else "")
            + f" + overhead {OVERHEAD_GB:.0f} = {save_total / GB:.1f} GB of {gpu_memory_gb:g} GB")
        if save_total > gpu_memory_gb * GB:
            report.problems.append(
                f"a checkpoint's save needs {save_total / GB:.1f} GB per GPU (megatron-core gathers each optimizer "
                "state of a rank's shard on the device): raise parallel.tensor_model_parallel_size (within a node) "
                "or parallel.pipeline_model_parallel_size, for fewer parameters per rank")
    if engine:
        weights_b, cache_b = engine
        host_name = next(iter(stages))  # rank 0, an engine's host, is in the first pipeline stage
        host, host_total = stages[host_name], totals[host_name]
        if offload:  # generating, the engine has the GPU to itself; training, the actor and the engine's weights
            host_total = OVERHEAD_GB * GB + weights_b + max(host_total - OVERHEAD_GB * GB, cache_b)
        elif colocated:  # the engine drops its KV cache while the actor trains: the busier phase counts
            host_total += weights_b + max(0.0, cache_b - host["activations"] - host["logits"])
        else:
            host_total += weights_b + cache_b
        total = max(total, host_total)
        report.lines.append(
            f"each engine's host (rank 0 first) also holds an embedded rollout engine: weights {weights_b / GB:.1f} GB "
            "+ KV cache "
            f"{cache_b / GB:.1f} GB (rollout.embedded.max_batch_size {config.rollout.embedded.max_batch_size} x "
            f"{config.data.max_prompt_length + config.data.max_response_length} tokens)"
            + (", with the actor in host memory while it generates (actor.offload)" if offload else
               ", freed while the actor trains, in place of its activations and logits" if colocated else "")
            + f" = {host_total / GB:.1f} GB there")
    if total <= gpu_memory_gb * GB:
        return
    fixes = []
    if engine and engine[1] > 0.2 * total:
        fixes.append("lower rollout.embedded.max_batch_size or set rollout.name=sglang"
                     + ("" if offload or not colocated else ", or set actor.offload=true"))
    if not config.actor.recompute_activations and activations > 0.2 * total:
        fixes.append("set actor.recompute_activations=true")
    if layout.tp > 1 and not layout.sequence_parallel:
        fixes.append("set parallel.sequence_parallel=true")
    if activations + logits > 0.2 * total:
        fixes.append(f"lower actor.ppo_max_token_len_per_gpu (now {config.actor.ppo_max_token_len_per_gpu})")
    if not layout.distributed_optimizer and layout.dp > 1:
        fixes.append("set parallel.use_distributed_optimizer=true")
    fixes.append("raise parallel.tensor_model_parallel_size (within a node) or parallel.pipeline_model_parallel_size")
    if layout.distributed_optimizer:
        fixes.append("use more nodes (the optimizer state is sharded over data parallelism)")
    report.problems.append(f"the estimate ({total / GB:.1f} GB) exceeds the GPU's {gpu_memory_gb:g} GB: "
                           + "; or ".join(fixes))
