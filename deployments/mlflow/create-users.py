"""Create fedround's MLflow users on the ``fedround-auth`` MLflow server (standard library only).

    python create-users.py USER [USER ...]

Runs once after the MLflow server is healthy (compose service ``mlflow-users``, k8s Job
``mlflow-users``), as the MLflow admin. Environment (the fedround image's entrypoint turns
each ``NAME_FILE`` into ``NAME`` and refuses placeholder values):

    MLFLOW_TRACKING_URI               the server, https:// only (the admin password goes to it)
    MLFLOW_TRACKING_USERNAME          the MLflow admin (``admin_username`` of basic_auth.ini)
    MLFLOW_TRACKING_PASSWORD          its password (``MLFLOW_AUTH_ADMIN_PASSWORD`` of the server)
    MLFLOW_TRACKING_SERVER_CERT_PATH  the CA that signed the server's certificate (ca.crt)
    MLFLOW_PASSWORD_<USER>            each user's password; USER upper-cased, other characters
                                      than A-Z and 0-9 as ``_`` (coordinator:
                                      MLFLOW_PASSWORD_COORDINATOR)
    MLFLOW_USERS_WAIT_S               how long to wait for the server to answer (default 300)

Each user is created with ``POST /api/2.0/mlflow/users/create``. A user that exists already
counts as done; its password is left as it is (change it with MLflow's update-password API).
New users get the server's ``default_permission`` (READ) on what others own, and MANAGE on
the experiments and models they create. No password is ever printed. Exit status 0 when
every user exists; otherwise 1, with a one-line reason on stderr.
"""

from __future__ import annotations

import base64
import json
import os
import re
import ssl
import sys
import time
import urllib.error
import urllib.request

CREATE_PATH = "/api/2.0/mlflow/users/create"
ALREADY_EXISTS = "RESOURCE_ALREADY_EXISTS"
MIN_PASSWORD_LENGTH = 12  # mlflow.utils.validation._validate_password
RETRY_STATUSES = frozenset({502, 503, 504})
RETRY_EVERY_S = 2.0
REQUEST_TIMEOUT_S = 10.0


class Failure(Exception):
    """Why the users could not be created: one line, never a secret."""


class NotYet(Exception):
    """The server did not answer (yet): try again until the deadline."""


def password_variable(user: str) -> str:
    """The environment variable holding ``user``'s password."""
    return "MLFLOW_PASSWORD_" + re.sub(r"[^A-Z0-9]", "_", user.upper())


def _required(name: str) -> str:
    value = os.environ.get(name, "")
    if not value.strip():
        raise Failure(f"{name} is not set")
    return value


def _answer(raw: bytes) -> dict[str, object]:
    try:
        payload = json.loads(raw)
    except ValueError:
        return {}
    return payload if isinstance(payload, dict) else {}


def _one_line(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return " ".join(text.split())[:300]


def create_user(
    base_url: str,
    admin: tuple[str, str],
    user: str,
    password: str,
    context: ssl.SSLContext,
) -> str:
    """``created`` or ``exists``; :class:`NotYet` while the server is not up, :class:`Failure`
    for any other answer."""
    secrets = [admin[1], password]
    token = base64.b64encode(f"{admin[0]}:{admin[1]}".encode()).decode()
    request = urllib.request.Request(
        base_url.rstrip("/") + CREATE_PATH,
        data=json.dumps({"username": user, "password": password}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Basic {token}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, context=context, timeout=REQUEST_TIMEOUT_S):
            return "created"
    except urllib.error.HTTPError as exc:
        payload = _answer(exc.read())
        code = str(payload.get("error_code", ""))
        if code == ALREADY_EXISTS:
            return "exists"
        if exc.code in RETRY_STATUSES:
            raise NotYet(f"HTTP {exc.code}") from None
        if exc.code == 401:
            raise Failure(
                f"the MLflow server refused the admin credentials (HTTP 401): check "
                f"MLFLOW_TRACKING_USERNAME ({admin[0]!r}) and MLFLOW_TRACKING_PASSWORD"
            ) from None
        if exc.code == 403:
            raise Failure(f"{admin[0]!r} may not create users (HTTP 403): not an admin") from None
        message = _one_line(str(payload.get("message") or exc.reason), secrets)
        raise Failure(
            f"creating MLflow user {user!r} failed: HTTP {exc.code} {code}: {message}"
        ) from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLError):  # a certificate problem: waiting won't help
            reason = _one_line(str(exc.reason), secrets)
            raise Failure(f"TLS with {base_url} failed: {reason}") from None
        raise NotYet(_one_line(str(exc.reason), secrets)) from None
    except ssl.SSLError as exc:
        raise Failure(f"TLS with {base_url} failed: {_one_line(str(exc), secrets)}") from None
    except OSError as exc:  # reset, timeout
        raise NotYet(_one_line(str(exc), secrets)) from None


def main(argv: list[str]) -> int:
    try:
        users = argv[1:]
        if not users:
            raise Failure("usage: create-users.py USER [USER ...]")
        base_url = _required("MLFLOW_TRACKING_URI")
        if not base_url.startswith("https://"):
            raise Failure("MLFLOW_TRACKING_URI must be https:// (the admin password is sent)")
        admin = (_required("MLFLOW_TRACKING_USERNAME"), _required("MLFLOW_TRACKING_PASSWORD"))
        passwords = {user: _required(password_variable(user)) for user in users}
        for user, password in passwords.items():
            if len(password) < MIN_PASSWORD_LENGTH:
                raise Failure(
                    f"{password_variable(user)} is shorter than MLflow's minimum of "
                    f"{MIN_PASSWORD_LENGTH} characters"
                )
        ca_file = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or None
        try:
            context = ssl.create_default_context(cafile=ca_file)
        except OSError as exc:
            raise Failure(f"cannot read the CA {ca_file}: {exc.strerror or exc}") from None
        try:
            wait_s = float(os.environ.get("MLFLOW_USERS_WAIT_S", "300"))
        except ValueError:
            raise Failure("MLFLOW_USERS_WAIT_S is not a number of seconds") from None
        deadline = time.monotonic() + wait_s
        for user, password in passwords.items():
            while True:
                try:
                    outcome = create_user(base_url, admin, user, password, context)
                    break
                except NotYet as exc:
                    if time.monotonic() >= deadline:
                        raise Failure(
                            f"{base_url} did not answer within {wait_s:g} s ({exc})"
                        ) from None
                    time.sleep(RETRY_EVERY_S)
            done = "created" if outcome == "created" else "already exists"
            sys.stdout.write(f"mlflow-users: MLflow user {user!r} {done}\n")
    except Failure as exc:
        sys.stderr.write(f"mlflow-users: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
