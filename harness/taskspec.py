"""The task mini-language of ``--tasks``, ``--task-arg`` and ``--protocols``, parsed without building anything.

``--tasks`` is a comma list of task specs (the syntax is unchanged from earlier releases):

    demo                          a registered task with the default protocols
    demo:n_patients=50,size=128   KEY=VALUE options: a piece KEY=VALUE after a comma continues the task before it
    demo:n_patients=8:linear      a trailing :PROTOCOL runs that protocol only (options come before it)
    csv:/data/x/labels.csv        a task that takes an argument (csv: the labels file)
    csv:/data/x/labels.csv:knn,vindr:agg=any

A comma always separates pieces there, so a value holding one cannot be written in ``--tasks``; ``--task-arg
NAME.KEY=VALUE`` adds one option to every task NAME of ``--tasks`` and takes the value verbatim
(``--task-arg csv.path=/data/a,b/labels.csv``: ``path`` is the argument of a task that takes one).
``--protocols linear,knn`` replaces the default protocols of every task whose spec names none.

The parsers are pure (the registered names come in as arguments) and light to import: `suggest` serves the
console script's own errors too; a malformed spec is a `harness.common.errors.UsageError` (exit 2). `read_tasks`
and `read_task` bind them to the registered tasks and protocols, for every tool that takes a task spec (the
evaluation, the ablation's ``--eval-task``, the trainer's ``eval.task``). The other values of the evaluation's
command line that need reading, ``--data-root`` and ``--label-fractions``, are read here too.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Collection, Sequence

from harness.common.errors import UsageError
from harness.registry import suggest  # noqa: F401  (re-exported: the console script's errors use it too)

@dataclass
class TaskSpec:
    """One task to evaluate: its registered name, its argument as the task factory receives it (``None``: none),
    the protocols to run, and `text`, how the command line spelt it (for messages and to find it again)."""

    name: str
    arg: str | None
    protocols: tuple[str, ...]
    text: str = field(default="", compare=False)


def is_word(text: str) -> bool:
    """A protocol-like word: ASCII letters, '_' and '-' (what the continuation rule accepts after a ':')."""
    return bool(text) and text.isascii() and all(c.isalpha() or c in "_-" for c in text)


def _option(piece: str) -> tuple[str, str | None] | None:
    """A piece that continues the task before it: ``KEY=VALUE`` or ``KEY=VALUE:WORD``, KEY an identifier and
    VALUE free of ':'. Returns (KEY=VALUE, WORD or None); None when the piece starts a task."""
    key, eq, rest = piece.partition("=")
    if not eq or not (key.isascii() and key.isidentifier()):
        return None
    value, colon, word = rest.partition(":")
    if not colon:
        return piece, None
    return (f"{key}={value}", word) if is_word(word) else None


@dataclass
class _Draft:
    """A task spec being read: the pieces of its argument so far, and its protocol once one was written."""

    name: str
    parts: list[str]
    protocol: str | None
    text: str

    def spec(self, default: tuple[str, ...]) -> TaskSpec:
        return TaskSpec(self.name, ",".join(self.parts) or None,
                        (self.protocol,) if self.protocol else default, self.text)


def _start(piece: str, protocols: Collection[str], flag: str) -> _Draft:
    """``NAME``, ``NAME:ARG``, ``NAME:PROTOCOL`` or ``NAME:ARG:PROTOCOL``: a last ':' segment is the protocol only
    when it is a registered one (a csv path may hold ':')."""
    name, _, rest = piece.partition(":")
    if not name:
        raise UsageError(f"{flag}: {piece!r} has no task name before its ':' (e.g. demo:linear)")
    head, _, tail = rest.rpartition(":")
    protocol = tail if tail in protocols else None
    arg = head if protocol else rest
    return _Draft(name, [arg] if arg else [], protocol, piece)


def parse_task_list(text: str, protocols: Collection[str], default: tuple[str, ...],
                    flag: str = "--tasks") -> list[TaskSpec]:
    """The task specs of a ``--tasks`` value (module docstring); `protocols` are the registered protocol names,
    `default` the protocols of a spec that names none. Empty pieces are ignored."""
    drafts: list[_Draft] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        option = _option(piece)
        if option is None:
            drafts.append(_start(piece, protocols, flag))
            continue
        if not drafts:
            raise UsageError(f"{flag} {text!r}: {piece!r} is a KEY=VALUE option with no task before it "
                             f"(write TASK:{piece})")
        draft = drafts[-1]
        if ":" not in draft.text:
            raise UsageError(f"{flag} {text!r}: option {option[0]!r} follows {draft.text!r}, which has no ':' "
                             f"before its options (write {draft.text}:{option[0]})")
        if draft.protocol:
            raise UsageError(f"{flag} {text!r}: option {option[0]!r} comes after the protocol of {draft.text!r}; "
                             f"write options first ({draft.name}:...,{option[0]}:{draft.protocol})")
        kv, word = option
        if word in protocols:
            draft.parts.append(kv)
            draft.protocol = word
        else:  # not a protocol: the piece stays part of the argument, for the task (or the checks) to judge
            draft.parts.append(piece)
        draft.text += "," + piece
    if not drafts:
        raise UsageError(f"{flag} {text!r} names no task")
    return [d.spec(default) for d in drafts]


def parse_task_spec(spec: str, protocols: Collection[str], default: tuple[str, ...]) -> TaskSpec:
    """One spec, commas included in its argument (``csv:/data/a,b/labels.csv`` is one csv path here)."""
    return _start(spec.strip(), protocols, "task").spec(default)


def parse_protocols(text: str, protocols: Collection[str]) -> tuple[str, ...]:
    """``--protocols linear,knn``: registered names, in registry order (the order protocols run in, which a
    protocol that reads another's results relies on)."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise UsageError(f"--protocols {text!r} names no protocol; choose from {', '.join(protocols)}")
    for n in names:
        if n not in protocols:
            raise UsageError(f"--protocols: unknown protocol {n!r}{suggest(n, protocols)}; "
                             f"registered: {', '.join(protocols)}")
    return tuple(p for p in protocols if p in names)


def parse_task_arg(text: str) -> tuple[str, str, str]:
    """``NAME.KEY=VALUE`` -> (NAME, KEY, VALUE); the value is taken verbatim (commas, '=' and ':' included)."""
    target, eq, value = text.partition("=")
    name, dot, key = target.partition(".")
    if not eq or not dot or not name or not (key.isascii() and key.isidentifier()):
        raise UsageError(f"--task-arg {text!r}: expected NAME.KEY=VALUE, e.g. --task-arg demo.n_patients=50 or "
                         "--task-arg csv.path=/data/labels.csv")
    if not value:
        raise UsageError(f"--task-arg {text!r}: the value is empty")
    return name, key, value


#: The key of a task's whole argument in ``--task-arg`` (the tasks that take one take a file: csv:PATH).
PATH_KEY = "path"


def apply_task_args(specs: list[TaskSpec], task_args: list[str], path_tasks: Collection[str]) -> list[TaskSpec]:
    """`specs` with every ``--task-arg`` added to the specs of its task. For a task in `path_tasks` (one that
    takes an argument) the only key is ``path``, the argument itself; for the others KEY=VALUE joins the task's
    comma list of options, so the value cannot hold a comma, and a key already given is an error."""
    out = list(specs)
    for raw in task_args:
        name, key, value = parse_task_arg(raw)
        hits = [i for i, s in enumerate(out) if s.name == name]
        if not hits:
            given = sorted({s.name for s in out})
            raise UsageError(f"--task-arg {raw!r}: task {name!r} is not in --tasks{suggest(name, given)}; "
                             f"--tasks names {', '.join(given)}")
        for i in hits:
            spec = out[i]
            if name in path_tasks:
                if key != PATH_KEY:
                    raise UsageError(f"--task-arg {raw!r}: task {name!r} takes one argument, its file: "
                                     f"--task-arg {name}.{PATH_KEY}=FILE")
                if spec.arg is not None:
                    raise UsageError(f"--task-arg {raw!r}: {spec.text!r} already has its file {spec.arg!r}")
                arg = value
            else:
                if "," in value:
                    raise UsageError(f"--task-arg {raw!r}: an option of task {name!r} cannot hold a comma (the "
                                     "task reads its options as one comma list)")
                given_keys = [p.partition("=")[0].strip() for p in (spec.arg or "").split(",")]
                if key in given_keys:
                    raise UsageError(f"--task-arg {raw!r}: {spec.text!r} already sets {key}")
                arg = f"{spec.arg},{key}={value}" if spec.arg else f"{key}={value}"
            out[i] = replace(spec, arg=arg, text=f"{spec.text} --task-arg {raw}")
    return out


# ------------------------------------------------------------------------------------- bound to the registries

def default_protocols() -> tuple[str, ...]:
    """The protocols a task spec that names none runs: those registered as default (``raddino-bench ls``)."""
    from harness.probes import PROTOCOLS

    return tuple(p.name for p in PROTOCOLS.entries.values() if p.default)


def read_tasks(text: str, protocols: str | None = None, task_args: Sequence[str] = ()) -> list[TaskSpec]:
    """The registered task specs of a ``--tasks`` value, with ``--protocols`` (the protocols of every spec that
    names none; None: the default ones) and every ``--task-arg`` applied, each spec's protocols in run order with
    those they run after (``demo:demographics`` runs the linear probe first). UsageError when malformed."""
    from harness.probes import PROTOCOLS
    from harness.tasks.base import TASKS

    default = parse_protocols(protocols, PROTOCOLS) if protocols else default_protocols()
    specs = parse_task_list(text, PROTOCOLS, default)
    path_tasks = {n for n, e in TASKS.entries.items() if e.takes_arg}
    return [replace(s, protocols=PROTOCOLS.ordered(s.protocols))
            for s in apply_task_args(specs, task_args, path_tasks)]


def read_task(text: str) -> TaskSpec:
    """One registered task spec, commas included in its argument (``csv:/data/a,b/labels.csv``), its protocols in
    run order as in `read_tasks`."""
    from harness.probes import PROTOCOLS

    spec = parse_task_spec(text, PROTOCOLS, default_protocols())
    return replace(spec, protocols=PROTOCOLS.ordered(spec.protocols))


# ------------------------------------------------------------------------------- the other values worth reading

#: ``--data-root NAME=DIR``: a NAME is spelt like this; anything else is one folder holding every dataset.
ROOT_NAME = re.compile(r"[A-Za-z0-9_-]+")


def parse_data_roots(values: Sequence[str]) -> tuple[Path | None, dict[str, Path]]:
    """``--data-root DIR`` and ``--data-root NAME=DIR`` values: (the folder of every dataset, the last one given;
    {name: folder} of the datasets named)."""
    root, named = None, {}
    for v in values:
        key, sep, path = v.partition("=")
        if sep and ROOT_NAME.fullmatch(key):
            named[key] = Path(path).expanduser()
        else:
            root = Path(v).expanduser()
    return root, named


def parse_fractions(text: str) -> tuple[float, ...]:
    """``--label-fractions``: sorted distinct fractions, each in (0, 1]; ValueError otherwise."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--label-fractions must be a comma list of numbers, got {text!r}") from None
    bad = [v for v in values if not 0.0 < v <= 1.0]  # NaN fails the comparison too
    if not values or bad:
        raise ValueError(f"--label-fractions must be in (0, 1], got {text!r}")
    return tuple(sorted(set(values)))
