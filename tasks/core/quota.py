"""Per-site storage quotas on the update prefix.

A site may write anything under ``<federation>/updates/<site>/`` (its updates, manifests,
heartbeats, reports), and S3 servers have no per-prefix quota, so a site could fill the
bucket. Before the coordinator sends a site work, it measures that prefix
(:meth:`fedround.tasks.object_store.ObjectStore.usage`) and leaves the site out of the
round, with the reason, while the prefix holds more than ``limits.site_storage_bytes``
bytes or ``limits.site_storage_objects`` objects. The site can then write at most one
round's objects past its quota before it is left out, and never fails the run.

This module is the pure part: the measurement's record and the verdict on it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class PrefixUsage:
    """What a prefix holds: its current objects' bytes and count.

    ``complete`` is false when counting stopped early (past the object cap): ``bytes`` and
    ``objects`` are then lower bounds.
    """

    bytes: int
    objects: int
    complete: bool = True


def measure(sizes: Iterable[int], max_objects: int | None = None) -> PrefixUsage:
    """The usage of objects of ``sizes``, consumed lazily: with ``max_objects``, counting
    stops after ``max_objects + 1`` objects (``complete`` false), enough to tell that a
    quota is broken without listing a flood of them."""
    total = count = 0
    for size in sizes:
        if max_objects is not None and count > max_objects:
            return PrefixUsage(total, count, complete=False)
        total += size
        count += 1
    return PrefixUsage(total, count)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def quota_breach(usage: PrefixUsage, max_bytes: int, max_objects: int, prefix: str) -> str | None:
    """Why a site holding ``usage`` under ``prefix`` is over its quota, or ``None``.

    The message names the prefix, what it holds, the limit it broke, and what to do.
    """
    at_least = "" if usage.complete else "at least "
    if usage.objects > max_objects:
        what = (
            f"{at_least}{usage.objects:,} objects, over the quota of {max_objects:,} "
            "(limits.site_storage_objects)"
        )
    elif usage.bytes > max_bytes:
        what = (
            f"{at_least}{_size(usage.bytes)} ({usage.bytes:,} bytes), over the quota of "
            f"{_size(max_bytes)} (limits.site_storage_bytes)"
        )
    else:
        return None
    return (
        f"storage quota: its prefix {prefix} holds {what}; an operator frees it by deleting "
        "finished runs' objects there (e.g. `mc rm --recursive --force <alias>/<bucket>/"
        f"{prefix}<old run id>/`) or raises the quota in the federation's config"
    )
