"""The local job service: a warm engine per device shared by local clients over a Unix socket.

`client` (pure standard library: the GIMP plug-in's side), `scheduler` (the queue and workers, also
embedded by the daemon), `protocol` (requests validated), `server` (the socket) and `connection`
(one client), `access` and `limits` (who may ask what, and how much), `commands` (`nst serve`,
`nst status`). Importing this package does not import torch. The protocol is docs/PROTOCOL.md.
"""

from .client import (  # noqa: F401
    JobCancelled, RawImage, ServiceBusy, ServiceClient, ServiceError, ServiceUnavailable, connect,
    default_socket_path, start_private_service,
)
