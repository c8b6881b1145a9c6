"""The URL gate: which request targets may name a file or blob, and that nothing else can."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import Config, MediaRoot
from agent.media_urls import media_file_for_target

SHA = "0123456789abcdef" * 4
CONFIG = Config(
    backend="azure_blob",
    roots=(
        MediaRoot("audio", Path("/srv/media/audio"), True),
        MediaRoot("video", Path("/srv/media/video"), True),
        MediaRoot("extras", Path("/srv/media/extras"), False),
    ),
    state_dir=Path("/var/lib/x"),
)
ALLOWED_CONTENT_ADDRESSED = re.compile(
    r"^(audio|video)/([0-9a-f]{64}\.[A-Za-z0-9]{1,10}|thumbnails/[0-9a-f]{64}\.png)$"
)
ALLOWED_OTHER = re.compile(r"^extras/([A-Za-z0-9][A-Za-z0-9._-]{0,254}/){0,3}[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")


@pytest.mark.parametrize(
    ("target", "blob_name"),
    [
        (f"/audio/{SHA}.mp3", f"audio/{SHA}.mp3"),
        (f"/video/{SHA}.mp4", f"video/{SHA}.mp4"),
        (f"/video/{SHA}.MOV", f"video/{SHA}.MOV"),
        (f"/video/thumbnails/{SHA}.png", f"video/thumbnails/{SHA}.png"),
        (f"/video/{SHA}.mp4?v=2&x=%2F..", f"video/{SHA}.mp4"),  # the query is ignored
        (f"http://example.org/video/{SHA}.mp4", f"video/{SHA}.mp4"),  # absolute form
        ("/extras/notes/readme.txt", "extras/notes/readme.txt"),
    ],
)
def test_media_urls_map_to_their_blob_and_file(target: str, blob_name: str) -> None:
    media = media_file_for_target(CONFIG, target)
    assert media is not None
    assert media.blob_name == blob_name
    assert media.path == Path("/srv/media") / blob_name


@pytest.mark.parametrize(
    "target",
    [
        "",
        "/",
        "*",
        f"video/{SHA}.mp4",  # not origin form
        "/video/",
        "/video",
        f"/video//{SHA}.mp4",
        f"/video/{SHA}.mp4/",
        f"/video/./{SHA}.mp4",
        f"/video/../audio/{SHA}.mp3",
        f"/video/%2e%2e/audio/{SHA}.mp3",
        f"/video/%2E%2E%2Faudio%2F{SHA}.mp3",
        f"/video%2F{SHA}.mp4",
        f"/video/{SHA}%2Emp4",
        f"/video/{SHA}.mp4%00.png",
        f"/video/{SHA}.mp4\x00",
        f"/video\\{SHA}.mp4",
        f"/video/{SHA.upper()}.mp4",  # names are lowercase hex
        f"/video/{SHA[:-1]}.mp4",
        f"/video/{SHA}",
        f"/video/{SHA}.",
        f"/video/{SHA}.mp4.tmp.part.x",
        f"/video/{SHA}.abcdefghijk",  # extension longer than 10
        f"/video/thumbnails/{SHA}.jpg",
        f"/video/thumbnails/x/{SHA}.png",
        f"/video/other/{SHA}.mp4",
        f"/audio/{SHA}.mp3 ",
        f"/photos/{SHA}.jpg",  # not a configured root
        f"/state/{SHA}.db",
        "/extras/.hidden",
        "/extras/a/../b",
        "/extras/a/b/c/d/e",  # deeper than allowed
        "/extras/x" + "y" * 300,
        "/extras/" + "/".join(["a" * 250] * 4) + "/b",  # over-long
        "/extras/~tmp",
        "/extras/file.part",
        f"/vidéo/{SHA}.mp4",
        f"/video/{SHA}.mp4#frag",
        f"//video/{SHA}.mp4",
        "http://example.org",
    ],
)
def test_everything_else_is_refused(target: str) -> None:
    assert media_file_for_target(CONFIG, target) is None


def _assert_inside(target: str) -> None:
    media = media_file_for_target(CONFIG, target)
    if media is None:
        return
    name = media.blob_name
    assert ALLOWED_CONTENT_ADDRESSED.match(name) or ALLOWED_OTHER.match(name), name
    root = media.root.path
    assert media.path.parent == root or root in media.path.parents
    assert ".." not in media.path.parts
    # The blob read is exactly the URL's path: nothing is rewritten on the way.
    assert target.split("?", 1)[0].endswith("/" + name)


_PIECES = st.sampled_from(
    [
        "audio",
        "video",
        "extras",
        "thumbnails",
        "..",
        ".",
        "",
        "%2e",
        "%2e%2e",
        "%2F",
        "%5C",
        "%00",
        "\\",
        "~",
        "\x00",
        "..%2f",
        f"{SHA}.mp4",
        f"{SHA}.png",
        f"{SHA}.mp3",
        f"{SHA.upper()}.mp4",
        "readme.txt",
        ".hidden",
        "a" * 300,
        "é",
        ";",
        "?",
        "#",
        "%",
        "%%",
        "/",
    ]
)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_PIECES, min_size=0, max_size=7), st.sampled_from(["/", "", "//", "http://h/", "/./"]))
def test_structured_targets_never_escape_the_roots(pieces: list[str], prefix: str) -> None:
    _assert_inside(prefix + "/".join(pieces))


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(min_size=0, max_size=200))
def test_arbitrary_targets_never_escape_the_roots(text: str) -> None:
    _assert_inside(text)
    _assert_inside("/" + text)
    _assert_inside("/video/" + text)
