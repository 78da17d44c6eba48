"""Which operating point a speed goal ships: the most accurate one whose measured speed meets it.

The latency table predicts; the runtime decides. A point's speed is what the search measured of its
exported file on the goal's runtime: beside the start model when it was visited, and again with every
other point in one session at the end. The smaller of the two counts, and it must beat the goal by
`goal_margin` (10% by default): the final benchmark times the shipped file once more, in its own
session, and a point that only just met the goal in the search can read below it there (the wide
MLP's shipped point measured 3.55x for a 4x goal). Among the points that clear the goal with the
margin, the most accurate ships: a faster point that lost accuracy buys nothing the user asked for.
"""
from __future__ import annotations

MARGIN_NOTE = ("the final benchmark may read it below the goal; a larger search.goal_margin or more "
               "frontier points give the search room")


def aim(points: list[float], goal: float | None, margin: float) -> tuple[list[float], float | None]:
    """The speedups to visit with the goal's own point aimed `margin` above the goal (a point measured
    just at the goal would not count), and that aim (None without a goal)."""
    if goal is None:
        return points, None
    target = goal * (1.0 + margin)
    return sorted({p for p in points if abs(p - goal) > 1e-9} | {target}), target


def measured(row: dict, runtime: str) -> float | None:
    """A point's measured speedup over the search's start on `runtime`: the smaller of its visit-time
    and its end-of-search measurement (None when neither was taken)."""
    figures = [row[key][runtime] for key in ("visit_speedup", "measured_speedup") if runtime in row.get(key, {})]
    return min(figures) if figures else None


def needed(row: dict, goal: float, latency_ms: float | None, runtime: str, asked: float | None = None) -> float:
    """The speedup over the start a point must reach: the goal's, or for a latency goal the start's
    measured p50 over the wanted latency (the goal as predicted when the start was not measured yet).
    With `asked` (the goal over the dense model) the end-of-search session's own dense-over-start ratio
    counts too: the share the earlier stages bought is taken at the smaller of its two measurements."""
    start = (row.get("start_ms") or {}).get(runtime)
    if latency_ms:
        return start / latency_ms if start else goal
    dense = (row.get("dense_ms") or {}).get(runtime)
    return max(goal, asked * start / dense) if asked and start and dense else goal


def done_before(measure, dense, start, cfg) -> float:
    """The speedup the stages before the search bought (dense over start on the goal's runtime). A
    session that says the goal is already met with the margin is repeated and the smaller figure kept:
    on a loaded machine one session read 4.58x where the final benchmark read 3.26x, and a goal thought
    met leaves the search nothing to do."""
    goal = cfg.goal
    done = float("inf")
    for _ in range(2):
        p50 = measure({"dense": dense, "start": start}, goal.runtime, goal.batch)
        done = min(done, p50["dense"] / p50["start"])
        if done < goal.speedup * (1.0 + cfg.goal_margin):
            break
    return done


def mark(rows: list[dict], goal: float, latency_ms: float | None, runtime: str, margin: float,
         asked: float | None = None) -> None:
    """Fill each row's `meets_goal`: its measured speed clears the goal with the margin."""
    for row in rows:
        speed = measured(row, runtime)
        row["meets_goal"] = (speed is not None
                             and speed >= needed(row, goal, latency_ms, runtime, asked) * (1.0 + margin))


def _most_accurate(rows: list[dict], candidates: list[int], runtime: str, higher: bool) -> int:
    """The best metric; among equals the faster point."""
    def key(i: int):
        value = rows[i]["metric"]
        return (value if higher else -value, measured(rows[i], runtime) or 0.0)
    return max(candidates, key=key)


def choose(rows: list[dict], good: list[int], goal: float, runtime: str, margin: float,
           latency_ms: float | None = None, higher: bool = True,
           asked: float | None = None) -> tuple[int | None, list[str]]:
    """The most accurate point of `good` (within budget, no slower than the start) meeting the goal with
    the margin; else the most accurate meeting it without (and one line saying so); else None (the
    caller falls back to the fastest within budget and says why)."""
    mark(rows, goal, latency_ms, runtime, margin, asked)
    with_margin = [i for i in good if rows[i]["meets_goal"]]
    if with_margin:
        return _most_accurate(rows, with_margin, runtime, higher), []
    bare = [i for i in good
            if (measured(rows[i], runtime) or 0.0) >= needed(rows[i], goal, latency_ms, runtime, asked)]
    if not bare:
        return None, []
    best = _most_accurate(rows, bare, runtime, higher)
    return best, [f"search: no point within budget cleared the {goal:.2f}x goal on {runtime} by the {margin:.0%} "
                  f"margin; shipped point {best}, measured {measured(rows[best], runtime):.2f}x ({MARGIN_NOTE})"]
