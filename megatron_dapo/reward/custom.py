"""Reward functions named in the config (`reward.functions`), so that a new task needs no change to the package.

    reward:
      functions:
        my_task: my_package.rewards:score          # an importable module
        geometry: examples/geometry/reward.py:score  # or a Python file

Each entry maps a `data_source` to a module-level function `fn(response, ground_truth, extra_info) ->
RewardResult | float` or a mapping in verl's layout (reward/registry.py). An entry for a built-in source
(math_dapo, ...) replaces the built-in function. The trainer loads the entries on every rank before anything
runs, so a typo stops the run at start-up with the key named, and every reward worker loads them again when it
starts: the workers receive functions by name, and a function from a file lives in a module that only exists
where the file was loaded. A file entry is read once, when the run loads it: a worker started later (one
replacing a worker that timed out) runs the code the run started with, not what the file holds by then (an
edit made while the run goes on, a file being rewritten); modules it imports are imported afresh.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import pickle
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable

from megatron_dapo.config.loader import ConfigError


def target_problem(data_source: str, target: object) -> str | None:
    """What is wrong with the form of one `reward.functions` entry (nothing is imported), or None."""
    key = f"reward.functions.{data_source}"
    if not isinstance(target, str) or target.count(":") < 1:
        return f"{key} must be 'package.module:function' or 'path/to/file.py:function', got {target!r}"
    where, name = target.rsplit(":", 1)
    if not where or not name.isidentifier():
        return f"{key} must be 'package.module:function' or 'path/to/file.py:function', got {target!r}"
    if where.endswith(".py") and not Path(where).is_file() and str(Path(where).resolve()) not in _SOURCES:
        return f"{key}: no file {where} (from {Path.cwd()})"
    return None


def load_reward_functions(functions: dict[str, str], sources: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """Import every `reward.functions` entry and register it for its data_source (replacing a built-in one).
    Raises ConfigError naming the key of each entry that cannot be loaded.
    sources: the contents of file entries (absolute path -> bytes) as this run first read them, used instead of
    the files (which may have changed or gone since). Returns the contents of this call's file entries, for the
    next process to load them from."""
    from megatron_dapo.reward.registry import register_reward

    _SOURCES.update(sources or {})
    problems = []
    for data_source, target in functions.items():
        problem = target_problem(data_source, target)
        if problem is None:
            try:
                fn = _load(target)
                pickle.loads(pickle.dumps(fn))  # the workers receive it by name: that must resolve
                register_reward(data_source, fn, replace=True)
            except ConfigError:
                raise
            except (Exception, SystemExit) as err:  # a file that calls sys.exit() as it is imported, too
                problem = f"reward.functions.{data_source}: {target!r} cannot be loaded: {type(err).__name__}: {err}"
        if problem:
            problems.append(problem)
    if problems:
        raise ConfigError(problems)
    files = {str(Path(where).resolve()) for where in (t.rsplit(":", 1)[0] for t in functions.values())
             if where.endswith(".py")}
    return {path: _SOURCES[path] for path in files if path in _SOURCES}


_SOURCES: dict[str, bytes] = {}
"""The contents of each reward file as this process first read it (absolute path -> bytes)."""


def check_reward_sources(datasets: dict[str, Iterable]) -> None:
    """Every data_source in the datasets (config key -> its prompts) has a reward function, or a ConfigError
    naming the sources, their row counts and the key to set."""
    from megatron_dapo.reward.registry import registered_sources

    known = set(registered_sources())
    problems = []
    for key, prompts in datasets.items():
        missing = Counter(p.data_source for p in prompts if p.data_source not in known)
        for source, rows in sorted(missing.items()):
            problems.append(f"{key}: {rows} rows have data_source {source!r}, which has no reward function "
                            f"(registered: {sorted(known)}); set reward.functions.{source}: "
                            "'package.module:function' or 'path/to/file.py:function'"
                            + (" in the config file (a dotted name cannot be a command-line key)" if "." in source
                               else ""))
    if problems:
        raise ConfigError(problems)


def _load(target: str) -> Callable:
    where, name = target.rsplit(":", 1)
    module = _load_file(Path(where)) if where.endswith(".py") else importlib.import_module(where)
    fn = getattr(module, name, None)
    if fn is None:
        raise AttributeError(f"{where} has no {name!r}")
    if not callable(fn):
        raise TypeError(f"{where}:{name} is a {type(fn).__name__}, not a function")
    _check_signature(fn, f"{where}:{name}")
    return fn


def _check_signature(fn: Callable, what: str) -> None:
    """TypeError unless `fn` can be called as fn(response, ground_truth, extra_info). verl's signature
    (data_source, solution_str, ground_truth, extra_info=None) also takes three arguments, each in the wrong place,
    and would score every response as wrong without an error: it is named and refused."""
    try:
        signature = inspect.signature(fn, follow_wrapped=False)  # what is called, a functools.wraps wrapper too
    except (TypeError, ValueError):  # a builtin without one: called as it is
        return
    parameters = list(signature.parameters.values())
    expected = "the trainer calls fn(response, ground_truth, extra_info)"
    if parameters and parameters[0].name == "data_source":
        raise TypeError(f"{what}{signature} has verl's signature (data_source first); {expected}: wrap it, e.g. "
                        f"def score(response, ground_truth, extra_info): return {fn.__name__}(DATA_SOURCE, response, "
                        "ground_truth, extra_info)")
    try:
        signature.bind(None, None, None)
    except TypeError as err:
        raise TypeError(f"{what}{signature} cannot be called with three arguments ({err}); {expected}") from None


def _load_file(path: Path):
    """The module of a Python file, under a name made from its absolute path: the same name in the trainer and
    in every reward worker, so functions pickled by name in one are found in the other."""
    path = path.resolve()
    stem = re.sub(r"\W", "_", path.stem)  # a dot would read as a package when the name is imported
    name = f"_megatron_dapo_reward_{stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} cannot be imported as a Python module")
    source = _SOURCES.get(str(path))
    if source is None:
        source = path.read_bytes()  # compiled as bytes: a coding cookie or a byte-order mark is honoured
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        exec(compile(source, str(path), "exec"), module.__dict__)
    except BaseException:
        del sys.modules[name]
        raise
    _SOURCES[str(path)] = source  # what loaded: the text every later load of this file runs
    return module
