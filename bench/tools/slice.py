#!/usr/bin/env python3
"""slice.py SLICE_US TID... : give threads an EEVDF slice of SLICE_US microseconds
(sched_setattr's sched_runtime for a fair-class thread; 0 = the kernel's default slice),
keeping each thread's policy and nice value. Linux 6.12 or later, x86_64. Exits 1 if
any thread could not be changed."""
import ctypes
import os
import struct
import sys

SYS_SCHED_SETATTR, SYS_SCHED_GETATTR = 314, 315  # x86_64
FMT = "IIQiIQQQ"  # struct sched_attr without the utilisation clamps: 48 bytes
libc = ctypes.CDLL(None, use_errno=True)


def getattr_(tid):
    buf = ctypes.create_string_buffer(56)
    if libc.syscall(SYS_SCHED_GETATTR, tid, buf, 56, 0) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return struct.unpack_from(FMT, buf)


def main():
    us, failed = int(sys.argv[1]), 0
    for tid in map(int, sys.argv[2:]):
        try:
            _, policy, _, nice, prio, _, _, _ = getattr_(tid)
            attr = ctypes.create_string_buffer(struct.pack(FMT, 48, policy, 0, nice, prio, us * 1000, 0, 0), 48)
            if libc.syscall(SYS_SCHED_SETATTR, tid, attr, 0) != 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            print(tid, "policy", policy, "nice", nice, "slice_ns", getattr_(tid)[5])
        except OSError as e:
            print(tid, "failed:", e, file=sys.stderr)
            failed = 1
    sys.exit(failed)


if __name__ == "__main__":
    main()
