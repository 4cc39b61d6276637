"""Semantic versions of a federation's registered models.

Every registered version gets a ``MAJOR.MINOR.PATCH`` tag next to MLflow's version number:

- **major**: the architecture (the model config) differs from the reference model;
- **minor**: retrained from scratch with the same architecture;
- **patch**: fine-tuned, i.e. trained starting from a registered model's weights.

The reference is the model the new one is compared with: the model it was fine-tuned from
for a patch, else the current ``production`` version, else the newest version with a
semantic version. Numbers never repeat: a bump takes the next free number in its line
(``1.3.0`` exists → the next minor of ``1.2.x`` is ``1.4.0``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")


class Change(StrEnum):
    FIRST = "first"
    MAJOR = "major"
    MINOR = "minor"
    PATCH = "patch"


@dataclass(frozen=True, order=True)
class SemVer:
    major: int
    minor: int
    patch: int

    @classmethod
    def parse(cls, text: str) -> SemVer:
        match = _SEMVER.match(text.strip())
        if match is None:
            raise ValueError(f"{text!r} is not a semantic version like '1.4.2'")
        return cls(int(match.group(1)), int(match.group(2)), int(match.group(3)))

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


FIRST = SemVer(1, 0, 0)


@dataclass(frozen=True)
class VersionBump:
    version: SemVer
    change: Change
    reason: str


def classify(
    model_config: Mapping[str, Any],
    reference_config: Mapping[str, Any] | None,
    fine_tuned: bool,
) -> tuple[Change, str]:
    """What kind of change a new model is, relative to its reference model's config."""
    if reference_config is None:
        return Change.FIRST, "no earlier version to compare with"
    differing = sorted(
        key
        for key in set(model_config) | set(reference_config)
        if model_config.get(key) != reference_config.get(key)
    )
    if differing:
        changes = ", ".join(
            f"{k} {reference_config.get(k)!r}→{model_config.get(k)!r}" for k in differing
        )
        return Change.MAJOR, f"architecture changed: {changes}"
    if fine_tuned:
        return Change.PATCH, "fine-tuned from a registered model, same architecture"
    return Change.MINOR, "retrained, same architecture"


def next_version(existing: Iterable[SemVer], reference: SemVer | None, change: Change) -> SemVer:
    """The next free semantic version for a ``change`` relative to ``reference``."""
    taken = set(existing)
    if change is Change.FIRST or reference is None:
        if not taken:
            return FIRST
        return SemVer(max(v.major for v in taken) + 1, 0, 0)
    if change is Change.MAJOR:
        return SemVer(max(v.major for v in taken | {reference}) + 1, 0, 0)
    if change is Change.MINOR:
        line = [v.minor for v in taken | {reference} if v.major == reference.major]
        return SemVer(reference.major, max(line) + 1, 0)
    same = [
        v.patch
        for v in taken | {reference}
        if (v.major, v.minor) == (reference.major, reference.minor)
    ]
    return SemVer(reference.major, reference.minor, max(same) + 1)


def bump(
    existing: Iterable[SemVer],
    model_config: Mapping[str, Any],
    reference: tuple[SemVer, Mapping[str, Any]] | None,
    fine_tuned: bool,
) -> VersionBump:
    """Classify the change and pick the version: the one call registration makes."""
    change, reason = classify(model_config, reference[1] if reference else None, fine_tuned)
    version = next_version(existing, reference[0] if reference else None, change)
    return VersionBump(version, change, reason)
