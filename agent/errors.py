"""Exception types and the exit codes they map to.

Exit codes follow sysexits(3) where systemd cares: 78 (EX_CONFIG) is listed in the
units' RestartPreventExitStatus=, so a bad configuration never restart-loops.
"""

EXIT_OK = 0
EXIT_FAILURE = 1  # work was attempted and some of it failed (status/verify style commands)
EXIT_USAGE = 2  # argparse's own code for bad command-line usage
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: a dependency (Azure, MySQL) cannot be reached
EXIT_SOFTWARE = 70  # EX_SOFTWARE: a bug; the traceback is in the log
EXIT_CANTCREAT = 73  # EX_CANTCREAT: the state directory cannot be written
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL: another run holds the queue lock
EXIT_CONFIG = 78  # EX_CONFIG


class AgentError(Exception):
    """Base class for errors the agent reports without a traceback."""

    exit_code = EXIT_FAILURE


class ConfigError(AgentError):
    """A configuration value is missing or invalid. The message names the variable."""

    exit_code = EXIT_CONFIG

    def __init__(self, variable: str, problem: str):
        self.variable = variable
        self.problem = problem
        super().__init__(f"{variable}: {problem}")


class ConfigErrors(AgentError):
    """Every configuration problem found in one pass, so the operator fixes them all at once."""

    exit_code = EXIT_CONFIG

    def __init__(self, errors: list[ConfigError]):
        self.errors = errors
        super().__init__("; ".join(str(e) for e in errors))


class StateError(AgentError):
    """The state directory or database cannot be used."""

    exit_code = EXIT_CANTCREAT


class CannotWrite(AgentError):
    """A file the command must write (besides the state) cannot be written: nothing was changed."""

    exit_code = EXIT_CANTCREAT


class Unavailable(AgentError):
    """Azure Blob or MySQL cannot be used, and the command has no way to record it for later."""

    exit_code = EXIT_UNAVAILABLE


class LockBusy(AgentError):
    """Another agent process is working on the queue."""

    exit_code = EXIT_TEMPFAIL


class FileRejected(Exception):
    """A media file cannot be uploaded as it is (not regular, being written, vanished...)."""


class ContentMismatch(Exception):
    """A content-addressed file's bytes do not hash to the sha256 in its name."""

    def __init__(self, expected: str, actual: str):
        self.expected = expected
        self.actual = actual
        super().__init__(f"sha256 of the content is {actual}, but the file name says {expected}")


class Interrupted(Exception):
    """The run is stopping (Ctrl-C): the transfer gave up between two blocks; the next run resumes it."""


class VerificationFailed(Exception):
    """A committed blob does not match what the agent computed from the local file."""
