"""TensorMap: canonical name -> lazy tensor, loaded one group (layer) at a time.

Canonical names (rotate-half rotary, unfused, unsharded; design.md):

    embed.weight                                [V, h]
    layers.{i}.attn_norm.{weight,bias}
    layers.{i}.attn.{q,k,v}.{weight,bias}       q: [n*d, h]  k, v: [kv*d, h]
    layers.{i}.attn.o.{weight,bias}             [h, n*d]
    layers.{i}.mlp_norm.{weight,bias}
    layers.{i}.mlp.{up,gate,down}.{weight,bias} gate only when gated
    final_norm.{weight,bias}
    lm_head.weight                              absent when tied

A group is "embed", a layer index, or "final". Shapes and dtypes are known without reading
tensor data: readers compute them by running their own conversion on shape-only tensors
(neoxconv.lazy) built from the file headers.

Loaders may return `Lazy` tensors (rows of mapped source files, see neoxconv.lazy):
`lazy_group` hands them to writers as they are, so bytes that do not change are copied file to
file; `load_group` materializes them for everyone else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from neoxconv.lazy import Lazy, real

Group = str | int
GroupLoader = Callable[[Group], dict[str, torch.Tensor]]


def group_of(name: str) -> Group:
    """The group a canonical name belongs to."""
    if name.startswith("layers."):
        return int(name.split(".")[1])
    if name.startswith("embed."):
        return "embed"
    return "final"


@dataclass(frozen=True)
class LazyTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    owner: "TensorMap"

    def load(self) -> torch.Tensor:
        return self.owner.load_group(group_of(self.name))[self.name]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


class TensorMap:
    """Ordered canonical tensors with a per-group loader and a one-group cache."""

    def __init__(self, metas: dict[Group, dict[str, torch.Tensor]], loader: GroupLoader):
        self._groups = list(metas)
        self._entries = {
            name: LazyTensor(name, tuple(t.shape), t.dtype, self)
            for group in self._groups for name, t in metas[group].items()
        }
        self._names = {g: list(metas[g]) for g in self._groups}
        # Tensors the reader computes (a row-parallel merge, a mean): planning treats them so.
        self._computed = {name for group in self._groups for name, t in metas[group].items() if not isinstance(t, Lazy)}
        self._loader = loader
        self._cached: tuple[Group, dict[str, torch.Tensor]] | None = None

    def groups(self) -> list[Group]:
        return list(self._groups)

    def names(self, group: Group | None = None) -> list[str]:
        return list(self._entries) if group is None else list(self._names[group])

    def __getitem__(self, name: str) -> LazyTensor:
        return self._entries[name]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def metas(self, group: Group) -> dict[str, torch.Tensor]:
        """Shape/dtype-only stand-ins for a group, for planning without reading data."""
        return {n: torch.empty(self._entries[n].shape, dtype=self._entries[n].dtype, device="meta")
                for n in self._names[group]}

    def shapes(self, group: Group) -> dict[str, Lazy]:
        """Shape-only Lazy tensors of a group: a writer's own conversion code runs on them to plan
        its files (rows stay rows; what the reader or the writer computes comes out as a real
        tensor without data, see Lazy.materialize)."""
        out = {}
        for n in self._names[group]:
            t = Lazy.shape_only(self._entries[n].shape, self._entries[n].dtype)
            out[n] = t.materialize() if n in self._computed else t
        return out

    def lazy_group(self, group: Group) -> dict:
        """A group as the loader returns it (Lazy tensors where it can), uncached: safe to call
        from several threads at once."""
        loaded = self._loader(group)
        missing = set(self._names[group]) - set(loaded)
        if missing:
            raise KeyError(f"loader for group {group!r} did not return {sorted(missing)}")
        return {n: loaded[n] for n in self._names[group]}

    def load_group(self, group: Group) -> dict[str, torch.Tensor]:
        if self._cached is None or self._cached[0] != group:
            loaded = self.lazy_group(group)
            self._cached = (group, {n: real(t) for n, t in loaded.items()})
        return self._cached[1]

    def release(self) -> None:
        """Forget the cached group (the next load reads it again), e.g. before other work runs."""
        self._cached = None

    def num_params(self) -> int:
        total = 0
        for t in self._entries.values():
            n = 1
            for s in t.shape:
                n *= s
            total += n
        return total

    def map(self, fn: Callable[[Group, dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> "TensorMap":
        """A new map whose groups are `fn(group, tensors)`; shapes come from running fn on metas."""
        metas = {g: fn(g, self.shapes(g)) for g in self._groups}
        return TensorMap(metas, lambda g: fn(g, self.load_group(g)))

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "TensorMap":
        """An in-memory map (tests, training results)."""
        metas: dict[Group, dict[str, torch.Tensor]] = {}
        order = sorted(tensors, key=lambda n: _group_order(group_of(n)))
        for name in order:
            metas.setdefault(group_of(name), {})[name] = tensors[name].to("meta")

        def load(group: Group) -> dict[str, torch.Tensor]:
            return {n: tensors[n] for n in metas[group]}

        return cls(metas, load)


def _group_order(group: Group) -> tuple[int, int]:
    if group == "embed":
        return (0, 0)
    if group == "final":
        return (2, 0)
    return (1, int(group))


def layer_group_order(groups: list[Group]) -> list[Group]:
    return sorted(groups, key=_group_order)
