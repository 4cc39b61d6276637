"""``fedround promote``, ``rollback``, ``lineage``, ``audit``, ``lock`` and ``checkpoints``:
the model lifecycle on the command line (registered into the ``fedround`` app by
``flows/cli/main.py``).

Exit codes: 0 done (promoted, canary started, rolled back, ...), 3 the candidate was
rejected by a gate, 1 an error (the message says what to do), 2 a config error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from fedround.flows import environment
from fedround.tasks.core.errors import ConfigError, FedroundError
from fedround.tasks.runtime import DEFAULT_STATE_DIR

REJECTED = 3

StateDir = Annotated[
    Path,
    typer.Option(
        "--state-dir",
        envvar="FEDROUND_STATE_DIR",
        help="Where Prefect, MLflow, the object store and run results live.",
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
Wait = Annotated[
    float,
    typer.Option("--wait", help="Wait up to this many seconds for another promotion's lock."),
]
ConfigArg = Annotated[Path, typer.Argument(help="Federation config (YAML).")]

checkpoints_app = typer.Typer(
    name="checkpoints",
    help="Checkpoint retention, backup and restore, bucket versioning.",
    no_args_is_help=True,
)


def _fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except FedroundError as exc:
        _fail(str(exc), 2 if isinstance(exc, ConfigError) else 1)


def _settings(state_dir: Path) -> Any:
    environment.configure(state_dir.resolve())
    from fedround.tasks.runtime import CoordinatorSettings

    return CoordinatorSettings.from_env()


@contextmanager
def _embedded_sites(config_path: Path, processes: int | None, distributed: bool) -> Iterator[None]:
    """Embedded: the demo sites on this machine evaluate; distributed: the sites' pools."""
    if distributed:
        if not os.environ.get("PREFECT_API_URL"):
            raise ConfigError("--distributed needs a Prefect server: set PREFECT_API_URL")
        yield
        return
    from fedround.flows.dispatch import embedded_federation

    with embedded_federation(config_path, processes):
        yield


def promote(
    config: ConfigArg,
    version: Annotated[
        str | None, typer.Option(help="Version to promote (default: alias 'candidate').")
    ] = None,
    allow_dirty: Annotated[
        bool,
        typer.Option(
            "--allow-dirty",
            envvar="FEDROUND_ALLOW_DIRTY",
            help="Use the config's gates even if it has uncommitted changes (recorded).",
        ),
    ] = False,
    wait: Wait = 0.0,
    distributed: Annotated[
        bool,
        typer.Option(
            "--distributed", help="Evaluate in the sites' own work pools (PREFECT_API_URL)."
        ),
    ] = False,
    processes: Annotated[
        int | None, typer.Option(help="Local site hosts, processes serving the sites (embedded).")
    ] = None,
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="Only repair: finish (if its alias had moved) or record as abandoned (if "
            "not) every promotion or rollback that died half-way, i.e. an 'intent' audit "
            "entry without its outcome. Every promotion and rollback does this first anyway.",
        ),
    ] = False,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    as_json: AsJson = False,
) -> None:
    """Evaluate the candidate and production models at every site and promote the
    candidate if it passes the federation's gates (or start its canary rollout).

    An alias change is audited twice: an 'intent' entry before it, the outcome after.
    A promotion that died in between is repaired from the registry's actual aliases by
    the next promotion or rollback, or by --repair alone."""
    _settings(state_dir)
    if repair:
        _repair(config, wait, as_json)
        return
    with _errors():
        from fedround.tasks.run_lineage import precheck

        precheck(config.resolve(), allow_dirty)
        with _embedded_sites(config.resolve(), processes, distributed):
            from fedround.flows.promotion import promote_model

            environment.quiet_known_errors()
            result = promote_model(
                config_path=str(config.resolve()),
                version=version,
                allow_dirty=allow_dirty,
                lock_wait_s=wait,
            )
    color = {"promoted": typer.colors.GREEN, "canary": typer.colors.YELLOW}
    typer.secho(
        f"fedround: {result.message}", fg=color.get(result.outcome, typer.colors.RED), err=True
    )
    if result.decision and "gates" in result.decision:
        for gate in result.decision["gates"]:
            typer.echo(
                f"  {'pass' if gate['passed'] else 'FAIL'}  {gate['gate']}: {gate['detail']}"
            )
    typer.echo(f"  audit entry #{result.audit_sequence}")
    if result.repaired:
        typer.echo(
            "  repaired first (an earlier change had died half-way): audit entries "
            + ", ".join(f"#{n}" for n in result.repaired)
        )
    if as_json:
        typer.echo(json.dumps(result.model_dump(mode="json")))
    if result.outcome == "rejected":
        raise typer.Exit(REJECTED)


def _repair(config: Path, wait: float, as_json: bool) -> None:
    with _errors():
        from fedround.flows.promotion import repair_promotions

        written = repair_promotions(str(config.resolve()), lock_wait_s=wait)
    if not written:
        typer.echo("fedround: nothing to repair: every promotion and rollback completed")
    for entry in written:
        typer.secho(f"  audit entry #{entry.sequence} {entry.action}: {entry.reason}", err=True)
    if as_json:
        typer.echo(json.dumps([entry.model_dump(mode="json") for entry in written]))


def rollback(
    config: ConfigArg,
    reason: Annotated[str, typer.Option(help="Why (goes into the audit log).")] = "",
    wait: Wait = 0.0,
    break_lock: Annotated[
        bool,
        typer.Option(
            "--break-lock",
            help="If a promotion holds the lock (e.g. it crashed and its lease has not run "
            "out), break the lock first; needs --reason; audited as 'lock-break'.",
        ),
    ] = False,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    as_json: AsJson = False,
) -> None:
    """Restore the previous production model (or stop a canary rollout in progress).

    A promotion that died half-way is repaired first. A dead promotion's lock is taken
    over once its lease runs out (at once if it ran on this machine and its process is
    gone); --break-lock --reason TEXT breaks it right away."""
    _settings(state_dir)
    with _errors():
        from fedround.flows.rollback import rollback_model

        environment.quiet_known_errors()
        result = rollback_model(
            config_path=str(config.resolve()),
            reason=reason,
            lock_wait_s=wait,
            break_lock=break_lock,
        )
    typer.secho(f"fedround: {result.message}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"  audit entry #{result.audit_sequence}")
    if as_json:
        typer.echo(json.dumps(result.model_dump(mode="json")))


def lineage(
    model: Annotated[str, typer.Argument(help="Registered model name, e.g. mnist-demo-global.")],
    version: Annotated[str, typer.Argument(help="Version number, or @alias (e.g. @production).")],
    verify: Annotated[
        bool, typer.Option("--verify", help="Re-check every checkpoint's digests.")
    ] = False,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    as_json: AsJson = False,
) -> None:
    """Print a registered model version's lineage: config revision, sites, data contracts,
    rounds, metrics, privacy budget, checkpoints, promotion history and cost."""
    settings = _settings(state_dir)
    with _errors():
        from fedround.tasks.lineage import build_lineage, render_text
        from fedround.tasks.object_store import open_store

        found = build_lineage(
            settings.tracking_uri, open_store(settings.object_store), model, version, verify
        )
    typer.echo(json.dumps(found.model_dump(mode="json")) if as_json else render_text(found))


def audit(
    federation: Annotated[str, typer.Argument(help="Federation name.")],
    model: Annotated[str | None, typer.Option(help="Only entries of this model.")] = None,
    verify: Annotated[
        bool, typer.Option("--verify", help="Check the log's sequence and hash chain.")
    ] = False,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Print a federation's audit log as JSON lines (who, when, what, why).

    Exits 1 if an entry is malformed (it is named on stderr, the others are printed), or,
    with ``--verify``, if the log fails its check: a malformed entry, a gap, a broken hash
    chain, or an end that does not match the log's head (entries deleted from the end)."""
    settings = _settings(state_dir)
    with _errors():
        from fedround.tasks.audit import AuditLog, render_jsonl
        from fedround.tasks.object_store import open_store

        log = AuditLog(open_store(settings.object_store), federation)
        entries, unreadable = log.read(model)
        typer.echo(render_jsonl(entries), nl=False)
        if verify:
            check = log.check()
            check.notes += _half_done(log, model)
            for note in check.notes:
                typer.secho(f"audit log note: {note}", fg=typer.colors.YELLOW, err=True)
            for problem in check.problems:
                typer.secho(f"audit log problem: {problem}", fg=typer.colors.RED, err=True)
            if check.problems:
                raise typer.Exit(1)
            typer.secho("audit log intact", err=True)
        elif unreadable:
            # An incomplete listing must not pass for the whole log (e.g. a compliance export).
            for problem in unreadable:
                typer.secho(
                    f"audit log problem: {problem} (not listed)", fg=typer.colors.RED, err=True
                )
            typer.secho(
                f"{len(unreadable)} malformed entries left out; `fedround audit {federation} "
                "--verify` checks the whole log",
                err=True,
            )
            raise typer.Exit(1)


def _half_done(log: Any, model: str | None) -> list[str]:
    """A note per 'intent' entry without its outcome (a change that died half-way, or
    one running now)."""
    from fedround.tasks.audit import pending_intents

    return [
        f"entry {e.sequence} records the intent to {e.details.get('intends')} {e.model} "
        f"v{e.version} but no outcome: if no promotion or rollback is running, "
        "`fedround promote <config> --repair` finishes or abandons it"
        for e in pending_intents(log.entries(model))
    ]


# --- locks ------------------------------------------------------------------------------

lock_app = typer.Typer(
    name="lock",
    help="Show and break the federation's single-writer locks (promotions, training runs).",
    no_args_is_help=True,
)


@lock_app.command("show")
def lock_show(
    federation: Annotated[str, typer.Argument(help="Federation name.")],
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """List the federation's locks: holder, host, process, lease."""
    settings = _settings(state_dir)
    with _errors():
        from fedround.tasks.core import keys
        from fedround.tasks.locks import lease_expired, read_lock
        from fedround.tasks.object_store import open_store

        store = open_store(settings.object_store)
        prefix = keys.lock_key(federation, "x").removesuffix("x.json")
        found = [key for key in store.list(prefix) if key.endswith(".json")]
        for key in found:
            info = read_lock(store, key)
            if info is None or info.get("broken"):
                continue
            state = "expired" if lease_expired(info) else "held"
            typer.echo(
                f"{key[len(prefix) : -len('.json')]}  {state}  {info.get('holder', '?')} on "
                f"{info.get('host', '?')} (pid {info.get('pid', '?')}): "
                f"{info.get('purpose') or '?'}; since {info.get('acquired_at', '?')}, lease "
                f"until {info.get('expires_at', '?')}"
            )


@lock_app.command("break")
def lock_break(
    federation: Annotated[str, typer.Argument(help="Federation name.")],
    name: Annotated[
        str,
        typer.Argument(
            help="The lock, as `fedround lock show` lists it: promotion-<model>, run-<run id>."
        ),
    ],
    reason: Annotated[
        str, typer.Option(help="Why its holder is known to be gone (required; audited).")
    ] = "",
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Break a lock whose holder is gone (a crashed promotion or coordinator) before its
    lease runs out. Refuses without --reason; the break goes into the audit log. Breaking
    a live holder's lock makes it stop (it checks its lock before every write)."""
    settings = _settings(state_dir)
    with _errors():
        from fedround.tasks.audit import AuditLog
        from fedround.tasks.lifecycle import break_lock_audited
        from fedround.tasks.object_store import open_store

        store = open_store(settings.object_store)
        entry = break_lock_audited(store, AuditLog(store, federation), name, reason)
    broken = entry.details["broken_lock"]
    typer.secho(
        f"fedround: broke the lock {entry.details['uri']} of {broken.get('holder', '?')} "
        f"({broken.get('purpose') or '?'}); audit entry #{entry.sequence}",
        fg=typer.colors.YELLOW,
        err=True,
    )


# --- checkpoints ------------------------------------------------------------------------


def _store_at(settings: Any, location: str) -> Any:
    """``s3://bucket`` (same S3 server and keys as the coordinator) or a local folder."""
    from fedround.tasks.object_store import ObjectStoreSettings, open_store

    if location.startswith("s3://"):
        bucket = location[len("s3://") :].strip("/")
        if not bucket or "/" in bucket:
            raise ConfigError(f"{location}: name a bucket, like s3://fedround-backup")
        if settings.object_store.kind != "s3":
            raise ConfigError(
                f"{location}: the coordinator's object store is local; back up to a folder"
            )
        return open_store(settings.object_store.model_copy(update={"bucket": bucket}))
    return open_store(ObjectStoreSettings(kind="local", root=Path(location).resolve()))


@checkpoints_app.command("prune")
def prune(
    older_than: Annotated[
        str, typer.Option(help="Delete checkpoints older than this (90d, 12h, 2w, 0s).")
    ] = "90d",
    federation: Annotated[
        str | None, typer.Option(help="The federation to prune (or --all-federations).")
    ] = None,
    all_federations: Annotated[
        bool, typer.Option("--all-federations", help="Prune every federation in the store.")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would go.")] = False,
    purge_versions: Annotated[
        bool,
        typer.Option(
            "--purge-versions", help="Also delete old versions kept by bucket versioning."
        ),
    ] = False,
    no_registry_check: Annotated[
        bool,
        typer.Option(
            "--no-registry-check",
            help="Prune even if the model registry cannot be read or lists no versions: "
            "checkpoints behind registered versions are then NOT protected (each run's "
            "latest still is). Without it, prune refuses and deletes nothing.",
        ),
    ] = False,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    as_json: AsJson = False,
) -> None:
    """Delete old checkpoints of one federation, keeping every one behind a registered
    model version, the latest of every run (whatever its age) and all of a run that is
    still open. Refuses, deleting nothing, if the model registry cannot be read or lists
    no versions (see --no-registry-check), or if another prune of the federation runs."""
    if (federation is None) == (not all_federations):
        _fail(
            "name the federation to prune with --federation NAME, or prune every federation "
            "in the store with --all-federations (not both)",
            2,
        )
    settings = _settings(state_dir)
    with _errors():
        from fedround.tasks.object_store import open_store
        from fedround.tasks.retention import (
            describe,
            parse_age,
            protected_digests,
            prune_checkpoints,
        )

        age = parse_age(older_than)
        digests = protected_digests(settings.tracking_uri, registry_check=not no_registry_check)
        if no_registry_check and not digests:
            typer.secho(
                "warning: --no-registry-check: the model registry protects no checkpoint; "
                "only each run's latest and those newer than "
                f"{older_than} are kept",
                fg=typer.colors.YELLOW,
                err=True,
            )
        report = prune_checkpoints(
            open_store(settings.object_store),
            digests,
            age,
            federation,
            dry_run=dry_run,
            purge_versions=purge_versions,
            registry_check=not no_registry_check,
        )
    verb = "would delete" if dry_run else "deleted"
    typer.echo(
        f"fedround: {verb} {len(report.deleted)} checkpoints ({report.bytes_freed} bytes); kept "
        f"{len(report.kept_registered)} behind registered versions, {len(report.kept_latest)} "
        f"latest of their run, {report.kept_recent} newer than {older_than}"
        + (f", {len(report.kept_unreadable)} unreadable" if report.kept_unreadable else "")
        + (f", {len(report.kept_open)} of runs still open" if report.kept_open else "")
        + (f"; purged {report.versions_purged} old versions" if purge_versions else "")
    )
    for name in describe(report.deleted):
        typer.echo(f"  {verb}  {name}")
    for prefix, versions in sorted(report.kept_registered.items()):
        typer.echo(f"  kept     {prefix} (registered: {', '.join(versions)})")
    for name in describe(report.kept_latest):
        typer.echo(f"  kept     {name} (latest checkpoint of its run)")
    for name in describe(report.kept_unreadable):
        typer.echo(f"  kept     {name} (unreadable manifest: check it)")
    for name in describe(report.kept_open):
        typer.echo(f"  kept     {name} (its run is still open: a coordinator holds its lock)")
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "deleted": describe(report.deleted),
                    "kept_registered": report.kept_registered,
                    "kept_latest": describe(report.kept_latest),
                    "kept_unreadable": describe(report.kept_unreadable),
                    "kept_open": describe(report.kept_open),
                    "kept_recent": report.kept_recent,
                    "bytes_freed": report.bytes_freed,
                    "dry_run": dry_run,
                }
            )
        )


def _copy(settings: Any, source: Any, destination: Any, federation: str, run_id: str) -> None:
    from fedround.tasks.retention import copy_run_checkpoints, ensure_bucket

    ensure_bucket(destination)
    report = copy_run_checkpoints(source, destination, federation, run_id)
    typer.echo(
        f"fedround: copied {len(report.rounds)} checkpoints ({report.files} files, "
        f"{report.bytes} bytes) of run {run_id}\n  from {report.source}\n  to   "
        f"{report.destination}\n  every digest verified before and after the copy"
    )
    for round_, digest in report.rounds.items():
        typer.echo(f"  round {round_:>4}  sha256 {digest}")


@checkpoints_app.command("backup")
def backup(
    run_id: Annotated[str, typer.Argument(help="Training run id.")],
    federation: Annotated[str, typer.Option(help="The run's federation.")],
    to: Annotated[str, typer.Option("--to", help="s3://bucket or a local folder.")],
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Copy a run's checkpoints to another bucket (or folder), verifying every digest."""
    settings = _settings(state_dir)
    with _errors():
        from fedround.tasks.object_store import open_store

        _copy(
            settings, open_store(settings.object_store), _store_at(settings, to), federation, run_id
        )


@checkpoints_app.command("restore")
def restore(
    run_id: Annotated[str, typer.Argument(help="Training run id.")],
    federation: Annotated[str, typer.Option(help="The run's federation.")],
    source: Annotated[str, typer.Option("--from", help="s3://bucket or a local folder.")],
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Copy a run's checkpoints back from a backup, verifying every digest."""
    settings = _settings(state_dir)
    with _errors():
        from fedround.tasks.object_store import open_store

        _copy(
            settings,
            _store_at(settings, source),
            open_store(settings.object_store),
            federation,
            run_id,
        )


@checkpoints_app.command("versioning")
def versioning(
    enable: Annotated[bool, typer.Option("--enable", help="Turn bucket versioning on.")] = False,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Show (or turn on) versioning of the coordinator's checkpoint bucket."""
    settings = _settings(state_dir)
    with _errors():
        from fedround.tasks.object_store import open_store
        from fedround.tasks.retention import enable_versioning, versioning_status

        store = open_store(settings.object_store)
        status = enable_versioning(store) if enable else versioning_status(store)
    typer.echo(f"bucket versioning: {status}")


def register(app: typer.Typer) -> None:
    app.command()(promote)
    app.command()(rollback)
    app.command()(lineage)
    app.command()(audit)
    app.add_typer(lock_app)
    app.add_typer(checkpoints_app)
