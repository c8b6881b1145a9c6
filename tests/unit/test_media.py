"""Blob names mirror URL paths; only top-level files of content-addressed roots are held to their name."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from agent.config import Config, MediaRoot
from agent.media import content_type_for, media_file_for_blob, media_file_for_path, name_problem

SHA = "a" * 64


@pytest.fixture
def config() -> Config:
    return Config(
        backend="azure_blob",
        roots=(
            MediaRoot("audio", Path("/home/ubuntu/audio"), True),
            MediaRoot("video", Path("/home/ubuntu/video"), True),
            MediaRoot("extras", Path("/srv/extras"), False),
        ),
        state_dir=Path("/var/lib/gighive-media-agent"),
    )


def test_blob_name_is_the_url_path(config):
    mf = media_file_for_path(config, Path(f"/home/ubuntu/video/{SHA}.mp4"))
    assert mf.blob_name == f"video/{SHA}.mp4"
    assert mf.expected_sha256 == SHA
    assert mf.content_type == "video/mp4"


def test_thumbnail_is_not_held_to_its_name(config):
    mf = media_file_for_path(config, Path(f"/home/ubuntu/video/thumbnails/{SHA}.png"))
    assert mf.blob_name == f"video/thumbnails/{SHA}.png"
    assert mf.expected_sha256 is None
    assert mf.content_type == "image/png"


def test_non_content_addressed_root_has_no_expected_hash(config):
    mf = media_file_for_path(config, Path(f"/srv/extras/{SHA}.mp3"))
    assert mf.expected_sha256 is None


def test_other_names_in_content_addressed_root_are_not_checked(config):
    assert media_file_for_path(config, Path("/home/ubuntu/audio/intro.mp3")).expected_sha256 is None


def test_path_outside_every_root(config):
    assert media_file_for_path(config, Path("/etc/passwd")) is None
    assert media_file_for_path(config, Path("/home/ubuntu/audio")) is None


@pytest.mark.parametrize(
    ("rel", "problem"),
    [
        (".hidden.mp3", "hidden"),
        ("sub/.git/x.mp3", "hidden"),
        ("upload.mp4.part", "temporary"),
        ("x.tmp", "temporary"),
        ("x.mp3~", "temporary"),
        ("name.", "not representable"),
        ("bad\\name.mp3", "not representable"),
        ("ctl\x01.mp3", "control character"),
    ],
)
def test_names_that_are_not_media(rel, problem):
    assert problem in name_problem(PurePosixPath(rel))


def test_plain_media_name_has_no_problem():
    assert name_problem(PurePosixPath(f"{SHA}.mp3")) is None


@pytest.mark.parametrize(
    "name",
    ["audio/../etc/passwd", "audio//x.mp3", "nope/x.mp3", "audio", "audio/./x.mp3", "audio/x\x00.mp3", "a" * 2000],
)
def test_blob_names_that_map_to_nothing(config, name):
    assert media_file_for_blob(config, name) is None


def test_blob_name_maps_back_to_the_local_path(config):
    mf = media_file_for_blob(config, f"audio/{SHA}.mp3")
    assert mf.path == Path(f"/home/ubuntu/audio/{SHA}.mp3")


@pytest.mark.parametrize(
    ("name", "ctype"),
    [
        ("a.mp3", "audio/mpeg"),
        ("a.M4A", "audio/mp4"),
        ("a.mov", "video/quicktime"),
        ("a.unknownext", "application/octet-stream"),
    ],
)
def test_content_types(name, ctype):
    assert content_type_for(name) == ctype
