"""Test-only helpers that run real services (Azurite, MariaDB, a token endpoint) on loopback.

Nothing here imports the ``agent`` package, so the infrastructure can be tested on its own.
"""
