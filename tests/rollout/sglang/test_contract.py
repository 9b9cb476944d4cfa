"""The SGLang adapter against the real sglang package (installed and imported on CPU; SGLang cannot
run here). CI installs sglang into its CUDA-torch environment, where these checks run.

- every Engine method the adapter calls exists and takes the keyword arguments it passes
  (test_broadcast.py also binds every call of a real push against the Engine's signatures);
- the keyword arguments it starts the Engine with are server arguments;
- its weight buckets deserialize through SGLang's own MultiprocessingSerializer and
  FlattenedTensorBucket into exactly the names and tensors that were sent.
"""
import dataclasses
import inspect
import os
import signal
import types

import pytest
import torch

from tests.required import unavailable


def _sglang():
    try:
        from sglang.srt.entrypoints.engine import Engine
    except ImportError as err:
        unavailable("sglang", f"sglang does not import here ({err}); CI's kernel environment installs it")
    return Engine


def _bind(method: str, **kwargs) -> None:
    """TypeError unless the real sglang.Engine's `method` takes these keyword arguments (the fakes below stand in
    for an Engine that cannot run here, and must not drift from its API); for generate, each request's sampling
    parameters as SGLang's own SamplingParams reads and verifies them."""
    inspect.signature(getattr(_sglang(), method)).bind(None, **kwargs)
    if method == "generate":
        _check_sampling(kwargs["sampling_params"])


VOCAB = 100
"""The vocabulary the fakes' requests are verified against (their token ids are below it)."""


def _check_sampling(sampling_params) -> None:
    """The sampling parameters of a generate call (one dict, or one per request), each through SGLang's own
    SamplingParams and its verify(), as its tokenizer manager takes them: a key SGLang does not know is a
    TypeError, a value it refuses a ValueError."""
    from sglang.srt.sampling.sampling_params import SamplingParams

    for params in sampling_params if isinstance(sampling_params, list) else [sampling_params]:
        SamplingParams(**params).verify(vocab_size=VOCAB)


CALLS = {  # Engine method -> keyword arguments megatron_dapo.rollout.sglang passes
    "generate": {"input_ids", "sampling_params", "return_logprob", "logprob_start_len"},
    "update_weights_from_tensor": {"named_tensors", "load_format", "flush_cache"},
    "flush_cache": set(),
    "release_memory_occupation": {"tags"},
    "resume_memory_occupation": {"tags"},
    "begin_weight_update": set(),
    "end_weight_update": set(),
    "init_weights_update_group": {"master_address", "master_port", "rank_offset", "world_size", "group_name",
                                  "backend"},
    "update_weights_from_distributed": {"names", "dtypes", "shapes", "group_name", "flush_cache", "load_format"},
    "shutdown": set(),
}


@pytest.mark.parametrize("method", sorted(CALLS))
def test_engine_methods_and_keywords_exist(method):
    engine = _sglang()
    assert hasattr(engine, method), f"sglang.Engine has no {method}"
    params = inspect.signature(getattr(engine, method)).parameters
    missing = CALLS[method] - set(params)
    assert not missing, f"sglang.Engine.{method} takes no {sorted(missing)}"


@pytest.mark.parametrize("mode", ["colocated", "disaggregated"])
def test_engine_start_arguments_are_server_arguments(mode, tmp_path, monkeypatch):
    """What SGLangEngine.launch starts sglang.Engine with (a recorder in its place: it cannot start here) is
    taken by SGLang's own ServerArgs, on the GPUs the mode gives it."""
    _sglang()
    import sglang
    from sglang.srt.server_args import ServerArgs

    from megatron_dapo.rollout.sglang import SGLangEngine
    from megatron_dapo.rollout.sglang.config import SGLangEngineConfig
    from tests.tiny_models import make_tiny_model

    started, manager = [], _tokenizer_manager()

    def record(**kwargs):
        started.append(ServerArgs(**kwargs))
        # SGLang's processes start without the trainer's setting (it would serialise their streams' kernels)
        assert "CUDA_DEVICE_MAX_CONNECTIONS" not in os.environ
        return _engine_front(manager)

    monkeypatch.setattr(sglang, "Engine", record)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    folder = make_tiny_model("qwen2", tmp_path / "qwen2", vocab_size=VOCAB)
    config = SGLangEngineConfig(tp_size=2, server_args={"attention_backend": "fa3"})
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    before = signal.getsignal(signal.SIGTERM)
    try:
        engine = SGLangEngine.launch(str(folder), config, mode, local_world_size=4 if mode == "disaggregated" else 8)
        assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"  # the trainer's again
        # Weights go by CUDA IPC where the engine shares the trainer's GPUs, by broadcast where it has its own; the
        # push is checked against the model's tensors either way.
        assert (engine._sender is None) == (mode == "colocated") and engine._ledger is not None
        # SGLang's loop is set up, the engine's own (its calls run it), and SIGTERM left as it was
        assert manager.event_loop is not None and manager.event_loop is engine.engine.loop
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        manager.close()
        signal.signal(signal.SIGTERM, before)
    (args,) = started
    assert (args.model_path, args.tp_size, args.skip_tokenizer_init, args.attention_backend) == (str(folder), 2, True,
                                                                                                 "fa3")
    assert args.enable_memory_saver == (mode == "colocated")
    assert args.base_gpu_id == (0 if mode == "colocated" else 4)  # after the trainer's 4 GPUs
    with pytest.raises(TypeError):  # the check can fail: an unknown argument is refused
        ServerArgs(model_path="/nonexistent", no_such_argument=1)


def test_sampling_arguments_are_sglangs():
    """The sampling parameters generate and score send, seeded and not, pass SGLang's SamplingParams.verify;
    the check refuses what SGLang refuses."""
    _sglang()
    from megatron_dapo.rollout.engine import SamplingParams
    from megatron_dapo.rollout.sglang import SGLangEngine

    engine = SGLangEngine(_Finishing(None), tp_size=1)
    for params in (SamplingParams(n=2, max_new_tokens=4, temperature=0.7, top_p=0.9, top_k=5, stop_token_ids=(2, 3),
                                  seed=2**62), SamplingParams(max_new_tokens=1)):
        engine.generate([[1, 2], [3]], params)
    SGLangEngine(_Scoring(), tp_size=1).score([[5, 6, 7]], 1.0)
    with pytest.raises(TypeError):
        _check_sampling({"max_new_tokens": 1, "seed": 3})  # not SGLang's name for it
    with pytest.raises(ValueError):
        _check_sampling([{"max_new_tokens": 1, "top_p": 1.5}])


class _Echoing:
    """sglang.Engine.generate recording each request as SGLang's own SamplingParams reads it (normalised), and
    answering request i with token 10 + i at log-prob -(i + 1) / 100: which answer reaches which prompt shows."""

    def __init__(self):
        self.requests: list[tuple[list[int], object, dict]] = []

    def generate(self, input_ids=None, sampling_params=None, return_logprob=False):
        from sglang.srt.sampling.sampling_params import SamplingParams

        _bind("generate", input_ids=input_ids, sampling_params=sampling_params, return_logprob=return_logprob)
        assert return_logprob and len(sampling_params) == len(input_ids)
        for ids, params in zip(input_ids, sampling_params):
            read = SamplingParams(**params)
            read.normalize(None)
            self.requests.append((ids, read, params))
        return [{"output_ids": [10 + i], "meta_info": {"finish_reason": {"type": "length", "length": 1},
                                                       "output_token_logprobs": [(-(i + 1) / 100, 10 + i, None)]}}
                for i in range(len(input_ids))]


def test_each_request_asks_for_what_was_requested_and_its_answer_comes_back_under_its_prompt():
    """What SGLang reads from each request is the requested sampling (temperature, top-p, top-k, stop ids, max
    tokens, a seed of its own per request), n requests per prompt in prompt order; the answers come back grouped
    under their prompts in that order."""
    _sglang()
    from sglang.srt.sampling.sampling_params import TOP_K_ALL

    from megatron_dapo.rollout.engine import SamplingParams
    from megatron_dapo.rollout.sglang import SGLangEngine

    front = _Echoing()
    prompts = [[1, 2], [3], [4, 5, 6]]
    params = SamplingParams(n=2, max_new_tokens=1, temperature=0.7, top_p=0.9, top_k=5, stop_token_ids=(2, 3), seed=11)
    out = SGLangEngine(front, tp_size=1).generate(prompts, params)
    assert [ids for ids, _, _ in front.requests] == [[1, 2], [1, 2], [3], [3], [4, 5, 6], [4, 5, 6]]
    for _, read, _ in front.requests:
        assert (read.temperature, read.top_p, read.top_k, read.max_new_tokens) == (0.7, 0.9, 5, 1)
        assert read.stop_token_ids == {2, 3}
    assert len({read.sampling_seed for _, read, _ in front.requests}) == 6  # each request draws its own
    seeds = {}
    for seed in (11, 12):  # the seeds follow the batch's: the same again, and none shared with another batch's
        again = _Echoing()
        SGLangEngine(again, tp_size=1).generate(prompts, dataclasses.replace(params, seed=seed))
        seeds[seed] = [read.sampling_seed for _, read, _ in again.requests]
    assert seeds[11] == [read.sampling_seed for _, read, _ in front.requests]
    assert not set(seeds[11]) & set(seeds[12])
    assert [[(c.token_ids, c.logprobs, c.finish_reason) for c in cs] for cs in out] == [
        [([10 + i], [pytest.approx(-(i + 1) / 100)], "length") for i in (2 * p, 2 * p + 1)] for p in range(3)]

    # No seed: a fresh draw each call, each request its own (SGLang's deterministic inference would give every
    # unseeded request its one default seed).
    drawn = []
    for _ in range(2):
        front = _Echoing()
        SGLangEngine(front, tp_size=1).generate([[7]], SamplingParams(max_new_tokens=1, temperature=1.3, n=2))
        assert all((read.temperature, read.top_p, read.top_k) == (1.3, 1.0, TOP_K_ALL) for _, read, _ in front.requests)
        drawn.append([read.sampling_seed for _, read, _ in front.requests])
    assert len(set(drawn[0] + drawn[1])) == 4, drawn


def test_buckets_round_trip_through_sglang_deserializer():
    _sglang()
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.utils.common import normalize_serialized_named_tensor_payloads
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    from megatron_dapo.rollout.engine import RolloutError
    from megatron_dapo.rollout.sglang.wire import bucket_payloads, flatten

    gen = torch.Generator().manual_seed(0)
    sent = [
        ("model.embed_tokens.weight", torch.randn(11, 7, generator=gen).to(torch.bfloat16)),  # 154 bytes
        ("model.layers.0.self_attn.q_proj.bias", torch.randn(8, generator=gen)),
        ("model.layers.0.mlp.down_proj.weight", torch.randn(8, 5, generator=gen).t()),  # not contiguous
        ("model.norm.weight", torch.randn(8, generator=gen, dtype=torch.float16)),
    ]
    with pytest.raises(RolloutError, match="an empty weight bucket"):
        flatten([])
    payloads = bucket_payloads(flatten(sent), tp_size=2)
    assert len(payloads) == 2
    for raw in normalize_serialized_named_tensor_payloads(payloads):
        data = MultiprocessingSerializer.deserialize(raw)
        bucket = FlattenedTensorBucket(flattened_tensor=data["flattened_tensor"], metadata=data["metadata"])
        received = dict(bucket.reconstruct_tensors())
        assert sorted(received) == sorted(name for name, _ in sent)
        for name, want in sent:
            got = received[name]
            assert got.dtype == want.dtype and got.shape == want.shape, name
            assert torch.equal(got, want), name
        for meta in data["metadata"]:  # SGLang's broadcast receiver refuses unaligned offsets
            assert meta.start_idx % meta.dtype.itemsize == 0, meta.name


class _Failing:
    """An engine front end whose weight loads fail, answering as sglang.Engine does: (False, message)."""

    def begin_weight_update(self):
        return True, "Succeeded"

    def update_weights_from_tensor(self, **kwargs):
        _bind("update_weights_from_tensor", **kwargs)
        return False, "update_weights_from_tensor must run between begin_weight_update() and end_weight_update()"


def test_a_failed_load_raises_with_sglangs_message_and_leaves_the_engine_stale():
    _sglang()
    from megatron_dapo.rollout.engine import RolloutError, SamplingParams, StaleWeightsError
    from megatron_dapo.rollout.sglang import SGLangEngine

    engine = SGLangEngine(_Failing(), tp_size=1)
    engine.begin_weight_update()
    with pytest.raises(RolloutError, match="SGLang's update_weights_from_tensor failed: update_weights_from_tensor "
                                           "must run between"):
        engine.update_weights([("model.norm.weight", torch.ones(4))])
    with pytest.raises(StaleWeightsError):
        engine.generate([[1, 2]], SamplingParams(max_new_tokens=2))


class _MemoryFrontEnd:
    """sglang.Engine's memory calls, signature-checked against the real Engine, keeping SGLang's
    bookkeeping of paused tags (its scheduler adds each released tag and removes each resumed one,
    and a tag resumed twice is a KeyError there)."""

    def __init__(self):
        from sglang.srt.entrypoints.engine import Engine

        self.engine_class, self.paused, self.calls = Engine, set(), []

    def _bind(self, method: str, **kwargs):
        inspect.signature(getattr(self.engine_class, method)).bind(self, **kwargs)
        self.calls.append((method, kwargs.get("tags")))

    def release_memory_occupation(self, tags=None):
        self._bind("release_memory_occupation", tags=tags)
        self.paused.update(tags)

    def resume_memory_occupation(self, tags=None):
        self._bind("resume_memory_occupation", tags=tags)
        for tag in tags:
            self.paused.remove(tag)

    def begin_weight_update(self):
        self._bind("begin_weight_update")
        assert "weights" not in self.paused, "weights loaded into released memory"
        return True, "Succeeded"

    def end_weight_update(self):
        self._bind("end_weight_update")
        return True, "Succeeded"

    def flush_cache(self):
        self._bind("flush_cache")
        return True

    def generate(self, input_ids=None, sampling_params=None, return_logprob=False):
        self._bind("generate", input_ids=input_ids, sampling_params=sampling_params, return_logprob=return_logprob)
        _check_sampling(sampling_params)
        assert not self.paused, f"generating with {sorted(self.paused)} paused"
        finish = {"type": "length"}
        return [{"output_ids": [7], "meta_info": {"finish_reason": finish, "output_token_logprobs": [(-0.5, 7, None)]}}
                for _ in input_ids]


def test_memory_is_taken_back_weights_first_each_tag_once():
    """actor.offload's order: release everything; take back the weights for the push while the KV cache
    stays free; then the rest. Each tag is one of SGLang's and is resumed exactly once. Released weights
    lose their values in SGLang (no CPU backup): the engine refuses to generate until a push; released
    with weights=False (a checkpoint saved mid-phase), it generates again without one."""
    _sglang()
    from sglang.srt.constants import GPU_MEMORY_ALL_TYPES

    from megatron_dapo.rollout.engine import RolloutError, SamplingParams, StaleWeightsError
    from megatron_dapo.rollout.sglang import SGLangEngine
    from megatron_dapo.rollout.sglang.engine import MEMORY_TAGS

    assert sorted(MEMORY_TAGS) == sorted(GPU_MEMORY_ALL_TYPES)  # the CUDA graphs' pool too
    front = _MemoryFrontEnd()
    engine = SGLangEngine(front, tp_size=1)
    engine.release_memory()
    with pytest.raises(RolloutError, match="call resume_weights"):
        engine.begin_weight_update()
    engine.resume_weights()
    engine.resume_weights()  # already back: SGLang is not asked twice
    engine.begin_weight_update()
    engine.end_weight_update(version=1)
    with pytest.raises(RolloutError, match="call resume_memory"):
        engine.generate([[1, 2]], SamplingParams(max_new_tokens=2))
    engine.resume_memory()
    engine.resume_memory()
    assert front.paused == set()
    memory_calls = [call for call in front.calls if "memory" in call[0]]
    assert memory_calls == [("release_memory_occupation", ["kv_cache", "weights", "cuda_graph"]),
                            ("resume_memory_occupation", ["weights"]),
                            ("resume_memory_occupation", ["kv_cache", "cuda_graph"])], memory_calls
    assert engine.generate([[1, 2]], SamplingParams(max_new_tokens=1))[0][0].token_ids == [7]
    # Without actor.offload the trainer resumes everything at once, then pushes.
    engine.release_memory()
    engine.resume_memory()
    assert front.calls[-1] == ("resume_memory_occupation", ["kv_cache", "weights", "cuda_graph"])
    assert front.paused == set()
    with pytest.raises(StaleWeightsError, match="weights were released and have not been pushed since"):
        engine.generate([[1, 2]], SamplingParams(max_new_tokens=1))
    engine.begin_weight_update()
    engine.end_weight_update(version=2)
    engine.generate([[1, 2]], SamplingParams(max_new_tokens=1))
    # A checkpoint with the actor offloaded: only the KV cache goes, and no push is needed after.
    engine.release_memory(weights=False)
    assert front.calls[-1] == ("release_memory_occupation", ["kv_cache", "cuda_graph"])
    engine.resume_memory()
    assert front.calls[-1] == ("resume_memory_occupation", ["kv_cache", "cuda_graph"]) and front.paused == set()
    engine.generate([[1, 2]], SamplingParams(max_new_tokens=1))


class _Finishing:
    """sglang.Engine.generate answering each request with SGLang's own finish reason `finish` (to_json())."""

    def __init__(self, finish):
        self.finish = finish

    def generate(self, input_ids=None, sampling_params=None, return_logprob=False):
        _bind("generate", input_ids=input_ids, sampling_params=sampling_params, return_logprob=return_logprob)
        finish = self.finish.to_json() if self.finish is not None else {"type": "stop", "matched": 7}
        return [{"output_ids": [7], "meta_info": {"finish_reason": finish,
                                                  "output_token_logprobs": [(-0.5, 7, None)]}} for _ in input_ids]


def test_finish_reasons_map_and_an_aborted_request_is_an_error():
    _sglang()
    from sglang.srt.managers.schedule_batch import FINISH_ABORT, FINISH_LENGTH, FINISH_MATCHED_TOKEN

    from megatron_dapo.rollout.engine import RolloutError, SamplingParams
    from megatron_dapo.rollout.sglang import SGLangEngine

    params = SamplingParams(max_new_tokens=1)
    for finish, expected in ((FINISH_MATCHED_TOKEN(matched=7), "stop"), (FINISH_LENGTH(length=1), "length")):
        assert SGLangEngine(_Finishing(finish), tp_size=1).generate([[1, 2]], params)[0][0].finish_reason == expected
    # A stop token as the last token max_new_tokens allows ended the response: a "stop" whichever check SGLang
    # made first (the embedded engine says "stop" too).
    stopped = SamplingParams(max_new_tokens=1, stop_token_ids=(7,))
    assert SGLangEngine(_Finishing(FINISH_LENGTH(length=1)), tp_size=1).generate([[1, 2]], stopped)[0][0] \
        .finish_reason == "stop"
    with pytest.raises(RolloutError, match="finish reason .*abort.*out of KV cache"):
        SGLangEngine(_Finishing(FINISH_ABORT(message="out of KV cache")), tp_size=1).generate([[1, 2]], params)
    # A "length" short of max_new_tokens: SGLang lowered it to what its KV cache or context length left.
    with pytest.raises(RolloutError, match=r"SGLang cut a response at 1 of its max_new_tokens=4 .*KV cache holds "
                                           r"fewer tokens"):
        SGLangEngine(_Finishing(FINISH_LENGTH(length=1)), tp_size=1).generate([[1, 2]], SamplingParams(max_new_tokens=4))
    assert SGLangEngine(_Finishing(None), tp_size=1).generate([], params) == []
    with pytest.raises(RolloutError, match=r"prompt 0 is a int, not a list of token ids \(a batch is a list of prompts\)"):
        SGLangEngine(_Finishing(None), tp_size=1).generate([1, 2], params)


class _Scoring:
    """sglang.Engine.generate answering a scoring request (max_new_tokens 0, logprob_start_len 0) as SGLang does:
    one (log-prob, token id, text) per prompt token, the first without a log-prob."""

    def generate(self, input_ids=None, sampling_params=None, return_logprob=False, logprob_start_len=None):
        _bind("generate", input_ids=input_ids, sampling_params=sampling_params, return_logprob=return_logprob,
              logprob_start_len=logprob_start_len)
        assert sampling_params["max_new_tokens"] == 0 and return_logprob and logprob_start_len == 0
        return [{"output_ids": [], "meta_info": {"input_token_logprobs": [(None, s[0], None)] + [
            (-0.25 * i, t, None) for i, t in enumerate(s[1:], 1)]}} for s in input_ids]


def test_score_gives_each_token_after_the_first_its_log_prob():
    _sglang()
    from megatron_dapo.rollout.engine import RolloutError
    from megatron_dapo.rollout.sglang import SGLangEngine

    engine = SGLangEngine(_Scoring(), tp_size=1)
    scored = engine.score([[5, 6, 7], [8, 9]], 1.0)
    assert [s.tolist() for s in scored] == [[-0.25, -0.5], [-0.25]]
    assert all(s.dtype == torch.float32 for s in scored)
    with pytest.raises(RolloutError, match="temperature 1 only, got 0.7"):
        engine.score([[5, 6]], 0.7)


class _Refusing:
    """sglang.Engine.generate as it answers a batch holding a request it aborts up front (status 400)."""

    def generate(self, input_ids=None, sampling_params=None, return_logprob=False):
        _bind("generate", input_ids=input_ids, sampling_params=sampling_params, return_logprob=return_logprob)
        raise ValueError("The input (30000 tokens) is longer than the model's context length (32768 tokens).")


def test_a_batch_sglang_refuses_is_a_rollout_error_with_its_reason():
    _sglang()
    from megatron_dapo.rollout.engine import RolloutError, SamplingParams
    from megatron_dapo.rollout.sglang import SGLangEngine

    with pytest.raises(RolloutError, match=r"SGLang refused the generation batch \(2 prompts x 1\): The input \(30000"):
        SGLangEngine(_Refusing(), tp_size=1).generate([[1], [2]], SamplingParams(max_new_tokens=4000))


class _Aborting:
    """sglang.Engine.generate as it answers a batch holding a request its scheduler aborted with a server-side
    status (TokenizerManager raises fastapi's HTTPException, whose str() is empty), or, for `abort_scoring`,
    returns the aborted request (its finish reason of type "abort", no log-probs)."""

    def __init__(self, abort_scoring: bool = False):
        self.abort_scoring = abort_scoring

    def generate(self, input_ids=None, sampling_params=None, return_logprob=False, logprob_start_len=None):
        _bind("generate", input_ids=input_ids, sampling_params=sampling_params, return_logprob=return_logprob,
              logprob_start_len=logprob_start_len)
        if self.abort_scoring:
            from sglang.srt.managers.schedule_batch import FINISH_ABORT

            return [{"output_ids": [], "meta_info": {"finish_reason": FINISH_ABORT("out of memory").to_json()}}
                    for _ in input_ids]
        import fastapi

        raise fastapi.HTTPException(status_code=503, detail="The request was aborted: KV cache exhausted")


def test_a_batch_sglang_aborts_is_a_rollout_error_with_its_reason():
    _sglang()
    from megatron_dapo.rollout.engine import RolloutError, SamplingParams
    from megatron_dapo.rollout.sglang import SGLangEngine

    with pytest.raises(RolloutError, match=r"SGLang failed on the generation batch \(1 prompts x 2\): HTTPException: "
                                           r"The request was aborted: KV cache exhausted"):
        SGLangEngine(_Aborting(), tp_size=1).generate([[1]], SamplingParams(n=2, max_new_tokens=4))
    with pytest.raises(RolloutError, match=r"SGLang failed on the scoring batch \(1 sequences\): HTTPException"):
        SGLangEngine(_Aborting(), tp_size=1).score([[1, 2]], 1.0)
    with pytest.raises(RolloutError, match=r"SGLang aborted scoring sequence 0: out of memory"):  # not a KeyError
        SGLangEngine(_Aborting(abort_scoring=True), tp_size=1).score([[1, 2]], 1.0)


def test_scores_only_at_temperature_1_and_refuses_original_logprobs(monkeypatch):
    """SGLang's prompt log-probs ignore the request's temperature, so score() takes only 1.0 (the parity probe's);
    SGLANG_RETURN_ORIGINAL_LOGPROB (temperature-1 sampled log-probs) stops the engine before it starts."""
    _sglang()
    from megatron_dapo.config.loader import ConfigError
    from megatron_dapo.rollout.engine import RolloutError
    from megatron_dapo.rollout.reshard import PROBE_TEMPERATURE
    from megatron_dapo.rollout.sglang import SGLangEngine
    from megatron_dapo.rollout.sglang.config import SGLangEngineConfig

    assert PROBE_TEMPERATURE == 1.0
    with pytest.raises(RolloutError, match="temperature 1 only, got 0.7"):
        SGLangEngine(_Finishing(None), tp_size=1).score([[1, 2, 3]], 0.7)
    monkeypatch.setenv("SGLANG_RETURN_ORIGINAL_LOGPROB", "true")
    with pytest.raises(ConfigError, match="SGLANG_RETURN_ORIGINAL_LOGPROB is set"):
        SGLangEngine.check_startable(SGLangEngineConfig(), "colocated", local_world_size=1)


class _Loading:
    """sglang.Engine's weight calls, signature-checked against the real Engine, loading every bucket."""

    def __init__(self):
        from sglang.srt.entrypoints.engine import Engine

        self.engine_class, self.loaded = Engine, 0

    def begin_weight_update(self):
        inspect.signature(self.engine_class.begin_weight_update).bind(self)
        return True, "Succeeded"

    def update_weights_from_tensor(self, **kwargs):
        inspect.signature(self.engine_class.update_weights_from_tensor).bind(self, **kwargs)
        self.loaded += 1
        return True, "Succeeded"

    def end_weight_update(self):
        return True, "Succeeded"

    def flush_cache(self):
        return True

    def generate(self, input_ids=None, sampling_params=None, return_logprob=False):
        return [{"output_ids": [7], "meta_info": {"finish_reason": {"type": "length"},
                                                  "output_token_logprobs": [(-0.5, 7, None)]}} for _ in input_ids]


def test_pushes_are_checked_against_the_models_names_and_shapes(tmp_path):
    """SGLang only warns about a tensor name it does not know: the adapter refuses an unknown name or a wrong
    shape before SGLang sees the bucket, and a push that leaves a tensor out stays open (stale)."""
    _sglang()
    from megatron_dapo.models.arch import ModelArch
    from megatron_dapo.rollout.engine import RolloutError, SamplingParams, StaleWeightsError
    from megatron_dapo.rollout.sglang import SGLangEngine
    from megatron_dapo.rollout.sglang.engine import push_ledger
    from tests.tiny_models import make_tiny_model

    ledger = push_ledger(ModelArch.from_pretrained(make_tiny_model("qwen2", tmp_path / "qwen2")))
    front = _Loading()
    engine = SGLangEngine(front, tp_size=1, ledger=ledger)
    full = {name: torch.zeros(shape) for name, shape in ledger.shapes.items()}
    engine.begin_weight_update()
    with pytest.raises(RolloutError, match=r"unknown tensor 'model.norm.weights' \(did you mean 'model.norm.weight'"):
        engine.update_weights([("model.norm.weights", full["model.norm.weight"])])
    with pytest.raises(RolloutError, match=r"'model.norm.weight' has shape \(3,\), the engine's .* has shape \(64,\)"):
        engine.update_weights([("model.norm.weight", torch.zeros(3))])
    assert front.loaded == 0  # SGLang saw neither
    names = sorted(full)
    engine.update_weights([(name, full[name]) for name in names[:-1]])
    with pytest.raises(RolloutError, match=f"weight push incomplete: 1 of {len(names)} parameters .*{names[-1]}"):
        engine.end_weight_update(version=1)
    with pytest.raises(StaleWeightsError):
        engine.generate([[1, 2]], SamplingParams(max_new_tokens=1))
    engine.update_weights([(names[-1], full[names[-1]])])
    engine.end_weight_update(version=1)
    assert engine.weight_version == 1 and front.loaded == 2
    assert engine.generate([[1, 2]], SamplingParams(max_new_tokens=1))[0][0].token_ids == [7]


class _NaNSampled:
    """sglang.Engine.generate answering as SGLang's scheduler does for a request that sampled an id outside the
    vocabulary (a NaN): the token overwritten by the stop id, the sampled one's log-prob kept."""

    def generate(self, input_ids=None, sampling_params=None, return_logprob=False):
        _bind("generate", input_ids=input_ids, sampling_params=sampling_params, return_logprob=return_logprob)
        from sglang.srt.managers.schedule_batch import FINISH_MATCHED_STR

        finish = FINISH_MATCHED_STR(matched="NaN happened").to_json()
        return [{"output_ids": [11, 2], "meta_info": {"finish_reason": finish, "output_token_logprobs": [
            (-0.5, 11, None), (float("nan"), -1, None)]}} for _ in input_ids]


def test_a_nan_sampled_is_an_error_not_a_stop():
    _sglang()
    from megatron_dapo.rollout.engine import RolloutError, SamplingParams
    from megatron_dapo.rollout.sglang import SGLangEngine

    with pytest.raises(RolloutError, match="log-probs are not finite or not those of its tokens .*NaN happened"):
        SGLangEngine(_NaNSampled(), tp_size=1).generate([[1, 2]], SamplingParams(max_new_tokens=2))


class _Sessions(_Loading):
    """_Loading with SGLang's weight-update session rules: one session at a time, loads only inside one."""

    def __init__(self):
        super().__init__()
        self.open = False

    def begin_weight_update(self):
        super().begin_weight_update()
        if self.open:
            return False, "a weight update session is already open"
        self.open = True
        return True, "Succeeded"

    def update_weights_from_tensor(self, **kwargs):
        if not self.open:
            return False, "update_weights_from_tensor must run between begin_weight_update() and end_weight_update()"
        return super().update_weights_from_tensor(**kwargs)

    def end_weight_update(self):
        was, self.open = self.open, False
        return (True, "Succeeded") if was else (False, "no weight update session is open")


def test_a_push_that_broke_off_can_be_made_again(tmp_path):
    """A push refused midway leaves SGLang's session open; the next push closes it before opening its own, and the
    engine serves again once that push is whole. With tied embeddings there is no lm_head.weight to push: SGLang's
    loaders skip one, so the adapter refuses it rather than count it as the embedding."""
    _sglang()
    from megatron_dapo.models.arch import ModelArch
    from megatron_dapo.rollout.engine import RolloutError, SamplingParams, StaleWeightsError
    from megatron_dapo.rollout.sglang import SGLangEngine
    from megatron_dapo.rollout.sglang.engine import push_ledger
    from tests.tiny_models import make_tiny_model

    arch = ModelArch.from_pretrained(make_tiny_model("qwen2", tmp_path / "qwen2"))
    assert arch.tie_word_embeddings
    ledger = push_ledger(arch)
    front = _Sessions()
    engine = SGLangEngine(front, tp_size=1, ledger=ledger)
    full = {name: torch.zeros(shape) for name, shape in ledger.shapes.items()}
    engine.begin_weight_update()
    engine.update_weights([("model.norm.weight", full["model.norm.weight"])])
    with pytest.raises(RolloutError, match="unknown tensor 'lm_head.weight'"):
        engine.update_weights([("lm_head.weight", full["model.embed_tokens.weight"])])
    with pytest.raises(StaleWeightsError):
        engine.generate([[1, 2]], SamplingParams(max_new_tokens=1))
    engine.begin_weight_update()  # the push again, from the start
    engine.update_weights(list(full.items()))
    engine.end_weight_update(version=3)
    assert engine.weight_version == 3 and not front.open
    assert engine.generate([[1, 2]], SamplingParams(max_new_tokens=1))[0][0].token_ids == [7]


def _tokenizer_manager():
    """An object with the state SGLang's TokenizerManager.auto_create_handle_loop reads and sets (the real method),
    whose reply handler only counts that it ran."""
    from sglang.srt.managers.tokenizer_manager import SignalHandler, TokenizerManager

    class Manager:
        auto_create_handle_loop = TokenizerManager.auto_create_handle_loop

        def __init__(self):
            self.event_loop, self.asyncio_tasks, self.signal_handler_class = None, set(), SignalHandler
            self.handled = 0

        async def handle_loop(self):  # SGLang's reads the replies every engine call waits for
            self.handled += 1

        async def sigterm_watchdog(self):
            pass

        def close(self):
            """The loop's handlers out and its tasks ended (the test's process goes on)."""
            import asyncio
            import signal

            if self.event_loop is not None:
                self.event_loop.remove_signal_handler(signal.SIGQUIT)
                self.event_loop.remove_signal_handler(signal.SIGTERM)
                for task in self.asyncio_tasks:
                    task.cancel()
                self.event_loop.run_until_complete(asyncio.gather(*self.asyncio_tasks, return_exceptions=True))

    return Manager()


def _engine_front(manager):
    """What sglang.Engine holds once started: its tokenizer manager, and the event loop every call of it runs
    (SGLang's own Engine._ensure_event_loop, as Engine.__init__ sets it)."""
    from sglang.srt.entrypoints.engine import Engine

    return types.SimpleNamespace(tokenizer_manager=manager, loop=Engine._ensure_event_loop())


def test_sigterm_stays_with_the_trainer_after_sglang_sets_up_its_event_loop():
    """SGLang's tokenizer manager adds an asyncio SIGTERM handler when it sets up its event loop (at the engine's
    first call): its watchdog then shuts SGLang down and exits the process with status 0, mid-step. The adapter
    sets the loop up at launch, through SGLang's own code, and takes that handler out: the handler from before
    (the trainer's stop request installs its own) gets SIGTERM, and SGLang keeps its SIGQUIT handler. The loop set
    up is the one the engine's calls run, so that SGLang's reply handler runs during them (on a loop of its own it
    never would, and every call would wait for its reply forever)."""
    import asyncio
    import os

    _sglang()
    from megatron_dapo.rollout.sglang.engine import leave_sigterm_to_the_trainer

    received = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    manager = _tokenizer_manager()
    try:
        engine = _engine_front(manager)
        leave_sigterm_to_the_trainer(engine)
        loop = manager.event_loop
        assert loop is engine.loop and signal.getsignal(signal.SIGQUIT) not in (signal.SIG_DFL, None)  # SGLang's

        async def engine_call():  # SIGTERM while SGLang's loop runs (an engine call), as well as outside one
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.sleep(0.05)

        manager.auto_create_handle_loop()  # the engine's first call: the loop is there, nothing is added again
        os.kill(os.getpid(), signal.SIGTERM)
        loop.run_until_complete(engine_call())
        assert received == [signal.SIGTERM, signal.SIGTERM]
        assert manager.handled == 1  # SGLang's reply handler ran in the engine's call
        assert not getattr(manager, "gracefully_exit", False)  # SGLang's handler, which sets it, never ran
    finally:
        manager.close()
        signal.signal(signal.SIGTERM, before)


def test_an_engine_launched_outside_the_main_thread_leaves_signals_alone():
    """Outside the main thread SGLang adds no signal handler and none can be set: the launch goes on."""
    import threading

    _sglang()
    from megatron_dapo.rollout.sglang.engine import leave_sigterm_to_the_trainer

    before, failures = signal.getsignal(signal.SIGTERM), []

    def launch():
        try:
            leave_sigterm_to_the_trainer(_engine_front(manager))
        except Exception as err:  # raised in the thread: reported to the test
            failures.append(err)

    manager = _tokenizer_manager()
    thread = threading.Thread(target=launch)
    thread.start()
    thread.join()
    manager.close()
    assert not failures and signal.getsignal(signal.SIGTERM) is before
