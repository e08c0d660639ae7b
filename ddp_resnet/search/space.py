"""The search space: ``KEY=KIND:ARGS`` items, checked against the config's own keys, types and choices.

    optim.lr=log:0.01:1.0                         log-uniform in [0.01, 1.0] (on an integer key: log-uniform ints)
    train.label_smoothing=float:0:0.2[:0.05]      uniform in [0, 0.2] (on a grid of 0.05)
    train.epochs=int:10:30[:5]                    an integer in [10, 30] (inclusive; step 5)
    data.auto_augment=choice:none,trivialaugment  one of the values (commas inside brackets stay: [30,60],[50,75])

Nothing here imports Optuna: a space is parsed and validated before the study exists (``distribution`` and
``grid`` import it when asked).
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

from ddp_resnet import config as config_mod
from ddp_resnet.config import ConfigError
from ddp_resnet.slurm.sweep import split_values

KINDS = ("log", "float", "int", "choice")
OWNED = {  # keys the search sets itself
    "output_dir": "each trial trains in its own directory under --out",
    "train.trial": "the search sets it for each trial",
    "ckpt.resume": "trials resume from their own checkpoints (auto)",
    "ckpt.overwrite": "a trial's directory is never started over",
}
NUMERIC_TYPES = ("float", "int", "int | auto")


class SpaceError(ValueError):
    """A bad ``--space`` item, in one line."""


@dataclass(frozen=True)
class Param:
    """One searched key: its kind and range (or choices)."""

    key: str
    kind: str  # log | float | int | choice
    integer: bool = False  # sampled as an integer (int kind, or log on an integer key)
    low: float = 0.0
    high: float = 0.0
    step: float | None = None
    choices: tuple = ()  # choice: the values as typed (strings)
    text: str = ""  # the item as given

    def override(self, value) -> str:
        """The trainer's ``key=value`` override for a sampled value."""
        if self.kind == "choice":
            return f"{self.key}={value}"
        return f"{self.key}={int(value) if self.integer else repr(float(value))}"

    def end_points(self) -> list:
        """The values the recipe is checked with before anything starts."""
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]

    def grid(self) -> list | None:
        """Every value of a discrete parameter (choice, int, float with a step); None for a continuous one."""
        if self.kind == "choice":
            return list(self.choices)
        if self.integer and self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step:
            count = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
            return [round(self.low + i * self.step, 12) for i in range(count)]
        return None

    def distribution(self, grid: bool = False):
        """The Optuna distribution (a categorical one over ``grid()`` for the grid sampler)."""
        import optuna.distributions as dists

        if grid or self.kind == "choice":
            return dists.CategoricalDistribution(self.grid())
        if self.integer:
            return dists.IntDistribution(int(self.low), int(self.high), log=self.kind == "log",
                                         step=int(self.step or 1))
        return dists.FloatDistribution(self.low, self.high, log=self.kind == "log", step=self.step)

    def parse_value(self, text: str):
        """An ``--enqueue`` value for this parameter, checked to lie in the space."""
        if self.kind == "choice":
            if text not in self.choices:
                raise SpaceError(f"--enqueue {self.key}={text}: not one of the --space choices "
                                 f"{', '.join(self.choices)}")
            return text
        try:
            value = int(text) if self.integer else float(text)
        except ValueError:
            raise SpaceError(f"--enqueue {self.key}={text}: expected {'an integer' if self.integer else 'a number'}"
                             ) from None
        if not self.low <= value <= self.high:
            raise SpaceError(f"--enqueue {self.key}={text}: outside the --space range [{self.low:g}, {self.high:g}]")
        return value

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.key}: one of {', '.join(self.choices)}"
        step = f", step {self.step:g}" if self.step else ""
        what = {"log": "log-uniform", "float": "uniform", "int": "integer"}[self.kind]
        return f"{self.key}: {what} in [{self.low:g}, {self.high:g}]{step}"


def _number(item: str, text: str, integer: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SpaceError(f"--space {item}: '{text}' is not a number") from None
    if not math.isfinite(value):
        raise SpaceError(f"--space {item}: '{text}' is not a finite number")
    if integer and value != int(value):
        raise SpaceError(f"--space {item}: '{text}' is not an integer")
    return value


def _key_row(item: str, key: str) -> dict:
    rows = {row["key"]: row for row in config_mod.keys()}
    if key in OWNED:
        raise SpaceError(f"--space {item}: {key} cannot be searched ({OWNED[key]})")
    if key not in rows:
        close = difflib.get_close_matches(key, list(rows), n=1)
        hint = f"; did you mean {close[0]}?" if close else " (python -m ddp_resnet.config --keys lists them)"
        raise SpaceError(f"--space {item}: unknown config key '{key}'{hint}")
    return rows[key]


def parse_item(item: str) -> Param:
    """One ``KEY=KIND:ARGS`` item -> Param; the key and the kind's fit to the key's type are checked here."""
    key, sep, spec = item.partition("=")
    key = key.strip()
    kind, colon, rest = spec.partition(":")
    if not sep or not key or not colon:
        raise SpaceError(f"--space {item}: expected KEY=KIND:ARGS with KIND one of {', '.join(KINDS)}, e.g. "
                         f"optim.lr=log:0.01:1.0")
    row = _key_row(item, key)
    if kind not in KINDS:
        raise SpaceError(f"--space {item}: unknown kind '{kind}'; valid kinds: {', '.join(KINDS)}")
    if kind == "choice":
        values = tuple(split_values(rest))
        if any(v == "" for v in values) or len(set(values)) != len(values):
            raise SpaceError(f"--space {item}: choices must be distinct and not empty")
        return Param(key, kind, choices=values, text=item)
    if row["type"] not in NUMERIC_TYPES:
        what = f"a choice key ({', '.join(row['choices'])})" if row["choices"] else f"a {row['type']} key"
        raise SpaceError(f"--space {item}: {key} is {what}; use choice:V1,V2,...")
    integer = kind == "int" or row["type"] != "float"
    if kind == "float" and integer:
        raise SpaceError(f"--space {item}: {key} is an integer key; use int:LO:HI or log:LO:HI")
    return _numeric(item, key, kind, integer, rest.split(":"))


def _numeric(item: str, key: str, kind: str, integer: bool, parts: list[str]) -> Param:
    if len(parts) not in (2, 3) or (kind == "log" and len(parts) == 3):
        shape = "log:LO:HI" if kind == "log" else f"{kind}:LO:HI[:STEP]"
        raise SpaceError(f"--space {item}: expected {shape}")
    low, high = (_number(item, p, integer) for p in parts[:2])
    step = _number(item, parts[2], integer) if len(parts) == 3 else None
    if low >= high:
        raise SpaceError(f"--space {item}: the range is {'inverted' if low > high else 'empty'} (low {parts[0]}, "
                         f"high {parts[1]}); give LO < HI")
    if kind == "log" and low <= 0:
        raise SpaceError(f"--space {item}: a log range needs LO > 0, got {parts[0]}")
    if step is not None and (step <= 0 or step > high - low):
        raise SpaceError(f"--space {item}: the step must be > 0 and at most HI - LO, got {parts[2]}")
    if step is not None and not integer and abs((high - low) / step - round((high - low) / step)) > 1e-9:
        raise SpaceError(f"--space {item}: HI - LO must be a multiple of the step {parts[2]}")
    return Param(key, kind, integer, low, high, step, text=item)


def parse_space(items: list[str]) -> list[Param]:
    """Every ``--space`` item, each key at most once."""
    if not items:
        raise SpaceError("--space: give at least one KEY=KIND:ARGS item")
    params = [parse_item(item) for item in items]
    keys = [p.key for p in params]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise SpaceError(f"--space: {', '.join(twice)} given twice")
    return params


def check_recipe(config: str | None, overrides: list[str], params: list[Param], world_size: int) -> None:
    """The recipe with each parameter at each end point (the others as the recipe has them), then with all at
    their low and all at their high ends, loads and validates (for ``world_size`` ranks); raise SpaceError."""
    def load(extra: list[str], item: str) -> None:
        try:
            cfg = config_mod.load(config, [*overrides, *extra])
            config_mod.validate_world(cfg, world_size)
        except ConfigError as exc:
            raise SpaceError(f"--space {item}: {exc}") from None

    for param in params:
        for value in param.end_points():
            load([param.override(value)], param.text)
    for end in (0, -1):
        load([p.override(p.end_points()[end]) for p in params], " ".join(p.text for p in params))


def parse_enqueue(text: str, params: list[Param]) -> dict:
    """``KEY=VALUE[,KEY=VALUE...]`` -> {key: value} for keys of the space (the others are sampled)."""
    by_key = {p.key: p for p in params}
    point = {}
    for part in split_values(text):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in by_key:
            raise SpaceError(f"--enqueue {text}: expected KEY=VALUE,... with keys of the --space "
                             f"({', '.join(by_key)})")
        point[key.strip()] = by_key[key.strip()].parse_value(value.strip())
    return point
