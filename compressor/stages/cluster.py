"""Cluster stage (tau_k): K-means on units' activation patterns; merge redundant units, drop rare ones.

Each unit is the vector of its activations over the calibration samples, centred and scaled to unit
norm, so the Euclidean distance between two units is sqrt(2 * (1 - correlation)): a scaled or
shifted copy of a unit sits at distance 0. Within a K-means cluster the most active unit is kept;
a member closer than `merge_distance` is folded into it: with a_removed ~ s * a_kept + t (least
squares over the calibration samples) its consumer rows are scaled by s and t * rows go into the
consumer bias before surgery adds the rows onto the kept unit. For a Dense+ReLU duplicate whose
incoming weights are s > 0 times the kept unit's, this is exact. Constant units (dead, or a zero
kernel) are removed with their value folded into the bias, also exact. Clusters smaller than
`min_cluster_size` (a fraction of the layer) hold rare patterns; the source article drops them.
"""
from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from compressor.config.recipe import ClusterStage
from compressor.graph import surgery
from compressor.stages import observation, planning, recovery
from compressor.stages.base import StageContext, StageOutcome, stage

_CONSTANT = 1e-6  # relative pattern norm below which a unit is taken as constant


def normalised_patterns(patterns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(units, samples) centred unit-norm rows, and a mask of constant units (zero rows)."""
    centred = (patterns - patterns.mean(axis=0)).T.astype(np.float64)
    norms = np.linalg.norm(centred, axis=1)
    constant = norms <= _CONSTANT * max(float(norms.max(initial=0.0)), 1e-30)
    unit = np.zeros_like(centred)
    unit[~constant] = centred[~constant] / norms[~constant, None]
    return unit, constant


def affine_fit(removed: np.ndarray, kept: np.ndarray) -> tuple[float, float]:
    """Least-squares s, t with removed ~ s * kept + t."""
    kc = kept - kept.mean()
    s = float(np.dot(removed - removed.mean(), kc) / max(np.dot(kc, kc), 1e-30))
    return s, float(removed.mean() - s * kept.mean())


def plan_group(patterns: np.ndarray, mean_abs: np.ndarray, cfg: ClusterStage, amount: float, seed: int,
               can_merge: bool, round_to: int = 1) -> dict:
    """Which units go and how: {'constant': [...], 'merge': {r: (k, dist)}, 'rare': [...], 'k': K}."""
    units = patterns.shape[1]
    vectors, constant = normalised_patterns(patterns)
    live = np.flatnonzero(~constant)
    merges, rare, k = {}, [], 0
    if len(live) >= 2:
        k = int(min(len(live), max(2, round(cfg.clusters_fraction * len(live)))))
        # One BLAS thread: next to TensorFlow's pools, k-means++'s many small products otherwise
        # oversubscribe the cores (measured: 15 s -> 2 s for the stage on 2 x 1024 units).
        with threadpool_limits(limits=1, user_api="blas"):
            labels = KMeans(n_clusters=k, n_init=cfg.n_init, random_state=seed).fit_predict(vectors[live])
        for cluster in range(k):
            members = live[labels == cluster]
            if len(members) < cfg.min_cluster_size * amount * units:
                rare.extend(int(u) for u in members)
                continue
            keep = members[np.argmax(mean_abs[members])]
            for r in members:
                dist = float(np.linalg.norm(vectors[r] - vectors[keep]))
                if r != keep and can_merge and dist < cfg.merge_distance * amount:
                    merges[int(r)] = (int(keep), dist)
    # Cheapest first: constants (exact), then merges by distance, then rare clusters by activity.
    order = [("constant", int(u)) for u in np.flatnonzero(constant)]
    order += [("merge", r) for r in sorted(merges, key=lambda r: merges[r][1])]
    order += [("rare", u) for u in sorted(rare, key=lambda u: mean_abs[u])]
    chosen = planning.rounded(order[:planning.cap(units, cfg.max_fraction, amount)], units, round_to)
    return {"k": k, "constant": [u for kind, u in chosen if kind == "constant"],
            "merge": {u: merges[u] for kind, u in chosen if kind == "merge"},
            "rare": [u for kind, u in chosen if kind == "rare"]}


@stage(ClusterStage, structured=True)
def apply(model, cfg: ClusterStage, ctx: StageContext, amount: float = 1.0) -> StageOutcome:
    # consumer rows get rescaled before surgery: never the caller's model
    base, groups, traces, activity = observation.observe(model, ctx.data.calibration())
    if not groups:
        return StageOutcome(base, {"layers": {}, "removed": 0}, ["cluster: no prunable Dense/Conv layers"])
    plan, merge, extra = {}, {}, {}
    for group in groups:
        tr = traces[group.name]
        single = len(group.members) == 1
        # A residual group is judged on all members' patterns side by side; it cannot merge (one
        # scale cannot fit several producers), so only constants and rare clusters leave it.
        patterns = np.concatenate([activity[m].patterns for m in group.members], axis=0)
        mean_abs = np.mean([activity[m].mean_abs for m in group.members], axis=0)
        can_fold = single and tr.consumers is not None
        chosen = plan_group(patterns, mean_abs, cfg, amount, ctx.recipe.seed, can_merge=can_fold,
                            round_to=ctx.recipe.unit_multiple())
        act = activity[group.name]
        offsets = {u: float(act.mean[u]) for u in chosen["constant"] + chosen["rare"]}
        scales = {}
        for r, (k, _dist) in chosen["merge"].items():
            s, t = affine_fit(act.patterns[:, r].astype(np.float64), act.patterns[:, k].astype(np.float64))
            scales[r], offsets[r] = s, t
        folded = can_fold and planning.fold_into_consumers(base, tr, group.units, scale=scales, offset=offsets)
        if not folded:  # no consumer to fold into: merges are impossible, removals go uncompensated
            chosen["merge"] = {}
        drop = chosen["constant"] + chosen["rare"]
        if drop:
            plan[group.name] = drop
        if chosen["merge"]:
            merge[group.name] = {r: k for r, (k, _d) in chosen["merge"].items()}
        for m in group.members:
            extra[m] = {"observed_at": traces[m].observe, "clusters": chosen["k"],
                        "removed_units": sorted(drop + list(chosen["merge"])),
                        "merged_into": {int(r): int(k) for r, (k, _d) in chosen["merge"].items()},
                        "constant_removed": len(chosen["constant"]), "merged": len(chosen["merge"]),
                        "rare_dropped": len(chosen["rare"]), "compensated": bool(folded),
                        "merge_scales": summary_of(list(scales.values())),
                        "coupled_with": [o for o in group.members if o != m]}
    pruned, result = surgery.remove_units(base, plan, merge, merge_exact=True)
    recovery.finetune(pruned, ctx, cfg.epochs, "cluster: fine-tune")
    layers = planning.layer_details(result, extra)
    removed = sum(r["removed"] for r in layers.values())
    merged = sum(r["merged"] for r in layers.values())
    notes = [f"cluster (K = {cfg.clusters_fraction:.0%} of units, merge distance {cfg.merge_distance * amount:.3g}, "
             f"tau_k={cfg.min_cluster_size * amount:.3g}): removed {removed} of "
             f"{sum(r['units_before'] for r in layers.values())} units, "
             f"{merged} of them merged into a near-identical unit, "
             f"{sum(r['rare_dropped'] for r in layers.values())} from rare clusters, "
             f"{sum(r['constant_removed'] for r in layers.values())} constant"]
    return StageOutcome(pruned, {"removed": removed, "merged": merged, "layers": layers,
                                 "skipped": dict(result.skipped)}, notes)


def summary_of(values: list[float]) -> dict | None:
    return planning.summary(np.asarray(values)) if values else None
