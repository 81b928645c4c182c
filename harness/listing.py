"""What ``raddino-bench ls`` and the start of ``raddino-bench eval`` print about the registered encoders.

A newcomer's first screen: one short cell per encoder (``ready``, ``weights missing``), then one note under the
table for the missing ones, with the places searched and the commands that fetch the files. The full message of
`WeightsMissing` (every accepted layout) is what ``--models NAME`` prints for one model; repeated in every row it
was a wall of text (issue 21).
"""
from __future__ import annotations

import shlex
import textwrap
from fnmatch import fnmatchcase
from pathlib import Path

from tabulate import tabulate

from baselines.registry import ENCODERS, Encoder, EncoderEntry, default_weights_dir, hub_cache_dir, weights_status
from harness.probes import PROTOCOLS
from harness.tasks.base import TASKS

#: The placeholder `WeightFiles.download` commands write for the weights root; the note fills in the real one so
#: that a command can be pasted as printed.
WEIGHTS_DIR_PLACEHOLDER = "<weights-dir>"
#: Width the note's paragraph is wrapped to; the fetch commands below it stay whole, however long.
WIDTH = 116


def matches(name: str, pattern: str | None) -> bool:
    """timm's ``list_models(pattern)`` rule: shell wildcards (``rad*``, ``*clip``), case-insensitive; a pattern
    without a wildcard matches anywhere in the name (``ls dino`` finds rad-dino and dinov2-base)."""
    if pattern is None:
        return True
    pattern = pattern.lower()
    if not any(c in pattern for c in "*?["):
        pattern = f"*{pattern}*"
    return fnmatchcase(name.lower(), pattern)


def licence_cell(entry: EncoderEntry) -> str:
    """The licence column of ``ls``: the entry's licence, ``gated`` when its hub repo is, ``-`` without weights."""
    w = entry.weight_files
    if w is None:
        return "-"
    return f"{entry.licence or '?'}{', gated' if w.gated else ''}"


def missing_note(names: list[str], weights_dir: Path | None) -> str:
    """One paragraph on the encoders in `names` (registered with weight files, none found): where they were
    looked for, then each one's fetch command on its own line."""
    if not names:
        return ""
    root = weights_dir if weights_dir is not None else default_weights_dir()
    entries = [ENCODERS.get(n) for n in names]
    where = f"{root}/<model>/ (--weights-dir, else $RADDINO_BENCH_WEIGHTS, else $HF_HOME/raddino-bench)"
    if any(e.weight_files.hub for e in entries):
        where += (f" and, for a model published on the Hugging Face hub, its cache {hub_cache_dir()} ($HF_HUB_CACHE, "
                  "else $HF_HOME/hub)")
    text = (f"Weights missing for {', '.join(names)}: looked in {where}. `--models NAME` names every file layout a "
            "model accepts. To fetch them (internet access):")
    width = max(map(len, names)) + 2
    commands = []
    for n, e in zip(names, entries):
        w = e.weight_files
        if w.gated:  # a shell comment, so the block still pastes as printed
            commands.append(f"  {n:<{width}}# gated: accept its licence at {' or '.join(r.page for r in w.gated)} "
                            "while logged in (hf auth login) first")
        if w.download:
            commands.append(f"  {n:<{width}}{w.download.replace(WEIGHTS_DIR_PLACEHOLDER, shlex.quote(str(root)))}")
    # Paths and names stay whole on their lines, to be copied as printed.
    return "\n".join([textwrap.fill(text, WIDTH, break_long_words=False, break_on_hyphens=False), *commands])


def status_table(encoders: list[Encoder], skipped: list[str], weights_dir: Path | None) -> str:
    """The encoders ``--models`` resolved to: each loaded one with its weights digest, each skipped one (its weights
    missing under ``--models all``) with those two words, and the note on where to put them."""
    rows = [[e.name, "ready", e.weights_digest[:12]] for e in encoders] + [[n, "skipped", "weights missing"]
                                                                           for n in skipped]
    table = tabulate(rows, headers=["encoder", "status", "weights"])
    note = missing_note(skipped, weights_dir)
    return f"{table}\n\n{note}" if note else table


def list_registered(weights_dir: Path | None, pattern: str | None = None) -> bool:
    """Print the encoders (whether their weights are present, and where, found without loading them), tasks and
    protocols whose names match `pattern` (`matches`), in table order; False when no name matches."""
    encoders = [(n, e) for n, e in ENCODERS.entries.items() if matches(n, pattern)]
    tasks = [(n, t) for n, t in TASKS.entries.items() if matches(n, pattern)]
    protocols = [(n, p) for n, p in PROTOCOLS.entries.items() if matches(n, pattern)]
    blocks = []
    if encoders:
        rows, missing = [], []
        for n, e in encoders:
            status = weights_status(n, weights_dir)
            if status.startswith("missing"):
                status = "missing"
                missing.append(n)
            rows.append([n, "name:ARG" if e.takes_arg else "", ", ".join(e.expected_files) or "(none)", status,
                         licence_cell(e), e.description])
        table = tabulate(rows, headers=["encoder", "form", "weight files", "weights", "licence", "what"])
        note = missing_note(missing, weights_dir)
        blocks.append(f"{table}\n\n{note}" if note else table)
    if tasks:
        blocks.append(tabulate([[n, "name:ARG" if t.takes_arg else "", t.description] for n, t in tasks],
                               headers=["task", "form", "what"]))
    if protocols:
        blocks.append(tabulate([[n, "yes" if p.default else f"when asked: TASK:{n} or --protocols {n}",
                                 ", ".join(p.after), p.description] for n, p in protocols],
                               headers=["protocol", "by default", "runs after", "what"]))
    if blocks:
        print("\n\n".join(blocks))
    return bool(blocks)
