"""The site's signing key: where it comes from, how it is made, how it is registered.

The private key comes only from ``$FEDROUND_SITE_SIGNING_KEY`` or from the file the site's
settings name (``signing_key_file``, by default ``<state_dir>/signing.key``), which must be
readable by its owner only (mode 0600). It is never a command-line flag and never logged;
only its key id and public key are shown.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path

from fedround.tasks.core.errors import ConfigError
from fedround.tasks.core.signing import SigningKey
from fedround.tasks.object_store import ObjectStore
from fedround.tasks.site_keys import load_key_ring, register_key

from .settings import SiteSettings, load_site_settings

log = logging.getLogger(__name__)

SIGNING_KEY_ENV = "FEDROUND_SITE_SIGNING_KEY"
SIGNING_KEY_SUFFIX = ".signing.key"  # `fedround site init`: site.yaml → site.signing.key


def read_key_file(path: Path) -> SigningKey:
    """The key in ``path``; refused unless only its owner may read it."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"signing key file {path} has mode {mode:04o}: others may read it; "
            f"run `chmod 600 {path}`"
        )
    try:
        return SigningKey.from_text(path.read_text())
    except ConfigError as exc:
        raise ConfigError(f"signing key file {path}: {exc}") from exc


def load_signing_key(settings: SiteSettings) -> SigningKey | None:
    """The site's private key ($FEDROUND_SITE_SIGNING_KEY, else its key file), or None
    when it has none (its updates go unsigned)."""
    text = os.environ.get(SIGNING_KEY_ENV)
    if text:
        try:
            return SigningKey.from_text(text)
        except ConfigError as exc:
            raise ConfigError(f"${SIGNING_KEY_ENV}: {exc}") from exc
    path = settings.signing_key_path
    if not path.exists():
        if settings.signing_key_file is not None:
            raise ConfigError(
                f"signing_key_file {path} does not exist: create it with `fedround site init` "
                f"or `fedround keys rotate`"
            )
        return None
    return read_key_file(path)


def write_key_file(path: Path, key: SigningKey) -> None:
    """Write ``key`` to ``path`` (mode 0600, replacing any key there)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (key.private_text() + "\n").encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def ensure_signing_key_file(settings: SiteSettings) -> SigningKey:
    """The key in the site's key file (not the environment's); a new one written there
    when the file does not exist."""
    path = settings.signing_key_path
    if path.exists():
        return read_key_file(path)
    key = SigningKey.generate()
    write_key_file(path, key)
    log.info("site %s: new signing key %s in %s", settings.site, key.key_id, path)
    return key


def ensure_signing_key(settings: SiteSettings) -> SigningKey:
    """The site's key; when it has none, a new one written to its key file."""
    key = load_signing_key(settings)
    if key is None:
        key = SigningKey.generate()
        write_key_file(settings.signing_key_path, key)
        log.info("site %s: new signing key %s", settings.site, key.key_id)
    return key


def provision_site_keys(
    site_configs: Mapping[str, Path], store: ObjectStore, federation: str
) -> dict[str, str]:
    """Sites and coordinator on one machine (the embedded default, the demo): give every
    site a key when it has none and register it. A key the site already had is registered
    only when the site has no registered key yet (trust on first use); otherwise it is left
    to ``fedround keys register`` / ``rotate``, with a warning. Returns site → key id."""
    ids = {}
    for site, path in site_configs.items():
        settings = load_site_settings(path)
        existing = load_signing_key(settings)
        key = existing or ensure_signing_key(settings)
        ring = load_key_ring(store, federation, site)
        if existing is None or not ring.keys:
            register_key(store, federation, site, key.registered())
        elif key.key_id not in {k.key_id for k in ring.keys}:
            log.warning(
                "site %s signs with key %s, which is not registered for it (registered: %s): "
                "its updates will be rejected until `fedround keys register` or `rotate`",
                site,
                key.key_id,
                ", ".join(k.key_id for k in ring.keys),
            )
        ids[site] = key.key_id
    return ids


def rotate_site_key(
    settings: SiteSettings, store: ObjectStore, overlap: timedelta
) -> tuple[SigningKey, SigningKey | None]:
    """A new key for the site, written over its key file and registered; its old key stays
    valid for ``overlap``. Returns (new, old)."""
    if os.environ.get(SIGNING_KEY_ENV):
        raise ConfigError(
            f"the site's key comes from ${SIGNING_KEY_ENV}: rotate it where that variable is "
            "set (or unset it to rotate the key file)"
        )
    old = load_signing_key(settings)
    new = SigningKey.generate()
    register_key(store, settings.federation, settings.site, new.registered(), overlap)
    write_key_file(settings.signing_key_path, new)
    return new, old
