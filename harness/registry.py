"""Named entries resolved on first use: the one registry pattern behind encoders, tasks and protocols.

An entry is a name, a ``"package.module:attribute"`` target and light metadata (a description, whether it takes an
argument, which entries it runs after, ...). Registering imports nothing: the target's module is imported the first
time the entry is loaded, so listing or planning never pays for a model family it does not use. Each kind keeps its
table in one place (``baselines/registry.py``, ``harness/tasks/__init__.py``, ``harness/probes/__init__.py``):

    ENCODERS.register("my-model", "baselines.my_model:build", description="...")

A name that is not registered raises `UnknownName`, whose one-line message suggests the closest registered name.
"""
from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any, Generic, TypeVar


class UnknownName(KeyError):
    """A name no entry of the registry has. ``str()`` is the one-line message (KeyError would quote it)."""

    def __str__(self) -> str:
        return str(self.args[0])


class RegistryError(ValueError):
    """A registry table that cannot be used as written: a duplicate name, a malformed target, a dependency on an
    unregistered entry or a dependency cycle."""


def suggest(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the choice closest to a misspelt `name`, else ``""``: the one did-you-mean of the
    command line, for registered names and for any other list of choices (the tasks of ``--tasks``, the models of
    ``--models``, the subcommands)."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass(frozen=True)
class Entry:
    """One registered name. `target` is ``"package.module:attribute"``; `after` the entries that must run (and
    be computed) before this one, for kinds that have an order."""

    name: str
    target: str
    description: str = ""
    after: tuple[str, ...] = ()

    def load(self) -> Any:
        """The target object, importing its module on first use."""
        return resolve(self.target)


@cache
def resolve(target: str) -> Any:
    """``"package.module:attribute"`` -> that attribute (the module imported once, then cached)."""
    module, _, attribute = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj


E = TypeVar("E", bound=Entry)


class Registry(Generic[E]):
    """An ordered table of entries of one kind (`kind` names it in messages: "encoder", "task", "protocol")."""

    def __init__(self, kind: str, entry_type: type[E]):
        self.kind = kind
        self.entry_type = entry_type
        #: name -> entry, in table order (the order of ``--list``, of ``--models all`` and of protocol ties)
        self.entries: dict[str, E] = {}

    def register(self, name: str, target: str, **fields: Any) -> E:
        """Add one entry; `fields` are the entry type's metadata. Nothing is imported."""
        if name in self.entries:
            raise RegistryError(f"{self.kind} {name!r} registered twice")
        module, sep, attribute = target.partition(":")
        if not (module and sep and attribute):
            raise RegistryError(f"{self.kind} {name!r}: target {target!r} is not of the form 'package.module:name'")
        entry = self.entry_type(name=name, target=target, **fields)
        self.entries[name] = entry
        return entry

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, name: str) -> E:
        """The entry `name`; `UnknownName` with the closest registered names otherwise."""
        entry = self.entries.get(name)
        if entry is None:
            raise UnknownName(self.unknown(name))
        return entry

    def unknown(self, name: str) -> str:
        """The one-line message for a name that is not registered: the closest name, then all of them."""
        return f"unknown {self.kind} {name!r}{suggest(name, self.entries)}; registered: {', '.join(self.entries)}"

    def load(self, name: str) -> Any:
        return self.get(name).load()

    def ordered(self, names: Iterable[str]) -> tuple[str, ...]:
        """`names` plus every entry they run after (transitively), dependencies first; entries that do not depend
        on each other keep table order. `UnknownName` for a name not registered, `RegistryError` for a dependency
        that is not registered or a cycle."""
        wanted: set[str] = set()
        stack = [self.get(n).name for n in names]
        while stack:
            name = stack.pop()
            if name in wanted:
                continue
            wanted.add(name)
            for dep in self.entries[name].after:
                if dep not in self.entries:
                    raise RegistryError(f"{self.kind} {name!r} runs after {dep!r}, which is not registered "
                                        f"({self.unknown(dep)})")
                stack.append(dep)
        done: list[str] = []
        pending = [n for n in self.entries if n in wanted]  # table order
        while pending:
            # The first entry (in table order) whose dependencies are all placed: a stable topological order.
            ready = next((n for n in pending if all(d in done for d in self.entries[n].after)), None)
            if ready is None:
                raise RegistryError(f"{self.kind}s {', '.join(map(repr, pending))} depend on each other in a cycle")
            done.append(ready)
            pending.remove(ready)
        return tuple(done)
