#!/usr/bin/python3
"""The seed's backup_nbd algorithm (DirectoryExample), as the benchmark baseline.

Map the dirty bitmap with block status, then for each dirty extent: synchronous 4 MiB reads,
write to the target at the same offset, discard the range on the export. One request at a time,
one connection. Uses libnbd's Python binding (Debian: python3-libnbd); run with /usr/bin/python3.

usage: seed_baseline.py URI TARGET BITMAP [--no-discard]
"""
import os
import sys

import nbd

CHUNK = 4 * 1024 * 1024


def dirty_extents(h, context, size):
    """All dirty extents of the bitmap, walking the disk with block status."""
    extents = []
    offset = 0
    while offset < size:
        pos = [offset]

        def collect(metacontext, start, entries, err):
            if metacontext != context:
                return 0
            p = start
            for i in range(0, len(entries), 2):
                length, flags = entries[i], entries[i + 1]
                if flags & 1:
                    extents.append((p, length))
                p += length
            pos[0] = p
            return 0

        h.block_status(min(size - offset, 2**31 - CHUNK), offset, collect)
        offset = max(pos[0], offset + 1)
    return extents


def main():
    uri, target, bitmap = sys.argv[1], sys.argv[2], sys.argv[3]
    discard = "--no-discard" not in sys.argv
    context = "qemu:dirty-bitmap:" + bitmap
    h = nbd.NBD()
    h.add_meta_context(context)
    h.connect_uri(uri)
    size = h.get_size()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o644)
    done = 0
    for off, length in dirty_extents(h, context, size):
        end = min(off + length, size)
        while off < end:
            n = min(CHUNK, end - off)
            os.pwrite(fd, h.pread(n, off), off)
            if discard:
                h.trim(n, off)
            off += n
            done += n
    os.fsync(fd)
    os.close(fd)
    h.shutdown()
    print(done)


if __name__ == "__main__":
    main()
