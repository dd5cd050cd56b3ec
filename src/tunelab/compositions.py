"""Schedules made of other schedule options: `scheduler=sequential` and `scheduler=chained`.

A composition lists its parts, each an option of conf/scheduler/ named by `option` with any of its
keys changed:

    parts: [{option: linear, start_factor: 0.1, end_factor: 1.0}, {option: cosine}, {option: constant, factor: 0.01}]
    milestones: [1, 6]          # sequential only: the epochs at which each part hands over

`sequential` runs the parts one after another (torch's SequentialLR); `chained` steps them all
together (torch's ChainedScheduler). The composition has one `interval` and one warmup, so a part
may not set its own. ReduceLROnPlateau has no place in either of torch's compositions (they step it
without a metric): it may only be the last part of a sequence, where the schedule itself steps it
after validation once the parts before it are done.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tunelab.errors import ConfigError, require

#: The scheduler options, one YAML file each.
CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "scheduler"
#: Keys the composition has once for all its parts.
_OWN_KEYS = ("interval", "warmup_epochs", "warmup_start_factor")
_KINDS = {"SequentialLR": "sequential", "ChainedScheduler": "chained"}
_PLATEAU = "ReduceLROnPlateau"


def kind(target: str) -> str | None:
    """`sequential` or `chained` when `target` is one of torch's compositions, else None."""
    return _KINDS.get(target.rsplit(".", 1)[-1])


@dataclass
class Part:
    """One part of a composition: the option it came from and its config, the composition's keys removed."""

    key: str  # where it is in the config, for messages: scheduler.parts.1
    option: str
    cfg: DictConfig

    @property
    def name(self) -> str:
        return self.cfg.get("_target_", "").rsplit(".", 1)[-1]

    @property
    def plateau(self) -> bool:
        return self.name == _PLATEAU


def parts(cfg: DictConfig) -> list[Part]:
    """The parts of a composition config, each its option's file merged with the keys given for it."""
    composition = kind(cfg.get("_target_", ""))
    given = cfg.get("parts")
    require(isinstance(given, (list, tuple)) or OmegaConf.is_list(given),
            f"scheduler.parts must be a list of parts, each {{option: NAME, ...keys}}, got {given!r}")
    require(len(given) >= 1, "scheduler.parts is empty: name at least one option, e.g. scheduler.parts=[{option: cosine}]")
    options = sorted(p.stem for p in CONF_DIR.glob("*.yaml") if kind(OmegaConf.load(p).get("_target_", "")) is None)
    found = [_part(f"scheduler.parts.{i}", part, options) for i, part in enumerate(given)]
    for i, part in enumerate(found):
        if part.plateau and (composition == "chained" or i < len(found) - 1):
            where = "scheduler=chained" if composition == "chained" else "the middle of scheduler=sequential"
            raise ConfigError(
                f"{part.key} ({part.option}) cannot run in {where}: torch steps the parts without a metric. "
                "plateau may only be the last part of scheduler=sequential, e.g. "
                "'scheduler.parts=[{option: linear, start_factor: 0.1, end_factor: 1.0}, {option: plateau}]' scheduler.milestones=[1]"
            )
    return found


def _part(key: str, given: Any, options: list[str]) -> Part:
    """One part: `options` are the schedule options a composition can hold (not compositions)."""
    given = OmegaConf.create(given) if isinstance(given, dict) else given
    require(OmegaConf.is_dict(given) and given.get("option") is not None,
            f"{key} must name an option, e.g. {{option: cosine}}; options: {', '.join(options)}")
    option = str(given.option)
    require(option in options, f"{key}.option={option} is not a schedule option a composition can hold; options: {', '.join(options)}")
    for own in _OWN_KEYS:
        require(own not in given, f"{key}.{own}: a part has no {own} of its own; set scheduler.{own} for the whole composition")
    cfg = OmegaConf.load(CONF_DIR / f"{option}.yaml")
    for own in _OWN_KEYS:
        cfg.pop(own, None)
    overrides = {k: v for k, v in OmegaConf.to_container(given, resolve=True).items() if k != "option"}
    unknown = sorted(set(overrides) - set(cfg))
    require(not unknown, f"{key}: {option} has no key {', '.join(unknown)}; its keys: {', '.join(k for k in cfg if not k.startswith('_'))}")
    return Part(key, option, OmegaConf.merge(cfg, overrides))


def milestone_units(cfg: DictConfig, n_parts: int, units: int, per_epoch: int) -> list[int]:
    """The sequence's milestones in scheduler steps (epochs x `per_epoch`, rounded), checked against the run.

    `units` is the number of scheduler steps the composition has (the run after warmup).
    """
    given = cfg.get("milestones")
    given = list(given) if given is not None else []
    require(len(given) == n_parts - 1,
            f"scheduler.milestones needs {n_parts - 1} epoch(s), one per hand-over between the {n_parts} parts, got {given}")
    for m in given:
        require(isinstance(m, (int, float)) and not isinstance(m, bool) and m > 0,
                f"scheduler.milestones must be epochs > 0 (fractions allowed), got {m!r}")
    steps = [int(round(m * per_epoch)) for m in given]
    require(all(b > a for a, b in zip([0, *steps], steps)),
            f"scheduler.milestones={given} must rise, each at least one scheduler step after the one before")
    require(not steps or steps[-1] < units,
            f"scheduler.milestones={given}: the last part would never run; the schedule has "
            f"{units / per_epoch:g} epoch(s) (trainer.max_epochs, less any warmup)")
    return steps


def segments(milestones: list[int], units: int) -> list[int]:
    """The length, in scheduler steps, of each part's segment: between milestones, the last to the end."""
    bounds = [0, *milestones, units]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def epochs_of(units: int, per_epoch: int) -> int:
    """A segment's length in whole epochs (at least 1), for options whose defaults count epochs."""
    return max(1, math.ceil(units / per_epoch))
