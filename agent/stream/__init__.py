"""The stream server (`gighive-media serve`): the site's /audio/ and /video/ URLs, answered from
local disk or from the private blob container, behind the web front (nginx or Apache).

Modules, one job each:
  settings  the STREAM_* variables
  http      request-head parsing, Range and conditional-request rules (RFC 9110), no I/O
  sources   the choice of source: the local file first, else the blob (the sources themselves
            are the storage seam's: agent/storage/local.py, agent/storage/azure_blob.py)
  handler   one request: map, choose the source, evaluate, send
  server    sockets (systemd activation or --listen), connection threads, idle exit, sd_notify

Request path -> MediaFile (the only gate to the file system and container) is agent/media_urls.py.
"""

from .server import run

__all__ = ["run"]
