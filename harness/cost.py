"""What each model costs to run on a task: its extraction throughput, and the numbers that drive it.

Per model and task (`model_cost`):

- ``throughput``: images per second of the encoder's own forward passes (`harness.features.TIMED`) during the
  extraction that made the task's features, on the device and machine named with it (`harness.common.devices.
  hardware`). Only the forward passes are timed: the decoding and the preprocessing run in the DataLoader workers
  for every encoder of a pass at once, overlapped with the forward passes, and the cache writes are storage, so
  neither belongs to one model, and a model's rate does not depend on which other models share its pass beyond the
  machine's load. Features computed in this run give this run's rate; features read from the feature cache give the
  rate measured when they were computed, stored in the entry's manifest, said so and dated; an entry cached before
  rates were stored has none (null, "not recorded"), never a zero.
- ``parameters``: every parameter of the model as loaded (`Encoder.parameter_count`; 0 for a weight-free floor).
- ``input_size``: the side of the square input of the encoder's native preprocessing (as run: the input policy's).
- ``tokens``: the sequence the transformer processes per image, its patch grid (the grid of patch tokens the
  encoder returns for one image at its input size) plus the tokens it prepends (`prefix_tokens`: CLS and
  registers); null for an encoder without tokens (a CNN, ``pixels``).
- ``feature_dim``: the width of the global feature the probes read, under the run's pooling.

The static numbers come from the encoder alone, through one forward pass of one blank image at its input size, so
they depend on no other model, no cache and no task. They are computed afresh on every run, never cached with the
protocols' results nor kept from an earlier run by a one-protocol merge: the numbers shown are always those of the
code and weights that ran. The section's cells are text (no best in column: a cost is not a score); the tidy table
(protocol ``cost``) and the per-model results JSON (``cost``) hold the numbers.
"""
from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence

import torch

from baselines.registry import Encoder
from harness.features import FeatureSet, encode_batch
from harness.leaderboard import Cell, Section
from harness.tidy import COST, RATE_METRIC, TidyRow

#: Tokens each transformers vision model prepends to its patch tokens, by ``config.model_type``, before its
#: ``config.num_register_tokens``: one CLS for the DINOv2, DINOv3 and CLIP families; none for SigLIP, which pools
#: with its attention head instead of a CLS token.
HF_CLS_TOKENS = {"dinov2": 1, "dinov2_with_registers": 1, "dinov3_vit": 1, "clip_vision_model": 1,
                 "siglip_vision_model": 0}
#: The keys of a throughput record that say where it was measured.
MACHINE = ("device", "processor", "threads")

_static: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def prefix_tokens(model: object) -> int | None:
    """The tokens `model` processes besides its patch tokens (CLS and registers), read from the model as built: a
    `trainer.vit` ViT (alone or as a CLIP tower's ``vit``) has a CLS token and ``num_register_tokens``; a
    transformers model has the tokens of its family (`HF_CLS_TOKENS`) and its config's ``num_register_tokens``.
    None for any other model (a CNN has no tokens; an architecture not listed here is not guessed)."""
    from trainer.vit import VisionTransformer

    vit = getattr(model, "vit", model)
    if isinstance(vit, VisionTransformer):
        return 1 + vit.num_register_tokens
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind in HF_CLS_TOKENS:
        return HF_CLS_TOKENS[kind] + int(getattr(config, "num_register_tokens", 0) or 0)
    return None


def static_cost(encoder: Encoder) -> dict:
    """The numbers of `encoder` that no run changes: parameters, input size, patch grid, prefix tokens, tokens and
    global feature width (the last two from one forward pass of a blank image, on the encoder's device). Computed
    once per encoder object and pooling."""
    pre = encoder.preprocess
    memo = _static.get(encoder)
    if memo is not None and memo[0] == (encoder.global_pool, pre):
        return dict(memo[1])
    x = torch.zeros(1, pre.channels, pre.size, pre.size, device=encoder.device)
    f = encode_batch(encoder, x, encoder.device)
    prefix = prefix_tokens(getattr(encoder, "model", None))
    h, w = (int(s) for s in f.patch.shape[-2:])
    out = {"parameters": encoder.parameter_count(), "input_size": pre.size, "input_channels": pre.channels,
           "patch_grid": [h, w], "prefix_tokens": prefix, "tokens": None if prefix is None else h * w + prefix,
           "feature_dim": int(f.global_.shape[-1])}
    _static[encoder] = ((encoder.global_pool, pre), out)
    return dict(out)


def _usable(record: object) -> bool:
    """A throughput record that gives a rate: a positive image count over positive seconds."""
    return (isinstance(record, dict) and isinstance(record.get("images"), int) and record["images"] > 0
            and isinstance(record.get("seconds"), (int, float)) and record["seconds"] > 0)


def throughput(entries: Sequence[FeatureSet]) -> dict | None:
    """The model's rate, from the feature entries its task read (`harness.features.FeatureStore.entries`): that of
    the largest pass (most images; the first of equals) among those computed in this run when there are any, else
    among the cached ones. One pass, not a pool of them: a later run reading only some of the entries (a
    one-protocol run needs no dense grids) then reports the same rate, the one of the task's global features. None
    when no entry has a rate."""
    fresh = [fs.throughput for fs in entries if not fs.from_cache and _usable(fs.throughput)]
    cached = [fs.throughput for fs in entries if fs.from_cache and _usable(fs.throughput)]
    chosen = fresh or cached
    if not chosen:
        return None
    r = max(chosen, key=lambda r: r["images"])
    return {"images_per_s": r["images"] / r["seconds"], "images": r["images"], "seconds": r["seconds"],
            "timed": r.get("timed"), **{k: r.get(k) for k in MACHINE}, "measured": str(r.get("measured", "")),
            "source": "this run" if fresh else "feature cache"}


def model_cost(encoder: Encoder, entries: Sequence[FeatureSet]) -> dict:
    """Everything the cost section, the tidy table and the results JSON say of `encoder` on one task."""
    return {**static_cost(encoder), "throughput": throughput(entries)}


def machine_label(rate: Mapping) -> str:
    """``cpu: AMD EPYC 7B13, 2 threads``: where a rate was measured (the tidy row's label)."""
    return f"{rate['device']}: {rate['processor']}, {rate['threads']} threads"


def cost_rows(task: str, costs: Mapping[str, dict]) -> list[TidyRow]:
    """The tidy rows of the cost section, per model: the rate (labelled with its machine; absent when not recorded),
    then parameters, input size, tokens (absent for an encoder without tokens) and feature width."""
    rows = []
    for model, c in costs.items():
        rate = c["throughput"]
        numbers = ([(RATE_METRIC, machine_label(rate), rate["images_per_s"])] if rate else []) + [
            ("parameters", "", c["parameters"]), ("input_size", "", c["input_size"]),
            ("tokens", "", c["tokens"]), ("feature_dim", "", c["feature_dim"])]
        rows += [TidyRow(task, model, COST, metric, label, float(value), None, None, None, None, None)
                 for metric, label, value in numbers if value is not None]
    return rows


def _rate(x: float) -> str:
    """Three significant figures or more: 0.94, 41.2, 1,235."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _count(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 100_000 else f"{n:,}"


def _tokens(c: dict) -> str:
    if c["tokens"] is None:
        return "n/a"
    h, w = c["patch_grid"]
    return f"{c['tokens']:,} = {h}×{w}" + (f" + {c['prefix_tokens']}" if c["prefix_tokens"] else "")


def _measured(rate: dict | None) -> str:
    if rate is None:
        return "not recorded (features cached before rates were stored)"
    where = f"{rate['device']}, {rate['processor']}, {rate['threads']} threads"
    return where + ("" if rate["source"] == "this run" else f"; feature cache, {rate['measured'][:10]}")


def cost_section(costs: Mapping[str, dict]) -> Section:
    """The leaderboard's cost section: one row per model, text cells."""
    columns = ["forward img/s", "measured on", "parameters", "input", "tokens", "feature dim"]
    rows = {}
    for model, c in costs.items():
        rate = c["throughput"]
        text = [_rate(rate["images_per_s"]) if rate else "—", _measured(rate), _count(c["parameters"]),
                f"{c['input_size']}×{c['input_size']}", _tokens(c), str(c["feature_dim"])]
        rows[model] = {col: Cell(None, note=t) for col, t in zip(columns, text)}
    return Section("Cost", columns, rows, notes=[
        "forward img/s: images over the wall seconds of the encoder's own forward passes in the extraction "
        "(inference mode, the device's autocast, the device synchronised; decoding, preprocessing and cache writes "
        "are shared by every encoder of a pass and excluded), measured in this run, or when the features were "
        "computed if they came from the feature cache (then dated). It depends on the machine and its load: "
        "`python -m harness.leaderboard check` does not compare it. parameters: every parameter of the model as "
        "loaded; input: the native preprocessing's size; tokens: the sequence the model processes per image, patch "
        "grid + CLS and registers (n/a: no tokens); feature dim: the global feature the probes read, under this "
        "run's pooling. Details: docs/evaluate.md#cost."])
