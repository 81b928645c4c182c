"""The documentation holds: every relative link and #anchor in README.md and docs/*.md resolves, no section sign
(pointers into private notes) is left in the tracked sources, README keeps the commands CI runs, and the Python
examples of docs/evaluate.md, docs/extending.md and docs/python-api.md run as written (blocks after a
`<!-- not-run: reason -->` comment are skipped, with the reason; a block after `<!-- file: PATH -->` is a new file of
the repository, saved as PATH where its package finds it, not run)."""
from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
EXECUTED = [REPO / "docs" / "evaluate.md", REPO / "docs" / "extending.md", REPO / "docs" / "python-api.md"]
SECTION_SIGN = "\u00a7"
PRIVATE_NOTES = "shared/" + "reference"  # spelled in two parts so that this file does not match itself
NOT_RUN = re.compile(r"^<!--\s*not-run:(.*)-->\s*$")
NEW_FILE = re.compile(r"^<!--\s*file:\s*(\S+)\s*-->\s*$")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _outside_fences(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the Markdown outside fenced code blocks."""
    out, fence = [], None
    for n, line in enumerate(text.splitlines(), start=1):
        m = re.match(r"^\s*(`{3,}|~{3,})", line)
        if m:
            marker = m.group(1)[0] * 3
            fence = None if fence == marker else (fence or marker)
            continue
        if fence is None:
            out.append((n, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link targets dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@functools.lru_cache(maxsize=None)
def anchors(page: Path) -> set[str]:
    """Every anchor GitHub renders for `page`: one per heading (repeats get -1, -2, ...) and explicit ids."""
    seen: dict[str, int] = {}
    out = set()
    text = page.read_text()
    for _, line in _outside_fences(text):
        m = HEADING.match(line)
        if m:
            base = slug(m.group(2))
            k = seen.get(base, 0)
            seen[base] = k + 1
            out.add(base if k == 0 else f"{base}-{k}")
    out |= set(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", text))
    return out


def links(page: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link and image outside code (fenced blocks and inline spans)."""
    prose = [(n, re.sub(r"`+[^`]*`+", " ", line)) for n, line in _outside_fences(page.read_text())]
    return [(n, target) for n, line in prose for target in LINK.findall(line)]


def test_the_documentation_has_its_pages():
    names = {p.name for p in PAGES}
    assert {"README.md", "evaluate.md", "datasets.md", "encoders.md", "protocols.md", "statistics.md",
            "pretraining.md", "slurm.md", "benchmarks.md", "extending.md", "python-api.md"} <= names


def test_slug_follows_github():
    assert slug("Evaluating encoders: `python -m harness.run`") == "evaluating-encoders-python--m-harnessrun"
    assert slug("Your own runs: the ckpt:DIR encoder") == "your-own-runs-the-ckptdir-encoder"
    assert slug("Continue from RAD-DINO (or DINOv2) weights") == "continue-from-rad-dino-or-dinov2-weights"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_and_anchors_resolve(page):
    broken = []
    for n, target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        where = f"{page.relative_to(REPO)}:{n}: {target}"
        if not dest.exists():
            broken.append(f"{where} (no such file)")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{where} (no heading with that anchor in {dest.name})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def _tracked(*suffixes: str) -> list[Path]:
    """The repository's tracked files with these suffixes (every such file outside hidden folders when this is
    not a git checkout)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        out = None
    if out is not None and out.returncode == 0 and out.stdout:
        files = [REPO / f for f in out.stdout.split("\0") if f]
    else:
        files = [p for p in REPO.rglob("*") if not any(part.startswith(".") for part in p.relative_to(REPO).parts)]
    return [f for f in files if f.suffix in suffixes and f.is_file()]


def test_no_section_signs_or_pointers_into_private_notes():
    found = []
    for f in _tracked(".py", ".md", ".yaml", ".sh"):
        for n, line in enumerate(f.read_text(errors="replace").splitlines(), start=1):
            if SECTION_SIGN in line or PRIVATE_NOTES in line:
                found.append(f"{f.relative_to(REPO)}:{n}: {line.strip()[:100]}")
    assert not found, ("cite the upstream file, paper section or issue instead of a section of private notes:\n"
                       + "\n".join(found))


def test_readme_keeps_the_commands_ci_runs():
    ci, readme = (REPO / ".ci" / "run").read_text(), (REPO / "README.md").read_text()
    pins = re.findall(r"\"((?:torch|torchvision)==[0-9.]+)\"", ci)
    assert len(pins) == 2, pins
    for pin in pins:
        assert pin in readme, f"README's install line lost {pin}, which .ci/run installs"
    command = "python -m pytest -q -n 2 --dist loadgroup"
    assert re.search(rf"^{re.escape(command)}$", ci, re.M), f".ci/run no longer runs {command}"
    assert re.search(rf"^\. \.venv/bin/activate && {re.escape(command)}$", readme, re.M), "README's test command"


def python_blocks(page: Path) -> list[tuple[int, str, str | None, str | None]]:
    """(line of the opening fence, code, not-run reason or None, path of the new file it is or None) of every
    ```python block of `page`."""
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "").strip()
            not_run, new_file = NOT_RUN.match(before), NEW_FILE.match(before)
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            blocks.append((i + 1, "\n".join(lines[i + 1:end]), not_run.group(1).strip() if not_run else None,
                           new_file.group(1) if new_file else None))
            i = end
        i += 1
    return blocks


def test_only_blocks_marked_not_run_are_left_out_and_new_files_are_named(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Text.\n\n```python\nx = 1\n```\n\n<!-- not-run: needs the network -->\n```python\n"
                    "import urllib.request\n```\n\n<!-- a plain comment -->\n```python\ny = 2\n```\n\n```bash\nls\n```\n"
                    "\n<!-- file: baselines/mine.py -->\n```python\nZ = 3\n```\n")
    assert python_blocks(page) == [(3, "x = 1", None, None), (8, "import urllib.request", "needs the network", None),
                                   (13, "y = 2", None, None), (22, "Z = 3", None, "baselines/mine.py")]


# Runs each page's blocks in order in one namespace, compiled against the page so that a traceback names its line. A
# new file is saved under the overlay folder instead, and that folder is added to its package's search path, so
# `import baselines.my_model` (and a registry target naming it) finds it as it would in the repository.
_DRIVER = """
import importlib, json, sys
from pathlib import Path
page, blocks, overlay = sys.argv[1], json.load(open(sys.argv[2])), Path(sys.argv[3])
namespace = sys.modules["__main__"].__dict__
for line, code, new_file in blocks:
    if new_file is None:
        exec(compile("\\n" * line + code, page, "exec"), namespace)
        continue
    path = overlay / new_file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(code + "\\n")
    package = importlib.import_module(".".join(Path(new_file).parent.parts))
    if str(path.parent) not in package.__path__:
        package.__path__.append(str(path.parent))
"""


@pytest.mark.slow
@pytest.mark.parametrize("page", EXECUTED, ids=lambda p: p.name)
def test_python_examples_run_as_written(page, tmp_path):
    blocks = python_blocks(page)
    runnable = [(line, code, new_file) for line, code, reason, new_file in blocks if reason is None]
    assert runnable, f"{page.name} has no runnable python block"
    assert all(reason for _, _, reason, _ in blocks if reason is not None), "a not-run comment must give its reason"
    for _, _, _, new_file in blocks:  # a new file of an existing package, never one the repository has
        if new_file is not None:
            assert (REPO / new_file).parent.is_dir() and not (REPO / new_file).exists(), new_file
    spec = tmp_path / "blocks.json"
    spec.write_text(json.dumps(runnable))
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "RADDINO_BENCH_CACHE": str(tmp_path / "cache"), "RADDINO_BENCH_WEIGHTS": str(tmp_path / "weights"),
           "HF_HUB_CACHE": str(tmp_path / "hf-hub"), "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _DRIVER, str(page), str(spec), str(tmp_path / "new-files")],
                          cwd=work, env=env, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, f"{page.name} examples failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    # The new files are read as the repository's own modules: their source keys the caches of what they compute.
    assert "cannot be read" not in done.stderr, done.stderr[-3000:]


@pytest.mark.parametrize("page,line,reason",
                         [(p, line, reason) for p in EXECUTED for line, _, reason, _ in python_blocks(p) if reason],
                         ids=lambda v: v.name if isinstance(v, Path) else str(v)[:40])
def test_blocks_marked_not_run(page, line, reason):
    pytest.skip(f"{page.name}:{line} not run: {reason}")
