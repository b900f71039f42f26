"""Name tables: a format's tensor names <-> canonical names <-> the role that holds them.

An `Entry` is one stored tensor: its name in the format (a pattern, `{i}` = layer index), the
canonical name(s) it holds (several when it fuses them) and its role (neoxconv.roles). A
family's table (archs/) declares every role; a format's table (NeoX, Meta) names tensors and
declares only how the format fuses several canonical tensors into one, and `with_roles` takes
every other role from the family. `split_group` / `merge_group` apply the roles to one group
(the embedding, a layer, the final layers) of canonical tensors.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from neoxconv.errors import NeoxconvError
from neoxconv.roles import Context, Role

Tensor = torch.Tensor


@dataclass(frozen=True)
class Entry:
    name: str  # the tensor's name in its format
    canonical: tuple[str, ...]  # canonical tensors it holds; () for a buffer that holds none
    role: Role | None = None  # None in a format's table: the family's role of the canonical tensor

    def at(self, i: int | str) -> "Entry":
        """The entry of layer i (`{i}` filled in)."""
        i = str(i)
        return Entry(self.name.replace("{i}", i), tuple(c.replace("{i}", i) for c in self.canonical), self.role)


def entries(*rows: tuple) -> tuple[Entry, ...]:
    """Table rows `(name, canonical name or tuple of names, role)` as entries."""
    return tuple(Entry(name, (canon,) if isinstance(canon, str) else tuple(canon), *rest) for name, canon, *rest in rows)


def _compile(pattern: str) -> re.Pattern:
    return re.compile(re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)"))


class Table:
    """Lookups both ways over a list of entries whose names may hold `{i}`."""

    def __init__(self, rows: Iterable[Entry]):
        self.entries = tuple(rows)
        self._names = [(_compile(e.name), e) for e in self.entries]
        self._canonical = [(_compile(c), e) for e in self.entries for c in e.canonical]
        self._patterns = {c: e for e in self.entries for c in e.canonical}

    def by_name(self, name: str) -> Entry | None:
        """The entry (for its layer) of a tensor's name in the format, None if the table has none."""
        for rx, e in self._names:
            m = rx.fullmatch(name)
            if m:
                return e.at(m["i"]) if "i" in rx.groupindex else e
        return None

    def by_canonical(self, name: str) -> Entry | None:
        """The entry (for its layer) that holds a canonical tensor (a name or a `{i}` pattern)."""
        if name in self._patterns:
            return self._patterns[name]
        for rx, e in self._canonical:
            m = rx.fullmatch(name)
            if m:
                return e.at(m["i"]) if "i" in rx.groupindex else e
        return None

    def role_of(self, canonical: str) -> Role:
        """The declared TP role of one canonical tensor; a fused tensor's members have its
        member role (column). KeyError when the table does not hold the tensor."""
        e = self.by_canonical(canonical)
        if e is None or e.role is None:
            raise KeyError(canonical)
        return e.role if e.role.arity == 1 else e.role.member


def with_roles(rows: Iterable[Entry], role_of: Callable[[str], Role], where: str) -> list[Entry]:
    """A format's entries with each single tensor's role taken from the family (`role_of`). A
    fused entry keeps its own role, whose members must be what the family declares."""

    def family_role(canonical: str) -> Role:
        try:
            return role_of(canonical)
        except KeyError:
            raise NeoxconvError(f"{where}: no model family declares the tensor {canonical}") from None

    out = []
    for e in rows:
        if e.role is None and e.canonical:
            e = dataclasses.replace(e, role=family_role(e.canonical[0]))
        elif e.role is not None and e.role.arity > 1:
            for c in e.canonical:
                if family_role(c) != e.role.member:
                    raise NeoxconvError(f"{where}: {e.name} fuses {c} as {e.role.member.name}, but the model's "
                                        f"family declares it {family_role(c).name}")
        out.append(e)
    return out


def split_group(rows: Iterable[Entry], tensors: dict[str, Tensor], p: int, ctx: Context,
                buffers: dict[str, list[Tensor]] | None = None) -> list[dict[str, Tensor]]:
    """What each of p ranks stores for one group, in table order: every entry whose canonical
    tensors are all present, split by its role; `buffers` (one tensor per rank) fill entries that
    hold none."""
    ranks: list[dict[str, Tensor]] = [{} for _ in range(p)]
    for e in rows:
        if not e.canonical:
            if buffers and e.name in buffers:
                for r, value in zip(ranks, buffers[e.name], strict=True):
                    r[e.name] = value
        elif all(c in tensors for c in e.canonical):
            for r, part in zip(ranks, e.role.split([tensors[c] for c in e.canonical], p, ctx), strict=True):
                r[e.name] = part
    return ranks


def merge_group(rows: Iterable[Entry], ranks: Sequence[dict[str, Tensor]], ctx: Context) -> dict[str, Tensor]:
    """The canonical tensors of one group from what its ranks store (entries rank 0 has)."""
    out: dict[str, Tensor] = {}
    for e in rows:
        if e.canonical and e.name in ranks[0]:
            out.update(zip(e.canonical, e.role.merge([r[e.name] for r in ranks], ctx), strict=True))
    return out
