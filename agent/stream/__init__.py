"""The stream server (`gighive-media serve`): the site's /audio/ and /video/ URLs, answered from
local disk or from the private blob container, behind the web front (nginx or Apache).

Modules, one job each:
  settings  the STREAM_* variables
  urls      request path -> MediaFile, or nothing (the only gate to the file system and container)
  http      request-head parsing, Range and conditional-request rules (RFC 9110), no I/O
  sources   local disk and Azure Blob behind one small protocol (open -> info + range readers)
  handler   one request: map, choose the source, evaluate, send
  server    sockets (systemd activation or --listen), connection threads, idle exit, sd_notify
"""

from .server import run

__all__ = ["run"]
