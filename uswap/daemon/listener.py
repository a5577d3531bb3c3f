"""The daemon's listening socket: bound before the store is opened (so a busy
or unusable socket is refused before anything is allocated), removed again if
a later check refuses the start, with every error naming the path and the
cause."""
from __future__ import annotations

import grp
import os
import socket
import stat

#: sun_path holds 108 bytes with the terminating NUL (unix(7)).
MAX_PATH_BYTES = 107


class Listener:
    """A bound, listening Unix socket at `path`, and the directory created for
    it (None when it was there already), which close() removes again."""

    def __init__(self, path: str, sock: socket.socket, created_dir: str | None) -> None:
        self.path = path
        self.sock = sock
        self.created_dir = created_dir

    def close(self) -> None:
        """Close the socket and remove its file (and the directory made for
        it, if empty). Idempotent."""
        if self.sock.fileno() >= 0:
            self.sock.close()
            try:
                os.unlink(self.path)
            except OSError:
                pass
        _remove_dir(self.created_dir)
        self.created_dir = None


def _remove_dir(created_dir: str | None) -> None:
    if created_dir is not None:
        try:
            os.rmdir(created_dir)
        except OSError:
            pass  # not empty any more: someone else uses it


def _error(path: str, cause: str) -> ValueError:
    return ValueError(f"socket: {path}: {cause}")


def _make_parent(path: str) -> str | None:
    """Create the socket's directory if missing; return it if created."""
    parent = os.path.dirname(path) or "."
    if os.path.isdir(parent):
        return None
    try:
        os.makedirs(parent, mode=0o755)
    except FileExistsError:
        # Not a directory, or created meanwhile by someone else.
        if not os.path.isdir(parent):
            raise _error(path, f"{parent} exists and is not a directory") from None
        return None
    except OSError as e:
        raise _error(path, f"cannot create its directory {parent}: {e.strerror}") from None
    return parent


def _clear_stale(path: str) -> None:
    """Remove a socket file left by a daemon that is gone; refuse anything
    else at `path` (a live daemon's socket, a file that is not a socket)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise _error(path, f"cannot inspect it: {e.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise _error(path, "exists and is not a socket; remove it or choose another --socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # stale socket of a daemon that is gone
    else:
        raise _error(path, "another uswap daemon is listening on it (a connection to it was accepted);"
                           " stop that daemon or choose another --socket")
    finally:
        probe.close()


def _group_name(gid: int) -> str:
    try:
        return f"{grp.getgrgid(gid).gr_name} (gid {gid})"
    except KeyError:
        return f"gid {gid}"


def listen(path: str, mode: int = 0o660, gid: int | None = None) -> Listener:
    """Bind and listen on the Unix socket `path` with permission bits `mode`
    (socket_mode) and group `gid` (socket_group; None: the daemon's own),
    creating its directory if missing. Who may connect is decided by these
    (connect(2) needs write permission on the file). Raises ValueError
    naming the path and the cause."""
    if len(os.fsencode(path)) > MAX_PATH_BYTES:
        raise _error(path, f"the path is {len(os.fsencode(path))} bytes long; a Unix socket path holds"
                           f" at most {MAX_PATH_BYTES}: choose a shorter --socket")
    created_dir = _make_parent(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    # Until bind() succeeds the file at `path` is not ours: a failure before
    # then removes only the directory made here, never what is at `path`.
    try:
        _clear_stale(path)
        # Accepted sockets inherit it: every message from then on carries its
        # writer's pid, even one sent before the daemon got to accept().
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.bind(path)
    except OSError as e:
        sock.close()
        _remove_dir(created_dir)
        raise _error(path, f"cannot bind it: {e.strerror}") from None
    except BaseException:
        sock.close()
        _remove_dir(created_dir)
        raise
    listener = Listener(path, sock, created_dir)
    # Group and mode are set before listen(): until then no client can
    # connect, so none gets in under the bind's default permissions.
    if gid is not None:
        try:
            os.chown(path, -1, gid)
        except OSError as e:
            listener.close()
            raise _error(path, f"cannot give it socket_group {_group_name(gid)}: {e.strerror}; the daemon's"
                               " user must be root or a member of that group") from None
    try:
        os.chmod(path, mode)
        sock.listen(64)
    except OSError as e:
        listener.close()
        raise _error(path, f"cannot listen on it: {e.strerror}") from None
    return listener
