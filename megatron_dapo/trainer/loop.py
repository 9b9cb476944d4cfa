"""The DAPO training loop: one step reads like the data flow.

collect (generate + reward, dynamic sampling) -> advantages -> old log-probs -> actor update
-> push weights into the rollout engines + parity probe -> metrics -> checkpoint.
Every rank steps through collection together: the engines (rank 0's, and with rollout.engines > 1
one per chosen data-parallel replica, see rollout/fleet.py) sample their shares and their hosts
score them, rank 0 gathers the groups, makes the dynamic-sampling decisions and builds the actor batch
from the groups kept, and every rank gets that batch. The actor runs on every rank.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_dapo.actor.actor import MegatronActor
from megatron_dapo.actor.batch import ActorBatch
from megatron_dapo.actor.checkpoint import CheckpointError
from megatron_dapo.actor.model import describe_spec
from megatron_dapo.config.loader import ConfigError
from megatron_dapo.config.root import DAPOConfig, config_changes, dump_config
from megatron_dapo.data.dataset import PromptStream
from megatron_dapo.metrics.samples import SampleLog, write_validation
from megatron_dapo.metrics.sinks import JSONL, MetricSinks, SinkError, check_sink_packages, read_metrics
from megatron_dapo.models.arch import ModelArch
from megatron_dapo.ops import extension
from megatron_dapo.parallel.init import init_distributed, stop_together
from megatron_dapo.reward.custom import check_reward_sources, load_reward_functions
from megatron_dapo.reward.registry import failure_kind, failure_metrics
from megatron_dapo.reward.scorer import RewardScorer
from megatron_dapo.rollout.engine import SamplingParams
from megatron_dapo.rollout.fleet import generate_shared, place_engines
from megatron_dapo.rollout.reshard import ProbeDiff, engine_probe_diff, push_weights, trainer_probe_logprobs
from megatron_dapo.sampling.dynamic import DynamicSampler, SampledBatch, SamplingStats
from megatron_dapo.trainer import checkpoints, startup
from megatron_dapo.trainer.control import ControlChannel
from megatron_dapo.trainer.groups import (BUILTIN_METRICS, FilterMetricCheck, Group, build_actor_batch, rollout_metrics,
                                          validation_metrics)
from megatron_dapo.trainer.lock import RunLock
from megatron_dapo.trainer.memory import ColocatedMemory
from megatron_dapo.trainer.scoring import score_groups
from megatron_dapo.trainer.stop import (STOP_FILE, StopRequest, clear_stale_stop, mark_honoured, process_started,
                                        slurm_attempt)
from megatron_dapo.trainer.timer import StepTimer


def check_update(update: dict[str, float], step: int, run_dir: Path) -> None:
    """Stop every rank alike (the figures are reduced over all of them) when the update's loss or gradient norm is
    not finite, before a checkpoint keeps its weights."""
    bad = {k: update[k] for k in ("actor/pg_loss", "actor/grad_norm") if not math.isfinite(update[k])}
    if bad:
        raise RuntimeError(
            f"step {step}: the actor's update gave {', '.join(f'{k}={v}' for k, v in bad.items())}: training "
            f"diverged, so its weights are not saved; the last complete checkpoint in {run_dir / 'checkpoints'} is "
            "intact (lower actor.optim.lr, or check the rewards and advantages of this step's samples.jsonl)")


class Trainer:
    def __init__(self, config: DAPOConfig):
        from transformers import AutoTokenizer

        self.config = cfg = config
        startup.check_model_folder(cfg.model.path, cfg.model.tokenizer_path)  # before any process group: every rank reads the same config
        startup.check_data_files(cfg.data)
        if cfg.rollout.name == "sglang":
            startup.match_sglang_nccl_settings(cfg.rollout.sglang.server_args)
        self.layout = init_distributed(cfg.parallel, seed=cfg.trainer.seed)
        self.rank0 = dist.get_rank() == 0
        self.run_dir = Path(cfg.trainer.run_dir)
        self.lock = RunLock(self.run_dir) if self.rank0 and not cfg.trainer.val_only else None
        """The run folder's RUNNING file, held by rank 0 of a training (a validation only reads the folder)."""
        self._started(lambda: self.lock and self.lock.acquire())  # before anything else looks into the folder
        self._started(lambda: startup.check_fresh_start(cfg))  # before this run writes anything into the folder
        self._started(lambda: check_sink_packages(cfg.logging))  # not minutes later, on rank 0 alone
        if self.rank0 and not cfg.trainer.val_only:  # a STOP file may be meant for a training in this folder
            # One the run this one resumes stopped on (clear_stale_stop says which are stale). Cleared now, not once
            # the model is up: a stop asked for during the minutes of start-up is kept, and the run stops after its
            # first step; so is one from the seconds of imports before this line, which is newer than this process.
            self._started(lambda: clear_stale_stop(self.run_dir / STOP_FILE, process_started(), slurm_attempt()))
        else:
            self._started(lambda: None)  # the call above is collective
        self._earlier_config: str | None = self._started(
            lambda: startup.read_earlier_config(cfg) if self.rank0 else None)
        """The config.yaml of the attempt this one may resume (rank 0 of a training), to say what changed. A file
        system that refuses (permissions, a stale NFS handle) stops every rank with the error, not rank 0 alone."""
        if self.rank0:
            print(f"run folder {self.run_dir}, layout {self.layout.describe()}", flush=True)
            print(describe_spec(), flush=True)
            if torch.cuda.is_available():
                print(extension.describe(), flush=True)
        self.tokenizer = tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path or cfg.model.path)
        self.stop_ids, outside = startup.stop_token_ids(
            tokenizer, cfg.model.path, vocab_size=ModelArch.from_pretrained(cfg.model.path).vocab_size)
        if outside and self.rank0:  # a padding token added to the tokenizer past the embedding, say
            print(f"warning: stop token ids {list(outside)} are outside the model's vocab, which it cannot draw: "
                  "left out", file=sys.stderr, flush=True)
        self.train_set = startup.read_prompts(cfg, "data.train_files", cfg.data.train_files, tokenizer)
        self.val_set = (startup.read_prompts(cfg, "data.val_files", cfg.data.val_files, tokenizer)
                        if cfg.data.val_files else None)
        if self.rank0:  # what the files held and what was dropped (too long, duplicated, malformed)
            print(f"data.train_files: {self.train_set.report()}", flush=True)
            if self.val_set is not None:
                print(f"data.val_files: {self.val_set.report()}", flush=True)
            elif cfg.trainer.val_before_train or cfg.trainer.test_freq:
                print("note: data.val_files is empty: no validation runs (trainer.val_before_train, trainer.test_freq)",
                      file=sys.stderr, flush=True)
            if decay_note := cfg.unreached_decay():
                print(f"warning: {decay_note}", file=sys.stderr, flush=True)
        self._started(lambda: (load_reward_functions(cfg.reward.functions), check_reward_sources(
            {"data.train_files": self.train_set, "data.val_files": self.val_set or []})))
        startup.check_room_to_respond(cfg, self.train_set, self.val_set)  # the same files on every rank: all refuse
        self.hf_copy = self._started(lambda: startup.hf_copy_settings(cfg))
        """What checkpoint.save_hf writes next to each checkpoint, or None."""
        # Without dynamic sampling every group generated is trained on: a step draws train_batch_size prompts.
        self.stream = PromptStream(self.train_set, (cfg.data.gen_batch_size if cfg.algorithm.filter_groups.enable
                                                    else cfg.data.train_batch_size),
                                   seed=cfg.trainer.seed, shuffle=cfg.data.shuffle)
        self.updates_per_step = cfg.updates_per_step
        """Optimizer steps of a full batch: the learning-rate schedule moves by this much every training step."""
        self.resume_from = self._resume_point()
        """The run folder's checkpoint this attempt goes on from, or None."""
        if self.resume_from is not None and not cfg.trainer.val_only:  # before minutes of model and engine start-up
            self._started(lambda: self.rank0 and self._check_data_order(self.resume_from))
        try:  # a resumed run reads its own checkpoint alone: its starting weights may be long gone
            self.actor = MegatronActor(cfg.actor, cfg.model.path, self.layout, temperature=cfg.rollout.temperature,
                                       norm_len=cfg.data.max_response_length, weights=cfg.model.megatron_checkpoint,
                                       last_step=cfg.trainer.total_training_steps * self.updates_per_step - 1,
                                       load_weights=self.resume_from is None)
        except CheckpointError as err:  # raised on every rank alike
            if self.resume_from is not None or not cfg.model.megatron_checkpoint:
                raise
            raise CheckpointError(f"model.megatron_checkpoint={cfg.model.megatron_checkpoint}: {err}") from err
        self.control = ControlChannel(cfg.trainer.rollout_timeout_s)
        """Rank 0's words to every rank during rollout (trainer/control.py)."""
        self.placement = place_engines(cfg.rollout.engines, timeout_s=cfg.trainer.rollout_timeout_s)
        """Which ranks host the rollout engines."""
        self.memory = ColocatedMemory(self.actor, colocated=cfg.rollout.mode == "colocated", offload=cfg.actor.offload)
        """Who holds the GPUs when (colocated mode; actor.offload)."""
        self.memory.before_engine_start()
        self.engine = self.memory.engine = self._started(self._make_engine)
        """This rank's rollout engine, or None."""
        if self.engine is not None:
            index = self.placement.hosts.index(dist.get_rank())
            print(f"rank {dist.get_rank()} hosts rollout engine {index} of {len(self.placement.hosts)} "
                  f"({cfg.rollout.name}, weights from data-parallel replica {self.placement.replicas[index]})", flush=True)
        self.scorer = self._started(lambda: RewardScorer(
            timeout_s=cfg.reward.timeout_s, num_workers=cfg.reward.num_workers, functions=cfg.reward.functions,
            max_rss_gb=cfg.reward.worker_max_rss_gb) if self.engine is not None else None)
        """Scores the completions of this rank's engine."""
        self.sampler = DynamicSampler(cfg.algorithm.filter_groups, cfg.data.train_batch_size)
        filtering = cfg.algorithm.filter_groups
        self.filter_metric_check = (FilterMetricCheck(filtering.metric, patience=filtering.max_num_gen_batches or 10,
                                                      sources={p.data_source for p in self.train_set})
                                    if filtering.enable and filtering.metric not in BUILTIN_METRICS else None)
        """Whether each data_source's rewards give the filter metric (on rank 0, each step until all have)."""
        self.sinks = self._started(lambda: MetricSinks(
            cfg.logging, self.run_dir, cfg.trainer.total_training_steps, training=not cfg.trainer.val_only)
            if self.rank0 else None)  # W&B's login or network failing stops every rank, not rank 0 alone
        self.samples = self._started(  # an unwritable folder stops every rank
            lambda: SampleLog(self.run_dir, cfg.logging.samples_per_step, training=not cfg.trainer.val_only)
            if self.rank0 else None)
        self.step = 0
        self.val_skipped = False
        """The validation due at self.step was skipped for a stop request: the attempt that resumes from its
        checkpoint runs it first (saved in the trainer state)."""
        self.saved_step = 0
        """The step of the run's newest complete checkpoint (the one resumed from, or the last saved); 0: none."""
        self.unlogged: dict | None = None
        """The row of the step being saved that a sink could not write, and the sinks that failed (None: all of
        them): saved in the trainer state, for the attempt that resumes from the checkpoint to write."""
        self.generation_seconds = 0.0
        """The slowest engine's generation time, summed over the current step's generation batches (rank 0)."""
        self.generated_tokens = 0
        """Response tokens generated in the current step, every generation batch's (rank 0's count)."""
        self.reward_failures: Counter[str] = Counter()
        """Responses of the current step whose reward failed, per kind (FAILURE_KINDS), in every generation batch,
        kept by dynamic sampling or not (rank 0's count)."""
        self.stop = StopRequest(self.run_dir, self.actor.device, catch_signals=not cfg.trainer.val_only)
        """SIGTERM, SIGUSR1 or a STOP file in the run folder: save after the current step and exit."""
        dist.barrier()
        probe_gen = torch.Generator().manual_seed(cfg.trainer.seed)
        prompt = torch.tensor(self.train_set[0].prompt_ids)
        # Random ids from the tokenizer's own: a model's vocabulary often ends in rows never trained.
        tail = torch.randint(0, min(self.actor.arch.vocab_size, len(tokenizer)), (8,), generator=probe_gen)
        self.probe = torch.cat([prompt, tail])[None]
        """A fixed sequence whose log-probs the engine and the trainer must agree on after every push."""
        self.parity_threshold = cfg.rollout.parity_threshold_for(
            trainer_float32=not self.actor.transformer_config.bf16)

    def _started(self, make):
        """`make()` on every rank; when it fails on any rank, every rank stops (the failing one with its error;
        a reward file that imports on one node and not on another, say)."""
        made = failure = None
        try:
            made = make()
        except Exception as err:
            failure = err
        stop_together(failure)  # the failing rank raises its own error, the others its message
        return made

    def _make_engine(self):
        """This rank's rollout engine (None where it hosts none); a setup problem is raised on every rank alike."""
        rollout, path, hosting = self.config.rollout, self.config.model.path, self.placement.hosts_engine
        if rollout.name == "sglang":
            from megatron_dapo.rollout.sglang import SGLangEngine

            ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's --nproc-per-node
            SGLangEngine.check_startable(rollout.sglang, rollout.mode, local_world_size=ranks_per_node)
            if problems := rollout.sglang.model_problems(ModelArch.from_pretrained(path)):
                raise ConfigError(problems)
            elsewhere = [host for host, local in zip(self.placement.hosts, self.placement.local_ranks) if local]
            if elsewhere:
                raise ConfigError(
                    f"rollout.engines={rollout.engines} puts SGLang engines on ranks {elsewhere}, which are not the "
                    "first rank of their node: choose rollout.engines so that DP / engines replicas fill whole nodes")
            return (SGLangEngine.launch(path, rollout.sglang, rollout.mode, local_world_size=ranks_per_node)
                    if hosting else None)
        from megatron_dapo.rollout.embedded import EmbeddedEngine

        return EmbeddedEngine.from_pretrained(path, rollout.embedded) if hosting else None

    # ---- the loop ---------------------------------------------------------------------------

    def train(self) -> None:
        cfg = self.config
        self._resume()
        self._validate_first()
        if self.step >= cfg.trainer.total_training_steps and not cfg.trainer.val_only and self.rank0:
            print(f"nothing to train: the run is at step {self.step}, and trainer.total_training_steps is "
                  f"{cfg.trainer.total_training_steps} (raise it to train on)", flush=True)
        while self.step < cfg.trainer.total_training_steps and not cfg.trainer.val_only:
            metrics = self.train_step()
            if metrics is None:  # a stop request cut the step's dynamic sampling short: the step is not trained
                self._stop_between_steps()
                break
            self.step += 1
            last = self.step == cfg.trainer.total_training_steps
            # A stop request leaves minutes at most: it skips a validation that is due (which can take longer)
            # and goes straight to the checkpoint. The run's last step is validated too.
            try:
                asked = self._validate_if_due(metrics, last)
            except Exception:  # (raised on every rank) the step is trained: kept, with its row, before the error
                self.val_skipped = True  # the attempt that resumes validates it first
                self._save_before_raising({"step": self.step, "metrics": metrics, "sinks": None})
                raise
            stopping = not last and asked
            # Taken over while suspended: stop, log and save nothing. The file is read, not the last heartbeat: a job
            # resumed from a suspension would log a row after the newcomer's start before its next beat noticed.
            self._started(lambda: self.lock and self.lock.check(look=True))
            saving = last or stopping or bool(cfg.checkpoint.save_freq and self.step % cfg.checkpoint.save_freq == 0)
            try:
                self._log(self.step, metrics)
            except Exception as err:
                # A sink that fails (a full disk, W&B) stops the run, not before the step it trained is kept, save
                # step or not, with the row, for the attempt resuming to write into the sinks that failed (rank 0
                # knows which).
                self._save_before_raising({"step": self.step, "metrics": metrics,
                                           "sinks": list(err.failed) if isinstance(err, SinkError) else None})
                if stopping and self.rank0:  # the stop asked for is done: the next attempt must not stop on it
                    self._mark_stop_honoured()
                if last and self.rank0:  # the run is trained: a stop request has nothing left to stop
                    self._finished(asked, hf_saved=False)
                raise
            if saving:
                self._save(hf=None if asked else self.hf_copy)  # a stop request leaves minutes at most
                # Asked for during the save (Slurm's warning, a STOP file): the checkpoint just written is the
                # stop's. Going on would train a whole step and save again in what time the warning left.
                stopping = stopping or (not last and self.stop.requested())
            if last and self.rank0:
                self._finished(asked)
            if stopping:
                if self.rank0:
                    self._mark_stop_honoured()
                    print(f"stopping after step {self.step} ({self.stop.reason() or 'another rank asked'}); "
                          f"saved {self.run_dir / 'checkpoints'}; start the same command again to continue", flush=True)
                break
        self._close()

    def _validate_first(self) -> None:
        """The validation before training (trainer.val_before_train) or instead of it (trainer.val_only), or the
        one the stop that saved the resumed checkpoint skipped."""
        cfg = self.config
        if cfg.trainer.val_only or (cfg.trainer.val_before_train and self.step == 0):
            if result := self.validate():  # none without validation files: no row of a step and a time alone
                self._log(self.step, result)
        elif self.val_skipped and self._not_yet_validated():  # the attempt that saved this checkpoint stopped
            if self.rank0:                                       # without the validation then due, or lost its row
                print(f"validating step {self.step}, whose validation the attempt that saved it did not log",
                      flush=True)
            self._log(self.step, self.validate())
        self.val_skipped = False

    def _validate_if_due(self, metrics: dict[str, float], last: bool) -> bool:
        """The validation due after this step (trainer.test_freq, and the last step) into `metrics`, unless a stop
        is asked for; then it is skipped and the checkpoint says so (self.val_skipped), for the attempt resuming
        from it to run. Returns whether a stop is asked for."""
        cfg = self.config
        asked = self.stop.requested()
        due = (bool(cfg.trainer.test_freq) and self.val_set is not None
               and (self.step % cfg.trainer.test_freq == 0 or last))
        self.val_skipped = due and asked
        if due and not asked:
            metrics.update(self.validate())
            asked = self.stop.requested()
        return asked

    def _save(self, hf: checkpoints.HFCopy | None) -> None:
        """The checkpoint of self.step (with its Hugging Face copy `hf`), the metrics files synced first."""
        if self.rank0:  # a lost node's page cache must not take rows the resumed attempt will not write again
            self.sinks.sync()
            self.samples.sync()
        started = time.perf_counter()
        with self.memory.actor_resident(make_room=True):
            checkpoints.save(self.run_dir, self.step, self.actor, self._state(), self.config.checkpoint.keep_last,
                             hf=hf, wait_group=self.control.group,
                             guard=(lambda: self.lock.check(look=True)) if self.lock else None)
        self.saved_step = self.step
        if self.rank0 and self.config.logging.console:  # what a stop's warning must leave time for, with the step
            print(f"step {self.step}: checkpoint saved in {time.perf_counter() - started:.0f} s", flush=True)

    def _save_before_raising(self, row: dict) -> None:
        """On the way out of an error after self.step was trained (its validation or its metrics row failed, on
        every rank): the step's checkpoint, without its Hugging Face copy, with its metrics row `row` for the
        attempt that resumes to write. A save that fails as well is said; the first error is the one raised."""
        self.unlogged = row
        try:
            self._started(lambda: self.lock and self.lock.check(look=True))  # taken over (the error, maybe): no save
            self._save(hf=None)
        except Exception as err:
            print(f"warning: step {self.step}'s checkpoint could not be saved on the way out either "
                  f"({type(err).__name__}: {err})", file=sys.stderr, flush=True)

    def _stop_between_steps(self) -> None:
        """A stop request ended the dynamic sampling of step self.step + 1 before its batch was full: that step is
        left untrained (train_step put its prompts back), the steps trained since the last checkpoint are saved,
        and the run stops. The attempt that resumes generates the step again from the same prompts and seeds, as
        the uninterrupted run would have: a stop does not turn into an update from a few groups."""
        self._started(lambda: self.lock and self.lock.check(look=True))  # taken over: save nothing
        if self.step > self.saved_step:
            self._save(hf=None)  # a stop request leaves minutes at most
        if self.rank0:
            self._mark_stop_honoured()
            saved = (f"saved {self.run_dir / 'checkpoints'}" if self.step else "nothing was trained yet, nothing saved")
            print(f"stopping before step {self.step + 1} ({self.stop.reason() or 'another rank asked'}); {saved}; "
                  "start the same command again to continue", flush=True)

    def _mark_stop_honoured(self) -> None:
        """Rank 0, stopping: a STOP file says it was stopped on, so that the attempt that resumes deletes it (one
        no run has stopped on, written by hand before that attempt's ranks start, stops it after its first step)."""
        try:
            mark_honoured(self.run_dir / STOP_FILE, self.step)
        except OSError as err:  # the checkpoint is saved: the run stops all the same
            print(f"warning: could not mark {self.run_dir / STOP_FILE} as stopped on ({err}): delete it before "
                  f"starting the run again, or it stops after its first step", file=sys.stderr, flush=True)

    def _finished(self, asked: bool, hf_saved: bool = True) -> None:
        """Rank 0, after the run's last step: a stop request that came during it has nothing to stop; what it
        skipped (the Hugging Face copy, the validation) is said, with how to make it. hf_saved=False: the checkpoint
        was saved without its Hugging Face copy for another reason (a sink that failed)."""
        try:
            self.stop.clear()
        except OSError as err:  # the run is complete all the same: not a reason to skip closing it
            print(f"warning: could not remove the STOP file: {err}", file=sys.stderr, flush=True)
        step_dir = self.run_dir / "checkpoints" / f"step_{self.step:06d}"
        if self.hf_copy and (asked or not hf_saved):
            why = "a stop was requested during the last step" if asked else "its metrics row could not be written"
            print(f"{why}: {step_dir} has no Hugging Face copy; start the "
                  f"same command again to write it, or `megatron-dapo convert mcore-to-hf --mcore {step_dir} "
                  f"--out {step_dir / 'hf'}`", flush=True)
        if self.val_skipped:
            print(f"a stop was requested during the last step: its validation was skipped; the same command "
                  f"again runs it, and with trainer.val_only=true it validates {step_dir} alone", flush=True)

    def _close(self) -> None:
        """Every part closed, the lock released. The run's work is saved by now: a part that fails to close (W&B's
        upload at finish, say) is reported, and neither keeps the others open nor fails a run that stopped cleanly
        (the batch script would not requeue it)."""
        for name, part in (("metric sinks", self.sinks), ("samples", self.samples), ("reward workers", self.scorer),
                           ("rollout engine", self.engine)):
            if part is not None:
                try:
                    part.close()
                except Exception as err:
                    print(f"warning: closing the {name} failed ({type(err).__name__}: {err}); the run's checkpoints "
                          "are saved", file=sys.stderr, flush=True)
        if self.lock:
            self.lock.release()

    def train_step(self) -> dict[str, float] | None:
        """Step self.step + 1: its metrics, or None when a stop request ended its dynamic sampling before the batch
        was full (then nothing is trained and its prompts are put back, for the attempt that resumes)."""
        cfg = self.config
        stream_state = self.stream.state_dict()
        check_state = self.filter_metric_check.state_dict() if self.filter_metric_check is not None else None
        announce = cfg.logging.progress_interval_s if self.rank0 and cfg.logging.console else None
        timer = StepTimer(announce, prefix=f"step {self.step + 1}: ")
        self.generation_seconds = self.generated_tokens = 0
        self.reward_failures = Counter()
        self.memory.to_generation(timer)
        with timer("generate"):
            sampled = self._collect()
        # The slowest engine's generation in each batch; the rest is scoring that no engine's generation hid
        # (rank 0's share, and a slower host's), gathering the groups, and dynamic sampling's bookkeeping.
        if self.rank0:
            timer.split("generate", "reward", max(timer.times["generate"] - self.generation_seconds, 0.0))
        with timer("batch"):
            batch, metrics = self._actor_batch(sampled)
        if self.control.broadcast(bool(self.rank0 and sampled.stats.stopped)):  # rank 0's word for every rank
            self.stream.load_state_dict(stream_state)
            if check_state is not None:
                self.filter_metric_check.load_state_dict(check_state)
            return None
        if batch is not None:
            self.memory.to_training(timer)
            with timer("old_log_prob"):
                batch.old_logp, _ = self.actor.compute_logprobs(batch)
            with timer("update"):
                update = self.actor.update(batch, group_size=cfg.rollout.n,
                                           schedule_step=self.step * self.updates_per_step)
            check_update(update, self.step + 1, self.run_dir)
            metrics.update(update)
            gaps = (batch.old_logp - batch.rollout_logp).abs() * batch.loss_mask
            metrics["rollout/trainer_logp_max_diff"] = float(gaps.max())
            metrics["rollout/trainer_logp_mean_diff"] = float(gaps.sum() / batch.loss_mask.sum().clamp(min=1))
            self.memory.to_push(timer)
            with timer("reshard"):
                push = self._push(version=self.step + 1)
                trainer_probe = trainer_probe_logprobs(self.actor, self.probe)
            if push is not None:
                metrics.update(push.metrics())
            self.memory.to_generation(timer)  # the engine is whole again; the probe needs its KV cache
            with timer("reshard"):
                probe = self._probe(trainer_probe, f"after the weight push of step {self.step + 1}")
                metrics["rollout/probe_logp_max_diff"], metrics["rollout/probe_logp_mean_diff"] = probe.max, probe.mean
            if cfg.actor.offload:
                metrics["actor/offloaded_gb"] = self.memory.offloaded_bytes / 1e9
            tokens = int(batch.lengths.sum())
            metrics["perf/tokens_per_s"] = tokens / max(timer.total(), 1e-9)
        if self.rank0:  # every generation batch's responses, the groups dynamic sampling dropped too
            metrics["perf/generated_tokens_per_s"] = self.generated_tokens / max(timer.times["generate"], 1e-9)
        metrics.update(timer.metrics())
        return metrics

    # ---- rollout: every rank takes part -----------------------------------------------------

    def _collect(self) -> SampledBatch | None:
        """Dynamic sampling, decided on rank 0; every rank takes part in each generation batch (the engines
        sample their shares, every prompt stream advances alike) until rank 0 says "done" (in _actor_batch).
        The kept groups and the sampling figures on rank 0, None elsewhere."""
        generated = 0

        def generate_batch() -> list[Group] | None:
            nonlocal generated
            prompts = next(self.stream)
            seed = self.config.trainer.seed * 1_000_003 + self.step * 1_009 + generated
            generated += 1
            return self._rollout(prompts, self._sampling(seed))

        if not self.rank0:
            while self._follow():  # rank 0 asks for each generation batch
                generate_batch()
            return None

        filtering, check = self.config.algorithm.filter_groups, self.filter_metric_check

        def next_batch() -> list[Group]:
            self.control.broadcast("more")
            groups = generate_batch()
            self.generated_tokens += sum(len(c.token_ids) for g in groups for c in g.completions)
            self.reward_failures.update(failure_kind(r) for g in groups for r in g.rewards if r.failed)
            if check is not None and not check.done:  # before the sampler drops every group for want of the figure
                check.add(groups)
                check.check(self.step + 1)
            return groups

        with self._stops_everyone():
            cut = self.config.algorithm.overlong_filtering
            # A stop request ends the generation batches (rank 0's word, as for the others); the step trains on
            # what was kept and the run saves after it (every rank agrees on the request then).
            return self.sampler.collect(next_batch, lambda g: g.metric(filtering.metric, cut),
                                        progress=self._progress_line(), all_correct=lambda g: g.all_correct(cut),
                                        stop=lambda: self.stop.reason() is not None)

    def _progress_line(self):
        """A console line after a generation batch, at most every logging.progress_interval_s (a 32B step
        generates for tens of minutes; the toy's steps take a second and print none)."""
        if not self.config.logging.console:
            return None
        interval, target = self.config.logging.progress_interval_s, self.config.data.train_batch_size
        started = last = time.perf_counter()

        def show(stats: SamplingStats, kept: int) -> None:
            nonlocal last
            now = time.perf_counter()
            if now - last >= interval:
                last = now
                unscored = (f", {stats.dropped_unscored} with fewer than two responses that count (reward failed or "
                            "gave no such figure, or cut at the length limit)" if stats.dropped_unscored else "")
                print(f"step {self.step + 1}: generation batch {stats.gen_batches}: {min(kept, target)}/{target} "
                      f"groups kept, {stats.dropped_all_correct} all-correct and {stats.dropped_all_wrong} all-wrong "
                      f"dropped{unscored}, {now - started:.0f} s", file=sys.stderr, flush=True)
        return show

    def _actor_batch(self, sampled: SampledBatch | None) -> tuple[ActorBatch | None, dict[str, float]]:
        """Rank 0 turns the kept groups into the actor batch and the step's rollout metrics, says "done", and
        every rank gets the batch (None when no group was kept). The metrics are rank 0's ({} elsewhere)."""
        if not self.rank0:
            return self.control.share_batch(None, self.actor.device), {}
        cfg, groups, batch = self.config, sampled.groups, None
        with self._stops_everyone():  # the other ranks still wait for rank 0's word
            metrics = {**sampled.stats.metrics(), **failure_metrics(self.reward_failures)}
            stats, target = sampled.stats, cfg.data.train_batch_size
            consequence = "the step trains on those" if groups else "the step has nothing to train on: no update"
            if stats.exhausted and cfg.logging.console:
                filtering = cfg.algorithm.filter_groups
                print(f"step {self.step + 1}: {stats.shortfall(target, filtering.metric)}; {consequence} "
                      f"(algorithm.filter_groups.max_num_gen_batches={filtering.max_num_gen_batches}, "
                      "on_exhausted=train)", file=sys.stderr, flush=True)
            if stats.stopped:  # the step is not trained (train_step): nothing of it is written
                if cfg.logging.console:
                    reason = self.stop.reason()
                    print(f"step {self.step + 1}: a stop was requested{f' ({reason})' if reason else ''}: dynamic "
                          f"sampling ends after {stats.gen_batches} generation batches with {stats.kept} of {target} "
                          "groups; the step is not trained (the attempt that resumes generates it again, from the "
                          "same prompts), and the run saves what it trained", file=sys.stderr, flush=True)
                groups = []
            if groups:
                metrics.update(rollout_metrics(groups, cfg.data.max_response_length))
                batch = build_actor_batch(groups, norm_by_std=cfg.algorithm.norm_adv_by_std_in_grpo,
                                          overlong_filtering=cfg.algorithm.overlong_filtering)
            self._check_lock()  # a job suspended while it generated finds out before it writes into the folder
            if not stats.stopped:
                self.samples.write(self.step + 1, "train", groups, self.tokenizer)
            packed = batch.pack() if batch is not None and dist.get_world_size() > 1 else None
        self.control.broadcast("done")
        return self.control.share_batch(batch, self.actor.device, packed), metrics

    def _follow(self) -> bool:
        """On ranks other than 0: rank 0's next word; True: one more generation batch, False: done; its error raised."""
        word = self.control.broadcast(None)
        if word not in ("more", "done"):
            raise RuntimeError(word)
        return word == "more"

    @contextlib.contextmanager
    def _stops_everyone(self):
        """On rank 0: an error inside tells the ranks waiting for its next word to stop too, then goes on."""
        try:
            yield
        except Exception as err:
            self.control.broadcast(f"rank 0 failed during rollout: {type(err).__name__}: {err}")
            raise

    def _sampling(self, seed: int, validation: bool = False) -> SamplingParams:
        r, v = self.config.rollout, self.config.rollout.val
        return SamplingParams(n=v.n if validation else r.n, temperature=v.temperature if validation else r.temperature,
                              top_p=v.top_p if validation else r.top_p, top_k=v.top_k if validation else r.top_k,
                              max_new_tokens=self.config.data.max_response_length, stop_token_ids=self.stop_ids,
                              seed=seed)

    def _rollout(self, prompts, params: SamplingParams) -> list[Group] | None:
        """Every engine generates its share and its host scores it: the groups on rank 0, None elsewhere."""
        def score(share: range, outputs) -> list[Group]:
            return score_groups(self.config, self.scorer, self.tokenizer, prompts[share.start:share.stop], outputs,
                                params.n)[0]

        def generated_in(seconds: float) -> None:
            self.generation_seconds += seconds

        return generate_shared(self.engine, self.placement, [p.prompt_ids for p in prompts], params, finish=score,
                               generated_in=generated_in)

    def validate(self) -> dict[str, float]:
        """The validation figures, with timing/validate (on every rank; {} without validation files)."""
        if self.val_set is None:
            return {}
        started = time.perf_counter()
        self.memory.to_generation()
        params = self._sampling(seed=self.config.trainer.seed, validation=True)
        if not self.rank0:
            while self._follow():
                self._rollout(list(self.val_set), params)
            return self.control.broadcast(None)
        self.control.broadcast("more")
        with self._stops_everyone():
            groups = self._rollout(list(self.val_set), params)
            self._check_lock()  # before writing into the folder, which may have been taken over meanwhile
            self.samples.write(self.step, "val", groups, self.tokenizer)
            if self.config.logging.val_generations:
                write_validation(self.run_dir, self.step, groups, self.tokenizer)
            result = validation_metrics(groups, params.n)
            result["timing/validate"] = time.perf_counter() - started
        self.control.broadcast("done")
        return self.control.broadcast(result)

    # ---- state ------------------------------------------------------------------------------

    def _not_yet_validated(self) -> bool:
        """Whether the run's metrics hold no validation of self.step yet (collective: rank 0 reads them). An
        attempt that validated the step a stop skipped and then ended (the run's last step, or a crash before
        its next checkpoint) left that row, and the next attempt does not validate the step again."""
        answer = [None]
        if self.rank0:
            try:
                rows = read_metrics(self.run_dir) if (self.run_dir / JSONL).is_file() else []
            except (OSError, ValueError):  # unreadable: validate, a row twice rather than none
                rows = []
            answer[0] = not any(row.get("step") == self.step and any(key.startswith("val/") for key in row)
                                for row in rows)
        dist.broadcast_object_list(answer, src=0)
        return bool(answer[0])

    def _state(self) -> dict:
        state = {"step": self.step, "data": self.stream.state_dict(), "val_skipped": self.val_skipped}
        if self.unlogged:
            state["unlogged_row"] = self.unlogged
        if self.filter_metric_check is not None:  # rank 0's counts (the marker is rank 0's)
            state["filter_metric_check"] = self.filter_metric_check.state_dict()
        return state

    def _resume_point(self) -> Path | None:
        """The newest complete checkpoint of the run folder when checkpoint.resume, else None (collective: rank 0's
        choice for all, as another node's listing of the folder may lag)."""
        if not self.config.checkpoint.resume:
            return None
        # Rank 0's listing failing (a stale NFS handle, no permission) stops every rank, none waits in the broadcast.
        chosen = [self._started(lambda: checkpoints.latest_checkpoint(self.run_dir) if self.rank0 else None)]
        dist.broadcast_object_list(chosen, src=0)
        return chosen[0]

    def _check_data_order(self, checkpoint: Path) -> None:
        """ConfigError when the prompt stream saved in `checkpoint` cannot be continued with this run's prompts
        (other files, in another order, another tokenizer, seed or shuffle)."""
        state = (checkpoints.saved_trainer_state(checkpoint) or {}).get("data")
        problem = None if state is None else self.stream.mismatch(state)
        if problem is not None:
            raise ConfigError(f"resuming from {checkpoint}: {problem} (or set checkpoint.resume=false in a fresh "
                              "trainer.run_dir)")

    def _resume(self) -> None:
        latest = self.resume_from
        if latest is not None or self.config.model.megatron_checkpoint:
            self._load_and_push(latest)
        else:  # each engine loaded model.path itself: checked all the same, before it generates from it
            with self.memory.actor_resident():
                trainer_probe = trainer_probe_logprobs(self.actor, self.probe)
            self._probe(trainer_probe, "at the start, where each engine loaded model.path itself and the trainer "
                                       "built the actor from it,",
                        loaded=f"model.path's weights ({self.config.model.path})")
        if latest is not None and self.hf_copy and not self.config.trainer.val_only:
            checkpoints.complete_hf_copy(latest, self.hf_copy, wait_group=self.control.group)
        if not self.config.trainer.val_only:  # training goes on from self.step: later rows superseded
            self._started(lambda: self.rank0 and self._training_starts(latest))
            self._started(lambda: self.rank0 and self._log_unlogged())
        self.unlogged = None

    def _training_starts(self, latest: Path | None) -> None:
        """Rank 0, once the run has resumed (or started): the metrics and samples files are told, and config.yaml
        becomes this attempt's. An attempt that failed to resume (an optimizer layout that does not load, say)
        leaves the config of the run's checkpoints there, for the next attempt to be compared with."""
        self.sinks.training_starts(self.step, latest)
        self.samples.training_starts(self.step, latest)
        saved = self.run_dir / "config.yaml"
        partial = saved.with_name(saved.name + ".partial")
        partial.write_text(dump_config(self.config))
        partial.replace(saved)  # whole or not at all

    def _log_unlogged(self) -> None:
        """Rank 0, resuming: the row of the checkpoint's step that a sink failed to write (the failure stopped the
        attempt that saved it), into the sinks that failed; metrics.jsonl's only when no attempt has written it
        since."""
        row = self.unlogged
        if not row or row["step"] != self.step:
            return
        sinks = [name for name in (row["sinks"] if row["sinks"] is not None else self.sinks.enabled())
                 if name in self.sinks.enabled()]  # one this attempt's config turns off gets nothing
        if JSONL in sinks and self.sinks.has_row(self.step, row["metrics"]):
            sinks = [name for name in sinks if name != JSONL]
        if sinks:
            print(f"step {self.step}: writing its metrics row, which the attempt that saved this checkpoint could "
                  f"not write, into {', '.join(sinks)}", flush=True)
            self.sinks.log(self.step, row["metrics"], only=sinks)

    def _load_and_push(self, latest: Path | None) -> None:
        """The run's latest checkpoint (or model.megatron_checkpoint's weights, already in the actor) into the
        engines, checked by the probe."""
        self.memory.to_training()
        if latest is None:  # the engines loaded model.path's weights, not the actor's
            version = 0
        else:
            state = checkpoints.load(latest, self.actor)
            self.step = self.saved_step = version = int(state["step"])
            if not self.config.trainer.val_only:  # a validation draws no training prompts
                self.stream.load_state_dict(state["data"])
                self.val_skipped = bool(state.get("val_skipped", False)) and self.val_set is not None
                self.unlogged = state.get("unlogged_row")
                if self.filter_metric_check is not None and state.get("filter_metric_check"):
                    self.filter_metric_check.load_state_dict(state["filter_metric_check"])
        self.memory.to_push()
        self._push(version=version)
        trainer_probe = trainer_probe_logprobs(self.actor, self.probe)
        self.memory.to_generation()
        loaded = (f"model.megatron_checkpoint's weights ({self.config.model.megatron_checkpoint})" if latest is None
                  else f"the weights of {latest} (to resume from an earlier checkpoint, move this one out of "
                       f"{latest.parent})")
        self._probe(trainer_probe, "after the weight push at the start" if latest is None
                    else f"after the weight push when resuming at step {self.step}", loaded=loaded)
        if latest is not None and self.rank0:
            print(f"resumed from {latest} at step {self.step}", flush=True)
            changes = config_changes(self._earlier_config, self.config) if self._earlier_config else []
            if changes:  # on purpose (a new learning rate) or not (a new run meant for a fresh folder): said aloud
                print(f"the config differs from the one the resumed run last started with ({len(changes)}): "
                      + "; ".join(changes), flush=True)

    def _push(self, version: int):
        """The actor's weights into every engine, each from its own replica; the figures on rank 0."""
        return push_weights(self.actor, self.engine, version=version, bucket_mb=self.config.rollout.weight_bucket_mb,
                            replicas=self.placement.replicas)

    def _probe(self, trainer_probe: torch.Tensor, when: str, loaded: str | None = None) -> ProbeDiff:
        """Every engine's log-probs of the probe against the trainer's (`trainer_probe`, taken right after
        the push); a mean difference over the parity threshold stops the run before the engines generate.
        Non-finite log-probs from the trainer itself stop it first, named as what they are, not a bad push: the
        weights the actor `loaded` as they were (their source named), or else weights that diverged in training."""
        if not torch.isfinite(trainer_probe).all():  # every rank has the same probe log-probs
            if loaded is not None:
                raise RuntimeError(
                    f"{when} the trainer's own log-probs of the probe are not finite: {loaded} hold NaN or inf as the "
                    "actor loaded them; nothing was trained or saved")
            raise RuntimeError(
                f"{when} the trainer's own log-probs of the probe are not finite: its weights "
                f"have diverged (NaN or inf), which is not a push problem; they are not saved, and the last complete "
                f"checkpoint in {self.run_dir / 'checkpoints'} is intact (lower actor.optim.lr and start again)")
        threshold = self.parity_threshold
        diff = engine_probe_diff(self.engine, self.probe, trainer_probe)
        if not diff.mean <= threshold:
            which = (f"rollout engine {self.placement.hosts.index(diff.rank)} of {len(self.placement.hosts)} "
                     f"(rank {diff.rank}, weights from data-parallel replica "
                     f"{self.placement.replicas[self.placement.hosts.index(diff.rank)]})"
                     if diff.rank in self.placement.hosts else "a rollout engine")
            raise RuntimeError(
                f"{when} {which}: its log-probs of the probe differ from the trainer's "
                f"by {diff.mean:.3g} on average, {diff.max:.3g} at most (> rollout.parity_threshold={threshold:g}): "
                "the engine is not running the trainer's weights; stopping before it generates from them")
        return diff

    def _check_lock(self) -> None:
        """On rank 0: RunFolderInUse when another training has taken the folder over (the file read now)."""
        if self.lock:
            self.lock.check(look=True)

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        """Rank 0 writes the row; a sink failing there (a full disk, W&B) stops every rank (collective)."""
        self._started(lambda: self.sinks and self.sinks.log(step, metrics))
