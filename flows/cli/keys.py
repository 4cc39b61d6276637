"""``fedround keys``: the sites' signing keys (registered into the ``fedround`` app by
``flows/cli/main.py``).

- ``keys list``: every registered key of a federation, with its validity;
- ``keys register``: register a site's public key (as ``fedround site init`` printed it);
- ``keys rotate``: a new key for a site, written 0600 where its settings say, registered,
  the old key valid for an overlap window (``--overlap 24h``);
- ``keys revoke``: end a (compromised) key now, with a reason; it is never valid again;
- ``keys export``: every site's public keys in one file, for the sites to pin (secure
  aggregation's adverts are then checked by the sites themselves);
- ``keys dispatch``: the coordinator's dispatch key of a tenant (it seals every flow run
  sent to a site), to pin at the sites; ``--new-file`` makes one for a secret.

Every change is audited (``fedround audit`` shows ``key-register`` and ``key-revoke``).

Private keys never pass through a flag or a log: only key ids and public keys are shown.
The registry lives in the coordinator's object store (``FEDROUND_OBJECT_STORE`` /
``FEDROUND_STATE_DIR``), where no site credential can write.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

from fedround.tasks.core.errors import FedroundError

if TYPE_CHECKING:
    from fedround.tasks.core.signing import RegisteredKey
    from fedround.tasks.object_store import ObjectStore

keys_app = typer.Typer(
    help="The sites' update-signing keys (list, register, rotate, revoke, export) and the "
    "coordinator's dispatch key (dispatch).",
    no_args_is_help=True,
)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def parse_overlap(text: str) -> timedelta:
    """``90s``, ``30m``, ``24h``, ``7d`` or plain seconds."""
    match = _DURATION.match(text)
    if match is None:
        raise typer.BadParameter(f"{text!r} is not a duration: use e.g. 30m, 24h or 7d")
    return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])


def _coordinator_store() -> ObjectStore:
    from fedround.tasks.object_store import open_store
    from fedround.tasks.runtime import CoordinatorSettings

    return open_store(CoordinatorSettings.from_env().object_store)


def _validity(key: RegisteredKey, now: datetime) -> str:
    if key.revoked_at is not None:
        return f"REVOKED at {key.revoked_at:%Y-%m-%d %H:%M:%S} UTC: {key.revoke_reason}"
    not_after = key.not_after
    if not_after is None:
        return "valid"
    if now <= not_after:
        return f"valid until {not_after:%Y-%m-%d %H:%M:%S} UTC (rotation overlap)"
    return f"retired at {not_after:%Y-%m-%d %H:%M:%S} UTC"


def list_keys(
    federation: Annotated[str, typer.Option(help="The federation whose site keys to list.")],
    site: Annotated[str | None, typer.Option(help="Only this site.")] = None,
) -> None:
    """List the sites' registered public keys: key id, validity, registration time."""
    from fedround.tasks.site_keys import load_key_ring, registered_sites

    try:
        store = _coordinator_store()
        sites = [site] if site else registered_sites(store, federation)
        rings = [load_key_ring(store, federation, name) for name in sites]
    except FedroundError as exc:
        _fail(str(exc))
    if not any(ring.keys for ring in rings):
        typer.echo(f"no site keys registered for {federation}")
        return
    now = datetime.now(UTC)
    for ring in rings:
        typer.echo(f"{ring.site}:")
        for key in ring.keys:
            when = f"{key.registered_at:%Y-%m-%d %H:%M:%S}" if key.registered_at else "?"
            typer.echo(f"  {key.key_id}  {_validity(key, now)}  (registered {when})")


def register_command(
    federation: Annotated[str, typer.Option(help="The site's federation.")],
    site: Annotated[str, typer.Option(help="The site whose key this is.")],
    public_key: Annotated[
        str, typer.Option(help="The public key `fedround site init` printed (base64).")
    ],
    overlap: Annotated[
        str | None,
        typer.Option(help="Retire the site's other keys after this long (e.g. 24h)."),
    ] = None,
) -> None:
    """Register a site's public key: its updates signed with it are accepted."""
    from fedround.tasks.core.signing import RegisteredKey
    from fedround.tasks.site_keys import register_key

    window = parse_overlap(overlap) if overlap else None
    try:
        key = RegisteredKey.from_text(public_key)
        register_key(_coordinator_store(), federation, site, key, window)
    except FedroundError as exc:
        _fail(str(exc))
    typer.echo(f"registered key {key.key_id} for site {site} of {federation}")


def rotate(
    site: Annotated[str, typer.Option(help="The site whose key to rotate.")],
    federation: Annotated[
        str | None,
        typer.Option(help="The site's federation (the demo's site config is found by it)."),
    ] = None,
    site_config: Annotated[
        Path | None,
        typer.Option(help="The site's site.yaml (default: the embedded demo's for --site)."),
    ] = None,
    overlap: Annotated[
        str, typer.Option(help="How long the old key stays valid: 30m, 24h, 7d.")
    ] = "24h",
) -> None:
    """Give a site a new signing key: written (0600) where its settings say, registered,
    and its old key kept valid for --overlap so in-flight updates are not lost."""
    from fedround.site_workers.settings import load_site_settings
    from fedround.site_workers.signing_key import rotate_site_key
    from fedround.tasks.runtime import CoordinatorSettings

    window = parse_overlap(overlap)
    if site_config is None:
        if federation is None:
            _fail("give --site-config (the site's site.yaml) or --federation (the demo's)", 2)
        site_config = CoordinatorSettings.from_env().site_config_file(federation, site)
    try:
        settings = load_site_settings(site_config)
        if settings.site != site or (federation and settings.federation != federation):
            _fail(f"{site_config} is the config of {settings.federation}/{settings.site}")
        new, old = rotate_site_key(settings, _coordinator_store(), window)
    except FedroundError as exc:
        _fail(str(exc))
    lines = [
        f"site {site} of {settings.federation}: new key {new.key_id} registered, written to "
        f"{settings.signing_key_path} (mode 0600)",
    ]
    if old is not None:
        until = datetime.now(UTC) + window
        lines.append(f"  old key {old.key_id} stays valid until {until:%Y-%m-%d %H:%M:%S} UTC")
    typer.echo("\n".join(lines))


def revoke(
    federation: Annotated[str, typer.Option(help="The site's federation.")],
    site: Annotated[str, typer.Option(help="The site whose key to revoke.")],
    key_id: Annotated[str, typer.Option(help="The key id (see `fedround keys list`).")],
    reason: Annotated[
        str, typer.Option(help="Why (required; it goes to the audit log), e.g. 'laptop lost'.")
    ],
) -> None:
    """Revoke a site's key now: updates signed with it are rejected from the next read on,
    and it can never be registered again. Give the site a new key with `keys rotate`."""
    from fedround.tasks.site_keys import revoke_key

    try:
        ring = revoke_key(_coordinator_store(), federation, site, key_id, reason)
    except FedroundError as exc:
        _fail(str(exc))
    still = [key.key_id for key in ring.valid(datetime.now(UTC))]
    typer.echo(f"revoked key {key_id} of site {site} of {federation} (audited)")
    if not still:
        typer.echo(
            f"  site {site} has no valid key left: its updates are rejected until it gets a "
            f"new one (fedround keys rotate --site {site} ...)"
        )


def export(
    federation: Annotated[str, typer.Option(help="The federation whose site keys to export.")],
    out: Annotated[
        Path, typer.Option("--out", help="Where to write them (JSON, public keys only).")
    ],
) -> None:
    """Write every site's registered public keys to a file, for the site operators to pin
    (``peer_keys_file`` in site.yaml): with secure aggregation each site then checks the
    other sites' key adverts itself. Export again after a rotation or revocation."""
    from fedround.tasks.core.signing import PeerKeys
    from fedround.tasks.site_keys import load_key_ring, registered_sites

    try:
        store = _coordinator_store()
        rings = {
            site: load_key_ring(store, federation, site)
            for site in registered_sites(store, federation)
        }
    except FedroundError as exc:
        _fail(str(exc))
    if not rings:
        _fail(f"no site keys registered for {federation}: nothing to export")
    peers = PeerKeys(federation=federation, exported_at=datetime.now(UTC), rings=rings)
    out.write_bytes(peers.to_json())
    typer.echo(
        f"wrote the keys of {len(rings)} sites of {federation} to {out}: give it to every "
        "site operator (peer_keys_file in site.yaml)"
    )


def dispatch(
    tenant: Annotated[str, typer.Option(help="The tenant whose coordinator's key to show.")],
    new_file: Annotated[
        Path | None,
        typer.Option(
            "--new-file",
            help="Write a new private dispatch key here (mode 0600) instead, for a secret "
            "the coordinator reads through FEDROUND_DISPATCH_KEY_FILE.",
        ),
    ] = None,
    federation: Annotated[
        str | None,
        typer.Option(help="Also list the keys published for this federation's sites."),
    ] = None,
) -> None:
    """The coordinator's dispatch key for a tenant: its key id and public key, to pin at
    the sites (``dispatch_keys`` in site.yaml). It seals every flow run sent to a site;
    a site's worker runs nothing else. The private key is never shown."""
    from fedround.flows.dispatch_key import load_dispatch_key, published_dispatch_keys
    from fedround.site_workers.signing_key import write_key_file
    from fedround.tasks.core.signing import SigningKey

    try:
        if new_file is not None:
            if new_file.exists():
                _fail(f"{new_file} exists: choose a new path (a key is never overwritten)")
            key = SigningKey.generate()
            write_key_file(new_file, key)
            typer.echo(f"wrote a new dispatch key {key.key_id} to {new_file} (mode 0600)")
        else:
            key = load_dispatch_key(tenant)
        typer.echo(f"tenant {tenant}: dispatch key {key.key_id}")
        typer.echo(f"pin it at each site (site.yaml):\n  dispatch_keys:\n    - {key.public_key}")
        if federation is not None:
            published = published_dispatch_keys(_coordinator_store(), federation)
            ids = [k.key_id for k in published.keys] if published else []
            typer.echo(f"published for {federation}: {', '.join(ids) or 'none yet'}")
    except FedroundError as exc:
        _fail(str(exc))


keys_app.command("list")(list_keys)
keys_app.command("dispatch")(dispatch)
keys_app.command("register")(register_command)
keys_app.command("rotate")(rotate)
keys_app.command("revoke")(revoke)
keys_app.command("export")(export)


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")
