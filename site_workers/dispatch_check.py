"""The site's side of signed dispatch: check a flow run's coordinator seal, once.

See :mod:`fedround.tasks.core.dispatch_seal`. The site's worker calls :func:`check_dispatch`
before a site flow starts: the seal must verify under a key the site trusts (pinned in its
settings as ``dispatch_keys``, else the keys its coordinator published under the
federation's read-only prefix) and must not have been used before. Used seals are
remembered in the site's state folder until they expire, so a replay is refused after a
worker restart too.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedround.tasks.core import keys
from fedround.tasks.core.dispatch_seal import (
    CLOCK_SKEW,
    DispatchRefused,
    DispatchSeal,
    verify_seal,
)
from fedround.tasks.core.errors import ObjectNotFound, ObjectTooLarge
from fedround.tasks.core.signing import RegisteredKey
from fedround.tasks.dispatch_keys import read_dispatch_keys
from fedround.tasks.object_store import ObjectStore, open_store

from .settings import SiteSettings

SEEN_FILE = "dispatch-seals-used.json"

log = logging.getLogger(__name__)


def trusted_dispatch_keys(settings: SiteSettings, store: ObjectStore) -> list[RegisteredKey]:
    """The coordinator keys this site trusts: its pinned ones, else the published ones."""
    if settings.dispatch_keys:
        return [RegisteredKey.from_text(text) for text in settings.dispatch_keys]
    key = keys.dispatch_keys_key(settings.federation)
    try:
        published = read_dispatch_keys(store, settings.federation)
    except ObjectNotFound:
        raise DispatchRefused(
            f"the coordinator has published no dispatch keys ({key}) and the site pins none "
            "(dispatch_keys in its settings): it cannot tell the coordinator's work from "
            "anyone else's"
        ) from None
    except (ObjectTooLarge, ValueError) as exc:
        raise DispatchRefused(
            f"the coordinator's published dispatch keys ({key}) are unusable: {str(exc)[:200]}"
        ) from None
    if published.federation != settings.federation:
        raise DispatchRefused(
            f"the published dispatch keys ({key}) are for federation {published.federation!r}"
        )
    return list(published.keys)


class UsedSeals:
    """Seal ids this site has run, with when they expire, in a file of its state folder.

    If that folder cannot be written (a read-only mount), the ids are remembered by this
    worker process only, with a warning: a replay is still refused until the worker
    restarts, and after that by the seal's window."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._memory: dict[str, str] = {}
        self._warned = False

    def _read(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def claim(self, seal: DispatchSeal, now: datetime | None = None) -> None:
        """Record ``seal`` as used; :class:`DispatchRefused` if it was used before."""
        now = now or datetime.now(UTC)
        with self._lock:
            used = {**self._read(), **self._memory}
            if seal.id in used:
                raise DispatchRefused(
                    f"its seal {seal.id[:12]}… was already used: a replayed dispatch is refused"
                )
            live = {k: v for k, v in used.items() if not _expired(v, now)}
            live[seal.id] = seal.expires_at.astimezone(UTC).isoformat()
            self._memory = live
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_name(self.path.name + ".tmp")
                tmp.write_text(json.dumps(live))
                os.replace(tmp, self.path)
            except OSError as exc:
                if not self._warned:
                    log.warning(
                        "cannot record used dispatch seals in %s (%s): remembered by this "
                        "worker only; give the site a writable state_dir",
                        self.path,
                        exc.strerror or exc,
                    )
                    self._warned = True


def _expired(text: str, now: datetime) -> bool:
    """Whether a recorded seal has expired (a replay of it is refused by its window then)."""
    try:
        return datetime.fromisoformat(text) + CLOCK_SKEW < now
    except (ValueError, TypeError):
        return False


def check_dispatch(
    settings: SiteSettings,
    parameters: Mapping[str, Any],
    entrypoint: str,
    used: UsedSeals,
    store: ObjectStore | None = None,
    now: datetime | None = None,
) -> DispatchSeal:
    """The flow run's seal, verified and claimed; :class:`DispatchRefused` with the reason."""
    trusted = trusted_dispatch_keys(settings, store or open_store(settings.object_store))
    seal = verify_seal(parameters, entrypoint=entrypoint, pool=settings.pool, keys=trusted, now=now)
    used.claim(seal, now)
    return seal


_USED: dict[Path, UsedSeals] = {}
_USED_LOCK = threading.Lock()


def used_seals(settings: SiteSettings) -> UsedSeals:
    """The site's record of used seals: one per state folder in this worker process."""
    path = settings.site_state_dir / SEEN_FILE
    with _USED_LOCK:
        return _USED.setdefault(path, UsedSeals(path))
