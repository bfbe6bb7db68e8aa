"""Small shared helpers: atomic writes that never clobber what they did not create, content
fingerprints, a per-directory run lock, MPI rank checks and strict JSON.

Outputs
-------
:func:`atomic_write` (one file) and :func:`atomic_dir` (a directory: bigfile meshes and catalogs)
build the output under a temporary sibling name and rename it into place, so a reader never sees a
half-written output and a failure leaves the previous one untouched. Files and folders get the
permissions the umask allows (``0666 & ~umask``, ``0777 & ~umask``), not the ``0600``/``0700`` of
:func:`tempfile.mkstemp`/:func:`tempfile.mkdtemp`.

:func:`atomic_dir` replaces an existing directory only when it is a previous output of ours: it
holds the marker file :data:`OUTPUT_MARKER`, written with every output and listing the files it
wrote, and nothing else (an empty directory also qualifies). Anything else at the path (a user's
folder, a file, a link, one of our outputs with a file added) is an error naming it
(:class:`ForeignOutputError`) unless ``overwrite=True``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path

#: marker file in every directory :func:`atomic_dir` writes (JSON: writer, version, files)
OUTPUT_MARKER = ".jerald_nbk-output.json"
#: lock file :func:`run_lock` holds in a run directory (JSON: host, pid, start time, command)
LOCK_NAME = ".jerald.lock"


def json_safe(obj):
    """``obj`` with numpy arrays and scalars as lists and floats, and NaN/inf as None (strict JSON)."""
    import math

    import numpy as np

    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic) or (hasattr(obj, "item") and getattr(obj, "shape", None) == ()):
        obj = obj.item()  # numpy and JAX scalars
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def is_root(comm=None) -> bool:
    """True on rank 0 of ``comm`` (always true without MPI)."""
    return comm is None or comm.rank == 0


# ------------------------------------------------------------------------------ permissions


def current_umask() -> int:
    """The process umask (read from ``/proc`` where possible, which leaves it untouched)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    old = os.umask(0o022)
    os.umask(old)
    return old


def default_mode(directory: bool = False) -> int:
    """Permissions a new file (``0666``) or directory (``0777``) gets under the current umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


# ------------------------------------------------------------------------------ atomic outputs


class ForeignOutputError(FileExistsError):
    """An output path holds something jerald-nbk did not write; it is left untouched."""


@contextlib.contextmanager
def atomic_write(path, mode: str = "w"):
    """Open a temporary file next to ``path``; on success rename it onto ``path``.

    A reader never sees a half-written file, and an exception (or an interrupt) leaves any previous
    file untouched and no temporary behind. The file gets ``0666 & ~umask`` permissions.

    Parameters
    ----------
    path : str or Path
        Destination file; its parent directories are created.
    mode : str
        ``open`` mode of the temporary file (``"w"`` or ``"wb"``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary is removed through a handle on its folder, so that it goes even when the folder
    # was moved or replaced meanwhile; the rename goes by path, so that a replaced folder is an
    # error (the output is not where it was asked for) and not a silent write elsewhere.
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, default_mode())
            with os.fdopen(fd, mode) as fh:
                fault_point("write")
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.basename(tmp), dir_fd=dir_fd)
            raise
    finally:
        os.close(dir_fd)


def _files_under(root: Path) -> list[str]:
    """Every non-directory entry under ``root`` (links not followed), as sorted relative paths."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        out += [str(rel / f) for f in filenames]
        # links to directories show up in dirnames: they are entries of their own, not followed
        out += [str(rel / d) for d in dirnames if (Path(dirpath) / d).is_symlink()]
    return sorted(os.path.normpath(f) for f in out)


def foreign_content(path) -> str | None:
    """Why ``path`` is not something :func:`atomic_dir` may replace, or None when it may.

    It may be replaced when it does not exist, is an empty directory, or is a previous output of
    ours: a directory holding :data:`OUTPUT_MARKER` and no file that the marker does not list.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    str or None
        A sentence naming ``path`` (and the first foreign file in it), or None.
    """
    path = Path(path)
    if not os.path.lexists(path):
        return None
    if path.is_symlink():
        return f"{path} is a symbolic link, not a jerald-nbk output"
    if not path.is_dir():
        return f"{path} is a file, not a jerald-nbk output"
    marker = path / OUTPUT_MARKER
    if not marker.is_file():
        with os.scandir(path) as it:
            if next(it, None) is None:
                return None  # an empty directory: nothing to lose
        return f"{path} exists and is not a jerald-nbk output (no {OUTPUT_MARKER} in it)"
    try:
        listed = set(json.loads(marker.read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{path}: its marker {marker} is unreadable, so it may hold files of someone else's"
    extra = [f for f in _files_under(path) if f not in listed and f != OUTPUT_MARKER]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        return f"{path} holds {path / extra[0]}{more}, which jerald-nbk did not write"
    return None


def check_output(path, overwrite: bool = False, what: str = "output") -> None:
    """Raise :class:`ForeignOutputError` if ``path`` holds something we must not replace.

    Parameters
    ----------
    path : str or Path
        An output directory about to be written by :func:`atomic_dir`.
    overwrite : bool
        Allow replacing whatever is there (the check passes).
    what : str
        What the path is, for the message (e.g. ``"mesh"``).
    """
    if overwrite:
        return
    reason = foreign_content(path)
    if reason is not None:
        raise ForeignOutputError(
            f"{what} {path}: {reason}; it is left untouched. Remove it, choose another path, "
            "or pass overwrite=True (--overwrite on the command line) to replace it"
        )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _replace_dir(tmp: Path, path: Path) -> None:
    """Move a finished directory onto ``path``; whatever stood there goes only once it is in place."""
    if os.path.lexists(path):
        old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.old")
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old, path)
            raise
        _remove(old)
    else:
        os.replace(tmp, path)  # fails (no harm done) if a non-empty directory appeared meanwhile


def _mark_output(tmp: Path) -> None:
    """Write :data:`OUTPUT_MARKER` into a finished output directory, listing its files."""
    from . import __version__

    doc = {"writer": "jerald_nbk", "version": __version__, "files": _files_under(tmp)}
    (tmp / OUTPUT_MARKER).write_text(json.dumps(doc, indent=1))


def _make_tmp_dir(path: Path, overwrite: bool) -> Path:
    check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, default_mode(directory=True))
    return tmp


def _finish_dir(tmp: Path, path: Path, overwrite: bool) -> None:
    _mark_output(tmp)
    check_output(path, overwrite)  # again: something may have appeared while we wrote
    _replace_dir(tmp, path)


@contextlib.contextmanager
def atomic_dir(path, comm=None, overwrite: bool = False):
    """Build a directory under a temporary name; rename it onto ``path`` on success.

    For multi-file outputs (bigfile meshes and catalogs): an existing ``path`` is replaced only once
    the new one is complete, and only if it is a previous output of ours (see
    :func:`foreign_content`) or ``overwrite`` is true. The finished directory gets the marker
    :data:`OUTPUT_MARKER` and ``0777 & ~umask`` permissions. With an MPI ``comm`` every rank enters
    the block (collective writers): rank 0 creates the temporary directory and renames it once every
    rank has left the block without error; after an error on any rank it is removed and ``path`` is
    left untouched.

    Parameters
    ----------
    path : str or Path
        The output directory.
    comm : MPI communicator, optional
        Collective use by every rank of ``comm``.
    overwrite : bool
        Replace whatever stands at ``path``, ours or not.

    Raises
    ------
    ForeignOutputError
        ``path`` holds something that is not a previous output of ours (before anything is
        written, and again before the rename); it is left untouched.
    """
    path = Path(path)
    if comm is None or comm.size == 1:
        tmp = _make_tmp_dir(path, overwrite)
        try:
            fault_point("write")
            yield tmp
            _finish_dir(tmp, path, overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return
    import numpy as np
    from mpi4py import MPI

    tmp, error = None, None
    if comm.rank == 0:
        try:
            tmp = str(_make_tmp_dir(path, overwrite))
        except Exception as err:  # noqa: BLE001 - raised on every rank below
            error = err
    tmp, error = comm.bcast((tmp, error), root=0)
    if error is not None:
        raise error
    tmp = Path(tmp)
    ok = False
    agree = comm.Dup()  # the end's agreement, apart from the writers' own collectives
    _PENDING.add(str(tmp))
    try:
        fault_point("write")
        yield tmp
        ok = True
    finally:
        flags = np.array([ok], dtype=np.int32), np.zeros(1, dtype=np.int32)
        request = agree.Iallreduce(flags[0], flags[1], op=MPI.LAND)
        if ok:
            request.Wait()
        elif not _wait(request, _grace()):
            # this rank failed alone while the others still write (in collectives this rank
            # will never join): remove the temporary and end every rank
            import traceback

            shutil.rmtree(tmp, ignore_errors=True)
            abort(comm, traceback.format_exc(), 1)
        agree.Free()
        _PENDING.discard(str(tmp))
        mine, ok = ok, bool(flags[1][0])
        error = None
        if comm.rank == 0:
            if ok:
                try:
                    _finish_dir(tmp, path, overwrite)
                except Exception as err:  # noqa: BLE001 - raised on every rank below
                    error = err
            if not ok or error is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        error = comm.bcast(error, root=0)
        if error is not None and ok:
            raise error
        if mine and not ok:
            raise RuntimeError(f"{path}: another rank failed while writing it; it was not written")


# ------------------------------------------------------------------------------ fingerprints

_HEAD = 1024  # elements (arrays) hashed at each end
_SAMPLE = 65536  # evenly spaced elements (arrays) hashed in between
_CHUNK = 4096  # bytes per sampled chunk of a file
_CHUNKS = 64  # sampled chunks per file, besides its head and tail


def fingerprint_array(array) -> dict:
    """A content fingerprint of an array (numpy or JAX): cheap, not a full hash.

    Shape, dtype, the sum of all elements, and a SHA-256 of the first and last
    elements and an evenly spaced sample of the rest: any change of scale, any shift and almost any
    edit changes it.

    Parameters
    ----------
    array : array_like

    Returns
    -------
    dict
        ``{"shape", "dtype", "sum", "sha256"}`` (``sum`` as a string: NaN compares equal).
    """
    import numpy as np

    if not hasattr(array, "reshape"):
        array = np.asarray(array)
    shape = [int(n) for n in array.shape]
    h = hashlib.sha256(f"{shape} {array.dtype}".encode())
    flat = array.reshape(-1)
    n = int(flat.shape[0])
    total = "0"
    if n:
        stride = max(1, n // _SAMPLE)
        for part in (flat[:_HEAD], flat[::stride][:_SAMPLE], flat[-_HEAD:]):
            h.update(np.ascontiguousarray(np.asarray(part)).tobytes())
        total = repr(float(np.asarray(array.sum())))
    return {"shape": shape, "dtype": str(array.dtype), "sum": total, "sha256": h.hexdigest()[:32]}


def fingerprint_file(path) -> dict:
    """A content fingerprint of a file or directory tree (e.g. a bigfile): cheap, not a full hash.

    Total size, number of files, and a SHA-256 of every file's relative name and size, its first
    and last 64 KiB and 64 evenly spaced 4 KiB chunks. Hidden files (our output marker, the run
    lock, temporaries) are left out.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    dict
        ``{"path", "size", "files", "sha256"}``; compare all but ``path``.
    """
    path = Path(path)
    if path.is_dir():
        files = [
            (f, path / f)
            for f in _files_under(path)
            if not any(part.startswith(".") for part in Path(f).parts)
        ]
    else:
        files = [(path.name, path)]
    h = hashlib.sha256()
    total = 0
    for name, f in files:
        size = f.stat().st_size
        total += size
        h.update(f"{name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= 2 * 65536 + _CHUNKS * _CHUNK:
                h.update(fh.read())
                continue
            h.update(fh.read(65536))
            step = (size - 2 * 65536) // _CHUNKS
            for i in range(_CHUNKS):
                fh.seek(65536 + i * step)
                h.update(fh.read(_CHUNK))
            fh.seek(size - 65536)
            h.update(fh.read())
    return {"path": str(path), "size": total, "files": len(files), "sha256": h.hexdigest()[:32]}


# ------------------------------------------------------------------------------ run lock


class RunLockedError(OSError):
    """Another process holds the run directory's lock."""


class StaleLockWarning(UserWarning):
    """A lock left by a process that no longer runs was taken over."""


_HELD: dict[str, int] = {}  # locks this process holds (real path -> depth): run_lock nests
_CREATED: dict[str, bool] = {}  # whether taking the lock created its directory


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _read_lock(lock: Path) -> dict | None:
    """The lock's record; None if it vanished; ``{}`` if it cannot be parsed (torn or foreign)."""
    try:
        text = lock.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None  # gone (with its directory, or that replaced by a file)
    try:
        doc = json.loads(text)
        return doc if isinstance(doc, dict) else {}
    except ValueError:
        return {}


def _describe_lock(doc: dict) -> str:
    return (
        f"host {doc.get('host', '?')}, pid {doc.get('pid', '?')}, since {doc.get('since', '?')}"
        + (f": {doc['command']}" if doc.get("command") else "")
    )


def _stale(lock: Path, doc: dict) -> bool:
    if not doc:  # unparseable: a writer that died between create and write, or being written now
        with contextlib.suppress(FileNotFoundError):
            return time.time() - lock.stat().st_mtime > 10.0
        return False
    if doc.get("host") != socket.gethostname() or not isinstance(doc.get("pid"), int):
        return False
    return doc["pid"] == os.getpid() or not _pid_alive(doc["pid"])


def _take_over(lock: Path, doc: dict) -> None:
    """Remove a stale lock, unless another process replaced it meanwhile."""
    aside = lock.with_name(f"{LOCK_NAME}.{os.getpid()}.{uuid.uuid4().hex[:8]}.stale")
    try:
        os.replace(lock, aside)
    except FileNotFoundError:
        return  # someone else took it over first
    if _read_lock(aside) != doc:  # a fresh lock of another process: put it back
        with contextlib.suppress(OSError):
            os.link(aside, lock)
        aside.unlink()
        return
    aside.unlink()
    warnings.warn(
        f"taking over the stale lock {lock} of a process that no longer runs ({_describe_lock(doc)})",
        StaleLockWarning,
        stacklevel=4,
    )


def _acquire(directory: Path, what: str) -> str:
    created = not os.path.lexists(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / LOCK_NAME
    key = os.path.realpath(lock)
    if key in _HELD:
        _HELD[key] += 1
        return key
    me = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv),
    }
    for _ in range(50):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, default_mode())
        except FileExistsError:
            doc = _read_lock(lock)
            if doc is None:
                continue  # released meanwhile: try again
            if _stale(lock, doc):
                _take_over(lock, doc)
                continue
            if not doc:
                time.sleep(0.1)  # being written: read it again
                continue
            raise RunLockedError(
                f"{what} {directory} is in use by another run ({_describe_lock(doc)}). Wait for it "
                f"to finish or choose another output directory; if that run is gone (e.g. on "
                f"another host), delete {lock}"
            ) from None
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        _HELD[key] = 1
        _CREATED[key] = created
        return key
    raise RunLockedError(f"{what} {directory}: cannot take the lock {lock} (it keeps changing)")


def _release(key: str) -> None:
    _HELD[key] -= 1
    if _HELD[key]:
        return
    del _HELD[key]
    created = _CREATED.pop(key, False)
    lock = Path(key)
    doc = _read_lock(lock)
    if doc and doc.get("pid") == os.getpid() and doc.get("host") == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
        if created:  # a run that failed before writing anything leaves no empty directory
            with contextlib.suppress(OSError):
                lock.parent.rmdir()


@contextlib.contextmanager
def run_lock(directory, comm=None, what: str = "run directory"):
    """Hold the lock file :data:`LOCK_NAME` in ``directory`` (created if needed) for the block.

    A second process asking for the same directory gets :class:`RunLockedError` naming the
    holder's host and pid. A lock whose process is gone (same host, dead pid) is taken over with a
    :class:`StaleLockWarning`. Nested use in one process is allowed (the outermost releases). With
    an MPI ``comm``, rank 0 holds the lock for all ranks and every rank raises its error. A
    directory the lock created and nothing else filled is removed again on release.

    Parameters
    ----------
    directory : str or Path
    comm : MPI communicator, optional
    what : str
        What the directory is, for the message.

    Yields
    ------
    Path
        The lock file.
    """
    directory = Path(directory)
    key, error = None, None
    if is_root(comm):
        try:
            key = _acquire(directory, what)
        except Exception as err:  # noqa: BLE001 - raised on every rank below
            error = err
    if comm is not None and comm.size > 1:
        error = comm.bcast(error, root=0)
    if error is not None:
        raise error
    lock = str(directory / LOCK_NAME)
    _PENDING_LOCKS.add(lock)  # a rank that aborts the run removes it (its holder is ended)
    try:
        yield directory / LOCK_NAME
    except BaseException:
        raise  # still listed: this rank may go on to abort the run
    else:
        _PENDING_LOCKS.discard(lock)
    finally:
        if key is not None:
            _release(key)


# ------------------------------------------------------------------------------ MPI failures
#
# Under ``mpiexec`` an exception on one rank must end every rank (issue 13, item 4). Three pieces:
#
# * :func:`root_only` runs a rank-0-only step (a write, a check) and shares its success or its
#   error with every rank, so that no rank waits in a later collective for a rank 0 that failed;
# * :func:`error_exit` is what a command's error handler returns through: it prints the message
#   and returns the exit code when every rank failed alike, and otherwise prints the failing
#   rank's message prefixed with its rank and aborts the communicator;
# * :func:`install_mpi_excepthook` (every command's entry point) does the same for an exception
#   that escapes the command (a traceback, prefixed with the rank).
#
# With one process (no communicator, or one rank) all three are what the code did before.

#: environment variable of the test-only fault hook (:func:`fault_point`): ``WHERE:RANK[,...]``
FAULT_ENV = "JERALD_TEST_FAULT"
#: seconds a failing rank waits for the other ranks to fail alike before aborting them all
GRACE_ENV = "JERALD_MPI_GRACE"

_GUARD = None  # a duplicate of COMM_WORLD: failing ranks agree on it (install_mpi_excepthook)
_PENDING: set[str] = set()  # temporaries a rank that aborts removes first (atomic_dir)
_PENDING_LOCKS: set[str] = set()  # run locks of this run, removed likewise (run_lock)


class InjectedFault(RuntimeError):
    """The test-only failure :func:`fault_point` raises."""


def _world():
    """COMM_WORLD if mpi4py is imported and runs more than one rank, else None."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None:
        return None
    world = mpi.COMM_WORLD
    return world if world.size > 1 else None


def fault_point(where: str) -> None:
    """Raise :class:`InjectedFault` here if the test hook asks for it (tests only).

    ``JERALD_TEST_FAULT=WHERE:RANK`` (comma-separated for several) fails the first time rank
    ``RANK`` of ``COMM_WORLD`` passes ``fault_point(WHERE)``. Places: ``read`` (catalogs),
    ``step`` (each training step), ``write`` (atomic file and directory writes), ``paint`` (the
    MPI engine's paint). Without the variable this is one dictionary lookup.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    from mpi4py import MPI

    rank = MPI.COMM_WORLD.rank
    for item in spec.split(","):
        name, _, r = item.strip().partition(":")
        if name == where and r.strip() == str(rank):
            os.environ[FAULT_ENV] = ",".join(
                x for x in spec.split(",") if x.strip() != item.strip()
            )
            raise InjectedFault(f"injected fault at {where!r} on rank {rank} ({FAULT_ENV})")


def _grace() -> float:
    try:
        return float(os.environ.get(GRACE_ENV, "5"))
    except ValueError:
        return 5.0


def _wait(request, seconds: float) -> bool:
    """Poll a nonblocking MPI request for up to ``seconds``; True if it completed."""
    end = time.monotonic() + seconds
    while not request.Test():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def _prefixed(rank: int, text: str) -> str:
    return "".join(f"[rank {rank}] {line}\n" for line in text.rstrip("\n").splitlines())


def abort(comm, message: str, code: int = 1) -> None:
    """Print ``message`` prefixed with this rank, remove pending temporaries, abort ``comm``."""
    rank = comm.rank
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    sys.stderr.write(_prefixed(rank, message))
    sys.stderr.flush()
    for tmp in list(_PENDING):
        _remove(Path(tmp))
    for lock in list(_PENDING_LOCKS):  # this run's: its holder (rank 0) is about to be ended
        with contextlib.suppress(OSError):
            os.unlink(lock)
    # MPI_Abort makes mpiexec kill every process at once; give its proxy a moment to forward
    # this rank's stderr first (under load the message was sometimes lost)
    time.sleep(0.5)
    comm.Abort(code or 1)


def raise_first(comm, error: BaseException | None) -> None:
    """After a step each rank ran alone (a check, a read), raise the first rank's error on every rank.

    ``error`` is this rank's (None if its step succeeded); every rank of ``comm`` must call this.
    Without MPI (``comm`` None or one rank) this rank's error is raised as it is. For steps in
    which the ranks call collectives, use :func:`gather_errors` (it cannot hang on a rank that
    failed alone).
    """
    if comm is not None and comm.size > 1:
        error = next((e for e in comm.allgather(error) if e is not None), None)
    if error is not None:
        raise error


def gather_errors(comm, error, cleanup=None) -> list:
    """Every rank's error (None where its step succeeded) after a collective step, never hanging.

    For steps in which the ranks call collectives (a parallel write) and catch their own errors:
    an ``allgather`` of those errors hangs when one rank fails alone, because the others still wait
    in a collective of the step that rank left. Here a rank whose step failed waits up to the
    grace time (``JERALD_MPI_GRACE``, 5 s) for the others; if they do not come, it removes
    ``cleanup`` (a temporary output), prints its error prefixed with its rank and aborts ``comm``.

    Parameters
    ----------
    comm : MPI communicator
        One reserved for this agreement (``Dup()`` it before the step: the step's own collectives
        must not match the nonblocking barrier used here).
    error : BaseException or None
        This rank's error.
    cleanup : path-like, optional
        Removed before aborting.
    """
    request = comm.Ibarrier()
    if error is None:
        request.Wait()
    elif not _wait(request, _grace()):
        import traceback

        if cleanup is not None:
            _remove(Path(cleanup))
        abort(comm, "".join(traceback.format_exception(error)), 1)
    return comm.allgather(error)


def _agree(message: str) -> list | None:
    """Every rank's message if all ranks fail within the grace time, else None (this rank only)."""
    guard = _GUARD
    if guard is None:
        return None
    if not _wait(guard.Ibarrier(), _grace()):
        return None
    return guard.allgather(message)


def error_exit(message: str, code: int = 1) -> int:
    """Report a command's error and return its exit code; under MPI make sure every rank ends.

    One process: print ``message`` to stderr and return ``code`` (as the commands always did).
    Several ranks: if every rank reaches its error handler within the grace time
    (``JERALD_MPI_GRACE``, 5 s; the error was shared, e.g. by :func:`root_only`), rank 0 prints the
    message (each distinct one, prefixed with its rank) and every rank returns ``code``;
    otherwise the failing rank prints its message prefixed with its rank and aborts
    ``COMM_WORLD``, which ends every rank with a non-zero exit.
    """
    world = _world()
    if world is None:
        print(message, file=sys.stderr)
        return code
    messages = _agree(message)
    if messages is None:
        abort(world, message, code)
    if world.rank == 0:
        distinct = dict.fromkeys(messages)
        if len(distinct) == 1:
            print(message, file=sys.stderr)
        else:
            for r, m in enumerate(messages):
                if messages.index(m) == r:
                    sys.stderr.write(_prefixed(r, m))
        sys.stderr.flush()
    return code


def _excepthook(kind, value, tb):
    import traceback

    text = "".join(traceback.format_exception(kind, value, tb))
    world = _world()
    if world is None or issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    summary = "".join(traceback.format_exception_only(kind, value))
    messages = _agree(summary)
    if messages is None:
        abort(world, text, 1)
    if world.rank == 0:  # the traceback of rank 0, and the other ranks' distinct errors
        sys.stderr.write(_prefixed(0, text))
        for r, m in enumerate(messages):
            if messages.index(m) == r and r > 0:
                sys.stderr.write(_prefixed(r, m))
        sys.stderr.flush()


def install_mpi_excepthook() -> None:
    """Under ``mpiexec`` with more than one rank, end every rank when any rank fails.

    Called by every command's entry point on every rank (it duplicates ``COMM_WORLD``, a
    collective call). An exception escaping the command prints its traceback prefixed with the
    failing rank and aborts ``COMM_WORLD`` (unless every rank failed alike within the grace time,
    then rank 0 prints it once and every rank exits with code 1). Does nothing with one process.
    """
    global _GUARD
    if (
        os.environ.get("PMI_SIZE", "1") == "1"
        and os.environ.get("OMPI_COMM_WORLD_SIZE", "1") == "1"
    ):
        if "mpi4py.MPI" not in sys.modules:
            return  # not under mpiexec: leave mpi4py unimported (fast --help)
    from mpi4py import MPI

    if MPI.COMM_WORLD.size == 1 or _GUARD is not None:
        return
    _GUARD = MPI.COMM_WORLD.Dup()
    sys.excepthook = _excepthook


def mark_shared(err: BaseException) -> BaseException:
    """Flag ``err`` as raised on every rank (:func:`root_only`); returns it."""
    with contextlib.suppress(AttributeError, TypeError):
        err.jerald_shared = True
    return err


def _portable(err: BaseException):
    """``err`` pickled, or (type name, message) when it does not pickle."""
    import pickle

    try:
        blob = pickle.dumps(err)
        pickle.loads(blob)
        return ("pickle", blob)
    except Exception:  # noqa: BLE001 - any exception that does not travel goes as text
        return ("text", (type(err).__name__, str(err)))


def _rebuilt(shared) -> BaseException:
    import pickle

    kind, payload = shared
    if kind == "pickle":
        return pickle.loads(payload)
    name, msg = payload
    return RuntimeError(f"{name}: {msg}")


class _RootStep:
    """What :func:`root_only` yields: ``bool(step)`` is True on the rank that runs the block."""

    def __init__(self, root: bool):
        self.root = root
        self.value = None

    def __bool__(self) -> bool:
        return self.root


@contextlib.contextmanager
def root_only(comm, what: str = "a step of rank 0", share: bool = False):
    """A step only rank 0 runs (a write, a check), whose outcome every rank learns.

    Use as::

        with root_only(comm, "writing the map") as root:
            if root:
                write_mesh(...)

    Rank 0 runs the block; at its end rank 0 broadcasts success or its exception, and every
    other rank raises the same exception (same type and message; a type that does not pickle
    becomes a RuntimeError naming it). The broadcast also replaces a ``Barrier`` after the step:
    no rank passes it before rank 0 has finished. With ``share=True`` the value rank 0 stores in
    ``root.value`` reaches every rank's ``root.value``. Without MPI (``comm`` None or one rank)
    the block simply runs and its exceptions propagate unchanged.

    Parameters
    ----------
    comm : MPI communicator or None
    what : str
        What the step does (documentation of the call site; not added to messages).
    share : bool
        Broadcast ``root.value`` from rank 0.
    """
    if comm is None or comm.size == 1:
        yield _RootStep(True)
        return
    step = _RootStep(comm.rank == 0)
    shared = None
    if step.root:
        try:
            yield step
        except Exception as err:
            shared = _portable(mark_shared(err))
            comm.bcast((shared, None), root=0)
            raise
        value = step.value if share else None
        try:
            comm.bcast((None, value), root=0)
        except Exception as err:  # the value does not pickle: every rank learns it
            comm.bcast((_portable(err), None), root=0)
            raise
        return
    yield step
    shared, value = comm.bcast(None, root=0)
    if shared is not None:
        raise mark_shared(_rebuilt(shared))
    step.value = value
