"""The one sweep parser: ``--sweep key=v1,v2`` items, their product, and each point's directory name.

Used by ``python -m ddp_resnet.slurm --sweep`` and by ``python -m ddp_resnet.experiments``, so an experiment run
locally and the same sweep submitted to SLURM write into the same directories.
"""
from __future__ import annotations

import itertools
import re
from collections.abc import Sequence


class SweepError(ValueError):
    """A bad ``--sweep`` item, described in one line."""


def split_values(text: str) -> list[str]:
    """Split `v1,v2,[1,2]` on the commas outside brackets -> ['v1', 'v2', '[1,2]']."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[({"
        depth -= ch in "])}"
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return out + [cur.strip()]


def parse_sweeps(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    """`--sweep key=v1,v2` items -> [(key, [v1, v2]), ...] (key order kept; repeated keys or values rejected)."""
    sweeps: list[tuple[str, list[str]]] = []
    for item in items:
        if "=" not in item or item.startswith("="):
            raise SweepError(f"--sweep '{item}': expected key=v1,v2,...")
        key, raw = item.split("=", 1)
        key = key.strip()
        values = split_values(raw)
        if not values or any(v == "" for v in values):
            raise SweepError(f"--sweep '{item}': empty value")
        if key == "output_dir":
            raise SweepError("--sweep output_dir: not allowed (each sweep point gets its own output directory)")
        if key in {k for k, _ in sweeps}:
            raise SweepError(f"--sweep {key}: given twice; list all values in one --sweep")
        if len(set(values)) != len(values):
            raise SweepError(f"--sweep {key}: repeated value")
        sweeps.append((key, values))
    return sweeps


def slug(text: str) -> str:
    """A directory-name-safe form of text."""
    return re.sub(r"[^A-Za-z0-9._+=-]+", "-", text).strip("-") or "x"


def point_names(sweeps: Sequence[tuple[str, Sequence[str]]]) -> list[tuple[list[str], str]]:
    """The product of the sweeps: [(overrides, directory name), ...] in itertools.product order.

    Names join `<last key part><value>` with '_' (e.g. lr0.05_weight_decay1e-4); the full dotted key is used
    when two swept keys share their last part, and an index prefix is added if names still collide.
    """
    if not sweeps:
        return [([], "")]
    lasts = [k.split(".")[-1] for k, _ in sweeps]
    labels = [k.split(".")[-1] if lasts.count(k.split(".")[-1]) == 1 else k for k, _ in sweeps]
    points = []
    for combo in itertools.product(*[values for _, values in sweeps]):
        overrides = [f"{key}={value}" for (key, _), value in zip(sweeps, combo)]
        name = "_".join(slug(f"{label}{value}") for label, value in zip(labels, combo))
        points.append((overrides, name))
    names = [n for _, n in points]
    if len(set(names)) != len(names):
        width = len(str(len(points) - 1))
        points = [(o, f"{i:0{width}d}_{n}") for i, (o, n) in enumerate(points)]
    return points
