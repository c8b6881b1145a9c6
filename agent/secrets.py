"""Reading secrets from files, never from argv.

Secrets reach the agent as files: systemd's LoadCredential= puts them under
$CREDENTIALS_DIRECTORY (a private ramfs only the service can read), or an operator names a
file with a *_FILE variable. A file that other users can read is refused rather than used,
because using it would silently bless a leak.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import ConfigError


class Secret:
    """A string that does not print itself, so it cannot reach a log line or `status` by accident."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def credential_path(name: str, environ: dict[str, str]) -> Path | None:
    """The file systemd's LoadCredential=<name> would provide, if it exists."""
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    candidate = Path(directory) / name
    return candidate if candidate.exists() else None


def check_private_file(path: Path, variable: str) -> None:
    """Refuse a secret file that is not a regular file or that 'other' users may read."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(variable, f"secret file {path} does not exist") from None
    except PermissionError:
        raise ConfigError(variable, f"secret file {path} is not readable by this user") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(variable, f"secret file {path} is not a regular file")
    if st.st_mode & (stat.S_IROTH | stat.S_IWOTH):
        raise ConfigError(
            variable,
            f"secret file {path} is readable or writable by other users (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); refusing it. Fix with: chmod o-rwx {path}",
        )


def read_secret_file(path: Path, variable: str) -> Secret:
    check_private_file(path, variable)
    try:
        value = path.read_text(encoding="utf-8")
    except PermissionError:
        raise ConfigError(variable, f"secret file {path} is not readable by this user") from None
    except UnicodeDecodeError:
        raise ConfigError(variable, f"secret file {path} is not UTF-8 text") from None
    # Editors and `echo` leave a trailing newline; a secret never legitimately ends in one.
    value = value.rstrip("\r\n")
    if not value:
        raise ConfigError(variable, f"secret file {path} is empty")
    return Secret(value)
