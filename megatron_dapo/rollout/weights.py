"""Weight pushes as transactions over HF-named tensors, for every engine.

`begin` marks the weights stale; each `update` validates its whole batch (names, shapes) before any of it
reaches the engine; `end` checks every parameter arrived since `begin` and only then makes the new version
current. A push that breaks off leaves the engine stale, so nothing samples from a half-updated model.
`PushLedger` keeps that account from the expected names and shapes alone (the SGLang adapter's, whose
weights live in SGLang's processes); `WeightPush` also copies into the embedded engine's parameters.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping

import torch

from megatron_dapo.rollout.engine import RolloutError, StaleWeightsError


def _listing(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... and {len(names) - limit} more" if len(names) > limit else "")


class PushLedger:
    """The engine's tensors by HF name and shape, their version, and the push in progress (if any)."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], aliases: Mapping[str, str]) -> None:
        """shapes: every required tensor by name; aliases: extra accepted name -> the name it shares storage with."""
        self.shapes = {name: tuple(shape) for name, shape in shapes.items()}
        self.aliases = dict(aliases)
        self.version = 0
        self.open_since: int | None = None  # version at the last begin() not yet closed by a good end()
        self.received: set[str] = set()
        self.given_as: dict[str, str] = {}  # parameter -> the name it first arrived under in this push

    @property
    def stale(self) -> bool:
        """True while a push is open or broke off."""
        return self.open_since is not None

    def check_fresh(self) -> None:
        """Raise StaleWeightsError while a push is open or broke off."""
        if self.open_since is not None:
            raise StaleWeightsError(
                f"weights are stale: a push began at version {self.open_since} and did not complete "
                "(call begin_weight_update(), push every tensor, then end_weight_update(version))"
            )

    def begin(self) -> None:
        """Open a push (also restarts one that broke off)."""
        self.open_since = self.version
        self.received = set()
        self.given_as = {}

    def accept(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
        """The batch as (engine name, tensor) once all of it is valid; RolloutError naming every bad tensor and
        accepting none otherwise. `record` the names once the engine holds them."""
        if self.open_since is None:
            raise RolloutError("update_weights() outside a push: call begin_weight_update() first")
        batch = pairs(named_tensors)
        names = {name for name, _ in batch}
        problems, seen, by_target = [], set(), {}
        for name, tensor in batch:
            target = self._target(name)
            valueless = (not isinstance(tensor, torch.Tensor) or tensor.is_meta or not tensor.is_floating_point())
            if valueless:  # named below; not compared with another tensor's values, which it cannot give
                pass
            elif name in seen:
                problems.append(f"tensor {name!r} appears twice in one update_weights() call")
            elif target is not None and target in by_target and not _same(by_target[target][1], tensor):
                # A tied head and its embedding: the same value under both names is fine, two values are not.
                problems.append(f"tensors {by_target[target][0]!r} and {name!r} are one parameter ({target!r}) "
                                "but differ in one update_weights() call")
            elif ((earlier := self.given_as.get(target, name)) != name and earlier not in names
                  and not self._holds(target, tensor)):
                # The later of two calls would silently win.
                problems.append(f"tensor {name!r} is parameter {target!r}, given as {earlier!r} earlier in this "
                                "push with another value")
            seen.add(name)
            if not valueless:
                by_target.setdefault(target, (name, tensor))
            if not isinstance(tensor, torch.Tensor):
                problems.append(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
            elif target is None:
                problems.append(self._unknown(name))
            elif valueless:  # a copy would fail, or round to integers
                what = "on the meta device (it holds no values)" if tensor.is_meta else f"of dtype {tensor.dtype}"
                problems.append(f"tensor {name!r} is {what}; the engine takes floating-point values")
            elif tuple(tensor.shape) != self.shapes[target]:
                problems.append(
                    f"tensor {name!r} has shape {tuple(tensor.shape)}, the engine's {target!r} has shape "
                    f"{self.shapes[target]}"
                )
        if problems:
            raise RolloutError(
                f"update_weights() rejected its batch of {len(batch)} tensor(s); none of them was copied:\n"
                + "\n".join(f"  - {p}" for p in problems)
            )
        return [(self._target(name), tensor) for name, tensor in batch]

    def record(self, names: Iterable[str]) -> None:
        """The engine now holds these tensors (the names given to `accept`)."""
        for name in names:
            target = self._target(name)
            self.received.add(target)
            self.given_as.setdefault(target, name)

    def _holds(self, target: str, tensor: torch.Tensor) -> bool:
        """Whether the engine's `target` already has this value; unknown without the values at hand."""
        return False

    def check_complete(self) -> None:
        """RolloutError unless a push is open and every tensor has arrived since begin()."""
        if self.open_since is None:
            raise RolloutError("end_weight_update() without begin_weight_update()")
        missing = sorted(set(self.shapes) - self.received)
        if missing:
            raise RolloutError(
                f"weight push incomplete: {len(missing)} of {len(self.shapes)} parameters not received since "
                f"begin_weight_update(): {_listing(missing)}; the engine stays stale (version {self.version})"
            )

    def end(self, version: int) -> None:
        """Close the push (check_complete first); then serve `version`."""
        self.check_complete()
        self.version = int(version)
        self.open_since = None
        self.received = set()
        self.given_as = {}

    def _target(self, name: str) -> str | None:
        if name in self.shapes:
            return name
        return self.aliases.get(name)

    def _unknown(self, name: str) -> str:
        close = difflib.get_close_matches(name, [*self.shapes, *self.aliases], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown tensor {name!r}{hint}; the engine's parameters carry their HF checkpoint names"


class WeightPush(PushLedger):
    """A PushLedger over the embedded engine's own parameters, which `update` copies into."""

    def __init__(self, params: Mapping[str, torch.Tensor], aliases: Mapping[str, str]) -> None:
        """params: every required parameter by name; aliases: extra accepted name -> the name it shares storage with."""
        super().__init__({name: tuple(p.shape) for name, p in params.items()}, aliases)
        self.params = dict(params)

    def update(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Validate the whole batch, then copy it (dtype and device converted on copy)."""
        named = pairs(named_tensors)
        batch = self.accept(named)
        with torch.no_grad():
            for (name, _), (target, tensor) in zip(named, batch):
                try:
                    self.params[target].copy_(tensor)
                except RuntimeError as err:  # out of memory on a conversion, a device gone: the push stays open
                    raise RolloutError(f"tensor {name!r}: copying it into the engine's {target!r} failed: {err}; "
                                       f"the engine stays stale (version {self.version}) until a complete push") \
                        from err
        self.record(name for name, _ in named)

    def _holds(self, target: str, tensor: torch.Tensor) -> bool:
        held = self.params[target]
        return isinstance(tensor, torch.Tensor) and torch.equal(held, tensor.to(held.device, held.dtype))


def _same(a, b) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and torch.equal(a, b.to(a.device)))


def pairs(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs of an update_weights() call as a list; RolloutError when they are not pairs."""
    if isinstance(named_tensors, Mapping):
        raise RolloutError("update_weights() takes (name, tensor) pairs: pass state_dict.items(), not the dict")
    batch = list(named_tensors)
    odd = [item for item in batch if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str))]
    if odd:
        raise RolloutError(f"update_weights() takes (name, tensor) pairs with the name a str; {len(odd)} of the "
                           f"{len(batch)} items are not, the first a {type(odd[0]).__name__}: {_short(odd[0])}")
    return batch


def _short(item) -> str:
    text = repr(item)
    return text if len(text) <= 80 else text[:77] + "..."
