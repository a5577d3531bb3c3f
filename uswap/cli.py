"""`uswap run` (the daemon), `uswap status`, `uswap budget`, `uswap top`,
`uswap handover` and `uswap exec` (uswap/exec.py)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Callable

from uswap import __version__, config


def _refuse(message: object, *made) -> int:
    """Undo what the start had made (each has close()), say why, exit 2."""
    for thing in made:
        thing.close()
    from uswap import logsetup
    # Under journald the refusal is filed as an error, not at the stream's default priority.
    priority = "<3>" if logsetup.stderr_is_journal() else ""
    print(f"{priority}uswap: error: {message}", file=sys.stderr)
    return 2


def _run(args: argparse.Namespace) -> int:
    overrides = {"backing": args.backing, "store_size": args.store_size,
                 "max_resident": args.max_resident, "socket": args.socket,
                 "log_level": args.log_level, "state_dir": args.state_dir}
    if args.socket is None and os.environ.get("USWAP_SOCKET"):
        overrides["socket"] = os.environ["USWAP_SOCKET"]
    try:
        cfg = config.load(args.config, overrides)
    except ValueError as e:
        return _refuse(e)
    from uswap import logsetup
    logsetup.configure(cfg.log_level)
    log = logging.getLogger("uswap")

    from uswap import native
    from uswap.daemon import listener as listening
    from uswap.daemon.server import Server
    from uswap.store import header, open_store

    # Checks in the order that leaves nothing behind on a refusal: the
    # settings (above), then the socket and the metrics address (a busy or unusable one is refused
    # before the store is created or allocated), then the store; what a later
    # refusal finds already made (the socket, the store lock) is undone.
    from uswap.store.lock import StoreBusy
    retry = _Retry(HANDOVER_WAIT if args.handover else 0)
    if args.handover:
        # Ask the running daemon to hand over, then take its socket and its
        # store as it lets go of them (it exits once its I/O in flight ended).
        err = _ask_handover(cfg.socket)
        if err:
            return _refuse(f"--handover: {err}")
        log.info("--handover: the daemon on %s is handing over; waiting for its socket and store", cfg.socket)
    while True:
        try:
            listener = listening.listen(cfg.socket, cfg.socket_mode, cfg.socket_group)
            break
        except ValueError as e:
            if not retry.again():
                return _refuse(e)
    made = [listener]  # what a refusal undoes, latest first
    metrics_server = None
    if cfg.metrics_listen:  # like the socket: a busy address is refused before the store is made
        from uswap.daemon.metrics import MetricsServer
        while True:
            try:
                metrics_server = MetricsServer(cfg.metrics_listen)
                break
            except ValueError as e:
                if not retry.again():  # --handover: the old daemon holds it until it has exited
                    return _refuse(e, *made)
        made.insert(0, metrics_server)
    while True:
        try:
            store = open_store(cfg.backing, cfg.store_size, cfg.nfs_timeout)
            break
        except StoreBusy as e:
            if not retry.again():
                return _refuse(e, *made)
        except ValueError as e:
            return _refuse(e, *made)
    made.insert(0, store)
    try:
        store_id = header.claim(store)
    except ValueError as e:
        return _refuse(e, *made)
    except OSError as e:
        return _refuse(f"backing: {store.url}: cannot write the store header: {e}", *made)
    # The state directory after the store lock: a daemon refused by the lock
    # never touches the state of the one holding the store.
    from uswap.daemon.statedir import StateBusy, StateDir, StateRefused
    while True:
        try:
            statedir = StateDir(cfg.state_dir, {"url": store.url, "size_bytes": store.size_bytes, "id": store_id})
            break
        except StateBusy as e:
            if not retry.again():  # --handover: the old daemon holds it until it has exited
                return _refuse(e, *made)
        except StateRefused as e:
            return _refuse(e, *made)
    inject = None
    spec = os.environ.get("USWAP_INJECT")
    if spec is not None:
        from uswap.store.inject import InjectingStore
        try:
            inject = store = InjectingStore(store, json.loads(spec or "{}"))
        except (ValueError, json.JSONDecodeError) as e:
            return _refuse(f"USWAP_INJECT: {e}", *made)
        log.warning("fault injection enabled: %s", spec)
    # I/O threads need the GIL for a few microseconds between system calls; the
    # default 5 ms switch interval would let the engine thread hold them off.
    sys.setswitchinterval(0.0002)
    if cfg.mlock:
        # Invariant 8: the daemon must never wait on its own memory. ONFAULT keeps
        # the regions' mappings from being populated by the lock itself.
        try:
            native.mlockall(current=True, future=True, onfault=True)
        except OSError as e:
            log.warning("mlockall failed (%s); the daemon may be paged out under pressure", e)
    try:
        server = Server(cfg, store, listener, inject, config_source=(args.config, overrides),
                        metrics_server=metrics_server, statedir=statedir)
    except (ValueError, OSError) as e:
        return _refuse(e, *made)
    try:
        return server.run()
    except Exception:
        # A bug must not leave a daemon that looks alive (socket present, threads
        # parked) while serving nothing: log it and exit so systemd restarts us.
        log.exception("fatal error in the daemon")
        logging.shutdown()
        os._exit(70)


# `uswap run --handover`: how long the new daemon waits for the running one
# to let go of the socket and the store (it waits up to 30 s for its I/O in
# flight, server.py HANDOVER_PATIENCE).
HANDOVER_WAIT = 60.0


class _Retry:
    """Polling with a deadline: again() sleeps a little and says whether to try once more."""

    def __init__(self, seconds: float) -> None:
        import time
        self.deadline = time.monotonic() + seconds

    def again(self) -> bool:
        import time
        if time.monotonic() >= self.deadline:
            return False
        time.sleep(0.05)
        return True


def _ask_handover(socket_path: str) -> str | None:
    """Send `handover` to the daemon at socket_path; None when it agreed, else why not."""
    import uswap
    from uswap import protocol
    try:
        with uswap.connect(socket_path) as client:
            client._request({"op": "handover"})
    except uswap.UswapError as e:
        return str(e)
    except (OSError, EOFError, protocol.ProtocolError) as e:
        return f"the daemon closed the connection before answering ({e})"
    return None


def _status(args: argparse.Namespace) -> int:
    st, rc = _daemon_call(args.socket, lambda c: c.status())
    if rc:
        return rc
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
        return 0
    from uswap.sizes import format_size as fs
    store = st["store"]
    print(f"daemon     uswap {st['version']}, pid {st['pid']}")
    print(f"resident   {fs(st['resident_bytes'])} of {fs(st['max_resident_bytes'])}")
    print(f"swapped    {fs(st['swapped_bytes'])}")
    print(f"store      {store['url']}: {fs(store['used_bytes'])} used of {fs(store['size_bytes'])}"
          + ("  (FULL)" if st["store_full"] else ""))
    print(f"swapouts   {st['swapouts_total']} pages, swapins {st['swapins_total']} pages, faults {st['faults_total']}")
    print(f"writeback  {st['writeback_inflight']} in flight; errors: write {st['write_errors_total']},"
          f" read {st['read_errors_total']}")
    budget, daemon = st["budget"], st["daemon"]
    print(f"budget     {budget['mode']}: {budget['reason']}")
    print(f"daemon     rss {fs(daemon['rss_bytes'])}, cpu {daemon['cpu_user_seconds_total']:.2f}s user"
          f" {daemon['cpu_system_seconds_total']:.2f}s system")
    if st.get("adoption_waiting") or st.get("adopted_regions_total") or st.get("adoption_dropped_total"):
        took = st.get("adoption_seconds")
        print(f"adoption   {st['adopted_regions_total']} regions adopted, {st['adoption_waiting']} waiting,"
              f" {st['adoption_dropped_total']} dropped" + (f"; done in {took}s" if took is not None else ""))
    print(f"clients    {len(st['clients'])}")
    for c in st["clients"]:
        for r in c["regions"]:
            print(f"  {c['name'] or '?'} pid {c['pid']} region {r['id']}: {fs(r['size_bytes'])},"
                  f" {fs(r['resident_bytes'])} resident, {fs(r['swapped_bytes'])} swapped")
    return 0


def _daemon_call(socket: str | None, call: Callable[["uswap.Client"], object]) -> tuple[object, int]:
    """(what `call(client)` returned, 0), or (None, 1) after printing why the daemon did not answer."""
    import uswap
    from uswap import protocol
    try:
        with uswap.connect(socket) as client:
            return call(client), 0
    except uswap.UswapError as e:
        print(f"uswap: error: {e}", file=sys.stderr)
    except (OSError, EOFError, protocol.ProtocolError) as e:
        print(f"uswap: error: the daemon closed the connection before answering ({e})", file=sys.stderr)
    return None, 1


def _budget(args: argparse.Namespace) -> int:
    from uswap.sizes import format_size as fs
    reply, rc = _daemon_call(args.socket, lambda c: c.set_budget(args.size))
    if rc == 0:
        print(f"budget: {fs(reply['old_bytes'])} -> {fs(reply['max_resident_bytes'])} ({reply['mode']})")
    return rc


def _top(args: argparse.Namespace) -> int:
    import uswap
    from uswap import protocol, top
    if args.interval <= 0:
        print(f"uswap: error: --interval {args.interval} must be above 0 seconds", file=sys.stderr)
        return 2
    iterations = 1 if args.once else args.iterations
    if iterations is not None and iterations < 1:
        print(f"uswap: error: --iterations {iterations} must be at least 1", file=sys.stderr)
        return 2
    try:
        with uswap.connect(args.socket, name="uswap-top") as client:
            return top.run(client.status, args.interval, iterations)
    except uswap.UswapError as e:
        print(f"uswap: error: {e}", file=sys.stderr)
    except (OSError, EOFError, protocol.ProtocolError) as e:
        print(f"uswap: error: the daemon closed the connection ({e})", file=sys.stderr)
    return 1


def _handover(args: argparse.Namespace) -> int:
    """Ask the running daemon to hand over (like SIGUSR2): it exits 0 without
    draining, and the next daemon on its state directory adopts every region."""
    err = _ask_handover(config.socket_path(args.socket))
    if err:
        print(f"uswap: error: {err}", file=sys.stderr)
        return 1
    print("uswap: the daemon is handing over; start the next one on the same --state-dir to adopt its regions")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="uswap", description="userspace swap daemon")
    parser.add_argument("--version", action="version", version=f"uswap {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--config", help="YAML settings file (see config/uswap.yaml)")
    run.add_argument("--backing", help="store: /path/to/swapfile (O_DIRECT) or nfs://HOST/EXPORT/FILE")
    run.add_argument("--store-size", help="store size, e.g. 4G")
    run.add_argument("--max-resident", help="resident budget for all regions, e.g. 1G")
    run.add_argument("--socket", help="socket path (default $USWAP_SOCKET or /run/uswap/uswap.sock)")
    run.add_argument("--log-level", help="debug, info, warning or error")
    run.add_argument("--handover", action="store_true",
                     help="ask the daemon running on --socket to hand over, and take its regions over when it exits")
    run.add_argument("--state-dir", help="where the page tables a successor adopts are kept (default"
                     " $RUNTIME_DIRECTORY/state or /run/uswap/state; tmpfs)")
    st = sub.add_parser("status", help="show the daemon's state")
    st.add_argument("--socket")
    st.add_argument("--json", action="store_true")
    bud = sub.add_parser("budget", help="change the running daemon's budget at once")
    bud.add_argument("size", help="a size (e.g. 512M, at most the store's size), or auto to follow the host again")
    bud.add_argument("--socket")
    top = sub.add_parser("top", help="a live view of the daemon")
    top.add_argument("--socket")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between two readings (default 1)")
    top.add_argument("--once", action="store_true", help="print one view and exit")
    top.add_argument("--iterations", type=int, help="print this many views and exit")
    ex = sub.add_parser("exec", help="run a program with its anonymous memory in uswap",
                        usage="uswap exec [--socket S] [--min-size SIZE] [--allocator A] -- CMD ARGS...")
    ex.add_argument("--socket", help="the daemon's socket (default $USWAP_SOCKET or /run/uswap/uswap.sock)")
    ex.add_argument("--min-size", help="smallest mapping held in uswap (default 1M)")
    ex.add_argument("--allocator", default="jemalloc", help="malloc to preload: jemalloc (default), mimalloc, glibc")
    ex.add_argument("command", nargs=argparse.REMAINDER, help="the program and its arguments")
    ho = sub.add_parser("handover", help="have the running daemon exit without draining, for the next"
                        " daemon to adopt its regions (an upgrade)")
    ho.add_argument("--socket")
    args = parser.parse_args(argv)
    if args.cmd == "exec":
        from uswap import exec as uswap_exec
        return uswap_exec.run(args.socket, args.min_size, args.allocator, args.command)
    return {"run": _run, "status": _status, "budget": _budget, "top": _top,
            "handover": _handover}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
