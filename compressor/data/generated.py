"""Generated image tasks at deployment size, made from the 5,000 mnist5k digits in memory (nothing is
downloaded or cached): `mnist5k@SIZE` (the digits resized) and `clutter@SIZE` (`clutter128` is
`clutter@128`), a task that needs capacity.

Why clutter: mnist5k is solved by networks of a few thousand weights, so "within one point" on it
says little about a user's ImageNet-like task. Each `clutter` image places one digit, rotated,
scaled, moved and coloured at random, on a coloured noise-and-stripes texture among strokes cut
from other digits (distractors of the same kind as the signal): a network must tell the whole
digit from digit-like clutter at any place and size. Images are (SIZE, SIZE, 3) floats in [0, 1];
the labels, the split (4,000 train / 1,000 test) and its digits are mnist5k's. The same seed gives
the same arrays on every machine.
"""
from __future__ import annotations

import numpy as np

from compressor.core.errors import CompressorError

SIZES = (16, 512)  # smallest and largest SIZE accepted
SEED = 0
FRAGMENT = 10  # side of the square of another digit each distractor is cut from
FRAGMENTS = (4, 9)  # distractors per image: at least, below
ROTATION = np.deg2rad(35)  # the digit turns by up to this much either way
HEIGHT = (0.3, 0.6)  # the digit's 28-pixel box spans this share of the image side
CHUNK = 250  # images made at once (bounds the temporaries to ~100 MB at 128 px)


def parse(spec: str) -> tuple[str, int] | None:
    """('mnist5k' | 'clutter', size) for a generated task's name, None for other data names."""
    if spec == "clutter128":
        return "clutter", 128
    base, at, size = spec.partition("@")
    if not at or base not in ("mnist5k", "clutter"):
        return None
    if not size.isdigit() or not SIZES[0] <= int(size) <= SIZES[1]:
        raise CompressorError(f"data '{spec}': the size after '@' must be a whole number of pixels from {SIZES[0]} to "
                              f"{SIZES[1]}; pass e.g. {base}@128")
    return base, int(size)


def make(kind: str, size: int, digits: np.ndarray, seed: int = SEED) -> np.ndarray:
    """(N, size, size, 3) float32 images from (N, 28, 28) digits in [0, 1], in the digits' order."""
    if kind == "mnist5k":
        lift = _lift(28, size)
        grey = np.einsum("yi,nij,xj->nyx", lift, digits.astype(np.float32), lift, optimize=True)
        return np.repeat(grey[..., None], 3, axis=-1)
    out = np.empty((len(digits), size, size, 3), np.float32)
    for start in range(0, len(digits), CHUNK):
        rng = np.random.default_rng([seed, start])  # each chunk its own stream
        out[start:start + CHUNK] = _cluttered(digits[start:start + CHUNK], digits, size, rng)
    return out


def _lift(n: int, size: int) -> np.ndarray:
    """(size, n) weights of linear interpolation from n samples to size samples (end points kept)."""
    where = np.linspace(0, n - 1, size)[:, None] - np.arange(n)[None]
    return np.maximum(0, 1 - np.abs(where)).astype(np.float32)


def _texture(n: int, size: int, rng) -> np.ndarray:
    """Coloured low-frequency noise plus stripes of random direction, frequency and colour."""
    f32 = np.float32
    lift = _lift(6, size)
    grid = rng.random((n, 6, 6, 3), dtype=f32) * rng.uniform(0.3, 0.8, (n, 1, 1, 1)).astype(f32)
    base = np.einsum("yi,nijc,xj->nyxc", lift, grid, lift, optimize=True)
    base += rng.uniform(0, 0.4, (n, 1, 1, 3)).astype(f32)
    theta = rng.uniform(0, np.pi, n)
    freq = (rng.uniform(2, 12, n) * 2 * np.pi / size).astype(f32)
    axis = np.arange(size, dtype=f32)
    phase = (axis[None, :, None] * (freq * np.cos(theta)).astype(f32)[:, None, None]
             + axis[None, None, :] * (freq * np.sin(theta)).astype(f32)[:, None, None])
    phase += rng.uniform(0, 2 * np.pi, (n, 1, 1)).astype(f32)
    colour = (rng.uniform(0, 0.2, (n, 1)) * rng.uniform(0.2, 1, (n, 3))).astype(f32)
    base += np.sin(phase, out=phase)[..., None] * colour[:, None, None, :]
    return base


def _render(src: np.ndarray, scale: np.ndarray, angle: np.ndarray, offset: np.ndarray, box: int) -> np.ndarray:
    """(n, box, box) bilinear renders of (n, h, w) sources turned by `angle` and magnified by `scale`,
    each source's centre at `offset` (pixels, from the box's corner); zero where no source falls.
    One C call for all: the sources are stacked with zero borders and each read stays in its own."""
    from scipy.ndimage import map_coordinates

    n, h, w = src.shape
    stacked = np.pad(src, ((0, 0), (1, 1), (1, 1))).reshape(n * (h + 2), w + 2)
    grid = np.arange(box, dtype=np.float32)
    dy = grid[None, :, None] - offset[:, 0, None, None].astype(np.float32)
    dx = grid[None, None, :] - offset[:, 1, None, None].astype(np.float32)
    cos = (np.cos(angle) / scale).astype(np.float32)[:, None, None]
    sin = (np.sin(angle) / scale).astype(np.float32)[:, None, None]
    sy = np.clip(cos * dy + sin * dx + (h - 1) / 2 + 1, 0, h + 1)  # box pixel -> source pixel (inverse map)
    sx = np.clip(cos * dx - sin * dy + (w - 1) / 2 + 1, 0, w + 1)
    sy += (np.arange(n, dtype=np.float32) * (h + 2))[:, None, None]
    return map_coordinates(stacked, np.stack([sy, sx]), order=1, mode="constant", cval=0.0)


def _stamp(images: np.ndarray, alpha: np.ndarray, corner: np.ndarray, colour: np.ndarray, on: np.ndarray) -> None:
    """Paint each (box, box) opacity map into its image at `corner` (may reach past the edges) in
    `colour`, where `on` (a loop of slices: at 128 px faster than one fancy-indexed write)."""
    box, size = alpha.shape[1], images.shape[1]
    low = np.maximum(corner, 0)
    high = np.minimum(corner + box, size)
    for i in np.flatnonzero(on & np.all(high > low, axis=1)):
        (y0, x0), (y1, x1), (cy, cx) = low[i], high[i], corner[i]
        region = images[i, y0:y1, x0:x1]
        region -= alpha[i, y0 - cy:y1 - cy, x0 - cx:x1 - cx, None] * (region - colour[i])


def _contrasting(rng, image_mean: np.ndarray) -> np.ndarray:
    """A random colour per image, flipped to its complement when its brightness is near the image's."""
    colour = rng.random((len(image_mean), 3), dtype=np.float32)
    near = np.abs(colour.mean(1) - image_mean) < 0.3
    colour[near] = 1 - colour[near]
    return colour


def _place(images, src, scale, angle, centre, rng, mean, on=None) -> None:
    """Render `src` at `centre` (image pixels) and paint it into the images."""
    box = int(np.ceil(max(src.shape[1:]) / 2 * scale.max() * 1.42)) * 2 + 3
    corner = np.floor(centre).astype(int) - box // 2
    alpha = _render(src, scale, angle, centre - corner, box)
    _stamp(images, alpha, corner, _contrasting(rng, mean), np.ones(len(src), bool) if on is None else on)


def _cluttered(digits: np.ndarray, pool: np.ndarray, size: int, rng) -> np.ndarray:
    """Texture, then the distractors (10x10 cuts of other digits), then the digit over them."""
    n = len(digits)
    images = _texture(n, size, rng)
    mean = images.mean((1, 2, 3))
    scale = rng.uniform(*HEIGHT, n) * size / 28
    room = np.maximum(0, size / 2 - 14 * scale)[:, None]  # the digit's 28-pixel box stays inside the image
    centre = (size - 1) / 2 + rng.uniform(-1, 1, (n, 2)) * room
    angle = rng.uniform(-ROTATION, ROTATION, n)
    count = rng.integers(*FRAGMENTS, n)
    for k in range(FRAGMENTS[1] - 1):  # distractors first: the digit is painted over them
        donors = pool[rng.integers(0, len(pool), n)]
        y, x = rng.integers(4, 28 - FRAGMENT - 3, (2, n))
        cuts = np.stack([d[a:a + FRAGMENT, b:b + FRAGMENT] for d, a, b in zip(donors, y, x)])
        _place(images, cuts, scale * rng.uniform(0.8, 1.2, n), rng.uniform(-np.pi, np.pi, n),
               rng.uniform(0.05, 0.95, (n, 2)) * size, rng, mean, on=k < count)
    _place(images, digits, scale, angle, centre, rng, mean)
    return np.clip(images, 0, 1, out=images)
