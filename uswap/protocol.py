"""Socket messages between clients and the daemon.

A message is a 4-byte big-endian length, then that many bytes of UTF-8 JSON
(an object with an "op" key). File descriptors travel with the first byte of
a message as SCM_RIGHTS, at most MAX_FDS per message. The first message on a
connection is {"op": "hello", "version": VERSION} (an integer: true is not 1),
sent within the daemon's handshake_timeout; the daemon answers with its
version or an error and closes on a mismatch.

A daemon that cannot take a connection (busy at max_clients, or out of file
descriptors) sends one {ok: false, error} and closes, possibly before it has
read the hello. Any request may be refused with {ok: false, error} and the
connection kept (e.g. "daemon out of file descriptors (EMFILE)" when the fds
riding on it could not be received); a malformed message is answered with an
error and the connection closed.

Requests and replies:
  hello   {version}                           -> {ok, version, page_size}
  alloc   {size, addr} + fds [uffd, memfd]    -> {ok, region} | {ok: false, error}
  free    {region}                            -> {ok}
  status  {}                                  -> {ok, status}
  fork_begin  {regions: [id...]}   (parent, in os.fork's before hook)
                                   -> {ok, token, regions: [id...]} + fds [keep-alive pipe write end]
  fork_child  {token, region}      (child, new connection; region: the parent's id)
                                   -> {ok, size, addr} + fds [the child's memfd]
  fork_attach {token, region} + fds [uffd]   (child, after mapping and registering)
                                   -> {ok, region: the child's new id}
  inject  {spec}   (fault injection; only when the daemon enables it) -> {ok}
"""
from __future__ import annotations

import json
import socket
import struct

VERSION = 1
MAX_MESSAGE = 1 << 20
MAX_FDS = 4


class ProtocolError(Exception):
    """A peer sent something that is not a valid message."""


def send(sock: socket.socket, msg: dict, fds: list[int] | None = None) -> None:
    body = json.dumps(msg, separators=(",", ":")).encode()
    data = struct.pack(">I", len(body)) + body
    if fds:
        sent = socket.send_fds(sock, [data[:1]], fds)
        if sent != 1:
            raise ProtocolError("short send")
        data = data[1:]
    sock.sendall(data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise EOFError("connection closed")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv(sock: socket.socket) -> tuple[dict, list[int]]:
    """Blocking receive of one message and its fds. Raises EOFError or ProtocolError."""
    first, fds, _flags, _addr = socket.recv_fds(sock, 1, MAX_FDS)
    if not first:
        for fd in fds:
            _close_quiet(fd)
        raise EOFError("connection closed")
    try:
        header = first + _recv_exact(sock, 3)
        (length,) = struct.unpack(">I", header)
        if length > MAX_MESSAGE:
            raise ProtocolError(f"message of {length} bytes exceeds {MAX_MESSAGE}")
        msg = decode(_recv_exact(sock, length), require_op=False)
    except BaseException:
        for fd in fds:
            _close_quiet(fd)
        raise
    return msg, fds


def decode(body: bytes, require_op: bool = True) -> dict:
    try:
        msg = json.loads(body)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, huge integers, deep nesting
        raise ProtocolError(f"not acceptable JSON: {str(e)[:200]}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("message is not a JSON object")
    if require_op and not isinstance(msg.get("op"), str):
        raise ProtocolError("message has no string 'op'")
    return msg


MAX_QUEUED_FDS = 16


class Frame:
    """One decoded message and the fds that rode on it. `fds_lost` is set when
    the kernel could not hand over all of its fds (the daemon was out of file
    descriptors): the request must be refused, and `fds` holds the few that
    did arrive, for the caller to close. `sender_pid` is the pid of the
    process that sent the fds (SCM_CREDENTIALS; a forked child may write on
    its parent's connection), 0 when unknown."""
    __slots__ = ("msg", "fds", "fds_lost", "sender_pid")

    def __init__(self, msg: dict, fds: list[int], fds_lost: bool, sender_pid: int = 0) -> None:
        self.msg = msg
        self.fds = fds
        self.fds_lost = fds_lost
        self.sender_pid = sender_pid


class MessageBuffer:
    """Incremental decoder for the daemon's non-blocking sockets.

    Ownership of received fds: they are held here until the message they
    rode on is complete AND decoded; next() then hands them to the caller.
    A message that fails to decode leaves them here, and close() (called
    when the connection is dropped) closes them: no fd is ever forgotten.
    """

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self.data = bytearray()
        self.fds: list[int] = []
        self.fds_lost = False
        self.sender_pid = 0
        self.max_message = max_message

    def feed(self, data: bytes, fds: list[int], fds_lost: bool = False, sender_pid: int = 0) -> None:
        """Queue received bytes and fds (the fds are ours from here on);
        `sender_pid` is the pid of the writer of these bytes, if known."""
        self.data += data
        self.fds.extend(fds)
        self.fds_lost |= fds_lost
        if fds or fds_lost:
            self.sender_pid = sender_pid
        if len(self.fds) > MAX_QUEUED_FDS:
            raise ProtocolError(f"too many file descriptors queued ({len(self.fds)});"
                                f" a message carries at most {MAX_FDS}")

    def next(self) -> Frame | None:
        """The next complete message and the fds that arrived with it, or None."""
        if len(self.data) < 4:
            return None
        (length,) = struct.unpack(">I", self.data[:4])
        if length > self.max_message:
            raise ProtocolError(f"message of {length} bytes exceeds {self.max_message}")
        if len(self.data) < 4 + length:
            return None
        body = bytes(self.data[4:4 + length])
        del self.data[:4 + length]
        msg = decode(body)  # raises with the fds still queued here: close() gets them
        frame = Frame(msg, self.fds, self.fds_lost, self.sender_pid)
        self.fds, self.fds_lost, self.sender_pid = [], False, 0
        return frame

    def pending_bytes(self) -> int:
        return len(self.data)

    def close(self) -> None:
        for fd in self.fds:
            _close_quiet(fd)
        self.fds = []


_UCRED = struct.Struct("3i")
_FD = struct.Struct("i")


def recv_with_creds(sock: socket.socket, bufsize: int, maxfds: int) -> tuple[bytes, list[int], int, int]:
    """recvmsg on a socket with SO_PASSCRED: (data, fds, msg flags, sender pid
    or 0). Every fd the kernel handed over is in the list, even when the
    control data was cut short (MSG_CTRUNC)."""
    ancsize = socket.CMSG_SPACE(maxfds * _FD.size) + socket.CMSG_SPACE(_UCRED.size)
    data, ancdata, flags, _addr = sock.recvmsg(bufsize, ancsize)
    fds: list[int] = []
    pid = 0
    for level, kind, payload in ancdata:
        if level != socket.SOL_SOCKET:
            continue
        if kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % _FD.size
            fds.extend(fd for (fd,) in _FD.iter_unpack(payload[:usable]))
        elif kind == socket.SCM_CREDENTIALS and len(payload) >= _UCRED.size:
            pid = _UCRED.unpack_from(payload)[0]
    return data, fds, flags, pid


def _close_quiet(fd: int) -> None:
    import os
    try:
        os.close(fd)
    except OSError:
        pass
