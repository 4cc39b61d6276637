"""MLflow server app ``fedround-auth``: MLflow's basic-auth app plus one rule on model aliases.

The rule: on MLflow registered models, only the *promotion identity* may set or delete an
alias other than ``candidate``. The promotion identity is any MLflow admin, or a user named
in the comma-separated environment variable ``FEDROUND_MLFLOW_PROMOTERS`` of the server.
Any other authenticated user who tries gets a 403 ``PERMISSION_DENIED`` that says to use
``fedround promote``.

Why: basic auth alone gates alias changes by EDIT/MANAGE permission on the model, and the
coordinator identity that creates a registered model gets MANAGE on it. So, with basic auth
only, the coordinator (or anyone holding its credentials) could point ``production`` at any
version it registered and skip the promotion checks. With this rule the coordinator can
only do what a round needs: register each new version with alias ``candidate`` (see
:mod:`fedround.tasks.registry`). Moving ``production``, ``deprecated`` or any other alias
takes the promotion identity (the one ``fedround promote`` runs as). The promoter still
needs EDIT (or MANAGE) on the model for basic auth's own check; this rule only narrows.

Registered under the ``mlflow.app`` entry point in ``pyproject.toml``; start it with
``mlflow server --app-name fedround-auth`` and the usual basic-auth settings
(``MLFLOW_AUTH_CONFIG_PATH``, ``MLFLOW_FLASK_SERVER_SECRET_KEY``). It needs MLflow's
``auth`` extra (Flask-WTF), like ``--app-name basic-auth``.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from flask import Response, request
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, PERMISSION_DENIED

if TYPE_CHECKING:
    from fastapi import FastAPI
    from flask import Flask

logger = logging.getLogger(__name__)

# The alias the coordinator gives each version it registers: fedround.tasks.registry.CANDIDATE.
# Not imported from there: that module pulls in the model code (torch) at import, and this
# one is loaded in every MLflow server worker.
CANDIDATE = "candidate"
PROMOTERS_ENV = "FEDROUND_MLFLOW_PROMOTERS"
# Set (POST) and delete (DELETE) of an alias, under /api/2.0/mlflow/ and /ajax-api/2.0/mlflow/.
ALIAS_ROUTE_SUFFIX = "registered-models/alias"
ALIAS_METHODS = frozenset({"POST", "DELETE"})


def alias_change_allowed(
    alias: str, username: str, is_admin: bool, promoters: frozenset[str]
) -> bool:
    """True when ``username`` may set or delete ``alias`` on a registered model.

    ``candidate`` is free (for whoever basic auth lets edit the model); every other alias,
    ``production`` first, needs the promotion identity: an admin or a listed promoter.
    """
    return alias == CANDIDATE or is_admin or username in promoters


def promoters_from_env(value: str | None) -> frozenset[str]:
    """The user names in a comma-separated ``FEDROUND_MLFLOW_PROMOTERS`` value."""
    return frozenset(name.strip() for name in (value or "").split(",") if name.strip())


def requested_aliases(body: bytes, query_aliases: list[str]) -> list[str]:
    """Every alias a set/delete-alias request names: its JSON body's ``alias`` and the query's.

    MLflow's handler reads the body only (as JSON whatever the content type, decoding a
    JSON string that holds JSON a second time, as old clients send it); the query string
    is checked too, so no spelling of the request gets an alias past the rule unseen.
    Raises ``ValueError`` when the body is not a JSON object or ``alias`` is not a string.
    """
    aliases = list(query_aliases)
    if not body.strip():
        return aliases
    try:
        payload = json.loads(body)
        if isinstance(payload, str):
            payload = json.loads(payload)
    except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"the request body is not JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise ValueError("the request body must be a JSON object")
    if "alias" in payload:
        alias = payload["alias"]
        if not isinstance(alias, str):
            raise ValueError("'alias' must be a string")
        aliases.append(alias)
    return aliases


def _error(message: str, error_code: int) -> Response:
    """An error in MLflow's REST format, so clients raise ``RestException`` with the message."""
    exc = MlflowException(message, error_code=error_code)
    return Response(
        exc.serialize_as_json(), status=exc.get_http_status_code(), mimetype="application/json"
    )


def refuse_alias_change_unless_promoter(promoters: frozenset[str]) -> Response | None:
    """Flask ``before_request`` hook: a 403 for a non-promoter's change of a protected alias.

    Runs after basic auth's own hook, so the caller is authenticated (basic auth answered
    401 and stopped the chain otherwise) and holds basic auth's permission on the model.
    """
    rule = request.url_rule  # None when nothing matched: no handler will run
    if rule is None or request.method not in ALIAS_METHODS:
        return None
    if not rule.rule.rstrip("/").endswith(ALIAS_ROUTE_SUFFIX):
        return None
    try:
        aliases = requested_aliases(request.get_data(cache=True), request.args.getlist("alias"))
    except ValueError as exc:
        return _error(f"malformed alias request: {exc}", INVALID_PARAMETER_VALUE)
    protected = [alias for alias in aliases if alias != CANDIDATE]
    if not protected:
        return None
    # Imported here, not at the top: importing it reads the auth config and needs Flask-WTF;
    # the pure rule above stays importable (and testable) without either.
    from mlflow.server import auth as basic_auth

    authorization = basic_auth.authenticate_request()
    if isinstance(authorization, Response):
        return authorization
    username = str(authorization.username)
    # What basic auth's sender_is_admin() does, without checking the password a third time.
    is_admin = bool(basic_auth.store.get_user(username).is_admin)
    for alias in protected:
        if not alias_change_allowed(alias, username, is_admin, promoters):
            logger.warning("refused alias %r on a registered model to user %r", alias, username)
            return _error(
                f"alias '{alias}' on registered models may be set only by the promotion "
                f"identity (an MLflow admin or a user in {PROMOTERS_ENV}); use "
                "`fedround promote`",
                PERMISSION_DENIED,
            )
    return None


@contextlib.contextmanager
def _init_lock() -> Iterator[None]:
    path = Path(tempfile.gettempdir()) / "fedround-auth-init.lock"
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def create_app() -> Flask | FastAPI:
    """MLflow's basic-auth app with the alias rule; the ``mlflow.app`` factory.

    The rule is registered after basic auth's ``create_app`` has added its own
    ``before_request`` hook: Flask runs those hooks in order, so the rule sees only
    authenticated callers. Under uvicorn basic auth returns a FastAPI app wrapping the same
    Flask app, so the hook added to the Flask app still runs for every Flask route.
    """
    from mlflow.server import app
    from mlflow.server import auth as basic_auth

    promoters = promoters_from_env(os.environ.get(PROMOTERS_ENV))
    # `mlflow server --app-name basic-auth` creates the user store and the admin once, in
    # the parent, before it starts workers; for another app name each worker does it in
    # create_app. One lock per host keeps the workers of a first start from racing.
    with _init_lock():
        auth_app: Flask | FastAPI = basic_auth.create_app(app)
    app.before_request(functools.partial(refuse_alias_change_unless_promoter, promoters))
    if not promoters:
        logger.warning(
            "fedround-auth: %s is empty; only MLflow admins may move aliases other than %r",
            PROMOTERS_ENV,
            CANDIDATE,
        )
    return auth_app
