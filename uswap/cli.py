"""`uswap run` (the daemon) and `uswap status`."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from uswap import config


def _run(args: argparse.Namespace) -> int:
    overrides = {"backing": args.backing, "store_size": args.store_size,
                 "max_resident": args.max_resident, "socket": args.socket,
                 "log_level": args.log_level}
    if args.socket is None and os.environ.get("USWAP_SOCKET"):
        overrides["socket"] = os.environ["USWAP_SOCKET"]
    try:
        cfg = config.load(args.config, overrides)
    except ValueError as e:
        print(f"uswap: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s uswap[%(process)d] %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("uswap")

    from uswap import native
    from uswap.daemon.server import Server
    from uswap.store import header, open_store

    try:
        store = open_store(cfg.backing, cfg.store_size, cfg.nfs_timeout)
    except ValueError as e:
        print(f"uswap: error: {e}", file=sys.stderr)
        return 2
    try:
        header.claim(store)
    except ValueError as e:
        store.close()
        print(f"uswap: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        store.close()
        print(f"uswap: error: backing: {store.url}: cannot write the store header: {e}", file=sys.stderr)
        return 2
    inject = None
    spec = os.environ.get("USWAP_INJECT")
    if spec is not None:
        from uswap.store.inject import InjectingStore
        try:
            inject = store = InjectingStore(store, json.loads(spec or "{}"))
        except (ValueError, json.JSONDecodeError) as e:
            print(f"uswap: error: USWAP_INJECT: {e}", file=sys.stderr)
            return 2
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
        server = Server(cfg, store, inject)
    except (ValueError, OSError) as e:
        store.close()
        print(f"uswap: error: {e}", file=sys.stderr)
        return 2
    try:
        return server.run()
    except Exception:
        # A bug must not leave a daemon that looks alive (socket present, threads
        # parked) while serving nothing: log it and exit so systemd restarts us.
        log.exception("fatal error in the daemon")
        logging.shutdown()
        os._exit(70)


def _status(args: argparse.Namespace) -> int:
    import uswap
    from uswap import protocol
    try:
        with uswap.connect(args.socket) as client:
            st = client.status()
    except uswap.UswapError as e:
        print(f"uswap: error: {e}", file=sys.stderr)
        return 1
    except (OSError, EOFError, protocol.ProtocolError) as e:
        print(f"uswap: error: the daemon closed the connection before answering ({e})", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
        return 0
    from uswap.sizes import format_size as fs
    store = st["store"]
    print(f"resident   {fs(st['resident_bytes'])} of {fs(st['max_resident_bytes'])}")
    print(f"swapped    {fs(st['swapped_bytes'])}")
    print(f"store      {store['url']}: {fs(store['used_bytes'])} used of {fs(store['size_bytes'])}"
          + ("  (FULL)" if st["store_full"] else ""))
    print(f"swapouts   {st['swapouts_total']} pages, swapins {st['swapins_total']} pages, faults {st['faults_total']}")
    print(f"writeback  {st['writeback_inflight']} in flight; errors: write {st['write_errors_total']},"
          f" read {st['read_errors_total']}")
    print(f"clients    {len(st['clients'])}")
    for c in st["clients"]:
        for r in c["regions"]:
            print(f"  pid {c['pid']} region {r['id']}: {fs(r['size_bytes'])},"
                  f" {fs(r['resident_bytes'])} resident, {fs(r['swapped_bytes'])} swapped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="uswap", description="userspace swap daemon")
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--config", help="YAML settings file (see config/uswap.yaml)")
    run.add_argument("--backing", help="store: /path/to/swapfile (O_DIRECT) or nfs://HOST/EXPORT/FILE")
    run.add_argument("--store-size", help="store size, e.g. 4G")
    run.add_argument("--max-resident", help="resident budget for all regions, e.g. 1G")
    run.add_argument("--socket", help="socket path (default $USWAP_SOCKET or /run/uswap/uswap.sock)")
    run.add_argument("--log-level", help="debug, info, warning or error")
    st = sub.add_parser("status", help="show the daemon's state")
    st.add_argument("--socket")
    st.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    return _run(args) if args.cmd == "run" else _status(args)


if __name__ == "__main__":
    sys.exit(main())
