"""Fixtures that put the agent in front of the test services."""

from __future__ import annotations

import pytest
from azure.storage.blob import BlobServiceClient

from tests.integration.agent_harness import Harness, connection_string_settings


@pytest.fixture
def harness(tmp_path, azurite, blob_container, media_roots) -> Harness:
    """The agent configured for the session Azurite (dev key) and a fresh container."""
    h = Harness(tmp_path, media_roots)
    h.settings = connection_string_settings(
        azurite.connection_string, blob_container.container_name, media_roots, h.state_dir
    )
    h.write_config()
    return h


@pytest.fixture
def private_harness(tmp_path, azurite_factory, media_roots):
    """The agent configured for an Azurite of its own (container `media`), for tests that stop or
    kill the service. Returns (harness, azurite)."""
    az = azurite_factory()
    BlobServiceClient.from_connection_string(az.connection_string).create_container("media")
    h = Harness(tmp_path, media_roots)
    h.settings = connection_string_settings(az.connection_string, "media", media_roots, h.state_dir)
    h.write_config()
    return h, az
