"""reward.functions: reward functions named in the config, from a file or a module, scored in real workers."""
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_dapo.config.loader import ConfigError
from megatron_dapo.data.dataset import Prompt
from megatron_dapo.reward import registry
from megatron_dapo.reward.config import RewardConfig
from megatron_dapo.reward.custom import check_reward_sources, load_reward_functions
from megatron_dapo.reward.registry import get_reward_fn
from megatron_dapo.reward.scorer import RewardScorer

REWARD_FILE = '''
from megatron_dapo.reward.registry import RewardResult


def digits(response, ground_truth, extra_info):
    """+1 when the response ends with the ground truth, with the response length as an extra figure."""
    right = response.strip().endswith(ground_truth)
    return RewardResult(score=1.0 if right else -1.0, acc=float(right), extra={"chars": float(len(response))})


def always_half(response, ground_truth, extra_info):
    return 0.5


NOT_A_FUNCTION = 3
'''


@pytest.fixture(autouse=True)
def registry_restored():
    """Each test registers functions in this process: the registry is put back after it."""
    saved = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my.reward-v2.py"  # a name that is no module name
    path.write_text(REWARD_FILE)
    return path


def test_a_function_from_a_file_scores_in_the_workers(reward_file):
    """The file's module exists only where the file was loaded: the workers load it too, or they could not
    receive the function by name."""
    with RewardScorer(timeout_s=5, num_workers=2, functions={"digits": f"{reward_file}:digits"}) as scorer:
        batch = scorer.score([("digits", "Answer: 7", "7", {}), ("digits", "Answer: 3", "7", {}),
                              ("math_dapo", "Answer: 4", "4", {})])
    assert batch.num_failed == 0, [r.reason for r in batch.results]
    assert batch.scores == [1.0, -1.0, 1.0]
    assert batch.accs == [1.0, 0.0, 1.0]
    assert batch.results[0].extra == {"chars": 9.0}


def test_a_replaced_worker_runs_the_file_as_the_run_read_it(reward_file):
    """A worker that started after the file changed (one replacing a worker that timed out) runs the code the run
    started with: an edit made while the run goes on, here one that would not even compile, changes nothing."""
    reward_file.write_text("\ufeff" + REWARD_FILE + '''

def slow(response, ground_truth, extra_info):
    if ground_truth == "hang":
        import time
        time.sleep(60)
    return 1.0 if response == ground_truth else -1.0
''')
    with RewardScorer(timeout_s=2, num_workers=1, functions={"slow": f"{reward_file}:slow"}) as scorer:
        assert scorer.score([("slow", "a", "a", {})]).scores == [1.0]
        reward_file.write_text("def slow(:\n")  # mid-edit
        batch = scorer.score([("slow", "a", "hang", {}), ("slow", "b", "b", {}), ("slow", "c", "d", {})])
        assert batch.failure_counts == {"timeout": 1}, [r.reason for r in batch.results]
        assert batch.scores[1:] == [1.0, -1.0]
        reward_file.unlink()  # gone (a save by rename, a cleaned folder): the next replacement starts all the same
        batch = scorer.score([("slow", "a", "hang", {}), ("slow", "b", "b", {})])
    assert batch.failure_counts == {"timeout": 1}, [r.reason for r in batch.results]
    assert batch.scores[1:] == [1.0]


def test_a_function_from_a_module_on_the_path(tmp_path, monkeypatch):
    (tmp_path / "team_rewards.py").write_text(REWARD_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    with RewardScorer(timeout_s=5, num_workers=1, functions={"half": "team_rewards:always_half"}) as scorer:
        batch = scorer.score([("half", "anything", "", {})])
    assert batch.num_failed == 0, batch.results[0].reason
    assert batch.scores == [0.5] and batch.accs == [0.5]


def test_an_entry_replaces_a_built_in_function(reward_file):
    with RewardScorer(timeout_s=5, num_workers=1, functions={"math_dapo": f"{reward_file}:always_half"}) as scorer:
        batch = scorer.score([("math_dapo", "Answer: 4", "4", {}), ("math_dapo", "no answer", "4", {})])
    assert batch.scores == [0.5, 0.5]
    assert get_reward_fn("math_dapo").__name__ == "always_half"


@pytest.mark.parametrize("target, expected", [
    ("no_colon_here", "reward.functions.bad must be 'package.module:function'"),
    ("module:", "reward.functions.bad must be 'package.module:function'"),
    (":fn", "reward.functions.bad must be 'package.module:function'"),
    ("missing/file.py:fn", "reward.functions.bad: no file missing/file.py"),
    (3, "reward.functions.bad must be 'package.module:function'"),
])
def test_a_malformed_entry_is_a_config_error_naming_the_key(target, expected):
    with pytest.raises(ConfigError, match="reward.functions.bad") as err:
        RewardConfig(functions={"bad": target})
    assert expected in str(err.value)


def test_an_entry_that_cannot_be_loaded_names_the_key_and_why(reward_file, tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("import not_a_module_anywhere\n")
    with pytest.raises(ConfigError) as err:
        load_reward_functions({"a": f"{reward_file}:nowhere", "b": f"{reward_file}:NOT_A_FUNCTION",
                               "c": "no_such_package.rewards:fn", "d": f"{broken}:fn"})
    text = str(err.value)
    assert f"reward.functions.a: '{reward_file}:nowhere' cannot be loaded: AttributeError" in text
    assert "reward.functions.b" in text and "is a int, not a function" in text
    assert "reward.functions.c" in text and "No module named 'no_such_package'" in text
    assert "reward.functions.d" in text and "No module named 'not_a_module_anywhere'" in text
    assert "a" not in registry.registered_sources()
    exits = tmp_path / "exits.py"
    exits.write_text("import sys\nsys.exit('set PRICE_DATA first')\n")  # ends the process when imported
    with pytest.raises(ConfigError, match=r"reward.functions.e: .* cannot be loaded: SystemExit: set PRICE_DATA first"):
        load_reward_functions({"e": f"{exits}:fn"})



def test_a_function_with_another_signature_is_refused_at_load(tmp_path):
    """verl's reward signature also takes three arguments, each in the wrong place (every response would score as
    wrong, without an error): refused with the wrapper to write; one that cannot take three arguments too."""
    path = tmp_path / "ported.py"
    path.write_text("def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n    return 1.0\n"
                    "def two(solution_str, ground_truth):\n    return 1.0\n"
                    "def flexible(response, *args, **kwargs):\n    return 1.0\n"
                    "def wrapped(response, ground_truth, extra_info):\n"
                    "    return compute_score('task', response, ground_truth, extra_info)\n"
                    "wrapped.__wrapped__ = compute_score  # as a decorator's wrapper says what it wraps\n")
    with pytest.raises(ConfigError) as err:
        load_reward_functions({"verl": f"{path}:compute_score", "short": f"{path}:two"})
    text = str(err.value)
    assert ("reward.functions.verl: " in text and "has verl's signature (data_source first); the trainer calls "
            "fn(response, ground_truth, extra_info): wrap it, e.g. def score(response, ground_truth, extra_info): "
            "return compute_score(DATA_SOURCE, response, ground_truth, extra_info)" in text), text
    assert "reward.functions.short: " in text and "two(solution_str, ground_truth) cannot be called with three " \
        "arguments (too many positional arguments)" in text, text
    assert not {"verl", "short"} & set(registry.registered_sources())
    load_reward_functions({"flexible": f"{path}:flexible", "wrapped": f"{path}:wrapped"})  # what is called counts
    assert get_reward_fn("flexible")("a", "b", {}) == 1.0 and get_reward_fn("wrapped")("a", "b", {}) == 1.0


WORKER_HABITS = '''
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor


def pooled(response, ground_truth, extra_info):
    """Code under test run in a process pool, as code-execution rewards do."""
    with ProcessPoolExecutor(max_workers=1) as pool:
        return float(pool.submit(pow, 3, 2).result())


def wanders(response, ground_truth, extra_info):
    os.chdir(response)
    return 1.0


def reads_here(response, ground_truth, extra_info):
    with open("ground_truth.txt") as f:
        return 1.0 if f.read() == ground_truth else 0.0


class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("no message")


def unprintable(response, ground_truth, extra_info):
    raise Unprintable()


def interruptible(response, ground_truth, extra_info):
    """Whether a program it starts can be stopped with SIGINT (a worker's own SIG_IGN would be inherited)."""
    out = subprocess.run([sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGINT))"],
                         capture_output=True, text=True, check=True).stdout
    return 1.0 if "default_int_handler" in out else 0.0
'''


KEEPS_A_HELPER = '''
import subprocess

HELPER = []


def keeps(response, ground_truth, extra_info):
    """Starts a helper once and keeps it for later samples (a solver, a sandbox)."""
    if not HELPER:
        HELPER.append(subprocess.Popen(["sleep", "600"]))
    return float(HELPER[0].pid)
'''

CRASHING_RUN = '''
import sys
from megatron_dapo.reward.scorer import RewardScorer

if __name__ == "__main__":
    scorer = RewardScorer(timeout_s=30, num_workers=1, functions={"keeps": sys.argv[1] + ":keeps"})
    print(int(scorer.score([("keeps", "", "", {})]).scores[0]), flush=True)
    raise RuntimeError("the run fails; nobody calls scorer.close()")
'''


def test_a_run_that_fails_leaves_no_helper_of_a_reward_function_behind(tmp_path):
    functions = tmp_path / "keeps.py"
    functions.write_text(KEEPS_A_HELPER)
    script = tmp_path / "run.py"
    script.write_text(CRASHING_RUN)
    run = subprocess.run([sys.executable, str(script), str(functions)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "the run fails" in run.stderr, run.stderr
    helper = int(run.stdout.split()[0])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{helper}").exists() and _state(helper) != "Z" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{helper}").exists() or _state(helper) == "Z", "the helper outlived the run"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_what_a_reward_function_may_do_in_a_worker(tmp_path, monkeypatch):
    """Start processes of its own, change the folder (the next sample starts where the worker did), raise an
    exception that cannot say what it is (its sample fails, the worker lives)."""
    habits = tmp_path / "habits.py"
    habits.write_text(WORKER_HABITS)
    here = tmp_path / "here"
    here.mkdir()
    (here / "ground_truth.txt").write_text("7")
    monkeypatch.chdir(here)  # the workers start here
    names = ("pooled", "wanders", "reads_here", "unprintable", "interruptible")
    with RewardScorer(timeout_s=60, num_workers=1, functions={n: f"{habits}:{n}" for n in names}) as scorer:
        batch = scorer.score([("pooled", "", "", {}), ("reads_here", "", "7", {}), ("wanders", "/", "", {}),
                              ("reads_here", "", "7", {}), ("unprintable", "", "", {}), ("reads_here", "", "7", {}),
                              ("interruptible", "", "", {})])
    reasons = [r.reason for r in batch.results]
    assert batch.scores[:4] == [9.0, 1.0, 1.0, 1.0], reasons
    assert reasons[4].startswith("error: Unprintable (its message cannot be shown) (at habits.py:"), reasons
    assert batch.scores[5:] == [1.0, 1.0], reasons


def test_a_data_source_without_a_function_is_named_with_its_rows():
    def prompt(source):
        return Prompt(prompt_ids=[1], ground_truth="1", data_source=source, extra_info={}, index=0)

    check_reward_sources({"data.train_files": [prompt("math_dapo")]})
    with pytest.raises(ConfigError) as err:
        check_reward_sources({"data.train_files": [prompt("math_dapo"), prompt("geometry"), prompt("geometry")],
                              "data.val_files": [prompt("aime")]})
    text = str(err.value)
    assert "data.train_files: 2 rows have data_source 'geometry'" in text
    assert "data.val_files: 1 rows have data_source 'aime'" in text
    assert "set reward.functions.geometry:" in text
