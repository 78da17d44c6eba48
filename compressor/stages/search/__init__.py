"""Search stage: say the goal, not the knobs.

Per-layer widths are chosen against latency measured on the target runtime (latency_model)
and unit importance (a named criterion): NetAdapt-style greedy steps of `round_units` units, each
step taking the group whose next units buy the most predicted latency per importance lost. The
operating points (frontier speedups, then the user's goal) are visited in increasing order from the
previous point's fine-tuned model (progressive shrinking), each checked against the accuracy
budget; past the first point that crosses it, the search bisects toward the last good one instead
of backing off by fixed percentages. Importance is what a cut costs the task's loss, on one scale
for all groups; no group goes below its floor (`limits`) and one point removes at most
`max_cut_fraction` of a group, so a point never collapses a layer to a single unit. The returned
model is the goal point, or without a speed goal the fastest point measured within budget.
"""
from __future__ import annotations

import math

import numpy as np

from compressor import criteria
from compressor.config.recipe import SearchStage
from compressor.config.task import Task, context_task
from compressor.graph import surgery
from compressor.stages import observation, planning, recovery
from compressor.stages.base import StageContext, StageOutcome, stage
from compressor.stages.search import goal as goal_choice
from compressor.stages.search import tuning
from compressor.stages.search.costs import Clock, Files
from compressor.stages.search.latency_model import RUNTIMES, LatencyModel, measure_models, probe
from compressor.stages.search.limits import FASTER, floors, lowest, narrowest, roles

MAX_SPEEDUP = 64.0  # without a speed goal the points double until the budget is crossed, at most to this


def _log(ctx: StageContext, message: str) -> None:
    if ctx.log is not None:
        ctx.log(message)


def _budget(ctx: StageContext, model) -> tuple[Task, float]:
    """The task scoring the budget split (validation, else test) and the baseline the budget is counted from."""
    task = context_task(ctx)
    return task, ctx.baseline_metric if ctx.baseline_metric is not None else task.keras(model).value


def _importance(model, cfg: SearchStage, ctx: StageContext):
    """Per group (current model's indices): units in removal order and the cumulative cost of removing them.

    The order is the criterion's. The cost is on one scale for every group: what the cut adds to the
    task's loss, by first-order Taylor (|activation x loss gradient| summed over the removed units and
    the group's members, on a few labelled calibration batches), divided by one total for the whole
    model. Attention heads, which are not output channels, cost the measured loss rise when the head
    alone is silenced. So removing 15 of 16 stem channels costs what it costs the loss, and 15 idle
    channels of a redundant group almost nothing, where a share of each group's own total made both 15/16."""
    needs = "gradients" in criteria.get(cfg.criterion).needs
    heads = bool(planning.head_groups(model))
    labelled = ctx.data.labelled_calibration()
    base, groups, traces, activity = observation.observe(model, ctx.data.calibration(), labelled if needs else None,
                                                     task=ctx.task)
    losses = activity if needs or not traces else observation.collect(base, labelled[0], list(traces.values()),
                                                                  labels=labelled[1], task=ctx.task)
    scores = {g.name: np.mean([observation.unit_scores(base, m, activity[m], cfg.criterion) for m in g.members],
                              axis=0) for g in groups}
    costs = {g.name: loss_cost(base, g.members, losses) for g in groups}
    if heads:
        rises = observation.head_scores(base, *labelled, task=ctx.task)
        scores.update(rises)
        costs.update(rises)
    total = sum(float(c.sum()) for c in costs.values()) or 1.0
    order, cost = {}, {}
    for name, score in scores.items():
        order[name] = np.argsort(score, kind="stable")
        cost[name] = np.concatenate([[0.0], np.cumsum(costs[name][order[name]])]) / total
    return base, traces, activity, order, cost


def loss_cost(model, members: list[str], losses: dict) -> np.ndarray:
    """Per unit of a group: the first-order rise of the loss when it is removed from every member
    (|a x dL/da|, mean per sample), 0 for a unit that is constant (dead kernel, never active)."""
    cost = np.zeros_like(np.asarray(losses[members[0]].taylor, dtype=np.float64))
    for m in members:
        taylor = np.asarray(losses[m].taylor, dtype=np.float64)
        cost += np.where(observation.dead_units(model, m) | (losses[m].mean_abs == 0), 0.0, taylor)
    return cost


def search_groups(model) -> list:
    """What the search may narrow: channel groups and attention layers (heads)."""
    return planning.groups(model, observable=True) + planning.head_groups(model)


def allocate(lm: LatencyModel, units: dict[str, int], removed: dict[str, int], share: dict[str, np.ndarray],
             target_ms: float, step: int, lowest: dict[str, int] | None = None) -> dict[str, int]:
    """Greedy: units to remove now per group so the predicted latency reaches `target_ms`.

    `removed` counts what earlier points took (relative to the latency model's model); `share[g][k]`
    is the importance lost by removing the k least important of the current units (one scale for all
    groups, `_importance`). Widths stay multiples of `step` down to one step, then narrow unit by
    unit (`narrower`), and never go below `lowest[g]` (the group's floor and the per-point cut, 1 if unset).
    """
    extra = {g: 0 for g in share}
    current = lm.predict(removed)
    while current > target_ms:
        best, best_ratio, best_ms = None, 0.0, current
        for g in share:
            keep = units[g] - removed.get(g, 0) - extra[g]
            for new_keep in narrower(keep, step, (lowest or {}).get(g, 1)):
                trial = dict(extra, **{g: extra[g] + keep - new_keep})
                ms = lm.predict(_add(removed, trial))
                lost = share[g][min(trial[g], len(share[g]) - 1)] - share[g][extra[g]]
                ratio = (current - ms) / (lost + 1e-6)
                if current - ms > 0 and ratio > best_ratio:
                    best, best_ratio, best_ms = (g, trial[g]), ratio, ms
                if current - ms > 0:
                    break  # the nearest width that buys something; further ones only past a flat stretch
        if best is None:
            break  # no group can shrink further for any predicted gain
        extra[best[0]] = best[1]
        current = best_ms
    return extra


def _unit(width: int, step: int) -> int:
    """Widths move in multiples of `step` above one step and by single units at or below it."""
    return step if width > step else 1


def narrower(keep: int, step: int, low: int = 1) -> list[int]:
    """Widths one, two and four steps below `keep` (multiples of `step`, single units at or below one
    step, never below `low` or 0): when the next step buys nothing, looking further lets a flat or
    noisy stretch of the measured table not hide the gain behind it."""
    widths, w = [], keep
    for n in range(1, 5):
        unit = _unit(w, step)
        w = max(1, (w - 1) // unit * unit)
        if n in (1, 2, 4) and low <= w < keep and w not in widths:
            widths.append(w)
    return widths


def _add(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in set(a) | set(b)}


def _shrink(importance, extra: dict[str, int]):
    """Remove the least important units per group (mean-replaced into the next layer); the fine-tune is
    `tuning.tune`'s."""
    base, traces, activity, order, _ = importance
    base = recovery.copy(base)
    plan = {}
    for g, k in extra.items():
        if k <= 0:
            continue
        drop = [int(i) for i in order[g][:k]]
        tr = traces.get(g)
        if tr is not None and activity.get(g) is not None:
            planning.fold_into_consumers(base, tr, len(order[g]), offset={i: float(activity[g].mean[i]) for i in drop})
        plan[g] = drop
    pruned, _ = surgery.remove_units(base, plan)
    return pruned


def _speed_targets(cfg: SearchStage, lm: LatencyModel, amount: float) -> tuple[list[float], float | None]:
    """Predicted speedups to visit in order, and the goal's (None: fastest within budget)."""
    goal = cfg.goal.speedup
    if cfg.goal.latency_ms is not None:
        goal = max(1.0, lm.predict() / cfg.goal.latency_ms)
    def gentle(s):
        return 1.0 + (s - 1.0) * amount

    points = sorted({gentle(p) for p in cfg.points} | ({gentle(goal)} if goal else set()))
    points = [p for p in points if p > 1.0]
    return points, (gentle(goal) if goal else None)


def _on_targets(cfg: SearchStage, ctx: StageContext) -> tuple[SearchStage, tuple[str, ...]]:
    """The runtimes the search times: those of the recipe's targets (a model one runtime cannot
    convert must not stop a search for the other), plus the runtime of a speed goal. Without a goal
    the runtime only names the table the allocation follows: it moves to a target's runtime."""
    ships = _target_runtimes(ctx)
    goal_less = cfg.goal.speedup is None and cfg.goal.latency_ms is None
    if goal_less and cfg.goal.runtime not in ships:
        cfg = cfg.model_copy(update={"goal": cfg.goal.model_copy(update={"runtime": ships[0]})})
    return cfg, tuple(rt for rt in RUNTIMES if rt in ships or rt == cfg.goal.runtime)


def _tables(model, names: list[str], cfg: SearchStage, ctx: StageContext,
            runtimes: tuple[str, ...] = RUNTIMES, clock: Clock | None = None) -> dict[str, LatencyModel]:
    from pathlib import Path

    from compressor.stages.search.latency_model import default_cache

    step = max(1, ctx.recipe.unit_multiple())
    _log(ctx, f"search: which layers each of {len(names)} groups narrows (one surgery per group)")
    clock = clock or Clock()
    with clock.phase("couplings"):
        couplings = probe(model, names)
    out = {}
    for rt in runtimes:
        cache = Path(cfg.latency_cache) / default_cache(rt).name if cfg.latency_cache else None
        _log(ctx, f"search: latency table for {rt} (cached entries are reused)")
        with clock.phase("tables"):
            out[rt] = LatencyModel(model, names, rt, cfg.goal.batch, step, cache, couplings=couplings,
                                   low=narrowest(cfg))
    return out


class Joint:
    """Several runtimes' tables as one: the mean of each runtime's predicted latency relative to its
    prediction for the start model (1.0 = start). Without a speed goal the point shipped is the
    fastest on all target runtimes together, so the allocation follows all their tables: a width
    that only one runtime pays for (attention heads in LiteRT, say) is still bought."""

    def __init__(self, lms: list[LatencyModel]):
        self.lms = lms
        self.refresh()

    def refresh(self) -> None:
        """Re-read each runtime's start prediction (after its calibration was refitted)."""
        self.dense = [lm.predict() for lm in self.lms]

    def predict(self, removed: dict[str, int] | None = None) -> float:
        return float(np.mean([lm.predict(removed) / d for lm, d in zip(self.lms, self.dense)]))


PROBES = (0.5, 0.25)  # width fractions of the uniformly narrowed copies the calibration starts from
MEASURE_RUNS = 1000  # interleaved rounds per whole-model measurement (exports, not rounds, dominate its cost)
VISIT_RUNS = 500  # rounds when a point is measured beside the start as it is visited (the final session: MEASURE_RUNS)
GAIN = 0.02  # without a goal the search goes on while each point measures at least this much faster
MAX_AGAIN = 3  # with a goal, points visited again toward it when the per-point cut held one short


def narrowed(model, units: dict[str, int], fraction: float, step: int) -> tuple[object, dict[str, int]]:
    """A copy with every group cut to `fraction` of its width (multiples of `step`, at least one step
    or unit): the same surgery the search uses, untrained, since latency does not depend on values."""
    removed = {}
    for g, u in units.items():
        unit = _unit(u, step)
        keep = min(u, max(unit, int(round(u * fraction / unit)) * unit))
        if keep < u:
            removed[g] = u - keep
    smaller, _ = surgery.remove_units(recovery.copy(model), {g: list(range(k)) for g, k in removed.items()})
    return smaller, removed


def calibrate(lms: dict[str, LatencyModel], start, units: dict[str, int], step: int, batch: int,
              files: Files | None = None):
    """Fit each runtime's correction on whole models measured on it: the uniformly narrowed probes
    first, then the start model. Returns the start's measured p50 per runtime (the reference every
    later point is scaled to) and its prediction from the probes alone (honest: made before its own
    measurement entered the fit), for the report's predicted-vs-measured rows."""
    probes = {f"probe{f}": narrowed(start, units, f, step) for f in PROBES}
    models = {"start": start, **{label: m for label, (m, _) in probes.items()}}
    reference, predicted = {}, {}
    for rt, lm in lms.items():
        p50 = measure_models(models, rt, batch, runs=MEASURE_RUNS, files=files)
        for label, (_, removed) in probes.items():
            lm.observe(removed, p50[label])
        predicted[rt] = lm.predict()
        lm.observe({}, p50["start"])
        reference[rt] = p50["start"]
    return reference, predicted


class _Search:
    """State of one search: the latency models, the budget and every point visited.

    Every visited point (already fine-tuned) is measured beside the start model on each runtime and
    enters that runtime's calibration, so the next allocation uses the corrected model. A row's
    `predicted_ms` is recorded before its own measurement enters the fit: the report's error is honest.
    `limits`: the narrowest width per group (`limits.floors`); one point removes at most the recipe's
    `max_cut_fraction` of a group's width.
    """

    def __init__(self, model, cfg: SearchStage, ctx: StageContext, lms: dict[str, LatencyModel], units, floor, task,
                 reference: dict[str, float], follow: tuple[str, ...] | None = None,
                 widths: dict[str, int] | None = None, clock: Clock | None = None, files: Files | None = None):
        self.cfg, self.ctx, self.lms, self.units, self.floor, self.task = cfg, ctx, lms, units, floor, task
        self.start, self.reference = model, reference
        self.follow = follow or (cfg.goal.runtime,)
        self.lm = lms[cfg.goal.runtime] if not follow else Joint([lms[rt] for rt in follow])
        self.step = max(1, ctx.recipe.unit_multiple())
        self.limits = widths or {g: 1 for g in units}
        self.rows, self.models, self.states, self.seen, self.notes = [], [], [], {}, []
        self.good = (1.0, model, {})  # (speedup, fine-tuned model, units removed per group)
        self.bad = None  # (speedup, units removed per group) of the last point over the budget
        self.reached = self.capped = False  # capped: the per-point cut, not the floors, held the last point
        self.clock, self.files = clock or Clock(), files
        self._importance = None  # (good model, its importance): bisection visits from one model reuse it

    def _plan(self, speedup: float, importance, removed: dict[str, int]) -> dict[str, int]:
        """Units to remove at this point; sets `capped` when the per-point cut held it short of the
        target, and says so once when the target is out of reach at the floors."""
        target = self.lm.predict() / speedup
        low = lowest(self.units, removed, self.limits, self.cfg.max_cut_fraction)
        extra = allocate(self.lm, self.units, removed, importance[4], target, self.step, low)
        total = _add(removed, extra)
        if self.lm.predict(total) <= target * 1.02:
            return extra
        keep = {g: self.units[g] - total.get(g, 0) for g in self.units}
        self.capped = any(w < low[g] for g in keep for w in narrower(keep[g], self.step, self.limits[g]))
        if not self.capped and not self.notes:
            at_most = self.lm.predict() / self.lm.predict(total)
            self.notes.append(f"search: {speedup:.2f}x predicted is out of reach at the width floors (round_units, "
                              f"min_width, min_fraction; at most {at_most:.2f}x predicted there); the search stops "
                              "at the floors instead of narrowing further")
            _log(self.ctx, self.notes[-1])
        return extra

    def visit(self, speedup: float, extra: dict[str, int] | None = None) -> bool | None:
        """Shrink the last good model to the predicted speedup (or by `extra` units per group), fine-tune,
        check the budget, measure. None: no widths not visited yet (nothing new to try)."""
        _, start, removed = self.good
        self.reached = self.capped = False
        importance = self.importance(start)
        extra = self._plan(speedup, importance, removed) if extra is None else extra
        total = _add(removed, extra)
        key = tuple(sorted(total.items()))
        if not any(extra.values()) or key in self.seen:
            return None
        label = f"search: fine-tune at {speedup:.2f}x"
        before = dict(self.clock.seconds)
        model = _shrink(importance, extra)
        metric, extra_epochs, spent, stopped = tuning.tune(model, self.ctx, self.cfg, self.task, self.floor, label,
                                                           self.clock)
        ok = self.task.within(self.floor, metric)  # the pipeline's own test, same rounding
        predicted = self.lm.predict() / self.lm.predict(total)
        self.reached = predicted >= 0.98 * speedup  # False: the floors or the per-point cut held the widths
        row = {"goal_speedup": round(speedup, 3), "predicted_speedup": round(predicted, 3), "reached": self.reached,
               "held_by": None if self.reached else "max_cut_fraction" if self.capped else "floors",
               "metric": metric, "accuracy": metric if self.task.is_accuracy else None, "within_budget": ok,
               "recovery_epochs": extra_epochs, "epochs_spent": spent, "stopped_early": stopped,
               "widths": {g: self.units[g] - total.get(g, 0) for g in self.units},
               "predicted_ms": {rt: lm.predict(total) for rt, lm in self.lms.items()}}
        with self.clock.phase("measure"):
            row["visit_speedup"] = self._observe(model, total, f"point{len(self.rows)}")
        row["seconds"] = {p: round(self.clock.seconds[p] - before.get(p, 0.0), 2)
                          for p in ("fine_tune", "recovery", "measure")}
        self.rows.append(row)
        self.models.append(model)
        self.states.append((speedup, model, total))
        _log(self.ctx, f"search: {speedup:.2f}x predicted -> {self.task.name} {metric:.4f} "
                       f"({'within' if ok else 'over'} budget), measured "
                       + ", ".join(f"{rt} {v:.2f}x" for rt, v in row["visit_speedup"].items()))
        self.seen[key] = ok
        if ok:
            self.good = (speedup, model, total)
        else:
            self.bad = (speedup, total)
        return ok

    def between(self) -> dict[str, int]:
        """Units to remove from the last good point to widths half way to the last bad one's (on the
        width grid: multiples of round_units above it); empty when no width lies between them."""
        extra = {}
        for g, u in self.units.items():
            wide, narrow = u - self.good[2].get(g, 0), u - self.bad[1].get(g, 0)
            grid = [w for w in range(narrow + 1, wide) if w <= self.step or w % self.step == 0]
            if grid:
                extra[g] = wide - min(grid, key=lambda w: (abs(w - (wide + narrow) / 2), -w))
        return extra

    def importance(self, model):
        """`_importance` of the model the next point starts from (kept while that model stays the start)."""
        if self._importance is None or self._importance[0] is not model:
            with self.clock.phase("importance"):
                self._importance = (model, _importance(model, self.cfg, self.ctx))
        return self._importance[1]

    def _observe(self, model, total: dict[str, int], label: str = "point") -> dict[str, float]:
        """Measure a point beside the start model (one interleaved session per runtime), refit each
        runtime's calibration with it, and return its measured speedups over the start. Its latency
        enters the fit scaled to the start's reference measurement, so machine-load drift cancels."""
        speedups = {}
        for rt, lm in self.lms.items():
            p50 = measure_models({"start": self.start, label: model}, rt, self.cfg.goal.batch, runs=VISIT_RUNS,
                                 files=self.files)
            speedups[rt] = p50["start"] / p50[label]
            lm.observe(total, self.reference[rt] / speedups[rt])
        if isinstance(self.lm, Joint):
            self.lm.refresh()
        return speedups

    def score(self, row: dict) -> float:
        """Geometric-mean measured speedup over the runtimes the search follows."""
        return float(np.exp(np.mean([math.log(row["visit_speedup"][rt]) for rt in self.follow])))

    def run(self, points: list[float], goal: float | None) -> None:
        """Visit the points in order. With a goal, a point the per-point cut held short is visited again
        from there, and the search stops where the floors leave nothing faster; without one, it keeps
        doubling while each point measures faster than the last good one. Past the first point over the
        budget it bisects toward the last good one."""
        queue, best, again = list(points), 1.0, 0
        while queue:
            s = queue.pop(0)
            verdict = self.visit(s)
            if verdict is None:
                break  # nothing new to remove for any predicted gain
            if not verdict:
                break
            if goal is not None:
                if not self.reached and self.capped and again < MAX_AGAIN:
                    queue.insert(0, s)  # the per-point cut held it: go on from this point toward the same target
                    again += 1
                elif not self.reached:
                    return  # at the floors: later points cannot do better
                continue
            if self.score(self.rows[-1]) < best * (1.0 + GAIN) or not (self.reached or self.capped):
                return  # not measurably faster (fixed costs dominate), or at the floors
            best = self.score(self.rows[-1])
            if not queue and s * 2 <= MAX_SPEEDUP:
                queue.append(s * 2)  # no speed goal: keep doubling until the budget is crossed
        self.bisect()

    def bisect(self) -> None:
        """Up to `cfg.bisect` points between the last good and the last bad point: at the geometric-mean
        speedup, or, when its allocation repeats a visited point, at widths half way between the two."""
        for _ in range(self.cfg.bisect if self.bad else 0):
            bad = self.bad[0]
            mid = math.sqrt(self.good[0] * bad)
            if mid - self.good[0] < 0.05 * self.good[0]:
                break
            verdict = self.visit(mid)
            if verdict is None:
                between = self.between()
                verdict = self.visit(mid, between) if between else None
            if verdict is None:
                break


def _correct_to_goal(search: _Search, goal: float | None, cfg: SearchStage, tries: int = 2) -> None:
    """The table predicts; the runtime decides. If the goal point measured slower than the goal, aim
    the prediction higher by the measured shortfall, from that point's fine-tuned state (the
    calibration has meanwhile learnt from that measurement too)."""
    runtime = cfg.goal.runtime
    for _ in range(tries if goal else 0):
        hits = [i for i, r in enumerate(search.rows) if r["within_budget"] and r["reached"]
                and not r.get("superseded") and r["goal_speedup"] >= round(goal, 3) - 1e-6]
        if not hits:
            return
        i = min(hits, key=lambda j: search.rows[j]["goal_speedup"])
        actual = search.rows[i]["visit_speedup"][runtime]  # measured beside the start when visited
        if actual >= goal:
            return
        aim = search.states[i][0] * goal / actual * 1.02
        _log(search.ctx, f"search: measured {actual:.2f}x for a {goal:.2f}x goal; aiming the prediction at {aim:.2f}x")
        search.good = search.states[i]
        search.rows[i]["superseded"] = True  # measured short of the goal
        ok = search.visit(aim)
        if ok is None:
            return  # the aimed allocation gives widths already visited: nothing new to offer
        search.rows[-1]["corrected_for_goal"] = True  # this point now stands for the goal
        if not ok:
            return


@stage(SearchStage)
def apply(model, cfg: SearchStage, ctx: StageContext, amount: float = 1.0) -> StageOutcome:
    task, floor = _budget(ctx, model)
    start = recovery.copy(model)
    groups = search_groups(start)
    if not groups:
        return StageOutcome(start, {"removed": 0, "frontier": []}, ["search: no prunable Dense/Conv layers"])
    cfg, runtimes = _on_targets(cfg, ctx)
    asked = cfg.goal.speedup if amount >= 1.0 else None  # over dense, before the stages' share is taken off
    cfg, goal_note = _relative_goal(cfg, ctx, model, start)
    if cfg is None:
        return StageOutcome(start, {"removed": 0, "frontier": []}, [goal_note])
    units = {g.name: g.units for g in groups}
    members = {g.name: len(g.members) for g in groups}
    search, limits, goal, measured = _explore(start, groups, cfg, ctx, runtimes, (task, floor), amount)
    lms = search.lms
    best, notes = _choose(search.rows, goal, cfg, _target_runtimes(ctx), task.name, floored=bool(search.notes),
                          higher=task.direction != "lower", asked=asked)
    notes += search.notes
    for i, row in enumerate(search.rows):
        row["shipped"] = i == best
    if not search.rows:
        notes.append(f"search: not reachable on {cfg.goal.runtime}: the latency table predicts no gain from narrower "
                     "layers (fixed per-op cost dominates); model left unchanged")
    elif best is None and not any(r["within_budget"] for r in search.rows):
        notes.append(f"search: no operating point stayed within the {task.budget_text()} budget; "
                     "model left unchanged")
    elif best is None:
        notes.append("search: no operating point within budget was faster than the model the stages left; "
                     "model left unchanged")
    notes += [goal_note] if goal_note else []
    if best is None:
        return StageOutcome(start, {"removed": 0, "frontier": search.rows, "latency_model": measured,
                                    "calibration": calibration(lms), "limits": limits,
                                    "costs": search.clock.record()}, notes)
    row = search.rows[best]
    removed = sum((units[g] - w) * members[g] for g, w in row["widths"].items())
    runtime = cfg.goal.runtime
    notes.insert(0, f"search ({cfg.criterion}, {runtime}): {row['measured_speedup'][runtime]:.2f}x measured "
                    f"({row['predicted_speedup']:.2f}x predicted), widths "
                    + ", ".join(f"{g} {units[g]}->{w}" for g, w in row["widths"].items()))
    details = {"goal": cfg.goal.model_dump(), "criterion": cfg.criterion, "removed": int(removed),
               "chosen": best, "widths": row["widths"], "frontier": search.rows, "latency_model": measured,
               "tables": {rt: {"path": str(lm.table.path), "entries": lm.entries, "measured_now": lm.table.measured}
                          for rt, lm in lms.items()},
               "calibration": calibration(lms), "limits": limits, "costs": search.clock.record()}
    points = {point_label(i, r): m for i, (r, m) in enumerate(zip(search.rows, search.models)) if i != best}
    return StageOutcome(search.models[best], details, notes, points)


def _explore(start, groups, cfg: SearchStage, ctx: StageContext, runtimes: tuple[str, ...], budget, amount: float):
    """Tables, calibration, the points and the final measurement: (search, limits, goal, latency-model rows).
    Every whole model is exported once per runtime for the whole search (`costs.Files`), and each phase's
    time is booked on the search's clock (report.json: the search stage's `costs`)."""
    (task, floor), units = budget, {g.name: g.units for g in groups}
    clock, files = Clock(), Files()
    try:
        lms = _tables(start, list(units), cfg, ctx, runtimes, clock=clock)
        _log(ctx, "search: calibrating the latency tables on whole models measured on each runtime")
        with clock.phase("calibration"):
            reference, start_predicted = calibrate(lms, start, units, max(1, ctx.recipe.unit_multiple()),
                                                   cfg.goal.batch, files=files)
        goal_less = cfg.goal.speedup is None and cfg.goal.latency_ms is None
        search = _Search(start, cfg, ctx, lms, units, floor, task, reference,
                         _target_runtimes(ctx) if goal_less else None, clock=clock, files=files)
        limits = _set_floors(search, start, groups, cfg)
        points, goal = _speed_targets(cfg, search.lm, amount)
        points, aimed = goal_choice.aim(points, goal, cfg.goal_margin)  # the goal's point aimed above it by the margin
        search.run(points, aimed)
        _correct_to_goal(search, aimed, cfg)
        with clock.phase("final_measure"):
            measured = _measure(start, search, cfg, start_predicted, ctx.dense_model)
        clock.count("exports", files.exported)
    finally:
        files.close()
    return search, limits, goal, measured


def _set_floors(search: _Search, start, groups, cfg: SearchStage) -> dict:
    """Fix each group's narrowest width on the search (`limits.floors`); returns the stage record's account."""
    bottlenecks = roles(start, groups)
    heads = {g.name for g in planning.head_groups(start)}
    search.limits = floors(search.units, heads, bottlenecks, cfg, search.step, _faster(search.lm, search.units))
    return {"floors": dict(search.limits), "bottlenecks": bottlenecks, "max_cut_fraction": cfg.max_cut_fraction}


def _faster(lm, units: dict[str, int]):
    """Whether the latency table predicts a group at width `narrow` to be faster than at `wide` (by FASTER)."""
    def faster(g: str, narrow: int, wide: int) -> bool:
        gain = lm.predict({g: units[g] - wide}) - lm.predict({g: units[g] - narrow})
        return gain > FASTER * lm.predict()
    return faster


def calibration(lms: dict[str, LatencyModel]) -> dict:
    """Per runtime: the fitted measured ≈ a + b·table_sum and how many whole models it was fitted on."""
    return {rt: {"a_ms": lm.fit[0], "b": lm.fit[1], "models": len(lm.samples)} for rt, lm in lms.items()}


def point_label(index: int, row: dict) -> str:
    """Folder name of a frontier point: its index and predicted speedup (unique, sortable)."""
    return f"point{index}-{row['predicted_speedup']:.2f}x"


def _relative_goal(cfg: SearchStage, ctx: StageContext, model, start) -> tuple[SearchStage | None, str | None]:
    """A speedup goal counts from the model before any stage: earlier stages already bought part of it,
    so the search aims at the rest (None: the goal is already met, the search keeps the model)."""
    dense = ctx.dense_model
    if cfg.goal.speedup is None or dense is None or dense is model:
        return cfg, None
    runtime = cfg.goal.runtime
    done = goal_choice.done_before(measure_models, dense, start, cfg)
    if done < 1.05:
        return cfg, None
    rest = cfg.goal.speedup / done
    if rest * (1.0 + cfg.goal_margin) <= 1.0:
        return None, (f"search: earlier stages already measured {done:.2f}x on {runtime}, meeting the "
                      f"{cfg.goal.speedup:.2f}x goal with the {cfg.goal_margin:.0%} margin; model left as they made it")
    goal = cfg.goal.model_copy(update={"speedup": rest})
    return cfg.model_copy(update={"goal": goal}), (
        f"search: earlier stages measured {done:.2f}x on {runtime}; the search aimed at the remaining {rest:.2f}x "
        f"of the {cfg.goal.speedup:.2f}x goal (its speedups count from the model it was given)")


def _measure(start, search: _Search, cfg: SearchStage, start_predicted: dict[str, float], dense=None) -> list[dict]:
    """Measured p50 of the start (the model the stages left), every point and the dense model before
    any stage, per runtime, in one interleaved session each; fills the frontier rows (`measured_speedup`
    over the start, `start_ms`, `dense_ms`) and returns the latency model's predicted-vs-measured rows.

    Each prediction was made before that model's own measurement entered the calibration (the start's
    from the probes alone, a point's when it was visited), so error_pct is an out-of-sample error.
    Predictions are in the load of the calibration session; on a shared machine this session may run
    slower or faster as a whole, so they are scaled by `load_drift` = this session's start p50 / the
    calibration session's (the start row is then compared against its calibration measurement)."""
    checks, start_ms, dense_ms = [], {}, {}
    for rt in search.lms:
        models = {"start": start, **{f"point{i}": m for i, m in enumerate(search.models)}}
        if dense is not None and dense is not start:
            models["dense"] = dense
        p50 = measure_models(models, rt, cfg.goal.batch, runs=MEASURE_RUNS, files=search.files)
        start_ms[rt] = p50["start"]
        dense_ms[rt] = p50.get("dense", p50["start"])
        drift = p50["start"] / search.reference[rt]
        rows = [("start", start_predicted[rt] * drift, p50["start"])]
        for i, row in enumerate(search.rows):
            row.setdefault("measured_ms", {})[rt] = p50[f"point{i}"]
            row.setdefault("measured_speedup", {})[rt] = p50["start"] / p50[f"point{i}"]
            rows.append((f"point{i}", row["predicted_ms"][rt] * drift, p50[f"point{i}"]))
        checks += [{"runtime": rt, "model": label, "predicted_ms": pred, "measured_ms": meas, "load_drift": drift,
                    "error_pct": 100.0 * (pred - meas) / meas} for label, pred, meas in rows]
    for row in search.rows:
        row["start_ms"], row["dense_ms"] = dict(start_ms), dict(dense_ms)
    return checks


def _target_runtimes(ctx: StageContext) -> tuple[str, ...]:
    """The runtimes the recipe ships to (a search without a speed goal is fastest on these together)."""
    from exporters.targets import selected

    wanted = {t.runtime for t in selected(ctx.recipe.targets)}
    return tuple(rt for rt in RUNTIMES if rt in wanted) or RUNTIMES


def _fastest(rows: list[dict], good: list[int], runtimes: tuple[str, ...]) -> int | None:
    """The point with the highest geometric-mean measured speedup over `runtimes`."""
    def score(i: int) -> float:
        return float(np.mean([math.log(rows[i]["measured_speedup"][rt]) for rt in runtimes]))
    return max(good, key=score) if good else None


def _no_slower(rows: list[dict], good: list[int], runtimes: tuple[str, ...]) -> tuple[list[int], list[str]]:
    """The points measured at least as fast as the search's start on every runtime they are judged on.
    Narrower is not always faster: onnxruntime leaves its blocked convolution kernels below a channel
    block (MobileNetV2: 1.39x in LiteRT but 0.70x in onnxruntime), and a model slower than the one the
    stages left is no result, whatever the other runtime gains."""
    kept = [i for i in good if all(rows[i]["measured_speedup"][rt] >= 1.0 for rt in runtimes)]
    if len(kept) == len(good):
        return kept, []
    worst = min((i for i in good if i not in kept),
                key=lambda i: min(rows[i]["measured_speedup"][rt] for rt in runtimes))
    slow = ", ".join(f"{rt} {rows[worst]['measured_speedup'][rt]:.2f}x" for rt in runtimes)
    return kept, [f"search: {len(good) - len(kept)} point(s) within budget measured slower than the model the stages "
                  f"left on a target runtime ({slow}) and were not chosen"]


def _choose(rows: list[dict], goal: float | None, cfg: SearchStage, runtimes: tuple[str, ...] | None = None,
            metric: str = "accuracy", floored: bool = False, higher: bool = True,
            asked: float | None = None) -> tuple[int | None, list[str]]:
    """With a goal: the most accurate point whose measured speed meets it with `goal_margin`
    (`goal.choose`), else the fastest measured one, saying why; without: the fastest on the recipe's
    target runtimes together. Never one slower than the start. `floored`: the search stopped at the
    width floors (what a missed goal is then blamed on); `asked`: the goal over the dense model."""
    runtime = cfg.goal.runtime
    judged = (runtimes or (runtime,)) if goal is None else (runtime,)
    good, slower = _no_slower(rows, [i for i, r in enumerate(rows) if r["within_budget"]], judged)
    if goal is None:
        return _fastest(rows, good, judged), slower
    best, said = goal_choice.choose(rows, good, goal, runtime, cfg.goal_margin, cfg.goal.latency_ms, higher, asked)
    if best is not None:
        return best, slower + said
    fastest_here = min(good, key=lambda i: rows[i]["measured_ms"][runtime]) if good else None
    if rows and not any(r.get("reached", True) for r in rows):
        top = max((r["predicted_speedup"] for r in rows), default=1.0)
        return fastest_here, slower + [f"search: goal {goal:.2f}x on {runtime} not reachable: the latency table "
                                       f"predicts at most {top:.2f}x at the width floors (fixed per-op cost dominates)"]
    reached = (f"{rows[fastest_here]['measured_speedup'][runtime]:.2f}x measured" if fastest_here is not None
               else "nothing")
    over = [r for r in rows if not r["within_budget"] and (goal_choice.measured(r, runtime) or 0.0) >= goal]
    why = ("at the width floors" if floored else f"within the {metric} budget" if over or not good
           else "as measured (the points within budget ran slower than predicted)")
    return fastest_here, slower + [f"search: goal {goal:.2f}x on {runtime} not reachable {why}; "
                                   f"best within budget: {reached}"]
