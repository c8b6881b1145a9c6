"""One simulated host for the whole simulation module: media roots, a container in the session
Azurite, GigHive's tables in the session MariaDB, fault proxies and a running stream server.
Each example starts from World.reset()."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.simulation.world import World


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, azurite, mariadb) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("sim"), azurite, mariadb)
    try:
        yield w
    finally:
        w.close()
