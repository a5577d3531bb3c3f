"""A bounded protocol fuzzer for the daemon's socket (tests/daemon/test_connections_protocol_fuzz.py).

It speaks the framing of uswap/protocol.py (4-byte big-endian length, UTF-8
JSON, fds as SCM_RIGHTS with the first byte) and sends, from a seeded RNG,
messages that are wrong in every way we could think of: cut short, too long,
not JSON, not an object, fields missing or of the wrong type, unknown ops,
ops before hello, allocs carrying the wrong fds or wrongly registered
userfaultfds or addresses that do not match, plain garbage; and connections
that close mid-frame or stay silent.

Each step says what a correct daemon does with it:
  "ok"      a valid request (hello, status): a reply with ok true;
  "refuse"  a complete but bad message: a reply with ok false and an error
            text, and/or the connection closed, promptly;
  "none"    an incomplete frame: nothing yet (we then close or go silent).
Every answer is checked against that; what differs is a finding, recorded
by category (with the step's bytes cut short) in FuzzReport.
"""
from __future__ import annotations

import collections
import fcntl
import json
import os
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from uswap import native, protocol, uffd

PAGE = 4096
KIT_PAGES = 4
REPLY_DEADLINE = 10.0   # s: a complete message gets its answer (or the close) within this
MAX_SILENT = 16         # connections kept open and silent until the end of the run
FULL_REGISTRATION = uffd.REGISTER_MISSING | uffd.REGISTER_WP | uffd.REGISTER_MINOR


# ----------------------------------------------------------------- fds to send

class Kit:
    """A region's pieces as a client builds them: a sealed empty memfd mapped
    here and registered in a uffd with `mode` (0: not registered). Nothing
    ever touches the mapped memory (a fault would wait for the daemon)."""

    def __init__(self, mode: int) -> None:
        self.mode = mode
        self.size = KIT_PAGES * PAGE
        self.memfd = os.memfd_create("uswap-fuzz", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.memfd, self.size)
        fcntl.fcntl(self.memfd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        self.addr = native.mmap_shared(self.memfd, self.size)
        self.uffd = uffd.open_uffd()
        if mode:
            # The raw ioctl: uffd.register() refuses registrations without WP/MINOR.
            ioctls = uffd.ffi.new("uint64_t *")
            ret = uffd.lib.us_uffd_register(self.uffd, self.addr, self.size, mode, ioctls)
            if ret < 0:
                raise OSError(-ret, f"UFFDIO_REGISTER mode {mode}: {os.strerror(-ret)}")

    def msg(self) -> dict:
        return {"op": "alloc", "size": self.size, "addr": self.addr}

    def close(self) -> None:
        if self.mode:
            try:
                uffd.unregister(self.uffd, self.addr, self.size)
            except OSError:
                pass
        native.munmap(self.addr, self.size)
        os.close(self.uffd)
        os.close(self.memfd)


class FdPool:
    """Every kind of fd the fuzzer attaches to messages, opened once and sent
    over and over (the kernel gives the daemon a new fd each time)."""

    def __init__(self, tmpdir: str) -> None:
        self.full = [Kit(FULL_REGISTRATION) for _ in range(4)]
        self.wrongly_registered = {
            "WP only": Kit(uffd.REGISTER_WP),
            "MISSING only": Kit(uffd.REGISTER_MISSING),
            "MISSING|MINOR": Kit(uffd.REGISTER_MISSING | uffd.REGISTER_MINOR),
            "not registered": Kit(0),
        }
        self._own: list[int] = []
        junk: dict[str, int] = {}
        junk["pipe read end"], junk["pipe write end"] = self._keep(*os.pipe())
        junk["/dev/null"] = self._keep(os.open("/dev/null", os.O_RDWR))
        plain = os.path.join(tmpdir, "fuzz-plain-file")
        junk["plain file"] = self._keep(os.open(plain, os.O_RDWR | os.O_CREAT, 0o600))
        os.ftruncate(junk["plain file"], KIT_PAGES * PAGE)
        a, b = socket.socketpair()
        junk["socket"], junk["socket peer"] = self._keep(a.detach(), b.detach())
        junk["unsealed memfd"] = self._keep(os.memfd_create("uswap-fuzz", os.MFD_CLOEXEC))
        os.ftruncate(junk["unsealed memfd"], KIT_PAGES * PAGE)
        sealed = os.memfd_create("uswap-fuzz", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(sealed, KIT_PAGES * PAGE)
        fcntl.fcntl(sealed, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK
                    | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
        junk["write-sealed memfd"] = self._keep(sealed)
        with_data = os.memfd_create("uswap-fuzz", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(with_data, KIT_PAGES * PAGE)
        os.pwrite(with_data, b"someone's data", 0)
        fcntl.fcntl(with_data, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        junk["memfd holding data"] = self._keep(with_data)
        junk["eventfd"] = self._keep(os.eventfd(0, os.EFD_CLOEXEC))
        self.junk = junk
        self.named: dict[str, int] = dict(junk)
        for i, k in enumerate(self.full):
            self.named[f"uffd{i}"] = k.uffd
            self.named[f"memfd{i}"] = k.memfd
        for name, k in self.wrongly_registered.items():
            self.named[f"uffd({name})"] = k.uffd
            self.named[f"memfd({name})"] = k.memfd
        # An address range that was mapped and is not any more.
        self.unmapped_addr = native.mmap_shared(junk["plain file"], KIT_PAGES * PAGE)
        native.munmap(self.unmapped_addr, KIT_PAGES * PAGE)

    def _keep(self, *fds: int):
        self._own.extend(fds)
        return fds[0] if len(fds) == 1 else fds

    def close(self) -> None:
        for k in self.full + list(self.wrongly_registered.values()):
            k.close()
        for fd in self._own:
            os.close(fd)


# ----------------------------------------------------------------- messages

@dataclass
class Step:
    category: str
    data: bytes
    fds: list[int] = field(default_factory=list)
    expect: str = "refuse"   # "ok" | "refuse" | "none"
    replies: int = 1         # replies a pipelined "ok" step gets
    what: str = ""           # a short description for findings


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def framed(msg: object) -> bytes:
    return frame(json.dumps(msg, separators=(",", ":")).encode())


# Values of the wrong type or range for integer fields (None: the field is left out).
WRONG_NUMBERS: list[object] = [
    None, True, False, 0, -1, -PAGE, 1.0, 4.0 * PAGE, 1e308, "16384", "0x1000", "", [], [PAGE], {},
    {"v": PAGE}, 2 ** 63, 2 ** 64, 2 ** 64 - PAGE, 2 ** 80, 10 ** 30, -(2 ** 70),
]

UNKNOWN_OPS = ["", " ", "Hello", "STATUS", "status ", "alloc\x00", "free\n", "hello2", "quit", "shutdown",
               "inject_all", "\u00e9t\u00e4t", "\U0001F4A3", "op", "null", "__class__", "x" * 5000]


class Generator:
    """Builds steps from one RNG. greeted: whether the connection said hello."""

    def __init__(self, rng: random.Random, pool: FdPool) -> None:
        self.rng = rng
        self.pool = pool
        self.builders = [
            (self.truncated, 8), (self.oversized, 4), (self.short_length, 4), (self.garbage, 6),
            (self.bad_json, 8), (self.non_object, 5), (self.bad_op, 5), (self.unknown_op, 6),
            (self.bad_hello, 4), (self.repeated_hello, 3), (self.bad_free, 6), (self.fds_on_other_op, 4),
            (self.inject, 3), (self.alloc_fields, 9), (self.alloc_fds, 9), (self.alloc_registration, 8),
            (self.alloc_address, 6), (self.status, 12), (self.pipelined_status, 2),
        ]
        self.weights = [w for _, w in self.builders]

    def step(self, greeted: bool) -> Step:
        build = self.rng.choices([b for b, _ in self.builders], self.weights)[0]
        step = build(greeted)
        if step.expect != "none" and not step.fds and self.rng.random() < 0.08:
            step.fds = self.junk_fds(self.rng.randint(1, 3))
            step.category += "+fds"
            step.expect = "refuse"
        if not greeted and not step.category.startswith("hello"):
            step.category = "before_hello:" + step.category
            if step.expect == "ok":
                step.expect = "refuse"  # anything but hello before hello
        return step

    def junk_fds(self, n: int) -> list[int]:
        return [self.rng.choice(list(self.pool.named.values())) for _ in range(n)]

    def any_message(self) -> dict:
        """Some message, valid or not, to cut or corrupt."""
        kit = self.rng.choice(self.pool.full)
        return self.rng.choice([{"op": "hello", "version": protocol.VERSION}, {"op": "status"},
                                kit.msg(), {"op": "free", "region": 1},
                                {"op": "inject", "spec": {"fail_reads": ["EIO"]}}])

    # -- framing

    def truncated(self, greeted: bool) -> Step:
        data = framed(self.any_message())
        cut = self.rng.randint(1, len(data) - 1)
        fds = self.junk_fds(self.rng.randint(1, 2)) if self.rng.random() < 0.2 else []
        return Step("truncated", data[:cut], fds, expect="none", what=f"{cut} of {len(data)} bytes")

    def oversized(self, greeted: bool) -> Step:
        length = self.rng.choice([protocol.MAX_MESSAGE + 1, 2 ** 31, 2 ** 32 - 1,
                                  self.rng.randint(protocol.MAX_MESSAGE + 1, 2 ** 32 - 1)])
        tail = self.rng.randbytes(self.rng.randint(0, 64))
        return Step("oversized", struct.pack(">I", length) + tail, what=f"length {length}")

    def short_length(self, greeted: bool) -> Step:
        """The prefix says less than the JSON that follows: the frame ends inside it."""
        body = json.dumps(self.any_message()).encode()
        n = self.rng.randint(1, len(body) - 1)
        return Step("short_length", struct.pack(">I", n) + body[:n], what=repr(body[:n][:60]))

    def garbage(self, greeted: bool) -> Step:
        data = self.rng.randbytes(self.rng.randint(1, 4096))
        expect = "none"
        if len(data) >= 4:
            (length,) = struct.unpack(">I", data[:4])
            if length > protocol.MAX_MESSAGE or len(data) >= 4 + length:
                expect = "refuse"
        return Step("garbage", data, expect=expect, what=f"{len(data)} random bytes")

    # -- JSON

    def bad_json(self, greeted: bool) -> Step:
        good = json.dumps(self.any_message()).encode()
        kind = self.rng.randrange(9)
        if kind == 0:
            body = good[:self.rng.randint(0, len(good) - 1)]
        elif kind == 1:
            body = good + self.rng.choice([b"}", b",", b" x", b"{}", b"\x00"])
        elif kind == 2:
            body = b"\xff\xfe" + good
        elif kind == 3:
            body = b"[" * self.rng.randint(1000, 200000)
        elif kind == 4:
            body = b'{"op":"hello","version":' + b"9" * self.rng.randint(4301, 20000) + b"}"
        elif kind == 5:
            body = self.rng.choice([b"NaN", b"Infinity", b"-Infinity", b"{'op': 'status'}", b"{op: status}"])
        elif kind == 6:
            body = b""
        elif kind == 7:
            body = good.replace(b'"', b"'")
        else:
            body = bytes(self.rng.randrange(256) for _ in range(self.rng.randint(1, 200)))
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError):
            obj = None
        if isinstance(obj, dict):  # the mutation happened to leave valid JSON: make it bad
            body = body + b"]"
        return Step("bad_json", frame(body), what=f"kind {kind}: {body[:60]!r}")

    def non_object(self, greeted: bool) -> Step:
        value = self.rng.choice([[], [1, 2], ["op", "hello"], [{"op": "status"}], "status", "",
                                 0, 1, -1.5, 1e308, None, True, False])
        return Step("non_object", framed(value), what=repr(value))

    def bad_op(self, greeted: bool) -> Step:
        op = self.rng.choice([None, 1, 0, True, False, 1.5, [], ["status"], {}, {"op": "status"}, 2 ** 70])
        msg = {"version": protocol.VERSION} if self.rng.random() < 0.2 else {"op": op, "version": protocol.VERSION}
        return Step("bad_op", framed(msg), what=repr(msg)[:80])

    def unknown_op(self, greeted: bool) -> Step:
        op = self.rng.choice(UNKNOWN_OPS + ["".join(chr(self.rng.randint(32, 0x2FFF)) for _ in range(12))])
        return Step("unknown_op", framed({"op": op}), what=repr(op)[:60])

    # -- handshake

    def bad_hello(self, greeted: bool) -> Step:
        version = self.rng.choice([0, 2, -1, True, 1.0, 1.5, "1", None, [1], {"v": 1}, 2 ** 64, 10 ** 30, 1e308])
        msg = {"op": "hello"} if version is None else {"op": "hello", "version": version}
        return Step("hello_bad_version", framed(msg), what=repr(version))

    def repeated_hello(self, greeted: bool) -> Step:
        step = Step("hello_again", framed({"op": "hello", "version": protocol.VERSION}))
        if not greeted:
            step.expect = "ok"
            step.category = "hello"
        return step

    # -- ops

    def status(self, greeted: bool) -> Step:
        return Step("status", framed({"op": "status"}), expect="ok")

    def pipelined_status(self, greeted: bool) -> Step:
        n = self.rng.randint(2, 5)
        return Step("status_pipelined", framed({"op": "status"}) * n, expect="ok", replies=n)

    def bad_free(self, greeted: bool) -> Step:
        region = self.rng.choice(WRONG_NUMBERS + [1, 2, 999999])
        msg = {"op": "free"} if region is None else {"op": "free", "region": region}
        return Step("free_not_ours", framed(msg), what=repr(region)[:60])

    def fds_on_other_op(self, greeted: bool) -> Step:
        msg = self.rng.choice([{"op": "status"}, {"op": "free", "region": 1},
                               {"op": "hello", "version": protocol.VERSION}, {"op": "nope"}])
        return Step("fds_on_" + msg["op"], framed(msg), self.junk_fds(self.rng.randint(1, 4)))

    def inject(self, greeted: bool) -> Step:
        spec = self.rng.choice([None, {}, [], "x", 1, {"fail_reads": ["EIO"]}, {"fail_writes": 1e308},
                                {"delay": -1}, {"x" * 100: [None] * 10}])
        return Step("inject_disabled", framed({"op": "inject", "spec": spec}), what=repr(spec)[:60])

    # -- alloc

    def alloc_fields(self, greeted: bool) -> Step:
        """The right fds, a field wrong."""
        kit = self.rng.choice(self.pool.full)
        msg = kit.msg()
        name = self.rng.choice(["size", "addr"])
        value = self.rng.choice(WRONG_NUMBERS + [kit.size + PAGE, kit.size - PAGE, PAGE + 1, kit.addr + 1,
                                                 float(kit.size), float(kit.addr)])
        if value is None:
            del msg[name]
        else:
            msg[name] = value
        return Step(f"alloc_{name}", framed(msg), [kit.uffd, kit.memfd], what=f"{name}={value!r}"[:80])

    def alloc_fds(self, greeted: bool) -> Step:
        """Right fields, 0..8 fds of any kinds (never the kit's own pair)."""
        kit = self.rng.choice(self.pool.full)
        names = list(self.pool.named)
        while True:
            chosen = [self.rng.choice(names) for _ in range(self.rng.randint(0, 8))]
            fds = [self.pool.named[n] for n in chosen]
            if fds != [kit.uffd, kit.memfd]:
                break
        return Step(f"alloc_{len(fds)}_fds", framed(kit.msg()), fds, what=",".join(chosen))

    def alloc_registration(self, greeted: bool) -> Step:
        """Right fields and memfd; the uffd does not have the range registered
        MISSING|WP|MINOR (registered otherwise, or in another uffd)."""
        if self.rng.random() < 0.25:
            kit, other = self.rng.sample(self.pool.full, 2)
            return Step("alloc_uffd_of_another_range", framed(kit.msg()), [other.uffd, kit.memfd],
                        what="the range is registered in another uffd")
        name = self.rng.choice(list(self.pool.wrongly_registered))
        kit = self.pool.wrongly_registered[name]
        return Step(f"alloc_registered_{name.replace(' ', '_')}", framed(kit.msg()), [kit.uffd, kit.memfd],
                    what=f"range registered {name}")

    def alloc_address(self, greeted: bool) -> Step:
        """Well-formed fields and real fds whose address does not match."""
        kit = self.rng.choice(self.pool.full)
        kind = self.rng.randrange(4)
        msg = kit.msg()
        fds = [kit.uffd, kit.memfd]
        if kind == 0:
            msg["addr"] = self.pool.unmapped_addr
            what = "addr not mapped"
        elif kind == 1:
            msg["addr"] = kit.addr + PAGE * self.rng.randint(1, KIT_PAGES - 1)
            what = "addr inside the mapping, the range running past it (into whatever is mapped next)"
        elif kind == 2:
            other = self.rng.choice([k for k in self.pool.full if k is not kit])
            fds = [kit.uffd, other.memfd]
            what = "the memfd is not the one mapped at addr"
        else:
            msg["addr"] = 0x10000 * self.rng.randint(1, 64)
            what = "addr of low memory"
        return Step(f"alloc_address_{kind}", framed(msg), fds, what=what)


# ----------------------------------------------------------------- running

@dataclass
class FuzzReport:
    seed: int
    messages: int = 0
    connections: int = 0
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    findings: dict = field(default_factory=lambda: collections.defaultdict(list))
    finding_counts: collections.Counter = field(default_factory=collections.Counter)
    finding_categories: dict = field(default_factory=lambda: collections.defaultdict(collections.Counter))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, category: str, outcome: str) -> None:
        with self.lock:
            self.outcomes[(category, outcome)] += 1

    def finding(self, kind: str, step: Step, detail: str) -> None:
        with self.lock:
            self.finding_counts[kind] += 1
            self.finding_categories[kind][step.category] += 1
            if self.finding_categories[kind][step.category] == 1:  # one example per category
                self.findings[kind].append(f"{step.category} ({step.what or step.data[:40]!r}): {detail}"[:300])

    def summary(self) -> str:
        lines = [f"seed {self.seed}: {self.messages} messages on {self.connections} connections"]
        for kind, n in sorted(self.finding_counts.items()):
            lines.append(f"  {kind}: {n} times, by category {dict(self.finding_categories[kind])}; e.g.")
            lines += [f"    {x}" for x in self.findings[kind]]
        return "\n".join(lines)


def send_step(sock: socket.socket, step: Step) -> bool:
    """Send the step's bytes (fds with the first byte). False if the daemon
    hung up before taking all of it (it may do so after a bad prefix)."""
    try:
        data = step.data
        if step.fds:
            if socket.send_fds(sock, [data[:1]], step.fds) != 1:
                return False
            data = data[1:]
        sock.sendall(data)
        return True
    except (BrokenPipeError, ConnectionResetError):
        return False


def read_reply(sock: socket.socket) -> tuple[str, dict | None]:
    """("reply", msg), ("closed", None), ("timeout", None) or ("garbage", None)."""
    sock.settimeout(REPLY_DEADLINE)
    try:
        msg, fds = protocol.recv(sock)
    except (EOFError, ConnectionResetError):
        return "closed", None
    except socket.timeout:
        return "timeout", None
    except protocol.ProtocolError:
        return "garbage", None
    for fd in fds:
        os.close(fd)
    if fds:
        return "garbage", msg
    return "reply", msg


class Fuzzer:
    """Runs steps on connections to `socket_path`, from `workers` threads."""

    def __init__(self, socket_path: str, seed: int, pool: FdPool) -> None:
        self.socket_path = socket_path
        self.seed = seed
        self.pool = pool
        self.report = FuzzReport(seed)
        self.silent: list[tuple[socket.socket, float, str]] = []
        self.silent_lock = threading.Lock()

    def connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.settimeout(REPLY_DEADLINE)
        s.connect(self.socket_path)
        with self.report.lock:
            self.report.connections += 1
        return s

    def keep_silent(self, s: socket.socket, what: str) -> bool:
        with self.silent_lock:
            if len(self.silent) >= MAX_SILENT:
                return False
            self.silent.append((s, time.monotonic(), what))
            return True

    def run(self, messages: int, workers: int, deadline: float, stream: int) -> None:
        """`messages` messages spread over `workers` threads (stream: which
        slice of the seed's RNG streams they use); stops at `deadline`."""
        share = [messages // workers + (1 if i < messages % workers else 0) for i in range(workers)]
        errors: list[BaseException] = []

        def work(i: int) -> None:
            try:
                self.worker(random.Random(self.seed * 1000 + stream * 100 + i), share[i], deadline)
            except BaseException as e:  # a bug in the fuzzer itself must fail the test
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    def worker(self, rng: random.Random, quota: int, deadline: float) -> None:
        gen = Generator(rng, self.pool)
        sent = 0
        while sent < quota and time.monotonic() < deadline:
            sent += self.connection(rng, gen)
        with self.report.lock:
            self.report.messages += sent

    def connection(self, rng: random.Random, gen: Generator) -> int:
        """One connection: maybe hello, valid requests, then one bad step.
        Returns the number of messages sent."""
        s = self.connect()
        keep = False
        sent = 0
        try:
            if rng.random() < 0.03:  # open and say nothing at all
                keep = self.keep_silent(s, "never sent a byte")
                return 1
            greeted = rng.random() < 0.8
            if greeted:
                sent += 1
                if not self.exchange(s, Step("hello", framed({"op": "hello", "version": protocol.VERSION}),
                                             expect="ok")):
                    return sent
            while True:
                step = gen.step(greeted)
                sent += step.replies
                alive = self.exchange(s, step)
                if step.expect == "none":
                    # Cut short: leave mid-frame, or stay silent with the frame half sent.
                    if rng.random() < 0.3:
                        keep = self.keep_silent(s, f"{step.category} then silent (greeted={greeted})")
                    return sent
                if not alive or step.expect != "ok" or rng.random() < 0.2:
                    return sent
                if step.category == "hello":
                    greeted = True
        finally:
            if not keep:
                s.close()

    def exchange(self, s: socket.socket, step: Step) -> bool:
        """Send a step and check the daemon's answer. True if the connection is
        still usable for another request."""
        complete = send_step(s, step)
        if step.expect == "none":
            self.report.note(step.category, "sent")
            return True
        for _ in range(step.replies):
            outcome, reply = read_reply(s)
            self.report.note(step.category, outcome)
            if outcome == "timeout":
                self.report.finding("no answer within %.0fs" % REPLY_DEADLINE, step,
                                    "neither a reply nor a close")
                return False
            if outcome == "garbage":
                self.report.finding("unparseable reply (or one carrying fds)", step, repr(reply))
                return False
            if outcome == "closed":
                if step.expect == "ok":
                    self.report.finding("valid request refused", step, "connection closed")
                return False
            if not isinstance(reply.get("ok"), bool):
                self.report.finding("reply without a boolean ok", step, repr(reply)[:200])
                return False
            if step.expect == "ok" and not reply["ok"]:
                self.report.finding("valid request refused", step, repr(reply)[:200])
                return False
            if step.expect == "refuse":
                if reply["ok"]:
                    self.report.finding("bad input accepted", step, repr(reply)[:200])
                elif not (isinstance(reply.get("error"), str) and reply["error"].strip()):
                    self.report.finding("refusal without an error text", step, repr(reply)[:200])
                return False
        return complete

    def close_all(self) -> None:
        with self.silent_lock:
            for s, _, _ in self.silent:
                s.close()
            self.silent = []


def closed_by_peer(s: socket.socket) -> bool:
    """Whether the daemon has closed this (silent) connection, without waiting.
    A reply it sent first (an error) is read and skipped."""
    s.setblocking(False)
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return True
    except BlockingIOError:
        return False
    except (ConnectionResetError, BrokenPipeError):
        return True
