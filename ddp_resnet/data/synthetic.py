"""A learnable synthetic image-classification dataset, generated deterministically in memory.

Each class owns a fixed random low-frequency colour pattern (a coarse random grid, bilinearly upsampled);
an image is its class pattern with a random brightness/contrast jitter plus per-pixel uniform noise. Train and
test share the class patterns and differ only in their noise, so a model that learns the patterns generalises.
The dataset depends only on its shape arguments and a fixed seed, never on the training seed.
"""

from __future__ import annotations

import numpy as np

DATASET_SEED = 20240611
_GRID = 4  # the pattern grid is GRID x GRID per colour channel before upsampling
_NOISE_SHIFT = 1  # per-pixel noise = random byte >> shift: uniform over 0..127 (std ~ 37)
_CHUNK = 512  # images generated per step


def _upsample_matrix(size: int, grid: int) -> np.ndarray:
    """``size x grid`` linear-interpolation weights (align-corners style) from a coarse grid to ``size`` pixels."""
    pos = np.linspace(0.0, grid - 1.0, size) if size > 1 else np.zeros(1)
    low = np.clip(np.floor(pos).astype(int), 0, grid - 2) if grid > 1 else np.zeros(size, int)
    frac = pos - low
    weights = np.zeros((size, grid), dtype=np.float32)
    weights[np.arange(size), low] = 1.0 - frac
    if grid > 1:
        weights[np.arange(size), low + 1] += frac
    return weights


def class_patterns(num_classes: int, image_size: int, seed: int = DATASET_SEED) -> np.ndarray:
    """The per-class mean images: float32 ``classes x size x size x 3`` in [0, 255]."""
    rng = np.random.default_rng([seed, 0])
    grids = rng.uniform(0.0, 255.0, size=(num_classes, _GRID, _GRID, 3)).astype(np.float32)
    up = _upsample_matrix(image_size, _GRID)
    return np.einsum("yi,kijc,xj->kyxc", up, grids, up, optimize=True).astype(np.float32)


def make_synthetic(
    num_train: int, num_test: int, num_classes: int, image_size: int, seed: int = DATASET_SEED
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(train_images, train_labels, test_images, test_labels)``; images uint8 NHWC, labels int64 (balanced)."""
    patterns = class_patterns(num_classes, image_size, seed)
    mean = patterns.mean(axis=(1, 2), keepdims=True)
    centered = patterns - mean

    def split(count: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([seed, stream])
        labels = rng.permutation(np.arange(count) % num_classes).astype(np.int64)
        contrast = rng.uniform(0.7, 1.3, size=(count, 1, 1, 1)).astype(np.float32)
        offset = mean[labels] + rng.uniform(-20.0, 20.0, size=(count, 1, 1, 1)).astype(np.float32)
        offset -= (255 >> _NOISE_SHIFT) / 2.0  # centres the noise added below
        out = np.empty((count, image_size, image_size, 3), dtype=np.uint8)
        for lo in range(0, count, _CHUNK):  # chunked: temporaries stay small (and cache-friendly)
            hi = min(lo + _CHUNK, count)
            chunk = centered[labels[lo:hi]]
            chunk *= contrast[lo:hi]
            chunk += offset[lo:hi]
            noise = np.frombuffer(rng.bytes(chunk.size), dtype=np.uint8).reshape(chunk.shape)
            chunk += noise >> _NOISE_SHIFT  # (raw bytes: ~10x faster than rng.integers for uint8)
            np.clip(chunk, 0.0, 255.0, out=chunk)
            out[lo:hi] = chunk
        return out, labels

    return (*split(num_train, 1), *split(num_test, 2))
