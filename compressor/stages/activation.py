"""Activation stage (tau_a): remove neurons/channels that are idle on calibration data.

Scores come from a named importance criterion (compressor/criteria), normalised so that low =
idle: `mean_abs` = mean |activation| / the layer's max (the source article's criterion), `apoz` =
1 - Average Percentage of Zeros after ReLU, `magnitude`, `bn_scale`, ... Units with an all-zero
incoming kernel (left by the weight stage) or that never fire score 0 and go first.
A removed unit's mean activation is folded into the next layer's bias, so removing a constant unit
is exact and the others cost less before fine-tuning.
"""
from __future__ import annotations

import numpy as np

from compressor.config.recipe import ActivationStage
from compressor.graph import surgery
from compressor.stages import observation, planning, recovery
from compressor.stages.base import StageContext, StageOutcome, stage


@stage(ActivationStage, structured=True)
def apply(model, cfg: ActivationStage, ctx: StageContext, amount: float = 1.0) -> StageOutcome:
    # biases get compensated before surgery: never on the caller's model
    labelled = observation.labelled_for(cfg.criterion, ctx.data)
    base, groups, traces, activity = observation.observe(model, ctx.data.calibration(), labelled, task=ctx.task)
    if not groups:
        return StageOutcome(base, {"layers": {}, "removed": 0}, ["activation: no prunable Dense/Conv layers"])
    threshold = cfg.threshold * amount
    plan, extra = {}, {}
    for group in groups:
        per_member = [observation.unit_scores(base, m, activity[m], cfg.criterion) for m in group.members]
        score = np.mean(per_member, axis=0)  # a residual group loses the same channels: joint score
        dead = np.any([s == 0 for s in per_member], axis=0) & (score == 0)
        drop = planning.below(score, threshold, planning.cap(group.units, cfg.max_fraction, amount))
        drop = planning.rounded(drop, group.units, ctx.recipe.unit_multiple())
        compensated = False
        if drop and cfg.compensate and len(group.members) == 1:
            tr = traces[group.name]
            compensated = planning.fold_into_consumers(
                base, tr, group.units, offset={i: float(activity[group.name].mean[i]) for i in drop})
        if drop:
            plan[group.name] = drop
        for m in group.members:
            extra[m] = {"observed_at": traces[m].observe, "removed_units": list(drop), "dead": int(dead.sum()),
                        "dead_removed": int(sum(dead[i] for i in drop)), "scores": planning.summary(score),
                        "compensated": compensated, "coupled_with": [o for o in group.members if o != m]}
    pruned, result = surgery.remove_units(base, plan)
    recovery.finetune(pruned, ctx, cfg.epochs, "activation: fine-tune")
    layers = planning.layer_details(result, extra)
    removed = sum(row["removed"] for row in layers.values())
    total = sum(row["units_before"] for row in layers.values())
    dead_removed = sum(row["dead_removed"] for row in layers.values())
    notes = [f"activation ({cfg.criterion}, tau_a={threshold:.3g}, cap {cfg.max_fraction * amount:.0%}/layer): "
             f"removed {removed} of {total} units in {sum(1 for r in layers.values() if r['removed'])} layers"
             + (f", {dead_removed} of them dead" if dead_removed else "")]
    if any(r["compensated"] for r in layers.values()):
        notes.append("activation: removed units' mean activation folded into the next layer's bias")
    return StageOutcome(pruned, {"criterion": cfg.criterion, "threshold": threshold,
                                 "max_fraction": cfg.max_fraction * amount,
                                 "removed": removed, "layers": layers, "skipped": dict(result.skipped)}, notes)
