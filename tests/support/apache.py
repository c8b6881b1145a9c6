"""A test front built like GigHive's `apacheWebServer` container, from Debian's apache2.

What it copies from GigHive (see ../shared/reference/gighive.md, "The front is Apache"):
- HTTPS only, mpm_event;
- Basic Auth for everything, and for /video a gallery nonce (header X-Gallery-Nonce, 30-40
  [A-Za-z0-9_-] characters) that replaces the password;
- `CacheEnable disk /` (mod_cache_disk);
- media files on disk get `Cache-Control: public, max-age=604800, immutable`, a forced
  `Accept-Ranges: bytes` and CORS exposing Content-Range / Content-Length (a <FilesMatch>);
- error answers (401/404/500) get `no-store`;
- the media directories are DocumentRoot/audio and DocumentRoot/video.

`site_extra` is included inside the <VirtualHost> (the agent's snippet goes there). Apache
refuses to serve as root, so as root the workers run as www-data and the caller must make the
media readable for it (`grant_read`).
"""

from __future__ import annotations

import base64
import hashlib
import os
import pwd
import shutil
import stat
import subprocess
from pathlib import Path

from . import _proc
from .tls import make_tls

MODULES = "/usr/lib/apache2/modules"
_LOADED = [
    "mpm_event",
    "authn_core",
    "authn_file",
    "auth_basic",
    "authz_core",
    "authz_user",
    "setenvif",
    "env",
    "headers",
    "mime",
    "socache_shmcb",
    "ssl",
    "rewrite",
    "proxy",
    "proxy_http",
    "cache",
    "cache_disk",
]
USER = "gighive"
PASSWORD = "correct horse battery staple"
NONCE = "Gallery_nonce-0123456789abcdefXYZ"  # 33 characters of [A-Za-z0-9_-]


def apache_binary() -> str | None:
    return shutil.which("apache2") or (shutil.which("/usr/sbin/apache2"))


def basic_auth(user: str = USER, password: str = PASSWORD) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def grant_read(*paths: Path, user: str = "www-data") -> None:
    """Let Apache's worker user reach these files: o+x on every directory above, o+r below.

    Only needed as root (a non-root Apache runs as the caller). Test directories only."""
    if os.geteuid() != 0:
        return
    for path in paths:
        path = path.resolve()
        for parent in path.parents:
            mode = parent.stat().st_mode
            if not mode & stat.S_IXOTH:
                parent.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
        todo = [path]
        while todo:
            p = todo.pop()
            mode = stat.S_IMODE(p.lstat().st_mode)
            if p.is_dir() and not p.is_symlink():
                p.chmod(mode | stat.S_IROTH | stat.S_IXOTH)
                todo.extend(p.iterdir())
            elif p.is_file():
                p.chmod(mode | stat.S_IROTH)


class ApacheFront:
    """apache2 in the foreground on a free loopback port, serving HTTPS."""

    def __init__(
        self,
        workdir: Path,
        media_dirs: dict[str, Path],
        site_extra: str = "",
        cache_disable_media=True,
        tls: bool = True,
    ):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        # tls=False: plain HTTP, GigHive's setup otherwise. Only the benchmark uses it, to tell the
        # cost of the proxy hop from the cost of TLS (which a direct Azurite read over HTTP lacks).
        self.tls = make_tls(workdir / "tls")
        self.scheme = "https" if tls else "http"
        ssl_lines = (
            f"SSLEngine on\n    SSLCertificateFile {self.tls.cert}\n    SSLCertificateKeyFile {self.tls.key}"
            if tls
            else ""
        )
        self.docroot = workdir / "html"
        self.docroot.mkdir(exist_ok=True)
        # GigHive bind-mounts /home/<user>/{audio,video} to /var/www/html/{audio,video}.
        for name, path in media_dirs.items():
            link = self.docroot / name
            if not link.exists():
                link.symlink_to(path)
        (self.docroot / "index.html").write_text("GigHive\n")
        self.cache_root = workdir / "cache"
        self.cache_root.mkdir(exist_ok=True)
        (workdir / "htpasswd").write_text(
            f"{USER}:{{SHA}}{base64.b64encode(hashlib.sha1(PASSWORD.encode()).digest()).decode()}\n"  # noqa: S324
        )
        user_lines = ""
        if os.geteuid() == 0:
            # The workers must write the disk cache and read the TLS key at start (the parent does).
            www = pwd.getpwnam("www-data")
            os.chown(self.cache_root, www.pw_uid, www.pw_gid)
            grant_read(self.docroot, workdir / "htpasswd")
            user_lines = "User www-data\nGroup www-data"
        self.port = _proc.free_port()
        loads = "\n".join(f"LoadModule {m}_module {MODULES}/mod_{m}.so" for m in _LOADED)
        conf = f"""
ServerRoot {workdir}
ServerName 127.0.0.1
PidFile {workdir}/apache2.pid
Mutex file:{workdir} default
DefaultRuntimeDir {workdir}
Listen 127.0.0.1:{self.port} {self.scheme}
{loads}
{user_lines}
ErrorLog {workdir}/error.log
LogLevel warn
LogFormat "%h %u \\"%r\\" %>s %b range=\\"%{{Range}}i\\" handler=%R" front
CustomLog {workdir}/access.log front
TypesConfig /etc/mime.types
StartServers 1
ServerLimit 2
ThreadsPerChild 64
MaxRequestWorkers 128
KeepAlive On
Timeout 120
SSLSessionCache shmcb:{workdir}/ssl_scache(512000)
SSLRandomSeed startup builtin

# GigHive: mod_cache_disk over the whole site.
CacheRoot {self.cache_root}
CacheEnable disk /
CacheDirLevels 2
CacheDirLength 1

<VirtualHost 127.0.0.1:{self.port}>
    ServerName 127.0.0.1
    {ssl_lines}
    DocumentRoot {self.docroot}
    <Directory {self.docroot}>
        Options FollowSymLinks
        AllowOverride None
    </Directory>

    # GigHive: Basic Auth everywhere ...
    <Location "/">
        AuthType Basic
        AuthName "GigHive"
        AuthUserFile {workdir}/htpasswd
        Require valid-user
    </Location>
    # ... and for /video a gallery nonce instead of the password (shared galleries, the iOS player).
    SetEnvIf X-Gallery-Nonce "^[A-Za-z0-9_-]{{30,40}}$" gallery_nonce
    <Location "/video/">
        <RequireAny>
            Require valid-user
            Require env gallery_nonce
        </RequireAny>
    </Location>

    # Not GigHive's: an anonymous, cacheable page, so a test can see the disk cache at work.
    <Location "/public/">
        Require all granted
        Header set Cache-Control "public, max-age=600"
    </Location>

    # GigHive: media served from disk gets a public, immutable cache policy, forced ranges, CORS.
    <FilesMatch "\\.(mp4|m4v|mov|webm|mkv|mp3|m4a|aac|wav|flac|ogg|opus)$">
        Header set Cache-Control "public, max-age=604800, immutable"
        Header set Accept-Ranges "bytes"
        Header set Access-Control-Allow-Origin "*"
        Header set Access-Control-Allow-Headers "Range"
        Header set Access-Control-Expose-Headers "Content-Length, Content-Range"
    </FilesMatch>
    # GigHive: error answers are never stored (a CDN must never cache a 401).
    Header always set Cache-Control "no-store" "expr=%{{REQUEST_STATUS}} -in {{'401','404','500'}}"

{site_extra}
</VirtualHost>
"""
        self.conf = workdir / "apache2.conf"
        self.conf.write_text(conf)
        binary = apache_binary()
        if binary is None:
            raise AssertionError("apache2 is not installed: run .ci/setup (it installs Debian's apache2)")
        check = subprocess.run([binary, "-t", "-f", str(self.conf)], capture_output=True, text=True)
        if check.returncode != 0:
            raise AssertionError(f"apache2 -t failed:\n{check.stderr}\n{conf}")
        self.proc = _proc.spawn([binary, "-f", str(self.conf), "-DFOREGROUND"], workdir / "stdout.log")
        deadline_msg = f"Apache to listen (log: {workdir}/error.log)"
        _wait(lambda: _proc.port_open("127.0.0.1", self.port), deadline_msg, self)

    def error_log(self) -> str:
        return _proc.tail(self.workdir / "error.log")

    def access_log(self) -> str:
        return _proc.tail(self.workdir / "access.log", limit=1 << 20)

    def cached_files(self) -> list[Path]:
        return [p for p in self.cache_root.rglob("*") if p.is_file()]

    def stop(self) -> None:
        _proc.terminate(self.proc, timeout=30)


def _wait(predicate, what: str, front: ApacheFront, timeout: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if front.proc.poll() is not None:
            raise AssertionError(f"apache2 exited with {front.proc.returncode}: {front.error_log()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
