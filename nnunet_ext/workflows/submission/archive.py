"""Safe extraction of zip and tar archives (model exports, submissions).

:func:`safe_extract` reads the whole member list first and refuses the archive, before the first byte is
written, when any member

* has an absolute path, a drive letter, a ``..`` component, a backslash or a NUL character in its name,
* is anything but a regular file or a directory (symbolic and hard links, devices, FIFOs, sparse files),
  or is encrypted,
* has the same name as another member (after normalising ``./`` and ``//``) -- unless both are directories,
  or a name (or folder) that differs from another one only in letter case or Unicode normal form,
* is a file where another member needs a directory (``a`` and ``a/b``),
* has a path component longer than 255 bytes, or a destination path longer than 4095 bytes,
* or lands on a path that already exists in the target,

or when the archive has more than ``max_members`` members, declares more than ``max_bytes`` in total,
more than ``max_ratio`` times its own size (plus 1 MiB; a compression bomb -- model checkpoints compress
by less than 2x), or more than the free space of the target's file system. Members are then streamed into a hidden
staging folder inside the target, each one capped at its declared size (a zip member whose data
decompresses to more than its header says is refused there), and moved into place at the end (one
``rename`` per top-level entry); on any error the staging folder is removed and the target is unchanged.
Files are written with mode 0644 and folders 0755 whatever the archive says (no set-uid bits).
"""
from __future__ import annotations

import os
import shutil
import stat
import tarfile
import unicodedata
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

MAX_BYTES = 16 * 1024 ** 3
MAX_MEMBERS = 10_000
MAX_RATIO = 100
NAME_MAX = 255
PATH_MAX = 4095
_CHUNK = 1 << 20


@dataclass
class _Member:
    name: str  # normalised, '/'-separated, no trailing slash
    is_dir: bool
    size: int
    ref: object  # zipfile.ZipInfo or tarfile.TarInfo


def _normalise(archive, raw: str) -> str | None:
    """The member's relative path, or None for the archive's root ('.', './'); ValueError when unsafe."""
    if not raw or "\x00" in raw:
        raise ValueError(f"{archive}: refusing member with an empty name or a NUL character ({raw!r})")
    if "\\" in raw:
        raise ValueError(f"{archive}: refusing member name with a backslash {raw!r}")
    if raw.startswith("/") or (len(raw) > 1 and raw[1] == ":"):
        raise ValueError(f"{archive}: refusing absolute path {raw!r}")
    parts = [p for p in PurePosixPath(raw).parts if p != "."]
    if ".." in parts:
        raise ValueError(f"{archive}: refusing path with '..': {raw!r}")
    for p in parts:
        if len(p.encode()) > NAME_MAX:
            raise ValueError(f"{archive}: refusing member {raw[:80]!r}...: a path component is longer than "
                             f"{NAME_MAX} bytes")
    return "/".join(parts) or None


def _zip_members(archive, z: zipfile.ZipFile, max_members: int) -> list[_Member]:
    infos = z.infolist()
    if len(infos) > max_members:
        raise ValueError(f"{archive}: {len(infos)} members, more than the limit of {max_members}")
    out = []
    for m in infos:
        mode = m.external_attr >> 16
        name = _normalise(archive, m.filename)
        if stat.S_ISLNK(mode):
            raise ValueError(f"{archive}: refusing symbolic link {m.filename!r}")
        kind = stat.S_IFMT(mode)
        is_dir = m.is_dir()
        if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
            raise ValueError(f"{archive}: refusing special file {m.filename!r} (mode {oct(mode)})")
        if m.flag_bits & 0x1:
            raise ValueError(f"{archive}: refusing encrypted member {m.filename!r}")
        if m.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):
            raise ValueError(f"{archive}: member {m.filename!r} uses an unsupported compression ({m.compress_type})")
        if name is None:
            if not is_dir:
                raise ValueError(f"{archive}: refusing file member without a name ({m.filename!r})")
            continue
        out.append(_Member(name, is_dir, 0 if is_dir else m.file_size, m))
    return out


def _tar_members(archive, t: tarfile.TarFile, max_members: int) -> list[_Member]:
    out = []
    n = 0
    while True:
        try:
            m = t.next()
        except tarfile.TarError as e:
            raise ValueError(f"{archive}: not a readable tar archive ({e})") from None
        if m is None:
            break
        n += 1
        if n > max_members:
            raise ValueError(f"{archive}: more than the limit of {max_members} members")
        name = _normalise(archive, m.name)
        if m.issym() or m.islnk():
            raise ValueError(f"{archive}: refusing {'symbolic' if m.issym() else 'hard'} link {m.name!r}")
        if m.issparse():
            raise ValueError(f"{archive}: refusing sparse file {m.name!r}")
        if not (m.isreg() or m.isdir()):
            raise ValueError(f"{archive}: refusing special file {m.name!r} (device, FIFO or other)")
        if name is None:
            if not m.isdir():
                raise ValueError(f"{archive}: refusing file member without a name ({m.name!r})")
            continue
        out.append(_Member(name, m.isdir(), 0 if m.isdir() else m.size, m))
    return out


def _validate(archive, members: list[_Member], target: Path, max_bytes: int, max_ratio: int) -> None:
    kinds: dict[str, bool] = {}  # path -> is_dir, explicit members and implied parent folders
    explicit: set[str] = set()
    folded: dict[str, str] = {}  # case- and Unicode-folded path (and each parent) -> its spelling
    for m in members:
        if m.name in explicit and not (m.is_dir and kinds.get(m.name)):
            raise ValueError(f"{archive}: duplicate member name {m.name!r}")
        explicit.add(m.name)
        parts_ = m.name.split("/")
        for k in range(1, len(parts_) + 1):
            spelled = "/".join(parts_[:k])
            key = unicodedata.normalize("NFC", spelled).casefold()
            if folded.setdefault(key, spelled) != spelled:
                raise ValueError(f"{archive}: members {folded[key]!r} and {spelled!r} differ only in letter case or "
                                 f"Unicode form; they would overwrite each other on case-insensitive file systems")
        parts = m.name.split("/")
        for k in range(1, len(parts)):
            parent = "/".join(parts[:k])
            if kinds.get(parent) is False:
                raise ValueError(f"{archive}: {parent!r} is a file but {m.name!r} needs it to be a folder")
            kinds[parent] = True
        if m.name in kinds and kinds[m.name] != m.is_dir:
            raise ValueError(f"{archive}: {m.name!r} is both a file and a folder")
        kinds[m.name] = m.is_dir
        dest = len(os.fsencode(str(target / m.name))) + 64  # + the staging folder's name
        if dest > PATH_MAX:
            raise ValueError(f"{archive}: refusing member {m.name[:80]!r}...: its destination path is longer "
                             f"than {PATH_MAX} bytes")
    total = sum(m.size for m in members)
    if total > max_bytes:
        raise ValueError(f"{archive}: the members add up to {total} bytes, more than the limit of {max_bytes}")
    size = Path(archive).stat().st_size
    if total > max_ratio * size + (1 << 20):
        raise ValueError(f"{archive}: {size} bytes that would extract to {total} bytes (more than {max_ratio}x): "
                         f"refusing a likely compression bomb")
    for top in sorted({m.name.split("/")[0] for m in members}):
        if os.path.lexists(target / top):
            raise ValueError(f"{archive}: {target / top} already exists; extract into an empty folder")
    free = shutil.disk_usage(target).free
    if total > free:
        raise ValueError(f"{archive}: needs {total} bytes, {target} has {free} free")


def _stream(archive, src, dest: Path, declared: int, name: str) -> int:
    written = 0
    with open(dest, "xb") as f:
        while True:
            chunk = src.read(min(_CHUNK, declared - written + 1))
            if not chunk:
                break
            written += len(chunk)
            if written > declared:
                raise ValueError(f"{archive}: member {name!r} holds more data than its declared {declared} bytes")
            f.write(chunk)
    if written != declared:
        raise ValueError(f"{archive}: member {name!r} is truncated ({written} of {declared} bytes)")
    os.chmod(dest, 0o644)
    return written


def archive_kind(path) -> str:
    """``"zip"`` or ``"tar"`` (any compression tarfile reads); ValueError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"archive {path} not found")
    if zipfile.is_zipfile(path):
        return "zip"
    try:
        if tarfile.is_tarfile(path):
            return "tar"
    except (OSError, tarfile.TarError, EOFError):
        pass
    raise ValueError(f"{path}: not a zip or tar archive (or a damaged one)")


def safe_extract(archive, target, *, max_bytes: int = MAX_BYTES, max_members: int = MAX_MEMBERS,
                 max_ratio: int = MAX_RATIO) -> list[str]:
    """Extract the zip or tar ``archive`` into the folder ``target`` (created if missing) after validating
    every member (see the module docstring); return the member names (normalised, folders included)."""
    for what, v in (("max_bytes", max_bytes), ("max_members", max_members), ("max_ratio", max_ratio)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{what} must be a positive integer, got {v!r}")
    archive = Path(archive)
    kind = archive_kind(archive)
    target = Path(target)
    if os.path.lexists(target) and not target.is_dir():
        raise ValueError(f"extraction target {target} exists and is not a folder")
    target.mkdir(parents=True, exist_ok=True)
    target = target.resolve()
    try:
        opened = zipfile.ZipFile(archive) if kind == "zip" else tarfile.open(archive, "r:*")
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f"{archive}: cannot open the {kind} archive ({e})") from None
    with opened as a:
        members = _zip_members(archive, a, max_members) if kind == "zip" else _tar_members(archive, a, max_members)
        _validate(archive, members, target, max_bytes, max_ratio)
        staging = target / f".extract-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            for m in members:
                dest = staging / m.name
                if m.is_dir:
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    src = a.open(m.ref) if kind == "zip" else a.extractfile(m.ref)
                    with src:
                        _stream(archive, src, dest, m.size, m.name)
                except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, NotImplementedError) as e:
                    raise ValueError(f"{archive}: cannot read member {m.name!r} ({type(e).__name__}: {e})") from None
            for d in staging.rglob("*"):
                if d.is_dir():
                    os.chmod(d, 0o755)
            for top in sorted({m.name.split("/")[0] for m in members}):
                if os.path.lexists(target / top):
                    raise ValueError(f"{archive}: {target / top} appeared while extracting; nothing was moved")
            moved = []
            try:
                for top in sorted({m.name.split("/")[0] for m in members}):
                    os.rename(staging / top, target / top)
                    moved.append(target / top)
            except OSError:
                for p in moved:  # undo a partial move
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return [m.name for m in members]
