#!/usr/bin/python3
"""A pass-through FUSE filesystem whose fsync fails on command.

    failfs.py BACKING MOUNTPOINT FLAG

Mounts BACKING at MOUNTPOINT (foreground; unmount with `umount`). While the
file FLAG exists, every fsync and fdatasync (of files and of directories)
fails with EIO, as on a disk that lost a write; everything else passes
through to BACKING. Used by tests/replicate.rs to show that a failed fsync
stops a replica (needs /dev/fuse and Debian's python3-fusepy).
"""

import errno
import os
import sys

from fusepy import FUSE, FuseOSError, Operations


class FailFs(Operations):
    def __init__(self, root, flag):
        self.root = root
        self.flag = flag

    def _p(self, path):
        return os.path.join(self.root, path.lstrip("/"))

    def _failing(self):
        return os.path.exists(self.flag)

    # Metadata
    def access(self, path, mode):
        if not os.access(self._p(path), mode):
            raise FuseOSError(errno.EACCES)

    def chmod(self, path, mode):
        return os.chmod(self._p(path), mode)

    def chown(self, path, uid, gid):
        return os.chown(self._p(path), uid, gid)

    def getattr(self, path, fh=None):
        st = os.lstat(self._p(path))
        keys = ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime",
                "st_nlink", "st_size", "st_uid", "st_blocks")
        return {k: getattr(st, k) for k in keys}

    def readdir(self, path, fh):
        return [".", ".."] + os.listdir(self._p(path))

    def readlink(self, path):
        return os.readlink(self._p(path))

    def mknod(self, path, mode, dev):
        return os.mknod(self._p(path), mode, dev)

    def rmdir(self, path):
        return os.rmdir(self._p(path))

    def mkdir(self, path, mode):
        return os.mkdir(self._p(path), mode)

    def statfs(self, path):
        st = os.statvfs(self._p(path))
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail",
                "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")
        return {k: getattr(st, k) for k in keys}

    def unlink(self, path):
        return os.unlink(self._p(path))

    def symlink(self, name, target):
        return os.symlink(target, self._p(name))

    def rename(self, old, new):
        return os.rename(self._p(old), self._p(new))

    def link(self, target, name):
        return os.link(self._p(name), self._p(target))

    def utimens(self, path, times=None):
        return os.utime(self._p(path), times)

    # Files
    def open(self, path, flags):
        return os.open(self._p(path), flags)

    def create(self, path, mode, fi=None):
        return os.open(self._p(path), os.O_RDWR | os.O_CREAT, mode)

    def read(self, path, length, offset, fh):
        return os.pread(fh, length, offset)

    def write(self, path, buf, offset, fh):
        return os.pwrite(fh, buf, offset)

    def truncate(self, path, length, fh=None):
        with open(self._p(path), "r+b") as f:
            f.truncate(length)

    def flush(self, path, fh):
        return 0

    def release(self, path, fh):
        return os.close(fh)

    def fsync(self, path, datasync, fh):
        if self._failing():
            raise FuseOSError(errno.EIO)
        return os.fsync(fh)

    def fsyncdir(self, path, datasync, fh):
        if self._failing():
            raise FuseOSError(errno.EIO)
        return 0


if __name__ == "__main__":
    backing, mountpoint, flag = sys.argv[1:4]
    FUSE(FailFs(os.path.abspath(backing), os.path.abspath(flag)), mountpoint,
         foreground=True, nothreads=False, allow_other=True)
