"""The README's first command: the agent's job end to end on this machine, with no Azure account.

Starts Azurite (the blob endpoint) and MariaDB (GigHive's database stand-in), writes sample media
shaped like GigHive's library (plus one corrupt file, to show the quarantine) and an agent.env,
then runs the real CLI:

1. db-migrate, and migrate for the library that already exists (the corrupt file is quarantined);
2. a new file lands in the library, and `gighive-media upload` (what gighive-media-upload.path
   starts) uploads it: the blob is verified and the DB pointer row written;
3. the stream server (`gighive-media serve`) answers a ranged request for it from disk;
4. with DELETE_LOCAL_AFTER_UPLOAD=true the next upload run evicts the local copies, and the same
   ranged request is answered from Blob, byte for byte the same;
5. status.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from azure.storage.blob import BlobServiceClient

from tests.support.azurite import Azurite
from tests.support.mariadb import MariaDB
from tests.support.media import make_content_addressed, make_thumbnail

REPO = Path(__file__).resolve().parents[2]


def run(cli: list[str], config: Path) -> int:
    argv = [sys.executable, "-m", "agent", "--config", str(config), *cli]
    print(f"\n$ gighive-media --config {config} {' '.join(cli)}", flush=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "MYSQL_", "MEDIA_"))}
    return subprocess.run(argv, cwd=REPO, env=env, check=False).returncode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ranged_get(port: int, url_path: str, first: int, last: int) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", url_path, headers={"Range": f"bytes={first}-{last}"})
        r = conn.getresponse()
        return r.status, r.getheader("Content-Range", ""), r.read()
    finally:
        conn.close()


def wait_listening(port: int, server: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the stream server exited with {server.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"the stream server did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


def show_request(port: int, url_path: str, expected: bytes, server_log: Path, seen: int) -> int:
    """One ranged request; print the answer and the server's own line saying where the bytes came from."""
    first, last = 1000, 1999
    print(f"\n$ curl -r {first}-{last} http://127.0.0.1:{port}{url_path}")
    status, content_range, body = ranged_get(port, url_path, first, last)
    same = body == expected[first : last + 1]
    print(f"HTTP {status}, Content-Range: {content_range}, {len(body)} bytes, same bytes as the original: {same}")
    # The server logs a request once its body is sent, just after the client has read it.
    deadline = time.monotonic() + 10
    while True:
        lines = server_log.read_text(errors="replace").splitlines()
        done = [line.strip() for line in lines[seen:] if " -> " in line]
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for line in done:
        print(f"  stream server: {line}")
    if status != 206 or not same:
        raise SystemExit("the ranged request was not answered correctly")
    return len(lines)


def write_config(config: Path, lines: list[str]) -> None:
    config.write_text("".join(line + "\n" for line in lines))
    config.chmod(0o600)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--dir", type=Path, default=None, help="work directory (default: a new one under $TMPDIR; emptied if given)"
    )
    parser.add_argument("--keep", action="store_true", help="leave Azurite and MariaDB running until Ctrl-C")
    args = parser.parse_args()

    # A fresh private directory by default: a fixed /tmp path could be pre-created by someone else.
    work: Path = args.dir or Path(tempfile.mkdtemp(prefix="gighive-media-demo-"))
    if args.dir:
        shutil.rmtree(work, ignore_errors=True)
    roots = {"audio": work / "media" / "audio", "video": work / "media" / "video"}
    for p in roots.values():
        p.mkdir(parents=True)

    print("starting Azurite and MariaDB ...", flush=True)
    azurite = Azurite(work / "azurite").start()
    db = MariaDB(work / "mariadb").start()
    try:
        BlobServiceClient.from_connection_string(azurite.connection_string).create_container("media")
        made = []
        for i, (size, ext) in enumerate([(180_000, "mp3"), (420_000, "m4a"), (96_000, "wav")]):
            made.append(make_content_addressed(roots["audio"], size, ext, seed=i))
        for i, size in enumerate([24 * 1024 * 1024, 3 * 1024 * 1024]):
            _, sha = make_content_addressed(roots["video"], size, "mp4", seed=100 + i)
            make_thumbnail(roots["video"], sha)
        corrupt = roots["audio"] / f"{'0' * 64}.mp3"
        corrupt.write_bytes(b"bytes that do not hash to the name")
        print(f"sample media in {work / 'media'}: 3 audio, 2 videos, 2 thumbnails, 1 corrupt file")

        config = work / "agent.env"
        settings = [
            "MEDIA_STORAGE_BACKEND=azure_blob",
            "AZURE_AUTH_MODE=connection_string",
            f'AZURE_STORAGE_CONNECTION_STRING="{azurite.connection_string}"',
            "AZURE_STORAGE_CONTAINER_NAME=media",
            f"MEDIA_ROOTS=audio={roots['audio']},video={roots['video']}",
            f"GIGHIVE_MEDIA_STATE_DIR={work / 'state'}",
            f"MYSQL_HOST={db.host}",
            f"MYSQL_PORT={db.port}",
            f"MYSQL_DATABASE={db.database}",
            f"MYSQL_USER={db.user}",
            f"MYSQL_PASSWORD_FILE={db.password_file(work / 'mysql-password')}",
            "UPLOAD_SETTLE_SECONDS=0",
            # The path unit's run keeps watching until it has been idle this long; 1 s for the demo.
            "UPLOAD_IDLE_EXIT_SECONDS=1",
        ]
        write_config(config, settings)

        print("\n== 1. The library that already exists: plan, then move it to Blob ==")
        run(["db-migrate"], config)
        run(["migrate", "--dry-run"], config)
        started = time.monotonic()
        migrate_rc = run(["migrate"], config)
        print(
            f"(migrate took {time.monotonic() - started:.1f} s, exit code {migrate_rc}: 1 because of the corrupt file)"
        )

        print("\n== 2. A new file lands in the library; the path unit's job uploads it ==")
        # GigHive's finalize renames a finished upload into the library as <sha256>.<ext>.
        staged, sha = make_content_addressed(work / "incoming", 6 * 1024 * 1024, "mp4", seed=200)
        new_file = roots["video"] / staged.name
        os.replace(staged, new_file)
        new_bytes = new_file.read_bytes()
        url_path = f"/video/{new_file.name}"
        print(f"new file: {new_file} ({len(new_bytes)} bytes)")
        run(["upload"], config)  # what gighive-media-upload.path starts (ExecStart=gighive-media upload)
        props = (
            BlobServiceClient.from_connection_string(azurite.connection_string)
            .get_blob_client("media", f"video/{new_file.name}")
            .get_blob_properties()
        )
        print(
            f"blob video/{new_file.name}: {props.size} bytes, Content-MD5 set: "
            f"{bool(props.content_settings.content_md5)}, metadata sha256 matches the name: "
            f"{props.metadata.get('sha256') == sha}"
        )
        conn = db.connect()
        with conn.cursor() as cur:
            cur.execute(
                "SELECT provider, blob_name, size_bytes, local_copy FROM media_storage_locations WHERE media_path LIKE %s",
                (f"%{new_file.name}",),
            )
            for provider, blob_name, size, local in cur.fetchall():
                print(f"DB pointer row: provider={provider} blob={blob_name} size={size} local_copy={local}")
        conn.close()

        print("\n== 3. The stream server answers a ranged request from disk ==")
        port = free_port()
        server_log = work / "serve.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "MYSQL_", "MEDIA_"))}
        with open(server_log, "wb") as log_file:
            server = subprocess.Popen(
                [sys.executable, "-m", "agent", "--config", str(config), "--log-level", "debug", "serve"]
                + ["--listen", f"127.0.0.1:{port}"],
                cwd=REPO,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_listening(port, server)
            seen = show_request(port, url_path, new_bytes, server_log, 0)

            print("\n== 4. DELETE_LOCAL_AFTER_UPLOAD=true: the next run evicts; Blob answers the same request ==")
            # The eviction policy keeps files local for EVICT_MIN_AGE_DAYS (7) and while GigHive works on
            # them; the demo's files are minutes old and its database has no GigHive job rows to wait for.
            write_config(
                config,
                [*settings, "DELETE_LOCAL_AFTER_UPLOAD=true", "EVICT_MIN_AGE_DAYS=0", "EVICT_WAIT_FOR_GIGHIVE=false"],
            )
            run(["upload"], config)
            print(f"local copy still on disk: {new_file.exists()}")
            show_request(port, url_path, new_bytes, server_log, seen)
        finally:
            server.terminate()
            server.wait(timeout=30)

        print("\n== 5. Status ==")
        status_rc = run(["status"], config)
        print(f"(status exit code {status_rc}: 1 means an item needs attention — here, the corrupt file)")

        conn = db.connect()
        with conn.cursor() as cur:
            cur.execute(
                "SELECT media_path, provider, size_bytes, local_copy FROM media_storage_locations ORDER BY media_path"
            )
            print("\nDB pointer rows (media_storage_locations):")
            for path, provider, size, local in cur.fetchall():
                print(f"  {provider:10} local_copy={local} {size:>10} {path}")
        conn.close()
        blobs = list(
            BlobServiceClient.from_connection_string(azurite.connection_string)
            .get_container_client("media")
            .list_blobs()
        )
        print(f"\nblobs in container 'media': {len(blobs)}")
        if args.keep:
            print(f"\nAzurite: {azurite.blob_endpoint}  MariaDB: 127.0.0.1:{db.port}  config: {config}")
            print("running until Ctrl-C ...")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        return 0
    finally:
        db.cleanup()
        azurite.stop()


if __name__ == "__main__":
    sys.exit(main())
