"""The local tokens the tests authenticate with (created in the tests' own credentials folder, see
tests/conftest.py), as websockets `connect` keyword arguments."""

from __future__ import annotations

from marginflow import auth, config


def local_token(role: str = "admin") -> str:
    """The local token of a role ("admin", "publisher", "subscriber", "query") or a demo desk
    ("desk:risk")."""
    return auth.local_token(role, config.current_access())


def with_token(role: str = "admin", token: str | None = None) -> dict:
    """websockets `connect` keyword arguments carrying a token (default: the local one of `role`)."""
    return {"additional_headers": {"Authorization": f"Bearer {token or local_token(role)}"}}


def desk_token(desk: str = "risk") -> dict:
    """`connect` keyword arguments for calc's API as a demo desk (its local token in the handshake)."""
    return with_token(token=local_token(f"desk:{desk}"))
