"""A speed goal checked on the shipped file: the final benchmark's figure, not the search's.

The search chose its point on its own measurements of exported candidates; the final benchmark
times the files that actually ship, in a session of its own. When the best of them (on the goal's
runtime, batch and one thread, within the budget) misses the goal, report.json's `goal_notes`,
report.md and the summary say so in one line: the measured figure, and the nearest frontier point
that met the goal in the search (its widths and metric), or why none did. `goal_check` holds the
figures either way.
"""
from __future__ import annotations

MAX_WIDTHS = 6  # groups named in the one line; the rest are counted


def search_goal(recipe):
    """The recipe's search stage when it has a speed goal (speedup or latency), else None."""
    from compressor.config.recipe import SearchStage

    stage = next((s for s in recipe.stages if isinstance(s, SearchStage)), None)
    return stage if stage is not None and (stage.goal.speedup or stage.goal.latency_ms) else None


def _rows(results: list[dict], runtime: str, batch: int) -> list[dict]:
    """The goal runtime's rows at the goal's batch (else the smallest measured) and the fewest threads."""
    rows = [r for r in results if r["runtime"] == runtime]
    if not rows:
        return []
    batch = batch if any(r["batch"] == batch for r in rows) else min(r["batch"] for r in rows)
    threads = min(r["threads"] for r in rows if r["batch"] == batch)
    return [r for r in rows if r["batch"] == batch and r["threads"] == threads]


def measure(results: list[dict], runtime: str, batch: int, budget: float) -> dict | None:
    """The fastest shipped (non-dense) file on the runtime, among those within the budget when any is,
    against the dense file of the same session (`files`: every shipped file's speedup, the float one too)."""
    from exporters.report import metric_drop

    rows = _rows(results, runtime, batch)
    dense = next((r for r in rows if r["variant"] == "dense"), None)
    files = [r for r in rows if r["variant"] != "dense"]
    if dense is None or not files:
        return None
    kept = [r for r in files if metric_drop(dense, r) <= budget] or files
    best = min(kept, key=lambda r: r["latency_ms"]["p50"])
    p50 = best["latency_ms"]["p50"]
    base = dense["latency_ms"]["p50"]
    return {"runtime": runtime, "batch": best["batch"], "threads": best["threads"], "file": best["file"],
            "dense_file": dense["file"], "p50_ms": p50, "dense_p50_ms": base,
            "measured_speedup": base / p50 if p50 else None,
            "files": {r["file"]: base / r["latency_ms"]["p50"] for r in files if r["latency_ms"]["p50"]}}


def search_speedup(row: dict, runtime: str) -> float | None:
    """A frontier point's speedup over dense as the search measured it: the smaller of its end-of-search
    figure and its visit-time one (both over the search's start, scaled by dense over start)."""
    dense, start, ms = (row.get(k, {}).get(runtime) for k in ("dense_ms", "start_ms", "measured_ms"))
    if not (dense and ms):
        return None
    figures = [dense / ms] + ([row["visit_speedup"][runtime] * dense / start]
                              if start and runtime in row.get("visit_speedup", {}) else [])
    return min(figures)


def check(recipe, results: list[dict], frontier: list[dict], notes: list[str], task) -> tuple[dict | None, list[str]]:
    """(`goal_check`, `goal_notes`): the shipped file against the recipe's speed goal; a line when it misses."""
    stage = search_goal(recipe)
    if stage is None:
        return None, []
    goal = stage.goal
    got = measure(results, goal.runtime, goal.batch, task.budget)
    if got is None:
        return None, []
    if goal.latency_ms:
        met = got["p50_ms"] <= goal.latency_ms
        wanted = f"p50 <= {goal.latency_ms:g} ms"
    else:
        met = got["measured_speedup"] >= goal.speedup
        wanted = f"{goal.speedup:.2f}x"
    record = {"goal": wanted, "margin": stage.goal_margin, "met": met, **got}
    if met:
        return record, []
    head = (f"goal {wanted} on {goal.runtime} not met by the shipped file: the final benchmark measured "
            f"{got['file']} at {got['p50_ms']:.4f} ms, {got['measured_speedup']:.2f}x over {got['dense_file']} "
            f"(batch {got['batch']}, {got['threads']} thread{'s' if got['threads'] > 1 else ''})")
    return record, [f"{head}; {_nearest(frontier, notes, goal, task)}"]


def _needed(row: dict, goal) -> float:
    """The speedup over dense a frontier point needs: the goal's, or dense p50 over the wanted latency."""
    dense = row.get("dense_ms", {}).get(goal.runtime)
    return dense / goal.latency_ms if goal.latency_ms and dense else (goal.speedup or float("inf"))


def _nearest(frontier: list[dict], notes: list[str], goal, task) -> str:
    """The frontier point that met the goal in the search nearest above the shipped one, or why none did."""
    rt = goal.runtime
    shipped = next((r for r in frontier if r.get("shipped")), None)
    speed = {i: search_speedup(r, rt) or 0.0 for i, r in enumerate(frontier)}
    met = [i for i, r in enumerate(frontier) if r["within_budget"] and speed[i] >= _needed(r, goal)
           and r is not shipped]
    said = (f"the search measured it at {search_speedup(shipped, rt) or 0.0:.2f}x; " if shipped is not None else "")
    if met:
        floor = (search_speedup(shipped, rt) or 0.0) if shipped is not None else 0.0
        faster = [i for i in met if speed[i] > floor]
        i = min(faster, key=lambda j: speed[j]) if faster else max(met, key=lambda j: speed[j])
        return said + f"nearest frontier point that met it: {_describe(frontier, i, shipped, speed[i], task)}"
    return said + "no frontier point within budget met it: " + _why_none(frontier, speed, notes, goal, task)


def _describe(frontier: list[dict], i: int, shipped: dict | None, speed: float, task) -> str:
    row = frontier[i]
    widths = [(g, w) for g, w in row["widths"].items() if shipped is None or shipped["widths"].get(g) != w]
    shown = ", ".join(f"{g} {shipped['widths'][g]}->{w}" if shipped else f"{g} {w}" for g, w in widths[:MAX_WIDTHS])
    more = f" and {len(widths) - MAX_WIDTHS} more" if len(widths) > MAX_WIDTHS else ""
    files = (f"; its files: {', '.join(row['files'])}" if row.get("files")
             else "; --keep-frontier writes its files")
    return (f"{row.get('point', f'point{i}')} ({shown or 'same widths'}{more}; {task.name} {row['metric']:.4f}, "
            f"{speed:.2f}x in the search{files})")


def _why_none(frontier: list[dict], speed: dict[int, float], notes: list[str], goal, task) -> str:
    """Why no visited point within budget reached the goal's speed."""
    if not frontier:
        stop = next((n.removeprefix("search: ") for n in notes if n.startswith("search:")), None)
        return stop or "the search visited no operating point"
    over = [i for i, r in enumerate(frontier) if not r["within_budget"] and speed[i] >= _needed(r, goal)]
    if over:
        i = max(over, key=lambda j: frontier[j]["metric"] if task.direction != "lower" else -frontier[j]["metric"])
        return (f"the points fast enough were over the {task.budget_text()} budget (best: "
                f"{frontier[i].get('point', i)}, {task.name} {frontier[i]['metric']:.4f}, {speed[i]:.2f}x)")
    within = [i for i, r in enumerate(frontier) if r["within_budget"]]
    fastest = max(within, key=lambda j: speed[j]) if within else None
    if fastest is None:
        return f"every point was over the {task.budget_text()} budget"
    if any(r.get("held_by") == "floors" for r in frontier) or any("width floors" in n for n in notes):
        return (f"out of reach at the width floors (round_units, search.min_width, search.min_fraction; fastest "
                f"point {speed[fastest]:.2f}x)")
    return f"the fastest point within budget measured {speed[fastest]:.2f}x (search.points, search.bisect)"
