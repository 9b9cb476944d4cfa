"""What a run checks and reads before its first step: the model folder, the data files, the run folder, the
stop tokens. Plain functions of the config, each raising a ConfigError that names the key to change; the trainer
calls them so that every rank refuses alike (trainer/loop.py)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from megatron_dapo.config.loader import ConfigError
from megatron_dapo.config.root import DAPOConfig
from megatron_dapo.convert.output import unfinished
from megatron_dapo.data.dataset import PromptDataset, TokenizerError, file_problem
from megatron_dapo.models.arch import ModelArch, read_json_object
from megatron_dapo.trainer import checkpoints


def match_sglang_nccl_settings(server_args: dict) -> None:
    """NCCL_CUMEM_ENABLE, unless set, as SGLang's Engine sets it for its worker processes (sglang 0.5.23,
    entrypoints/engine.py _set_envs_and_config): 1 with enable_symm_mem, which it forces, 0 otherwise (its choice
    when unset; with the variable set it keeps the value, so both sides agree). NCCL reads it once per process, so
    it must hold before this process's first communicator: the weight broadcast (disaggregated mode) joins a
    trainer rank and those workers in one NCCL group, and peers that disagree on cuMem can hang or fail in it."""
    os.environ.setdefault("NCCL_CUMEM_ENABLE", "1" if server_args.get("enable_symm_mem") else "0")


def check_model_folder(path: str, tokenizer_path: str | None = None) -> None:
    """ConfigError naming model.path unless it is a folder with a config.json; and naming either key when it is an
    unfinished save or conversion (a `.partial` folder)."""
    if not path:
        raise ConfigError("model.path is not set: give the Hugging Face model folder (config.json, safetensors, "
                          "tokenizer) the actor starts from, e.g. model.path=/models/Qwen2.5-7B")
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"model.path={path}: no config.json there; it must be a local Hugging Face model folder")
    problems = [problem for folder, key in ((path, "model.path"), (tokenizer_path, "model.tokenizer_path"))
                if folder and (problem := unfinished(folder, key))]
    if problems:
        raise ConfigError(problems)


def check_data_files(data) -> None:
    """ConfigError naming the key of each data file that is missing or of a type not read, and of an empty
    data.train_files (their contents are read later, by every rank)."""
    problems = [] if data.train_files else ["data.train_files is empty: give the training prompts' .parquet or "
                                            ".jsonl files, e.g. data.train_files=[/data/train.parquet]"]
    for key, files in (("data.train_files", data.train_files), ("data.val_files", data.val_files)):
        problems += [f"{key}: {problem}" for problem in map(file_problem, files) if problem is not None]
    if problems:
        raise ConfigError(problems)


def read_prompts(cfg: DAPOConfig, key: str, files: list[str], tokenizer) -> PromptDataset:
    """The prompts of `files`; a file that cannot be read, or none left, is a ConfigError naming `key` (every
    rank reads the same files and raises alike)."""
    data = cfg.data
    try:
        return PromptDataset.from_files(files, tokenizer, prompt_key=data.prompt_key,
                                        max_prompt_length=data.max_prompt_length)
    except TokenizerError as err:  # the model's setting, not the data's
        raise ConfigError(str(err)) from None
    except (ValueError, OSError) as err:
        raise ConfigError(f"{key}: {err}") from None


def check_fresh_start(cfg: DAPOConfig) -> None:
    """ConfigError when checkpoint.resume=false would train into a folder that holds an earlier run's
    checkpoints: its config and metrics would be mixed with the new run's, and keep_last, ordering the
    checkpoints by step, would delete the new run's as soon as they are saved."""
    if cfg.checkpoint.resume or cfg.trainer.val_only:
        return
    run_dir = Path(cfg.trainer.run_dir)
    latest = checkpoints.latest_checkpoint(run_dir)
    if latest is not None:
        raise ConfigError(f"checkpoint.resume=false, but trainer.run_dir={run_dir} holds an earlier run's "
                          f"checkpoints (the newest is {latest.name}): choose a new trainer.run_dir, move "
                          f"{run_dir / 'checkpoints'} away, or set checkpoint.resume=true to continue it")


def check_room_to_respond(cfg: DAPOConfig, train_set: PromptDataset, val_set: PromptDataset | None) -> None:
    """Each engine refuses a prompt it could not extend by data.max_response_length tokens (and the actor a
    sequence past the model's positions): a run would stop when such a prompt is first drawn, maybe hours
    in. Found at start instead, from the longest prompt kept."""
    arch = ModelArch.from_pretrained(cfg.model.path)
    held = cfg.rollout.held_back()
    spare = f" less the {held} tokens SGLang keeps back" if held else ""
    limits = {f"the model's max_position_embeddings{spare}": (arch.max_position_embeddings - held, "")}
    if (engine_limit := cfg.rollout.length_limit()) is not None:
        key, limit = engine_limit
        limits[f"{key}{spare}"] = (limit - held, f", or raise {key}")
    problems = []
    for files, prompts in (("data.train_files", train_set), ("data.val_files", val_set)):
        longest = max((len(p.prompt_ids) for p in prompts or ()), default=0)
        needed = longest + cfg.data.max_response_length
        problems += [f"{files}: the longest prompt kept has {longest} tokens; with data.max_response_length="
                     f"{cfg.data.max_response_length} that is {needed} > {limit}, {what}: lower "
                     f"data.max_prompt_length (longer prompts are dropped) or data.max_response_length{fix}"
                     for what, (limit, fix) in limits.items() if needed > limit]
    if problems:
        raise ConfigError(problems)


def read_earlier_config(cfg: DAPOConfig) -> str | None:
    """The run folder's config.yaml (the folder made first when missing), None when there is none or the run
    only validates (it keeps the run's config as it is). A file that is not text is a ConfigError."""
    run_dir = Path(cfg.trainer.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = run_dir / "config.yaml"
    if cfg.trainer.val_only or not saved.is_file():
        return None
    try:
        return saved.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{saved} is not UTF-8 text ({err}): it is the config a run in this folder started "
                          "with; restore it or move the run folder aside") from None


def hf_copy_settings(cfg: DAPOConfig) -> checkpoints.HFCopy | None:
    """checkpoint.save_hf's settings, its folders checked now rather than at the first checkpoint."""
    if not cfg.checkpoint.save_hf:
        return None
    needed = {"model.path": Path(cfg.model.path) / "config.json"}  # a local model folder
    if cfg.model.tokenizer_path:
        needed["model.tokenizer_path"] = Path(cfg.model.tokenizer_path)  # a local folder
    for key, path in needed.items():
        if not path.exists():
            raise ConfigError(f"checkpoint.save_hf copies the config, generation config and tokenizer files of "
                              f"local folders, but {path} does not exist: point {key} at a local folder or set "
                              "checkpoint.save_hf=false")
    return checkpoints.HFCopy(dtype={"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.checkpoint.hf_dtype],
                              template=Path(cfg.model.path),
                              tokenizer=Path(cfg.model.tokenizer_path) if cfg.model.tokenizer_path else None)


def stop_token_ids(tokenizer, model_path: str | Path, vocab_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Where a response ends: the tokenizer's end and padding tokens, and every eos_token_id of the model folder's
    config.json and generation_config.json (chat models list several there, Llama 3 Instruct's end of turn among
    them; SGLang stops on those too, so both engines end responses alike). Returns (the ids inside the model's
    vocab, those outside it); a ConfigError when none is inside: no response could end."""
    ids = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    for name in ("config.json", "generation_config.json"):
        path = Path(model_path) / name
        if path.is_file():
            eos = read_json_object(path, " (model.path)").get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [eos])
    ids = {t for t in ids if isinstance(t, int) and not isinstance(t, bool) and t >= 0}
    inside, outside = tuple(sorted(t for t in ids if t < vocab_size)), tuple(sorted(t for t in ids if t >= vocab_size))
    if not inside:
        raise ConfigError(f"model.path: no stop token inside the model's vocab [0, {vocab_size}): the tokenizer's end "
                          f"and padding tokens and the eos_token_id of {model_path}'s config.json and "
                          f"generation_config.json give {list(outside) or 'none'}, so no response could end; check "
                          "model.tokenizer_path and the model folder's files")
    return inside, outside
