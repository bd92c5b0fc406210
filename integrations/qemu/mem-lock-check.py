#!/usr/bin/env python3
"""mem-lock-check.py QEMU_BINARY [PORT]  (default: a free port): postcopy into a destination started with
`-overcommit mem-lock=on`, then check that its guest memory is locked again.

postcopy_ram_supported_by_host runs munlockall (userfaultfd registration fails on locked
memory); postcopy_ram_incoming_cleanup must lock it again, as QEMU does. Two QEMUs on
loopback, both stopped (-S), 256 MiB each; the precopy is throttled so that
migrate-start-postcopy comes while it runs. Passes when the destination completes and its
VmLck (/proc/PID/status) covers guest RAM again. Prints what it saw; exit 0 on pass.
Written for postcopy-ram's integrations/qemu/ (QMP over a Unix socket, standard library only).
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

RAM_MIB = 256


def qmp(path, proc):
    for _ in range(300):
        if proc.poll() is not None:
            sys.exit(f"FAIL: QEMU exited early ({proc.returncode})")
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            break
        except OSError:
            time.sleep(0.1)
    else:
        sys.exit(f"FAIL: no QMP socket at {path}")
    f = s.makefile("rw")
    json.loads(f.readline())

    def cmd(name, **args):
        f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        f.flush()
        while True:
            r = json.loads(f.readline())
            if "error" in r:
                sys.exit(f"FAIL: {name}: {r['error']}")
            if "return" in r:
                return r["return"]

    cmd("qmp_capabilities")
    return cmd


def vmlck_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmLck:"):
                return int(line.split()[1])
    return 0


def main():
    qemu = sys.argv[1]
    if len(sys.argv) > 2:
        port = int(sys.argv[2])
    else:
        with socket.socket() as probe:  # a free loopback port
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    tmp = tempfile.mkdtemp(prefix="postcopy-memlock-")
    common = [qemu, "-machine", "pc", "-m", str(RAM_MIB), "-nodefaults",
              "-display", "none", "-S"]
    dst_sock, src_sock = os.path.join(tmp, "dst.qmp"), os.path.join(tmp, "src.qmp")
    dst = subprocess.Popen(common + ["-overcommit", "mem-lock=on",
                                     "-incoming", f"tcp:127.0.0.1:{port}",
                                     "-qmp", f"unix:{dst_sock},server=on,wait=off"])
    src = subprocess.Popen(common + ["-qmp", f"unix:{src_sock},server=on,wait=off"])
    try:
        d = qmp(dst_sock, dst)
        s = qmp(src_sock, src)
        before = vmlck_kib(dst.pid)
        caps = [{"capability": "postcopy-ram", "state": True}]
        d("migrate-set-capabilities", capabilities=caps)
        s("migrate-set-capabilities", capabilities=caps)
        s("migrate-set-parameters", **{"max-bandwidth": 64 << 10})
        s("migrate", uri=f"tcp:127.0.0.1:{port}")
        time.sleep(1)
        during = vmlck_kib(dst.pid)
        # Still in precopy (throttled to 64 KiB/s), so the rest can only arrive postcopy.
        src_before = s("query-migrate").get("status")
        if src_before != "active":
            sys.exit(f"FAIL: source status {src_before!r} before migrate-start-postcopy")
        s("migrate-start-postcopy")
        s("migrate-set-parameters", **{"max-bandwidth": 256 << 10})
        statuses = []
        for _ in range(1200):
            st = d("query-migrate").get("status")
            if not statuses or statuses[-1] != st:
                statuses.append(st)
            if st in ("completed", "failed"):
                break
            time.sleep(0.1)
        after = vmlck_kib(dst.pid)
        print(f"destination VmLck: {before} KiB at start, {during} KiB during precopy "
              f"(after munlockall), {after} KiB after postcopy; "
              f"source {src_before} at migrate-start-postcopy; "
              f"destination status {' -> '.join(str(x) for x in statuses)}")
        if statuses[-1] != "completed":
            sys.exit("FAIL: the destination did not complete")
        if during != 0:
            sys.exit("FAIL: guest RAM was still locked during the migration (no munlockall)")
        if after < RAM_MIB * 1024:
            sys.exit(f"FAIL: guest RAM ({RAM_MIB} MiB) is not locked again after postcopy")
        print("PASS: guest memory locked again after postcopy")
    finally:
        for p in (src, dst):
            p.kill()
            p.wait()
        for name in (dst_sock, src_sock):
            if os.path.exists(name):
                os.unlink(name)
        os.rmdir(tmp)


if __name__ == "__main__":
    main()
