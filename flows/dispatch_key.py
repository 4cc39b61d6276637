"""The coordinator's dispatch key: it seals every flow run sent to a site.

One key per tenant (:mod:`fedround.tasks.core.dispatch_seal`). The private key comes from
``$FEDROUND_DISPATCH_KEY`` (its text: a secret mounted into the environment), else from the
file ``$FEDROUND_DISPATCH_KEY_FILE`` names (mode 0600), else from
``<state dir>/dispatch-keys/<tenant>.key``, made on first use. It is never a flag and never
logged; only its key id and public key are shown (``fedround keys dispatch``).

The coordinator publishes the public half under the federation's read-only prefix
(:func:`fedround.tasks.core.keys.dispatch_keys_key`), which only its tenant's coordinator
identity may write; sites trust those keys unless they pin their own (``dispatch_keys`` in
their settings).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from fedround.site_workers.signing_key import read_key_file, write_key_file
from fedround.tasks.core import keys
from fedround.tasks.core.dispatch_seal import DispatchKeys
from fedround.tasks.core.errors import ConfigError, ObjectNotFound, ObjectTooLarge
from fedround.tasks.core.signing import SigningKey
from fedround.tasks.dispatch_keys import read_dispatch_keys
from fedround.tasks.object_store import ObjectStore
from fedround.tasks.runtime import state_dir_from_env

log = logging.getLogger(__name__)

DISPATCH_KEY_ENV = "FEDROUND_DISPATCH_KEY"
DISPATCH_KEY_FILE_ENV = "FEDROUND_DISPATCH_KEY_FILE"
KEEP_PUBLISHED = 8  # older keys drop out of the published ring (a coordinator that lost its key)


def dispatch_key_path(state_dir: Path, tenant: str) -> Path:
    return state_dir / "dispatch-keys" / f"{tenant}.key"


def load_dispatch_key(
    tenant: str, state_dir: Path | None = None, env: Mapping[str, str] | None = None
) -> SigningKey:
    """The tenant coordinator's private dispatch key (see the module docstring)."""
    env = os.environ if env is None else env
    text = env.get(DISPATCH_KEY_ENV, "").strip()
    if text:
        try:
            return SigningKey.from_text(text)
        except ConfigError as exc:
            raise ConfigError(f"${DISPATCH_KEY_ENV}: {exc}") from None
    named = env.get(DISPATCH_KEY_FILE_ENV, "").strip()
    if named:
        path = Path(named)
        if not path.is_file():
            raise ConfigError(
                f"${DISPATCH_KEY_FILE_ENV} names {path}, which does not exist: create it with "
                "`fedround keys dispatch --init`"
            )
        return read_key_file(path)
    path = dispatch_key_path(state_dir or state_dir_from_env(), tenant)
    if path.is_file():
        return read_key_file(path)
    key = SigningKey.generate()
    write_key_file(path, key)
    log.info("tenant %s: new dispatch key %s in %s", tenant, key.key_id, path)
    return key


def published_dispatch_keys(store: ObjectStore, federation: str) -> DispatchKeys | None:
    """The keys published for ``federation``; None when there are none or they are unusable."""
    try:
        return read_dispatch_keys(store, federation)
    except ObjectNotFound:
        return None
    except (ObjectTooLarge, ValueError) as exc:
        key = keys.dispatch_keys_key(federation)
        log.warning("the published dispatch keys %s are unusable (%s): rewriting them", key, exc)
        return None


def publish_dispatch_key(
    store: ObjectStore, federation: str, tenant: str, key: SigningKey
) -> DispatchKeys:
    """Add ``key``'s public half to the federation's published dispatch keys (once)."""
    current = published_dispatch_keys(store, federation)
    if current is None or current.federation != federation or current.tenant != tenant:
        current = DispatchKeys(federation=federation, tenant=tenant)
    updated = current.with_key(key.registered())
    if updated is not current:
        updated = updated.model_copy(update={"keys": updated.keys[-KEEP_PUBLISHED:]})
        store.put(keys.dispatch_keys_key(federation), updated.to_json())
        log.info("federation %s: dispatch key %s published", federation, key.key_id)
    return updated
