"""Who may use the job service, and what a client of another user may ask of it.

The socket is 0600 (the service's user only), or 0660 with a socket group, whose members then
connect too. A request runs with the service user's file access, so a client whose user (read
with SO_PEERCRED) is neither the service's nor root is *confined*: its images come as pixels,
never as paths; it names no init image and no weights file; its result comes back as pixels
(no `output_path`). The service then reads and writes no file on its behalf. docs/PROTOCOL.md,
"Who may ask what". A StyleParams field that takes a path must be added to `_PATH_PARAMS`.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass

from ..errors import ParamError, ServiceSetupError
from ..params import INITS, WEIGHTS_NAMES

# StyleParams fields that name a file unless they hold one of these words.
_PATH_PARAMS = {"init": INITS, "weights": WEIGHTS_NAMES}


def socket_group_problem(group: str) -> str | None:
    """Why this process cannot give its socket to `group`, or None.

    Giving a file to a group takes membership of it (or root). Called by the server before it
    binds and by the daemon's configuration check, so that both say the same thing.
    """
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        return f"no such group {group!r} (create it: groupadd {group})"
    if os.geteuid() == 0 or gid == os.getegid() or gid in os.getgroups():
        return None
    user = _login(os.geteuid())
    return (f"this process runs as user {user}, which is not in group {group}, so it cannot give the socket "
            f"to that group: add user {user} to group {group} (usermod -aG {group} {user}), or set "
            f"SupplementaryGroups={group} in the unit (systemctl edit nst-daemon)")


def check_socket_group(group: str) -> int:
    """The group's id; ServiceSetupError (exit 2) with the fix when this process cannot use it."""
    problem = socket_group_problem(group)
    if problem:
        raise ServiceSetupError(f"socket group {group}: {problem}")
    return grp.getgrnam(group).gr_gid


@dataclass(frozen=True)
class Peer:
    """The process at the other end of a connection."""

    pid: int | None
    uid: int | None
    trusted: bool  # the service's own user or root; anyone else is confined

    def describe(self) -> str:
        return "an unknown user" if self.uid is None else f"user {_login(self.uid)}"


def peer_of(sock: socket.socket, group_socket: bool) -> Peer:
    """The peer's credentials (SO_PEERCRED). Where the system gives none, only a group socket lets
    other users in, so its clients are confined."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", raw)
    except (AttributeError, OSError):
        return Peer(None, None, trusted=not group_socket)
    return Peer(pid, uid, trusted=uid in (os.geteuid(), 0))


def confine(peer: Peer, images: list[tuple[str, dict]], params, output_path: str | None) -> None:
    """ParamError where a confined peer's job names a file. images: (field, spec) pairs."""
    if peer.trusted:
        return
    why = (f"this service runs as user {_login(os.geteuid())} and reads or writes no file for another user "
           f"({peer.describe()})")
    for field, spec in images:
        if "path" in spec:
            raise ParamError(f"{field}.path", f"{why}: send the image's pixels instead")
    for name, words in _PATH_PARAMS.items():
        value = getattr(params, name)
        if value not in words:
            raise ParamError(name, f"{why}: use {', '.join(words)}")
    if output_path is not None:
        raise ParamError("output_path", f"{why}: leave output_path null and take the result as pixels")


def _login(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"
