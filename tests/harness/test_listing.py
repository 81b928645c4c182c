"""What ``raddino-bench ls [PATTERN]`` and the start of ``eval`` print about the encoders: a pattern keeps the names
it matches (timm's list_models rule), and a missing model is one short row plus one note under the table."""
from __future__ import annotations

import pytest

from harness import cli
from harness.listing import matches, status_table


@pytest.mark.parametrize("pattern, name, hit", [
    (None, "pixels", True),
    ("dino", "rad-dino", True),          # no wildcard: anywhere in the name
    ("dino", "pixels", False),
    ("rad*", "rad-dino", True),          # a wildcard: the whole name
    ("dino*", "rad-dino", False),
    ("BIO*", "biovil-t", True),          # case-insensitive
    ("?lip", "clip", True),
    ("[bc]*", "mrm", False),
])
def test_a_pattern_matches_as_timm_list_models_does(pattern, name, hit):
    assert matches(name, pattern) is hit


def test_ls_pattern_keeps_the_tables_with_a_match(tmp_path, capsys):
    assert cli.main(["ls", "dino", "--weights-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0] for line in out.splitlines()[2:] if line.strip() and not line.startswith(" ")}
    assert {"rad-dino", "dinov2-base"} <= rows and "pixels" not in rows
    assert "task" not in rows and "protocol" not in rows  # no task or protocol holds 'dino'
    assert cli.main(["ls", "knn"]) == 0
    assert capsys.readouterr().out.split()[0] == "protocol"


def test_ls_pattern_matching_nothing_exits_1_and_says_so(capsys):
    assert cli.main(["ls", "no-such-name"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "no encoder, task or protocol name matches 'no-such-name'" in captured.err


def test_a_skipped_encoder_is_one_short_row_and_the_note_says_where_and_how(tmp_path):
    out = status_table([], ["rad-dino", "mrm"], tmp_path)
    table, note = out.split("\n\n")
    rows = table.splitlines()[2:]
    assert [r.split() for r in rows] == [["rad-dino", "skipped", "weights", "missing"],
                                         ["mrm", "skipped", "weights", "missing"]]
    assert max(map(len, table.splitlines())) < 40  # a reason per row, not the whole message
    assert f"{tmp_path}/<model>/" in note
    # each fetch command on its own line, the weights folder filled in so that it can be pasted as printed
    assert f"  rad-dino  hf download microsoft/rad-dino config.json model.safetensors preprocessor_config.json " \
           f"--local-dir {tmp_path}/rad-dino" in note.splitlines()
    assert any(line.startswith("  mrm") and f"{tmp_path}/mrm/" in line for line in note.splitlines())
