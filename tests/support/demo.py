"""The README's first command: the upload path end to end on this machine, with no Azure account.

Starts Azurite (the blob endpoint) and MariaDB (GigHive's database stand-in), writes sample media
shaped like GigHive's library (plus one corrupt file, to show the quarantine), writes an agent.env,
then runs the real CLI: db-migrate, migrate (dry run, then for real), status, verify, reconcile,
and shows the DB pointer rows.
"""

from __future__ import annotations

import argparse
import os
import shutil
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
        config.write_text(
            "MEDIA_STORAGE_BACKEND=azure_blob\n"
            "AZURE_AUTH_MODE=connection_string\n"
            f'AZURE_STORAGE_CONNECTION_STRING="{azurite.connection_string}"\n'
            "AZURE_STORAGE_CONTAINER_NAME=media\n"
            f"MEDIA_ROOTS=audio={roots['audio']},video={roots['video']}\n"
            f"GIGHIVE_MEDIA_STATE_DIR={work / 'state'}\n"
            f"MYSQL_HOST={db.host}\nMYSQL_PORT={db.port}\nMYSQL_DATABASE={db.database}\nMYSQL_USER={db.user}\n"
            f"MYSQL_PASSWORD_FILE={db.password_file(work / 'mysql-password')}\n"
            "UPLOAD_SETTLE_SECONDS=0\n"
        )
        config.chmod(0o600)

        run(["db-migrate"], config)
        # The existing library: plan, then move it (the path unit's `upload` handles new files).
        run(["migrate", "--dry-run"], config)
        started = time.monotonic()
        migrate_rc = run(["migrate"], config)
        print(
            f"(migrate took {time.monotonic() - started:.1f} s, exit code {migrate_rc}: 1 because of the corrupt file)"
        )
        status_rc = run(["status"], config)
        print(f"(status exit code {status_rc}: 1 means an item needs attention — here, the corrupt file)")
        run(["verify", "--all", "--readback"], config)
        run(["reconcile"], config)

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
