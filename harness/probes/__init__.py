"""Evaluation protocols on frozen features: one table line per protocol, nothing imported until it runs.

A protocol is ``fit_and_score(tr, encoders, *dependencies) -> ProtocolResult`` (see `harness.protocols`): it gets
the task's shared state, the encoders, and the results of the protocols it declares with ``after=``, in that order.
Protocols run, and their sections appear in a leaderboard, dependencies first and otherwise in table order: the
k-NN probe and the label-efficiency curves follow the linear probe, whose section they are read beside;
demographics scores the linear probe's own test predictions per subgroup, so asking for it runs the linear probe
too.
"""
from __future__ import annotations

from dataclasses import dataclass

from harness.registry import Entry, Registry


@dataclass(frozen=True)
class ProtocolEntry(Entry):
    """A protocol's table line. `default`: part of a task's protocols when the task spec names none.
    `dense_rows`: lazy target of ``task -> row indices`` whose dense features (patch grids, layers) the protocol
    reads, declared up front so one extraction pass serves every protocol (and a SLURM sweep can extract them in
    its feature jobs); empty for global features only. `inputs`: lazy target of ``task -> dict`` of digests of
    the task data the protocol's numbers depend on besides the images, labels and split (sex and age, masks): an
    earlier section is kept beside a one-protocol run only when they are unchanged."""

    default: bool = True
    dense_rows: str = ""
    inputs: str = ""


PROTOCOLS: Registry[ProtocolEntry] = Registry("protocol", ProtocolEntry)

PROTOCOLS.register("linear", "harness.probes.linear:fit_and_score",
                   description="logistic-regression probe per label on global features; AUROC, AUPRC")
PROTOCOLS.register("knn", "harness.probes.knn:fit_and_score",
                   description="k-NN probe (DINO): cosine neighbours, exp(cos/T)-weighted per-label votes; AUROC, "
                               "AUPRC")
PROTOCOLS.register("attentive", "harness.probes.attentive:fit_and_score", default=False,
                   dense_rows="harness.probes.attentive:all_rows",
                   description="attention pool (one learned query, multi-head) trained on frozen patch tokens with "
                               "one budget for all models; AUROC, AUPRC")
PROTOCOLS.register("label-efficiency", "harness.probes.label_efficiency:fit_and_score", default=False,
                   description="linear probe refitted on fractions of the training patients (several seeded draws "
                               "each); macro AUROC curve with CIs and a figure")
PROTOCOLS.register("seg", "harness.probes.segmentation:fit_and_score",
                   dense_rows="harness.probes.segmentation:masked_rows",
                   inputs="harness.probes.segmentation:section_inputs",
                   description="linear and multi-level segmentation heads on frozen patch tokens; Dice, IoU")
PROTOCOLS.register("demographics", "harness.probes.demographics:fit_and_score", after=("linear",),
                   inputs="harness.probes.demographics:section_inputs",
                   description="sex (logistic, AUROC) and age (ridge; MAE, R2, r) from global features; "
                               "classification AUROC per sex and age band")
