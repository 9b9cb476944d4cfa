"""Strict YAML -> dataclass loading with dotted command-line overrides.

Every key in the YAML file or on the command line must name a field of the config dataclasses;
every value must have the field's type. All problems are collected and reported together, each
naming the dotted key to change, before any work starts.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config problem; the message names the key(s) to change."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(self._render())

    def _render(self) -> str:
        if len(self.problems) == 1:
            return self.problems[0]
        return f"{len(self.problems)} config problems:\n" + "\n".join(f"  - {p}" for p in self.problems)


@dataclasses.dataclass(frozen=True)
class _Override:
    """A command-line value: its text and its YAML reading. A text setting takes the text, so that
    `trainer.run_dir=2024`, `logging.wandb_project=on`, `model.path=/m/a #1` or `logging.wandb_run_name=@x` mean
    what they say; any other setting takes the reading, or reports `error` when the text is not YAML."""

    text: str
    value: Any
    error: str | None = None


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`["actor.clip_ratio_high=0.28", ...]` -> `[("actor.clip_ratio_high", _Override("0.28", 0.28)), ...]`, in
    command-line order (applied in turn: of a key given twice the last wins, and sections given twice merge)."""
    parsed: list[tuple[str, Any]] = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value (e.g. actor.clip_ratio_high=0.28)")
        try:
            parsed.append((key, _Override(raw.strip(), yaml.load(raw, Loader=_StrictLoader) if raw.strip() else "")))
        except yaml.YAMLError as err:  # reported where the setting is known not to be text
            parsed.append((key, _Override(raw.strip(), None, error=_yaml_problem(err))))
    return parsed


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any] | list[tuple[str, Any]],
                    root: type | None = None) -> dict[str, Any]:
    """Set each dotted key in a nested dict (a copy), in turn; intermediate mappings are created as needed. A
    mapping given for a section is merged into it, key by key, as a YAML file's section would be by dotted keys
    (into what earlier overrides gave it too); a mapping setting (`reward.functions`) is replaced. `root`: the
    config dataclass that tells sections from mapping settings (without it every mapping is merged)."""
    out = _deep_copy(raw)
    for dotted, value in (overrides.items() if isinstance(overrides, dict) else overrides):
        node, section = out, root
        parts = dotted.split(".")
        for depth, part in enumerate(parts[:-1]):
            prefix = ".".join(parts[: depth + 1])
            kind = _field_type(section, part)
            if root is not None and kind is not None and not _holds_keys(kind):
                raise ConfigError(f"override {dotted}: {prefix} is a setting ({_type_name(kind)}), not a section")
            child = node.get(part)
            if child is None:  # absent, or a section whose keys are all commented out
                child = node[part] = {}
            if isinstance(child, _Override) and isinstance(child.value, dict):  # given whole by an earlier override
                child = node[part] = _deep_copy(child.value)
            if not isinstance(child, dict):
                shown = child.value if isinstance(child, _Override) else child
                raise ConfigError(f"override {dotted}: {prefix} holds a {type(shown).__name__}, not a section")
            node, section = child, kind
        last = parts[-1]
        given = value.value if isinstance(value, _Override) else value
        current = node.get(last)
        if isinstance(current, _Override) and isinstance(current.value, dict):  # given whole by an earlier override
            current = current.value
        if (isinstance(given, dict) and isinstance(current, dict)
                and (root is None or dataclasses.is_dataclass(_field_type(section, last)))):
            node[last] = _merged(current, given, _field_type(section, last) if root is not None else None)
        else:
            node[last] = value
    return out


def _holds_keys(tp: Any) -> bool:
    """Whether a setting of type `tp` is a section or a mapping (`reward.functions`), which dotted keys go into."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        return any(_holds_keys(arg) for arg in typing.get_args(tp) if arg is not type(None))
    return dataclasses.is_dataclass(tp) or tp is dict or typing.get_origin(tp) is dict or tp is Any


def _field_type(section: type | None, name: str) -> Any:
    """The type of field `name` of dataclass `section` (None when either is unknown)."""
    if section is None or not dataclasses.is_dataclass(section):
        return None
    return typing.get_type_hints(section).get(name)


def _merged(base: dict[str, Any], update: dict[str, Any], section: type | None) -> dict[str, Any]:
    out = _deep_copy(base)
    for key, value in update.items():
        inner = _field_type(section, key)
        if isinstance(out.get(key), _Override) and isinstance(out[key].value, dict):  # a section an earlier
            out[key] = _deep_copy(out[key].value)  # override gave whole (`actor.optim={...}` before `actor={...}`)
        if isinstance(value, dict) and isinstance(out.get(key), dict) and (
                section is None or dataclasses.is_dataclass(inner)):
            out[key] = _merged(out[key], value, inner)
        else:
            out[key] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.load(path.read_text(), Loader=_StrictLoader) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not a {type(data).__name__}")
    return data


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (it would keep the last silently,
    so a second `actor:` section at the end of a file would undo the first)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`, whose keys the section may override
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, collections.abc.Hashable):
                continue  # the parent class refuses it, as a YAML error
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    f"key {key!r} appears twice in one section", seen[key], "here again", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


class ConfigDumper(yaml.SafeDumper):
    """Writes config files the loader reads back as they were (a text that would read as a number is quoted)."""


# Numbers as YAML 1.2 reads them, not PyYAML's YAML 1.1: `010` is ten (1.1: octal eight), `1:30` is text (1.1:
# base 60, ninety), `1e-5` is a number (1.1: text, without a dot). Hex (0x1f), octal (0o17) and binary (0b101)
# keep their prefixes.
_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
for _cls in (_StrictLoader, ConfigDumper):
    _cls.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT, _FLOAT)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    _cls.add_implicit_resolver(_INT, re.compile(r"^[-+]?(?:[0-9][0-9_]*|0x[0-9a-fA-F_]+|0o[0-7_]+|0b[01_]+)$"),
                               list("-+0123456789"))
    _cls.add_implicit_resolver(_FLOAT, re.compile(
        r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))


def _construct_int(loader: _StrictLoader, node) -> int:
    text = loader.construct_scalar(node)
    digits = text.replace("_", "")
    sign, digits = (-1, digits[1:]) if digits[:1] == "-" else (1, digits.lstrip("+"))
    base = {"0x": 16, "0o": 8, "0b": 2}.get(digits[:2], 10)
    try:
        return sign * int(digits[2:] if base != 10 else digits, base)
    except ValueError:  # `!!int 1:30`: an explicit tag on what is no integer
        raise yaml.constructor.ConstructorError(None, None, f"{text!r} is not an integer", node.start_mark) from None


_StrictLoader.add_constructor(_INT, _construct_int)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """What is wrong with a command-line value: the whole message for a mapping's key, else its one-line reason."""
    if isinstance(err, yaml.constructor.ConstructorError):
        return str(err)
    return getattr(err, "problem", None) or err.__class__.__name__


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from nested dicts; raise one ConfigError listing every problem."""
    problems: list[str] = []
    value = _build(cls, data, prefix, problems)
    if problems:
        raise ConfigError(problems)
    return value


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _build(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    where = prefix or "config"
    start = len(problems)
    if not isinstance(data, dict):
        problems.append(f"{where}: expected a section (mapping), got {type(data).__name__} {data!r}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            full = f"{prefix}.{key}" if prefix else str(key)
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            suggestion = f" (did you mean {prefix + '.' if prefix else ''}{hint[0]}?)" if hint else ""
            problems.append(_UnknownKey(f"unknown key {full}{suggestion}"))
    kwargs: dict[str, Any] = {}
    for name in fields:
        if name in data:
            full = f"{prefix}.{name}" if prefix else name
            # model.path's default "" is its "not set": given so (a dumped config writes it), it is not refused.
            kwargs[name], _ = _convert(hints[name], data[name], full, problems,
                                       empty_ok=fields[name].default == "")
    if _unbuildable(problems[start:]):  # a value of the wrong type: the section's own checks would trip on it
        return None
    try:
        # Built beside an unknown key (here or in a section within): its own checks, and those of the sections
        # around it, run too, so that every problem is said at once; from_dict raises all the same.
        return cls(**kwargs)
    except ConfigError as err:
        problems.extend(err.problems)
    except TypeError as err:  # a required field without a value
        problems.append(f"{where}: {err}")
    return None


class _UnknownKey(str):
    """The problem of a key the section does not have: it keeps no value from being checked."""


def _unbuildable(problems: list[str]) -> bool:
    """Whether these problems leave a value that a section's checks cannot take (anything but unknown keys)."""
    return any(not isinstance(problem, _UnknownKey) for problem in problems)


def _convert(tp: Any, value: Any, key: str, problems: list[str], empty_ok: bool = False) -> tuple[Any, bool]:
    """`value` as type `tp`, and whether it converted (else problems says why). empty_ok: accept an empty text
    (a setting whose default is the empty text); else an empty text is refused, as the current folder it means
    for a path is never what was meant."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if isinstance(value, _Override):
        if _wants_text(tp, value):
            if not value.text:  # `model.megatron_checkpoint=$CKPT` with CKPT unset: not the current folder
                problems.append(f"override {key}: the value is empty; leave the setting out for its default")
                return None, False
            value = value.text
        elif value.text == "None" and value.value == "None":
            value = None
        elif value.error is not None:
            problems.append(f"override {key}: value {value.text!r} is not valid YAML ({value.error})")
            return None, False
        else:
            value = value.value
    if dataclasses.is_dataclass(tp):
        if value is None:  # a section whose keys are all commented out
            value = {}
        n = len(problems)
        built = _build(tp, value, key, problems)
        return built, not _unbuildable(problems[n:]) and built is not None
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None, True
        inner = [a for a in args if a is not type(None)]
        for candidate in inner:
            scratch: list[str] = []
            converted, good = _convert(candidate, value, key, scratch)
            if good:
                return converted, True
        if len(inner) == 1:
            return _convert(inner[0], value, key, problems)
        problems.append(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {_plain(value)!r}")
        return None, False
    if origin is Literal:
        if value in args:
            return value, True
        choices = ", ".join(repr(a) for a in args)
        problems.append(f"{key}: {value!r} is not one of {choices}")
        return None, False
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key}: expected a list, got {type(value).__name__} {_plain(value)!r}")
            return None, False
        if origin is tuple and args and args[-1] is not Ellipsis and len(args) != len(value):
            problems.append(f"{key}: expected {len(args)} values, got {len(value)}")
            return None, False
        item_types = [args[0]] * len(value) if origin is list or args[-1:] == (Ellipsis,) else list(args)
        out, ok = [], True
        for i, (item_tp, item) in enumerate(zip(item_types, value)):
            converted, good = _convert(item_tp, item, f"{key}[{i}]", problems)
            ok &= good
            out.append(converted)
        return (tuple(out) if origin is tuple else out), ok
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {type(value).__name__} {_plain(value)!r}")
            return None, False
        item_tp = args[1] if args else Any
        out, ok = {}, True
        if args and args[0] is str:
            for name in value:
                if not isinstance(name, str):
                    problems.append(f"{key}: key {name!r} ({type(name).__name__}) is not text (YAML reads 2024 as a "
                                    "number, yes / no / on / off as true / false): quote it in the YAML file")
                    ok = False
            if not ok:
                return None, False
        for name, item in value.items():
            out[name], good = _convert(item_tp, item, f"{key}.{name}", problems)
            ok &= good
        return out, ok
    if tp is Any:
        return _plain(value), True
    if tp is bool:
        if isinstance(value, bool):
            return value, True
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value, True
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int past float's range
                number = math.inf
        if number is not None:
            if math.isfinite(number):
                return number, True
            # No setting means "no limit" by inf, and a NaN passes every `x < bound` check unnoticed.
            problems.append(f"{key}: expected a finite number, got {value!r}")
            return None, False
    elif tp is str:
        if isinstance(value, str):
            if value or empty_ok:
                return value, True
            problems.append(f"{key}: the value is empty; leave the setting out for its default (null unsets an "
                            "optional one)")
            return None, False
    else:
        raise TypeError(f"config loader does not handle type {tp!r} (key {key})")
    problems.append(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {_plain(value)!r}")
    return None, False


def _wants_text(tp: Any, override: _Override) -> bool:
    """Whether a text setting takes the command line's text as it is: yes, unless the text is quoted YAML
    or, for an optional setting, null (or None)."""
    optional_text = typing.get_origin(tp) in (Union, types.UnionType) and str in typing.get_args(tp)
    if tp is not str and not optional_text:
        return False
    if override.error is not None:
        return True
    if optional_text and (override.value is None or override.text == "None"):  # Python's spelling of null too
        return False
    return not override.text.startswith(("'", '"'))


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _plain(value: Any) -> Any:
    """`value` with the command line's texts dropped (an Any setting takes the YAML reading)."""
    if isinstance(value, _Override):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}
