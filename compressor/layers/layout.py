"""Channel layouts: which producer ("space") each position of a tensor's last axis comes from.

Surgery derives one layout per tensor; layer handlers transform layouts (a Flatten repeats one per
spatial position, a depthwise conv repeats each channel `depth_multiplier` times, a Concatenate
puts layouts side by side) and slice weights with the kept positions a layout gives.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Segment:
    """`length` consecutive channels of one space, each repeated `inner` times in a row
    (DepthwiseConv with depth_multiplier m makes channel c occupy positions c*m..c*m+m-1)."""

    space: str
    length: int
    inner: int = 1
    # A layer with per-channel parameters on the way (BN, depthwise): merging is then inexact.
    touched_by: str | None = None

    @property
    def width(self) -> int:
        return self.length * self.inner


@dataclass(frozen=True)
class Layout:
    """Last-axis layout: `outer` repetitions (spatial positions after Flatten) of the segments.
    After Flatten of (H, W, C) channel c of position (h, w) sits at (h*W + w)*C + c."""

    segments: tuple[Segment, ...]
    outer: int = 1

    @property
    def block_width(self) -> int:
        return sum(seg.width for seg in self.segments)

    @property
    def width(self) -> int:
        return self.outer * self.block_width

    @property
    def spaces(self) -> set[str]:
        return {seg.space for seg in self.segments}

    def kept_positions(self, kept_of) -> np.ndarray:
        """Positions of the last axis that survive, given kept channel indices per space."""
        block = []
        offset = 0
        for seg in self.segments:
            kept = np.asarray(kept_of(seg.space), dtype=np.int64)
            block.append(offset + (kept[:, None] * seg.inner + np.arange(seg.inner)).ravel())
            offset += seg.width
        block = np.concatenate(block) if block else np.zeros(0, np.int64)
        return (np.arange(self.outer)[:, None] * self.block_width + block[None, :]).ravel()

    def merge_pairs(self, merges_of) -> list[tuple[int, int, Segment]]:
        """(removed position, kept position, segment) for every folded unit, in input positions."""
        pairs = []
        offset = 0
        for seg in self.segments:
            for removed, kept in sorted(merges_of(seg.space).items()):
                for repeat in range(self.outer):
                    base = repeat * self.block_width + offset
                    for j in range(seg.inner):
                        removed_at = base + removed * seg.inner + j
                        pairs.append((removed_at, base + kept * seg.inner + j, seg))
            offset += seg.width
        return pairs

    def touched(self, layer_name: str) -> Layout:
        segments = tuple(Segment(s.space, s.length, s.inner, s.touched_by or layer_name) for s in self.segments)
        return Layout(segments, self.outer)

    def times_inner(self, multiplier: int, layer_name: str) -> Layout:
        segments = tuple(Segment(s.space, s.length, s.inner * multiplier, s.touched_by or layer_name)
                         for s in self.segments)
        return Layout(segments, self.outer)

    def repeated(self, times: int) -> Layout:
        return Layout(self.segments, self.outer * times)

    def same_structure(self, other: Layout) -> bool:
        return self.outer == other.outer and [(s.length, s.inner) for s in self.segments] == [
            (s.length, s.inner) for s in other.segments
        ]


def opaque(space: str, width: int) -> Layout:
    return Layout((Segment(space, max(int(width), 0)),))


def single(space: str, units: int) -> Layout:
    return Layout((Segment(space, int(units)),))
