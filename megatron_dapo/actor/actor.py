"""The Megatron actor: old log-probs (forward only) and DAPO updates through megatron-core's schedules."""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_dapo.actor.batch import ActorBatch, data_parallel_shares, split_by_token_budget
from megatron_dapo.actor.checkpoint import load_model_weights
from megatron_dapo.actor.config import ActorConfig, OptimConfig
from megatron_dapo.actor.loss import PolicyLossOutput, aggregate_loss, loss_metrics, policy_loss
from megatron_dapo.actor.model import build_gpt_model, check_sequence_length, check_token_ids, load_hf_weights
from megatron_dapo.actor.offload import HostOffload, OffloadStats
from megatron_dapo.models.arch import ModelArch, read_json_object
from megatron_dapo.ops.logprob import vocab_parallel_logprob
from megatron_dapo.parallel.config import ParallelLayout
from megatron_dapo.parallel.init import default_device, stop_together

_SUMS = ("tokens", "clip_high", "clip_low", "dual_clip", "kl_k1", "kl_k3", "clip_high_prob", "entropy", "loss")
_MAXIMA = PolicyLossOutput.MAXIMA


@dataclass
class _MicroBatch:
    rows: list[int]
    """Rows of the (mini-)batch, on this data-parallel rank."""
    data: ActorBatch
    tokens: torch.Tensor
    """[b, s] padded to the micro-batch's width."""
    positions: torch.Tensor


def learning_rate(optim: OptimConfig, step: int, last_step: int | None = None) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warm-up over optim.lr_warmup_steps (the first
    step already moves), then optim.lr, or a cosine / linear decay that reaches optim.min_lr at step
    optim.lr_decay_steps (when that is 0: at `last_step`, the run's last) and stays there."""
    warmup = optim.lr_warmup_steps
    if step < warmup:
        return optim.lr * (step + 1) / warmup
    end = optim.lr_decay_steps or last_step
    if optim.lr_decay_style == "constant" or end is None or end <= warmup:
        return optim.lr
    progress = min(1.0, (step - warmup) / (end - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if optim.lr_decay_style == "cosine" else 1 - progress
    return optim.min_lr + (optim.lr - optim.min_lr) * shape


class MegatronActor:
    """This rank's shard of the policy, its optimizer and its schedules.

    Every rank is given the same whole batch; each data-parallel rank takes its rows, each pipeline
    runs its micro-batches, and the loss of every shard is already divided by the whole
    mini-batch's token (or sequence) count, so gradients add up to the unsplit batch's.
    """

    def __init__(self, config: ActorConfig, model_path: str | Path, layout: ParallelLayout, *, temperature: float,
                 norm_len: int | None = None, bf16: bool | None = None, weights: str | Path | None = None,
                 last_step: int | None = None, load_weights: bool = True):
        """model_path: the Hugging Face folder whose config.json defines the model and whose safetensors
        it starts from, unless `weights` names a megatron-core checkpoint to take the weights from.
        load_weights: False leaves the weights as built, for a caller that loads a whole checkpoint over them
        next (load_actor: a resumed run, which would otherwise read a full set of weights for nothing).
        last_step: the index of the run's last optimizer step, where a learning-rate decay ends unless its config
        says otherwise."""
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        if config.loss_agg_mode == "seq-mean-token-sum-norm" and norm_len is None:
            # aggregate_loss's default, the padded width, differs from micro-batch to micro-batch here
            raise ValueError("actor.loss_agg_mode=seq-mean-token-sum-norm needs norm_len, the fixed length each "
                             "sequence's loss sum is divided by (the trainer passes data.max_response_length)")
        if layout.vpp is not None:
            raise ValueError(
                "parallel.virtual_pipeline_model_parallel_size is not supported by the actor yet: set it to null"
            )
        self.config, self.layout, self.temperature, self.norm_len = config, layout, temperature, norm_len
        self.arch = ModelArch.from_pretrained(model_path)
        self.hf_config = read_json_object(Path(model_path) / "config.json")
        bf16 = torch.cuda.is_available() if bf16 is None else bf16
        model = build_gpt_model(self.arch, layout, bf16=bf16, recompute=config.recompute_activations)
        if torch.cuda.is_available():
            model.cuda()
        if load_weights and weights is None:
            load_hf_weights(model, self.arch, model_path)
        elif load_weights:
            load_model_weights(model, weights, arch=self.arch)
        self.transformer_config = model.config
        self.model = DistributedDataParallel(
            model.config,
            DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                          use_distributed_optimizer=layout.distributed_optimizer),
            model,
        )
        model.config.finalize_model_grads_func = _finalize_grads
        optim = config.optim
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=optim.lr, weight_decay=optim.weight_decay,
                            adam_beta1=optim.betas[0], adam_beta2=optim.betas[1], adam_eps=optim.eps,
                            clip_grad=optim.grad_clip, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
                            use_distributed_optimizer=layout.distributed_optimizer),
            [self.model],
        )
        self.steps = 0
        """Optimizer steps taken."""
        self.scheduled = 0
        """Learning-rate schedule indices used so far, one a mini-batch, stepped or skipped: where an update without
        schedule_step starts."""
        self.last_step = last_step
        self._host = HostOffload(self)

    # ---- device memory ----------------------------------------------------------------------

    def offload(self) -> OffloadStats:
        """Weights and optimizer state to host memory, gradients freed (actor.offload; see offload.py)."""
        return self._host.offload()

    def reload(self) -> OffloadStats:
        """Back on the device after `offload`; gradients start at zero."""
        return self._host.reload()

    def check_resident(self) -> None:
        """RuntimeError when the weights are offloaded: computing on them would read freed memory."""
        if self._host.offloaded:
            raise RuntimeError("the actor's weights and optimizer state are in host memory (actor.offload): "
                               "call reload() before computing or saving")

    # ---- groups and devices -------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return default_device()

    @staticmethod
    def _groups():
        from megatron.core import parallel_state as ps

        return ps

    def _is_last_stage(self) -> bool:
        return self._groups().is_pipeline_last_stage()

    # ---- micro-batching ---------------------------------------------------------------------

    def _local_rows(self, lengths: list[int]) -> list[int]:
        """This data-parallel rank's rows, in batch order: balanced by tokens (`data_parallel_shares`)."""
        ps = self._groups()
        return data_parallel_shares(lengths, ps.get_data_parallel_world_size())[ps.get_data_parallel_rank()]

    def _micro_batches(self, batch: ActorBatch, first_row: int = 0) -> list[_MicroBatch]:
        """`batch`: rows first_row.. of the batch the caller was given (for naming a bad sample)."""
        _check_not_empty(batch)
        check_sequence_length(self.arch, int(batch.lengths.max()))
        check_token_ids(self.arch, batch.tokens, batch.lengths, first_row)
        rows = self._local_rows(batch.lengths.tolist())
        if not rows:  # more data-parallel ranks than rows: run the shortest row with no loss so the schedule runs
            rows, empty = [int(batch.lengths.argmin())], True
        else:
            empty = False
        multiple = self.layout.tp if self.layout.sequence_parallel else 1
        lengths = [int(batch.lengths[r]) for r in rows]
        out = []
        for group in split_by_token_budget(lengths, self.config.ppo_max_token_len_per_gpu, multiple):
            picked = [rows[i] for i in group]
            data = batch.rows(torch.tensor(picked))
            if empty:
                data.loss_mask = torch.zeros_like(data.loss_mask)
                picked = []
            width = -(-data.tokens.shape[1] // multiple) * multiple
            tokens = torch.nn.functional.pad(data.tokens, (0, width - data.tokens.shape[1])).to(self.device)
            positions = torch.arange(width, device=self.device).expand_as(tokens)
            out.append(_MicroBatch(rows=picked, data=data, tokens=tokens, positions=positions))
        return out

    def _run(self, micro_batches: list[_MicroBatch], loss_fn, forward_only: bool) -> list[dict]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator: Iterator[_MicroBatch], model):
            mb = next(data_iterator)
            output = model(mb.tokens, mb.positions, attention_mask=None)
            return output, partial(loss_fn, mb)

        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=[self.model],
            num_microbatches=len(micro_batches),
            seq_length=max(mb.tokens.shape[1] for mb in micro_batches),
            micro_batch_size=max(mb.tokens.shape[0] for mb in micro_batches),
            forward_only=forward_only,
        )

    def _logp_entropy(self, mb: _MicroBatch, logits: torch.Tensor,
                      temperature: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [b, s, V/tp] -> logp, entropy [b, s] aligned with the tokens (column 0 is 0), at `temperature`
        (default: the rollout's)."""
        ps = self._groups()
        width = logits.shape[-1]
        # Every position's logits against the next token (the last position against token 0, dropped
        # below): the logits are used whole, never sliced into a copy, and their memory takes the gradient.
        targets = torch.nn.functional.pad(mb.tokens[:, 1:], (0, 1))
        logp, entropy = vocab_parallel_logprob(
            logits, targets, temperature=self.temperature if temperature is None else temperature,
            vocab_start=ps.get_tensor_model_parallel_rank() * width, vocab_size=self.arch.vocab_size,
            group=ps.get_tensor_model_parallel_group(), inplace_backward=logits.requires_grad,
        )
        pad = (1, 0)
        s = mb.data.tokens.shape[1]
        return (torch.nn.functional.pad(logp[:, :-1], pad)[:, :s],
                torch.nn.functional.pad(entropy[:, :-1], pad)[:, :s])

    # ---- forward only -----------------------------------------------------------------------

    @torch.no_grad()
    def compute_logprobs(self, batch: ActorBatch,
                         temperature: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(token t | tokens < t) and the entropy there, [B, S] float32, on every rank (0 at t = 0
        and beyond each row's length), at `temperature` (default: the rollout's, as the loss sees them)."""
        self.check_resident()
        self.model.eval()
        micro_batches = self._micro_batches(batch)

        def collect(mb: _MicroBatch, logits: torch.Tensor):
            logp, entropy = self._logp_entropy(mb, logits, temperature)
            return logits.new_zeros(()), torch.tensor(1, dtype=torch.int, device=logits.device), {
                "logp": logp.float(), "entropy": entropy.float()}

        outputs = self._run(micro_batches, collect, forward_only=True)
        # Only the positions inside each row's length travel, packed row after row at offsets every rank
        # computes alike from the lengths: a batch of long-tailed response lengths is mostly padding.
        lengths = batch.lengths.long()
        starts = torch.cumsum(lengths, 0) - lengths
        packed = torch.zeros(2, int(lengths.sum()), dtype=torch.float32, device=self.device)
        if self._is_last_stage():
            for mb, out in zip(micro_batches, outputs):
                if mb.rows:
                    rows = torch.tensor(mb.rows)
                    width = torch.arange(out["logp"].shape[1])
                    inside = width < lengths[rows][:, None]  # [b, s]: row-major, as the packing
                    where = (starts[rows][:, None] + width)[inside].to(self.device)
                    inside = inside.to(self.device)
                    packed[0, where] = out["logp"][inside]
                    packed[1, where] = out["entropy"][inside]
        ps = self._groups()
        dist.all_reduce(packed, group=ps.get_pipeline_model_parallel_group())
        dist.all_reduce(packed, group=ps.get_data_parallel_group())
        valid = torch.arange(batch.tokens.shape[1]) < lengths[:, None]
        result = torch.zeros(2, *batch.tokens.shape, dtype=torch.float32)
        result[:, valid] = packed.cpu()
        result[:, :, 0] = 0.0  # no log-prob for the first token
        return result[0], result[1]

    # ---- the update ------------------------------------------------------------------------

    def update(self, batch: ActorBatch, group_size: int, schedule_step: int | None = None) -> dict[str, float]:
        """ppo_epochs passes over the batch in mini-batches of ppo_mini_batch_size groups of
        `group_size` sequences; one optimizer step per mini-batch. Returns the mean metrics.

        schedule_step: the learning-rate schedule's index of this update's first optimizer step, the next
        ones following it. The trainer passes (training step - 1) x the updates of a full batch, so that a
        step that keeps fewer groups (or none) does not delay the warm-up's end or the decay's. Default: the
        mini-batches of the updates so far (a skipped one counts, as within an update)."""
        if batch.advantages is None or batch.old_logp is None:
            raise ValueError("update needs advantages and old_logp in the batch")
        _check_not_empty(batch)
        self.check_resident()
        self.model.train()
        mini = self.config.ppo_mini_batch_size * group_size
        first = self.scheduled if schedule_step is None else schedule_step
        history: list[dict[str, float]] = []
        trained: list[dict[str, float]] = []  # the mini-batches with loss tokens: a skipped one has no loss figures
        summed = dict.fromkeys(_SUMS, 0.0)  # the loss's sums over every mini-batch (and every rank)
        for _ in range(self.config.ppo_epochs):
            for start in range(0, batch.size, mini):
                lr = learning_rate(self.config.optim, first + len(history), self.last_step)
                rows = batch.rows(slice(start, start + mini))
                step_metrics, totals = self._mini_batch_step(rows, lr, first_row=start)
                history.append(step_metrics)
                for key in _SUMS:
                    summed[key] += totals.get(key, 0.0)
                if bool(rows.loss_mask.any()):
                    trained.append(history[-1])
        self.scheduled = first + len(history)
        counted = trained or history
        metrics = {key: sum(h[key] for h in counted) / len(counted) for key in history[0]}  # loss, grad norm
        for key in ("actor/lr", "actor/update_skipped"):  # over every mini-batch
            metrics[key] = sum(h[key] for h in history) / len(history)
        # The token-level figures over every token of the update: a mean of the mini-batches' means would count
        # a short last mini-batch (dynamic sampling that ran out) as much as a full one, and the first
        # mini-batch, on-policy, clips none, so its 0 would halve the probability of the up-clipped tokens.
        if trained:
            metrics.update(loss_metrics(summed, dict.fromkeys(_MAXIMA, 0.0)))  # the maxima are taken below
            metrics["actor/entropy"] = summed["entropy"] / max(summed["tokens"], 1.0)
        for key in ("actor/ratio_max", "actor/pg_clip_high_prob_max"):  # the largest, as their names say
            metrics[key] = max(h[key] for h in history)
        return metrics

    def _mini_batch_step(self, batch: ActorBatch, lr: float,
                         first_row: int = 0) -> tuple[dict[str, float], dict[str, float]]:
        """One optimizer step on `batch`, rows first_row.. of the update's batch (for naming a bad sample); its
        metrics, and the loss's sums over the whole mini-batch (every rank's).
        A mini-batch without a loss token (overlong filtering or failed rewards masked all of it) takes none:
        its gradient is zero, but Adam's momentum and the weight decay would still move the weights. Every
        rank holds the whole batch, so every rank skips alike."""
        if not bool(batch.loss_mask.any()):
            return self._reduce_metrics([], None, lr, success=False)
        global_tokens = batch.loss_mask.sum().clamp(min=1).to(torch.float32)
        global_seqs = (batch.loss_mask.sum(-1) > 0).sum().clamp(min=1).to(torch.float32)  # rows with loss tokens
        micro_batches = self._micro_batches(batch, first_row)
        for group in self.optimizer.param_groups:  # megatron-core leaves lr and wd to a scheduler; we are it
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = self.config.optim.weight_decay * group.get("wd_mult", 1.0)

        refused: list[ValueError] = []
        """Why this rank's loss refused a micro-batch (non-finite inputs); raised on every rank after the schedule."""

        def loss_fn(mb: _MicroBatch, logits: torch.Tensor):
            logp, entropy = self._logp_entropy(mb, logits)
            device = logp.device
            data = mb.data
            mask = data.loss_mask.to(device)
            try:
                out = policy_loss(
                    logp, data.old_logp.to(device), data.advantages.to(device), mask,
                    clip_ratio_low=self.config.clip_ratio_low, clip_ratio_high=self.config.clip_ratio_high,
                    clip_ratio_c=self.config.clip_ratio_c, loss_agg_mode=self.config.loss_agg_mode,
                    global_tokens=global_tokens.to(device), global_seqs=global_seqs.to(device),
                    global_rows=batch.size, norm_len=self.norm_len,
                    rollout_logp=data.rollout_logp.to(device) if data.rollout_logp is not None else None,
                    tis_cap=self.config.tis_imp_ratio_cap, samples=[first_row + r for r in mb.rows],
                )
            except ValueError as err:
                # Raising here would stop this rank alone, inside the schedule, while the other pipeline stages
                # and data-parallel ranks wait on it. The schedule finishes on a loss that moves nothing (its
                # gradient is zero), and no optimizer step is taken.
                refused.append(err)
                return logp.sum() * 0.0, torch.tensor(1, dtype=torch.int, device=device), {}
            sums = out.sums()
            sums["entropy"] = torch.where(mask.bool(), entropy.detach(), 0).sum(dtype=torch.float32)
            sums["loss"] = out.loss.detach().float()
            sums.update(out.maxima())
            loss = out.loss
            if self.config.entropy_coeff:  # the entropy's gradient flows through the same log-prob op
                loss = loss - self.config.entropy_coeff * aggregate_loss(
                    entropy, mask, self.config.loss_agg_mode, global_tokens=global_tokens.to(device),
                    global_seqs=global_seqs.to(device), global_rows=batch.size, norm_len=self.norm_len)
            return loss, torch.tensor(1, dtype=torch.int, device=device), sums

        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = self._run(micro_batches, loss_fn, forward_only=False)
        stop_together(refused[0] if refused else None, ValueError)
        success, grad_norm, _ = self.optimizer.step()
        self.steps += 1
        return self._reduce_metrics(outputs, grad_norm, lr, success)

    def _reduce_metrics(self, outputs: list[dict], grad_norm, lr: float,
                        success: bool) -> tuple[dict[str, float], dict[str, float]]:
        """The mini-batch's metrics, and the loss's sums (named as in _SUMS) over every rank."""
        ps = self._groups()
        sums = torch.zeros(len(_SUMS), dtype=torch.float32, device=self.device)
        maxima = torch.zeros(len(_MAXIMA), dtype=torch.float32, device=self.device)  # all of them are >= 0
        if self._is_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
            for out in outputs:
                sums += torch.stack([out[k].to(sums.device) for k in _SUMS])
                maxima = torch.maximum(maxima, torch.stack([out[k].to(sums.device) for k in _MAXIMA]))
        dist.all_reduce(sums)
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
        totals = dict(zip(_SUMS, sums.tolist()))
        metrics = loss_metrics(totals, dict(zip(_MAXIMA, maxima.tolist())))
        metrics.update({
            "actor/pg_loss": totals["loss"],
            "actor/entropy": totals["entropy"] / max(totals["tokens"], 1.0),
            "actor/grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
            "actor/lr": lr,
            "actor/update_skipped": float(not success),
        })
        return metrics, totals


def _finalize_grads(model, num_tokens=None, **kwargs):
    """megatron-core's grad finalisation (DP reduce, SP norm grads, tied embeddings across PP) without
    its division by the token count: our loss is already normalised by the global batch."""
    from megatron.core.distributed import finalize_model_grads

    return finalize_model_grads(model, num_tokens=None, **kwargs)


def _check_not_empty(batch: ActorBatch) -> None:
    if batch.size == 0:
        raise ValueError("the actor was given an empty batch (0 sequences)")
