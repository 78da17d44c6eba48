"""Sparse-optimisation stage: train with a penalty that drives whole units to zero, then remove them.

`group_lasso` adds strength * sum_j ||(kernel[..., j], bias[j])||_2 over every prunable producer
(one group per output unit); `bn_l1` adds strength * sum |gamma| of the BatchNormalization right
after a producer (network slimming); `both` adds the two. The penalty sits in the loss, so Adam
weighs it against the data term per weight: a unit the data does not need has only the penalty's
gradient and is pushed to zero at about the learning rate per step, while a useful unit's data
gradient outweighs it. (A proximal shrink, w *= max(0, 1 - lr*strength/||w||), needs a plain SGD
step size to be meaningful; under Adam it is either negligible or fights the optimiser.)
Units whose norm (|gamma|) relative to the layer's largest is below `threshold` are then removed,
their mean activation folded into the next layer's bias, and the model is fine-tuned without the
penalty. The weight stage's zeros are held throughout (training.fit's HoldZeros).
"""
from __future__ import annotations

import numpy as np

from compressor.config.recipe import SparseOptStage
from compressor.core._tf import tf
from compressor.graph import surgery
from compressor.layers import handler_for
from compressor.stages import observation, planning, recovery
from compressor.stages.base import StageContext, StageOutcome, stage
from compressor.train import distribute
from compressor.train.training import clone_with_weights

_EPS = 1e-12  # keeps the norm differentiable at an all-zero unit (weight-stage masks can make one)


def group_norms(layer) -> np.ndarray:
    """L2 norm of each unit's weights and bias (a whole head for attention), from the layer table."""
    return handler_for(layer).unit_norms(layer)


def _penalty(model, producers: list[str], bns: list[str], strength: float):
    """A zero-argument loss for `model.add_loss`."""
    layers = [model.get_layer(n) for n in producers]
    gammas = [model.get_layer(n).gamma for n in bns if model.get_layer(n).gamma is not None]

    def loss():
        total = tf.constant(0.0)
        for layer in layers:
            total += tf.reduce_sum(tf.sqrt(handler_for(layer).unit_sq(layer) + _EPS))
        for gamma in gammas:
            total += tf.reduce_sum(tf.abs(gamma))
        return strength * total

    return loss


def relative(values: np.ndarray) -> np.ndarray:
    top = float(np.max(values)) if len(values) else 0.0
    return values / top if top > 0 else np.zeros_like(values)


def _group_score(trained, group, traces, use_groups: bool, use_bn: bool) -> np.ndarray:
    """Per unit of a group, the mean over its members of the smaller of the relative group norm and
    the relative BN scale: a unit is idle if either its incoming group or its BN scale is gone."""
    per_member = []
    for m in group.members:
        scores = []
        if use_groups:
            scores.append(relative(group_norms(trained.get_layer(m))))
        bn = traces[m].batch_norm
        if use_bn and bn:
            scores.append(relative(np.abs(trained.get_layer(bn).gamma.numpy().astype(np.float64))))
        per_member.append(np.min(scores, axis=0) if scores else np.ones(group.units))
    return np.mean(per_member, axis=0)

@stage(SparseOptStage, structured=True)
def apply(model, cfg: SparseOptStage, ctx: StageContext, amount: float = 1.0) -> StageOutcome:
    with distribute.scope():  # the penalty below is attached to `work`, so `work` itself must train distributed
        work = recovery.copy(model)  # trained in place below: never the caller's model
    groups = planning.groups(work)
    if not groups:
        return StageOutcome(work, {"layers": {}, "removed": 0}, ["sparse_opt: no prunable Dense/Conv layers"])
    graph = observation.layer_graph(work)
    traces = {m: observation.trace(work, m, graph) for g in groups for m in g.members}
    producers = [m for g in groups for m in g.members]
    bns = sorted({t.batch_norm for t in traces.values() if t.batch_norm})
    use_groups = cfg.penalty in ("group_lasso", "both")
    use_bn = cfg.penalty in ("bn_l1", "both")
    notes = []
    if use_bn and not bns:
        notes.append("sparse_opt: no BatchNormalization after a prunable layer; bn_l1 has nothing to act on")
    # backing off (amount < 1) also trains more gently: a weaker penalty at a lower learning rate
    strength = cfg.strength * amount
    lr_scale = 1.0 + (cfg.lr_scale - 1.0) * amount
    work.add_loss(_penalty(work, producers if use_groups else [], bns if use_bn else [], strength))
    recovery.finetune(work, ctx, cfg.epochs, f"sparse_opt: {cfg.penalty} training",
                     learning_rate=ctx.recipe.learning_rate * lr_scale)
    trained = clone_with_weights(work)  # drops the penalty: clone_model does not copy add_loss callables
    activity = observation.collect(trained, ctx.data.calibration(), [observation.trace(trained, m) for m in producers])
    threshold = cfg.threshold * amount
    plan, extra = {}, {}
    for group in groups:
        score = _group_score(trained, group, traces, use_groups, use_bn)
        drop = planning.below(score, threshold, planning.cap(group.units, cfg.max_fraction, amount))
        drop = planning.rounded(drop, group.units, ctx.recipe.unit_multiple())
        compensated = False
        if drop and len(group.members) == 1 and handler_for(trained.get_layer(group.name)).units_on_output:
            compensated = planning.fold_into_consumers(
                trained, traces[group.name], group.units,
                offset={i: float(activity[group.name].mean[i]) for i in drop})
        if drop:
            plan[group.name] = drop
        for m in group.members:
            extra[m] = {"removed_units": list(drop), "scores": planning.summary(score),
                        "near_zero": int(np.sum(score < threshold)),
                        "batch_norm": traces[m].batch_norm, "compensated": compensated,
                        "coupled_with": [o for o in group.members if o != m]}
    pruned, result = surgery.remove_units(trained, plan)
    recovery.finetune(pruned, ctx, cfg.finetune_epochs, "sparse_opt: fine-tune")
    layers = planning.layer_details(result, extra)
    removed = sum(r["removed"] for r in layers.values())
    notes.insert(0, f"sparse_opt ({cfg.penalty}, strength {strength:g}, {cfg.epochs} epochs): removed {removed} of "
                    f"{sum(r['units_before'] for r in layers.values())} units whose norm fell below "
                    f"{threshold:.3g} of their layer's largest")
    return StageOutcome(pruned, {"penalty": cfg.penalty, "strength": strength, "threshold": threshold,
                                 "removed": removed, "layers": layers, "skipped": dict(result.skipped)}, notes)
