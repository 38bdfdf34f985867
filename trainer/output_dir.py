"""The output directory: one writer at a time, writable before the first step, and one-line errors for
failed writes (full disk, read-only file system)."""
import contextlib
import errno
import fcntl
import os
import socket

from trainer import UserError

LOCK_NAME = 'output_dir.lock'


def writer_id():
    """host.pid: unique among the processes that may share an output dir, also across machines."""
    return f'{socket.gethostname()}.{os.getpid()}'


def write_error(err, path):
    """The UserError for an OSError raised while writing `path`."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f'no space left on the device writing {path}: free some space or choose another '
                         f'--output-dir, then rerun (the last complete checkpoint is intact)')
    return UserError(f'cannot write {path} ({err.strerror or err}): make --output-dir writable or choose '
                     f'another, then rerun')


def write_atomic(path, write):
    """Call `write(file)` on a temporary file beside `path`, named after this writer (host and pid),
    sync it, then rename it over `path` (an atomic replace on POSIX), so that `path` always holds a
    complete file: a kill at any moment leaves the old or the new one, plus at most a stale temporary
    file. A failed write (full disk) removes the temporary file and raises a UserError."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp_path = os.path.join(directory, f'.{os.path.basename(path)}.{writer_id()}.tmp')
    try:
        with open(tmp_path, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except OSError as err:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise write_error(err, path) from None


def check_writable(directory):
    """Create `directory` if needed and write, sync and delete a small file there, so that a read-only
    or full disk stops the run before it trains rather than at its first save."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise UserError(f'--output-dir {directory} is a file, not a directory: choose another --output-dir')
    probe = os.path.join(directory, f'.write-test.{writer_id()}')
    try:
        os.makedirs(directory, exist_ok=True)
        with open(probe, 'wb') as f:
            f.write(bytes(1 << 16))
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as err:
        raise write_error(err, directory) from None


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    return True


class OutputDirLock:
    """An exclusive lock on an output dir, held by a run's main process from start-up to exit.

    The lock is an flock on `output_dir.lock`, which the kernel releases when its holder dies, so a lock
    file left by a killed run does not block the next one. The file names the holder (host and pid) for
    the refusal message. Where the file system has no flock, a holder on this host whose pid is gone is
    treated as stale; a holder on another host then has to be checked by the user.
    """

    def __init__(self, directory):
        self.path = os.path.join(directory, LOCK_NAME)
        self.fd = None

    def acquire(self):
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                self._lock(fd)
            except BaseException:
                os.close(fd)
                raise
            # a previous holder may have deleted the file after we opened it: lock the file on disk
            if os.path.exists(self.path) and os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f'{socket.gethostname()} {os.getpid()}\n'.encode())
        self.fd = fd

    def _lock(self, fd):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._refuse(self._holder(fd))
        except OSError as err:  # no flock on this file system: judge the holder by its pid
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise write_error(err, self.path) from None
            host, pid = self._holder(fd)
            here = host == socket.gethostname()
            if host and (not here or (pid and pid != os.getpid() and process_alive(pid))):
                self._refuse((host, pid))

    def _holder(self, fd):
        os.lseek(fd, 0, os.SEEK_SET)
        host, _, pid = os.read(fd, 4096).decode(errors='replace').strip().partition(' ')
        return host, int(pid) if pid.isdigit() else 0

    def _refuse(self, holder):
        host, pid = holder
        who = f'process {pid} on host {host}' if host else 'another process'
        raise UserError(f'--output-dir {os.path.dirname(self.path)} is in use by {who} (lock file {self.path}): wait '
                        f'for that run to end or choose another --output-dir; if it is not running, delete the '
                        f'lock file')

    def release(self):
        if self.fd is not None:
            with contextlib.suppress(FileNotFoundError):  # deleted by hand
                os.remove(self.path)
            os.close(self.fd)
            self.fd = None
