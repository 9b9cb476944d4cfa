"""RewardScorer: the reward functions (reward/registry.py) run in worker processes, so that one bad sample costs
one sample.

`RewardScorer` runs the functions in a persistent pool of spawned processes: a function that raises,
returns something that is not a finite number, kills its process, takes longer than `timeout_s` on
a sample, or grows its process past twice `max_rss_gb` while scoring one gets that sample a failed result
(score FAILED_SCORE, acc 0, failed=True, a reason), which is counted; the worker is killed and replaced when
needed, and the batch goes on.

Workers are spawned, not forked: the trainer holds CUDA contexts and threads, which a fork would copy
half-way. A spawned worker imports the parent's `__main__` module once, so a pool is started once
and reused; a sample then costs one pipe round trip (measured on 2 CPU cores: 1000 math_dapo
samples in 0.13-0.17 s with 2 workers, 0.29 s with 1, against 0.03-0.05 s in-process; start-up ~0.15 s).
"""
from __future__ import annotations

import atexit
import importlib
import logging
import math
import multiprocessing
import multiprocessing.connection
import numbers
import os
import pickle
import signal
import subprocess
import time
import traceback
from collections import Counter, deque
from collections.abc import Mapping
from typing import Any, Iterable

from megatron_dapo.reward.custom import load_reward_functions
from megatron_dapo.reward.registry import (FAILED_SCORE, RewardBatch, RewardResult, RewardSample, get_reward_fn,
                                           registered_functions)

logger = logging.getLogger(__name__)


class RewardScorer:
    """A persistent pool of `num_workers` spawned processes scoring samples with a per-sample timeout.

    Use as a context manager, or call close(). Not thread-safe: one `score` call at a time.
    `functions`: the config's reward.functions (reward/custom.py), loaded here and in every worker.
    """

    def __init__(self, *, timeout_s: float, num_workers: int = 2, startup_timeout_s: float = 300.0,
                 functions: dict[str, str] | None = None, max_rss_gb: float | None = None):
        """max_rss_gb: a worker whose resident memory has grown past this is replaced after its sample (a reward
        function that caches or leaks would otherwise grow for the whole run: it loses nothing); one that passes
        twice this while scoring a sample it started below it is killed then, and the sample fails as `memory` (a
        function allocating without bound would otherwise take the host's memory before its timeout, and the
        kernel's OOM killer picks the largest process: the trainer). Read every MEMORY_POLL_S. None: never."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.timeout_s = timeout_s
        self.max_rss_bytes = None if max_rss_gb is None else max_rss_gb * 1e9
        self.replaced_for_memory = 0
        """Workers replaced so far because they outgrew max_rss_gb (between samples or while scoring one)."""
        self.startup_timeout_s = startup_timeout_s
        self.functions = dict(functions or {})
        self.sources = load_reward_functions(self.functions)  # the workers run the files' code as read here
        self._ctx = multiprocessing.get_context("spawn")
        self._workers = [self._new_worker() for _ in range(num_workers)]
        # A run that ends on an error ends the workers' process groups too: what a reward function started and
        # kept (a solver in a module global) would otherwise outlive the trainer.
        self._owner = os.getpid()
        atexit.register(self._close_at_exit)

    def score(self, samples: Iterable[RewardSample | tuple], give_up_after: int | None = None,
              group_size: int = 1) -> RewardBatch:
        """One result per sample. give_up_after: once this many samples of a data_source are done and every one
        failed, that source's function is broken: the rest of its samples are failed as not_scored, unscored (one
        that hangs would otherwise cost reward.timeout_s per sample, hours for a batch, all to fail anyway). Its
        samples already out finish first: one of them may succeed, and then the rest are scored after all.

        group_size: the samples come in groups of this many responses to one prompt. They are sent to the workers
        response-major (every prompt's first response, then every prompt's second...), so the first samples of a
        source done come from as many prompts as there are: a few prompts whose ground truth the function cannot
        read fail all their responses, and sent prompt after prompt they could look like a broken function."""
        if not self._workers:
            raise RuntimeError("RewardScorer.score() after close()")
        samples = [RewardSample(*s) for s in samples]
        if group_size < 1 or len(samples) % group_size:
            raise ValueError(f"{len(samples)} samples do not make groups of group_size={group_size}")
        fns = []
        for index, sample in enumerate(samples):
            try:
                fns.append(get_reward_fn(sample.data_source))
            except ValueError as err:
                raise ValueError(f"sample {index}: {err}") from None
        results: list[RewardResult | None] = [None] * len(samples)
        kinds: Counter[str] = Counter()
        done: Counter[str] = Counter()      # finished samples per data_source
        scored: Counter[str] = Counter()    # of them, scored
        held: dict[str, list[int]] = {}     # queued samples of a source whose function may be broken, held back
        given_up: set[str] = set()

        def fail(index: int, kind: str, detail: str) -> None:
            results[index] = RewardResult(score=FAILED_SCORE, acc=0.0, failed=True, reason=f"{kind}: {detail}")
            kinds[kind] += 1
            done[samples[index].data_source] += 1

        queue = deque(sorted(range(len(samples)), key=lambda i: (i % group_size, i // group_size)))
        polled = time.monotonic()  # when the busy workers' memory was last read
        while True:
            busy = {samples[w.index].data_source for w in self._workers if w.index is not None}
            for source in list(held):  # decided once its samples out are back
                if scored[source]:
                    queue.extendleft(reversed(held.pop(source)))
                elif source not in busy:
                    why = f"the reward function of {source!r} failed on all {done[source]} of its samples scored before"
                    for index in held.pop(source):
                        fail(index, "not_scored", why)
                    given_up.add(source)
            if give_up_after is not None:
                for source in {s for s, n in done.items() if n >= give_up_after and not scored[s]} - given_up:
                    if source not in held and any(samples[i].data_source == source for i in queue):
                        held[source] = [i for i in queue if samples[i].data_source == source]
                        queue = deque(i for i in queue if samples[i].data_source != source)
            if not (queue or held or busy):
                break
            # 1. hand queued samples to idle workers
            for slot, worker in enumerate(self._workers):
                if worker.ready and worker.index is None and queue:
                    index = queue.popleft()
                    sample = samples[index]
                    try:
                        # The number outside the sample's own pickle: the worker reads it even when the rest
                        # cannot be unpickled there, and says why for this sample.
                        payload = pickle.dumps((index, pickle.dumps((fns[index], sample.response,
                                                                     sample.ground_truth, sample.extra_info))))
                    except Exception as err:
                        fail(index, "error", f"sample cannot be sent to a worker: {type(err).__name__}: {err}")
                        continue
                    if not worker.submit(index, payload, time.monotonic() + self.timeout_s, self._over_limit(worker)):
                        queue.appendleft(index)             # the worker was dead before it got the sample
                        self._replace(slot)
            # 2. wait for a result, a ready message, the next deadline, or the next look at the workers' memory
            waiting = {w.conn: slot for slot, w in enumerate(self._workers) if not w.ready or w.index is not None}
            if not waiting:                                 # only unsendable samples were left
                continue
            now = time.monotonic()
            wait_s = max(0.0, min(self._workers[slot].deadline for slot in waiting.values()) - now)
            if self.max_rss_bytes is not None:
                wait_s = min(wait_s, max(0.0, polled + MEMORY_POLL_S - now))
            for conn in multiprocessing.connection.wait(list(waiting), timeout=wait_s):
                slot = waiting[conn]
                worker = self._workers[slot]
                try:
                    message = conn.recv_bytes()
                except (EOFError, OSError):             # the process is gone
                    worker.process.join(timeout=5)
                    if worker.index is None:
                        raise RuntimeError(f"reward worker {worker.process.pid} died while starting "
                                           f"(exit code {worker.process.exitcode})") from None
                    fail(worker.index, "worker_died", f"exit code {worker.process.exitcode}")
                    self._replace(slot)
                    continue
                if not worker.ready:
                    status, value, _ = pickle.loads(message)
                    if status != "ready":
                        raise RuntimeError(f"reward worker {worker.process.pid} failed to start: {value}")
                    worker.ready = True
                    continue
                try:
                    status, value, answered = pickle.loads(message)
                except Exception as err:                    # e.g. a class the trainer cannot import
                    status, value = "error", f"result cannot be read: {type(err).__name__}: {err}"
                    answered = worker.index
                if answered != worker.index:  # not this sample's answer (a stray reply): keep waiting for it
                    logger.warning("reward worker %d answered for sample %s while scoring sample %s; ignored",
                                   worker.process.pid, answered, worker.index)
                    continue
                index, worker.index = worker.index, None
                if status == "error":
                    fail(index, "error", value)
                else:
                    result, problem = _check(value)
                    if problem is not None:
                        fail(index, *problem)
                    else:
                        results[index] = result
                        done[samples[index].data_source] += 1
                        scored[samples[index].data_source] += 1
                self._replace_if_grown(slot)
            # 3. kill workers past their deadline, or grown past the memory limit in their sample
            now = time.monotonic()
            for slot, worker in enumerate(self._workers):
                if worker.index is not None and now >= worker.deadline:
                    fail(worker.index, "timeout", f"no result after {self.timeout_s} s (worker killed)")
                    self._replace(slot)
                elif (worker.index is not None and not worker.over_at_start and now >= polled + MEMORY_POLL_S
                      and not worker.conn.poll() and (rss := self._over_limit(worker, KILL_FACTOR))):
                    # (a result waiting in the pipe is read first: the worker is then replaced between samples)
                    fail(worker.index, "memory", f"the worker held {rss / 1e9:.2f} GB while scoring it (> "
                                                 f"{KILL_FACTOR:g} x reward.worker_max_rss_gb="
                                                 f"{self.max_rss_bytes / 1e9:g}; killed)")
                    self.replaced_for_memory += 1
                    self._replace(slot)
                elif not worker.ready and now >= worker.deadline:
                    raise RuntimeError(f"reward worker {worker.process.pid} did not start within "
                                       f"{self.startup_timeout_s} s")
            if now >= polled + MEMORY_POLL_S:
                polled = now
        batch = RewardBatch(results=results, failure_counts=dict(kinds))  # type: ignore[arg-type]
        if kinds:
            first = next(i for i, r in enumerate(batch.results) if r.failed)
            logger.warning("reward: %d/%d samples failed (%s); first: sample %d (%s%s): %s", batch.num_failed,
                           len(samples), ", ".join(f"{k} {n}" for k, n in kinds.items()), first,
                           samples[first].data_source, f", {samples[first].where}" if samples[first].where else "",
                           batch.results[first].reason)
        return batch

    def _close_at_exit(self) -> None:
        if os.getpid() == self._owner:  # not in a process forked from the owner, which inherits the hook
            self.close()

    def close(self) -> None:
        atexit.unregister(self._close_at_exit)
        for worker in self._workers:
            worker.stop()
        self._workers = []

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _replace(self, slot: int) -> None:
        self._workers[slot].kill()
        self._workers[slot] = self._new_worker()

    def _new_worker(self) -> _Worker:
        """A worker that imports, before it says it is ready, every module a registered reward function comes
        from: a verifier's heavy imports (sympy, a sandbox) are paid at start, not by the first sample of each
        fresh worker against its reward.timeout_s."""
        modules = sorted({getattr(fn, "__module__", None) for fn in registered_functions().values()}
                         - {None, "__main__"})
        return _Worker(self._ctx, self.startup_timeout_s, self.functions, self.sources, modules)

    def _over_limit(self, worker: _Worker, factor: float = 1.0) -> int | None:
        """The worker's resident bytes when they are more than `factor` x max_rss_gb; None otherwise (or no
        limit)."""
        if self.max_rss_bytes is None:
            return None
        rss = _resident_bytes(worker.process.pid)
        return rss if rss is not None and rss > factor * self.max_rss_bytes else None

    def _replace_if_grown(self, slot: int) -> None:
        """Replace the idle worker in `slot` when it holds more than max_rss_gb (between samples: nothing is lost)."""
        if rss := self._over_limit(self._workers[slot]):
            logger.warning("reward worker %d holds %.2f GB (> reward.worker_max_rss_gb=%g): replaced by a fresh one",
                           self._workers[slot].process.pid, rss / 1e9, self.max_rss_bytes / 1e9)
            self.replaced_for_memory += 1
            self._replace(slot)


def compute_rewards(samples: Iterable[RewardSample | tuple], *, timeout_s: float, num_workers: int = 2,
                    functions: dict[str, str] | None = None) -> RewardBatch:
    """Score `samples` with a pool started for this call (a trainer keeps one RewardScorer instead)."""
    with RewardScorer(timeout_s=timeout_s, num_workers=num_workers, functions=functions) as scorer:
        return scorer.score(samples)


class _Worker:
    """One worker process and the parent's end of its pipe. `deadline` is the startup deadline until
    `ready`, then the deadline of the sample `index` it is scoring (None when idle); `over_at_start`: it held
    more than the memory limit when it got that sample (a fresh worker over a limit set below a worker's
    footprint), so the sample is not failed for it."""

    def __init__(self, ctx, startup_timeout_s: float, functions: dict[str, str], sources: dict[str, bytes],
                 modules: list[str] = ()):
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child_conn, functions, sources, list(modules)),
                                   daemon=True, name="reward-worker")
        self.process.start()
        child_conn.close()
        self.watcher = _watch_group(self.process.pid)  # the worker makes its pid its process group's id
        self.ready = False
        self.index: int | None = None
        self.deadline = time.monotonic() + startup_timeout_s
        self.over_at_start = False

    def submit(self, index: int, payload: bytes, deadline: float, over_at_start: object = False) -> bool:
        try:
            self.conn.send_bytes(payload)
        except (BrokenPipeError, OSError):
            return False
        self.index, self.deadline, self.over_at_start = index, deadline, bool(over_at_start)
        return True

    def kill(self) -> None:
        """SIGKILL to the worker's process group: what the reward function started (a sandbox, a solver) too."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):      # not its own group leader yet, or already gone
            self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()
        self._end_watcher()

    def stop(self) -> None:
        try:
            self.conn.send_bytes(b"")
        except OSError:
            pass
        self.process.join(timeout=1)
        if self.process.is_alive():
            self.kill()
            return
        try:  # what the reward function started and left running (a solver kept in a module global)
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # nothing of its group is left
            pass
        self.conn.close()
        self._end_watcher()

    def _end_watcher(self) -> None:
        """The group is ended: its watcher is not needed, and is reaped (no zombie per replaced worker)."""
        if self.watcher is not None:
            self.watcher.kill()
            self.watcher.wait()
            self.watcher = None


_TIMERS = ((signal.ITIMER_REAL, signal.SIGALRM), (signal.ITIMER_VIRTUAL, signal.SIGVTALRM),
           (signal.ITIMER_PROF, signal.SIGPROF))
"""The interval timers a reward function may arm (signal.alarm is the first), and the signal each sends."""


def _worker_main(conn, functions: dict[str, str], sources: dict[str, bytes], modules: list[str] = ()) -> None:
    """Worker loop: load the config's reward functions (those from files from `sources`, their text as the trainer
    read it) and import `modules` (those of the registered functions),
    then receive (sample number, pickled (fn, response, ground_truth, extra_info)) and send ("ok", value, number)
    or ("error", why, number)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)             # Ctrl-C is the trainer's to handle
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:                               # the trainer died before the line above took hold
        os._exit(1)
    try:
        os.setsid()  # a process group of its own, which kill() ends with everything the reward function started
    except OSError:  # already a group leader: kill() then ends the worker alone
        pass
    else:  # out of the terminal's group, Ctrl-C no longer reaches it; what a function starts must not ignore it
        signal.signal(signal.SIGINT, signal.default_int_handler)
    # The reward functions may start processes of their own (a process pool running code under test): the
    # worker is a daemon to the trainer, which multiprocessing would refuse to let have children.
    multiprocessing.current_process().daemon = False
    try:
        load_reward_functions(functions, sources)
    except Exception as err:
        conn.send_bytes(pickle.dumps(("failed", f"{type(err).__name__}: {err}", None)))
        return
    for name in modules:
        try:
            importlib.import_module(name)
        except BaseException:  # said by each of its samples, as the error of the function that cannot be loaded
            pass
    conn.send_bytes(pickle.dumps(("ready", os.getpid(), None)))
    me, home = os.getpid(), os.getcwd()
    handlers = {sig: signal.getsignal(sig) for _, sig in _TIMERS}
    while True:
        try:
            payload = conn.recv_bytes()
        except (EOFError, OSError):
            return
        if not payload:
            return
        index, sample = pickle.loads(payload)
        try:
            fn, response, ground_truth, extra_info = pickle.loads(sample)
            reply = pickle.dumps(("ok", fn(response, ground_truth, extra_info), index))
        except BaseException as err:                       # a reward function may even call sys.exit
            where = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
            at = f" (at {os.path.basename(where.filename)}:{where.lineno})" if where else ""
            try:
                why = f"{type(err).__name__}: {err}{at}"
            except BaseException:                          # its __str__ raised too
                why = f"{type(err).__name__} (its message cannot be shown){at}"
            reply = pickle.dumps(("error", why, index))
        if os.getpid() != me:  # a process the reward function forked came back here: it must not answer
            os._exit(0)
        try:  # the next sample, of any data_source, starts where the worker started
            if os.getcwd() != home:
                os.chdir(home)
        except OSError:  # the folder it moved to is gone
            os.chdir(home)
        for timer, sig in _TIMERS:  # a verifier's own timeout left armed (it raised first) ends with its sample
            signal.setitimer(timer, 0)
            signal.signal(sig, handlers[sig])
        conn.send_bytes(reply)



_WATCHER = """
import os, signal, sys, time
owner, group = int(sys.argv[1]), int(sys.argv[2])
signal.signal(signal.SIGINT, signal.SIG_IGN)
while os.getppid() == owner:
    time.sleep(0.25)
try:
    os.killpg(group, signal.SIGKILL)
except OSError:
    pass
"""
"""The watcher's program: once the pool's owner (its parent) is gone, it ends the processes left in the worker's
process group."""


def _watch_group(group: int) -> subprocess.Popen | None:
    """A watcher for worker `group`'s process group, started by the pool's owner (the trainer). What a reward
    function started (a sandbox, a solver kept in a module global) stays in the worker's group when the worker
    dies; the pool ends the group when it kills or stops a worker, but a trainer killed by SIGKILL or the OOM
    killer takes only the worker with it (`_die_with_parent`) and leaves the rest running. The watcher sees its
    parent go and ends the group. It runs in a session of its own (a signal to the trainer's group or the
    worker's does not end it), holds none of their files, and the pool stops and reaps it with its worker.
    None, with a warning, when no process can be started."""
    import sys

    try:
        return subprocess.Popen([sys.executable, "-S", "-c", _WATCHER, str(os.getpid()), str(group)],
                                start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    except OSError as err:
        logger.warning("reward worker %d: no watcher for its process group (%s); what its functions start may "
                       "outlive a killed trainer", group, err)
        return None


def _resident_bytes(pid: int) -> int | None:
    """The resident memory of process `pid` (Linux's /proc/PID/statm), or None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _die_with_parent() -> None:
    """Linux: the kernel sends this worker SIGKILL when the trainer dies, even by SIGKILL or the OOM killer,
    which leave no chance to stop it (a worker stuck in a reward function's C code would live on). Elsewhere
    nothing: the worker then ends when it next reads from its closed pipe."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


MEMORY_POLL_S = 0.2
"""How often the pool reads its busy workers' resident memory while they score (with reward.worker_max_rss_gb)."""

KILL_FACTOR = 2.0
"""A worker past this many times reward.worker_max_rss_gb in the middle of a sample is killed (past the limit
itself, it is replaced once the sample is done)."""

RESERVED_EXTRA = ("score",)
"""Extra figures' names that validation's own figures take (val/NAME_mean: val/score_mean)."""


def _check(value: Any) -> tuple[RewardResult | None, tuple[str, str] | None]:
    """A reward function's return value -> (result, None) or (None, (kind, detail)). Numbers may be any real
    number, numpy's and bools included (True is 1.0); the result holds Python floats and `pred` as text."""
    try:
        if isinstance(value, Mapping):  # verl's layout: {"score", "acc", "pred", other figures}
            if "score" not in value:
                return None, ("bad_return", f"returned a mapping without 'score' (keys: "
                                            f"{', '.join(sorted(map(str, value))[:8])})")
            extra = {k: v for k, v in value.items() if k not in ("score", "acc", "pred")}
            value = RewardResult(score=value["score"], acc=value.get("acc", value["score"]), extra=extra,
                                 pred=value.get("pred"))
        if isinstance(value, RewardResult):
            if value.failed:                               # the function reported its own failure
                return None, ("error", value.reason or "the reward function marked the sample failed")
            if not isinstance(value.extra, dict):
                return None, ("bad_return", f"extra is {type(value.extra).__name__}, expected a dict of numbers")
            if clash := [str(k) for k in value.extra if str(k) in RESERVED_EXTRA or "/" in str(k)]:
                return None, ("bad_return", f"extra figure(s) {clash}: 'score' would be logged as val/score_mean, "
                                            f"the mean score itself, and a '/' under another data_source's "
                                            f"figures (val/SOURCE/...): name them otherwise")
            named = [("score", value.score), ("acc", value.acc), *((f"extra[{k!r}]", v) for k, v in value.extra.items())]
        elif _real(value) is None:
            return None, ("bad_return", f"returned {type(value).__name__}, expected RewardResult, a mapping with "
                                        "'score' or a float")
        else:
            named = [("score", value)]
        checked = []
        for name, number in named:
            real = _real(number)
            if real is None:
                return None, ("bad_return", f"{name} is {type(number).__name__}, expected a number")
            if not math.isfinite(real):
                return None, ("non_finite", f"{name} is {real}")
            checked.append(real)
        if not isinstance(value, RewardResult):            # a float return is both score and accuracy
            return RewardResult(score=checked[0], acc=checked[0]), None
        score, acc, *extra = checked
        return RewardResult(score=score, acc=acc, extra=dict(zip(map(str, value.extra), extra)),
                            pred=None if value.pred is None else str(value.pred)), None
    except Exception as err:                               # whatever the value's own methods raise
        return None, ("bad_return", f"the returned value cannot be read: {type(err).__name__}: {err}")


def _real(number: Any) -> float | None:
    """A real number (int, float, bool, numpy scalar) as a float; None for anything else."""
    if isinstance(number, numbers.Real) or (type(number).__module__ == "numpy" and getattr(number, "shape", None) == ()
                                            and getattr(number.dtype, "kind", "") in "biuf"):
        return float(number)
    return None
