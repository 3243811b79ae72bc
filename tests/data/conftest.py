import pwd

import pytest


@pytest.fixture
def no_home(monkeypatch):
    """A user with no cache folder: no LOMAR_CACHE_DIR, XDG_CACHE_HOME or HOME, and no home folder in the password
    database (a container run as a user id its image does not list)."""
    for name in ("LOMAR_CACHE_DIR", "XDG_CACHE_HOME", "HOME"):
        monkeypatch.delenv(name, raising=False)

    def unknown(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", unknown)
