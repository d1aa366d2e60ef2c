"""safe_extract: zip and tar, every unsafe member refused before the first byte is written, limits on size,
member count and compression ratio, staging folder moved into place. Each refusal names the archive and the
member, and leaves the target exactly as it was (checksums before and after)."""
import hashlib
import io
import os
import tarfile
import zipfile

import pytest

from nnunet_ext.workflows.submission import safe_extract


def _digest(root):
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


@pytest.fixture
def target(tmp_path):
    t = tmp_path / "target"
    (t / "existing").mkdir(parents=True)
    (t / "existing" / "keep.txt").write_text("keep")
    return t


def _zip(path, members):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for m in members:
            if isinstance(m, zipfile.ZipInfo):
                z.writestr(m, b"x")
            elif m.endswith("/"):
                z.writestr(zipfile.ZipInfo(m), b"")
            else:
                z.writestr(m, f"data of {m}")
    return path


def _tar(path, members, mode="w:gz"):
    with tarfile.open(path, mode) as t:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                t.addfile(m, io.BytesIO(b"x" * m.size) if m.isreg() else None)
                continue
            info = tarfile.TarInfo(m.rstrip("/"))
            if m.endswith("/"):
                info.type = tarfile.DIRTYPE
                t.addfile(info)
            else:
                data = f"data of {m}".encode()
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return path


def _refused(archive, target, match):
    before = _digest(target)
    with pytest.raises(ValueError, match=match) as e:
        safe_extract(archive, target)
    assert str(archive) in str(e.value)
    assert _digest(target) == before  # nothing written, no staging folder left
    assert not [p for p in target.iterdir() if p.name.startswith(".extract")]
    return str(e.value)


@pytest.mark.parametrize("kind", ["zip", "tar"])
@pytest.mark.parametrize("member,match", [("../evil.txt", "'..'"), ("/abs/evil.txt", "absolute"),
                                          ("a/../../evil.txt", "'..'"), ("C:/evil.txt", "absolute"),
                                          ("a\\..\\evil.txt", "backslash")])
def test_traversal_refused(tmp_path, target, kind, member, match):
    members = ["ok/file.txt", member]
    a = _zip(tmp_path / "a.zip", members) if kind == "zip" else _tar(tmp_path / "a.tar.gz", members)
    _refused(a, target, match)
    assert not (tmp_path / "evil.txt").exists() and not (target / "ok").exists()


def test_zip_symlink_and_special_files_refused(tmp_path, target):
    link = zipfile.ZipInfo("model/link")
    link.external_attr = 0o120777 << 16
    _refused(_zip(tmp_path / "l.zip", ["model/a.txt", link]), target, "symbolic link 'model/link'")
    fifo = zipfile.ZipInfo("model/fifo")
    fifo.external_attr = 0o010644 << 16
    _refused(_zip(tmp_path / "f.zip", [fifo]), target, "special file 'model/fifo'")


@pytest.mark.parametrize("typ,match", [(tarfile.SYMTYPE, "symbolic link"), (tarfile.LNKTYPE, "hard link"),
                                       (tarfile.CHRTYPE, "special file"), (tarfile.FIFOTYPE, "special file")])
def test_tar_links_and_devices_refused(tmp_path, target, typ, match):
    info = tarfile.TarInfo("model/x")
    info.type = typ
    info.linkname = "/etc/passwd"
    _refused(_tar(tmp_path / "t.tar", ["model/a.txt", info], "w"), target, match)


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_duplicate_names_refused(tmp_path, target, kind):
    members = ["m/a.txt", "m/b.txt", "./m//a.txt"]
    a = _zip(tmp_path / "d.zip", members) if kind == "zip" else _tar(tmp_path / "d.tar", members, "w")
    _refused(a, target, "duplicate member name 'm/a.txt'")


@pytest.mark.parametrize("kind", ["zip", "tar"])
@pytest.mark.parametrize("members,pair", [(["m/Model.pth", "m/model.pth"], "'m/Model.pth' and 'm/model.pth'"),
                                          (["M/a.txt", "m/b.txt"], "'M' and 'm'"),
                                          (["m/caf\u00e9.txt", "m/cafe\u0301.txt"], "Unicode form")])
def test_names_differing_only_in_case_or_unicode_form_refused(tmp_path, target, kind, members, pair):
    a = _zip(tmp_path / "c.zip", members) if kind == "zip" else _tar(tmp_path / "c.tar", members, "w")
    assert pair in _refused(a, target, "differ only in letter case or Unicode form")


def test_zip_literal_duplicate_refused(tmp_path, target):
    a = tmp_path / "dup.zip"
    with zipfile.ZipFile(a, "w") as z, pytest.warns(UserWarning, match="Duplicate"):
        z.writestr("m/a.txt", "first")
        z.writestr("m/a.txt", "second")
    _refused(a, target, "duplicate")


@pytest.mark.parametrize("members", [["m/a", "m/a/b.txt"], ["m/a/b.txt", "m/a"], ["m/a/", "m/a"]])
@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_file_directory_clash_refused(tmp_path, target, kind, members):
    a = _zip(tmp_path / "c.zip", members) if kind == "zip" else _tar(tmp_path / "c.tar", members, "w")
    _refused(a, target, "file|folder|duplicate")


def test_long_names_refused(tmp_path, target):
    _refused(_zip(tmp_path / "n.zip", ["m/ok.txt", "m/" + "x" * 300]), target, "longer than 255 bytes")
    deep = "/".join(["d" * 200] * 21) + "/f.txt"
    _refused(_zip(tmp_path / "p.zip", ["m/ok.txt", deep]), target, "longer than 4095 bytes")


def test_size_count_and_ratio_limits(tmp_path, target):
    a = _zip(tmp_path / "many.zip", [f"m/{k}.txt" for k in range(30)])
    with pytest.raises(ValueError, match="30 members, more than the limit of 10"):
        safe_extract(a, target, max_members=10)
    t = _tar(tmp_path / "many.tar", [f"m/{k}.txt" for k in range(30)], "w")
    with pytest.raises(ValueError, match="more than the limit of 10 members"):
        safe_extract(t, target, max_members=10)
    with pytest.raises(ValueError, match="more than the limit of 100"):
        safe_extract(a, target, max_bytes=100)
    bomb = tmp_path / "bomb.zip"  # ~20 KB that would extract to 20 MiB
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("m/zeros.bin", b"\0" * (20 << 20))
    assert bomb.stat().st_size < 100_000
    _refused(bomb, target, "compression bomb")
    tbomb = tmp_path / "bomb.tar.gz"
    with tarfile.open(tbomb, "w:gz") as t:
        info = tarfile.TarInfo("m/zeros.bin")
        info.size = 20 << 20
        t.addfile(info, io.BytesIO(b"\0" * info.size))
    _refused(tbomb, target, "compression bomb")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            safe_extract(a, target, max_bytes=bad)


def test_existing_entry_in_target_refused(tmp_path, target):
    _refused(_zip(tmp_path / "e.zip", ["new/a.txt", "existing/other.txt"]), target, "already exists")
    assert not (target / "new").exists()


def test_not_an_archive_and_corrupt(tmp_path, target):
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"not an archive at all" * 10)
    _refused(junk, target, "not a zip or tar archive")
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w", zipfile.ZIP_STORED) as z:
        z.writestr("m/a.txt", "data of m/a.txt")
    data = bytearray(good.read_bytes())
    i = data.index(b"data of")  # stored member data: change bytes, the CRC no longer matches
    data[i:i + 4] = b"XXXX"
    bad = tmp_path / "crc.zip"
    bad.write_bytes(bytes(data))
    msg = _refused(bad, target, "cannot read member 'm/a.txt'")
    assert "CRC" in msg or "Bad" in msg
    with pytest.raises(FileNotFoundError, match="missing.zip"):
        safe_extract(tmp_path / "missing.zip", target)


@pytest.mark.parametrize("kind", ["zip", "tar.gz", "tar.bz2", "tar.xz", "tar"])
def test_normal_extraction(tmp_path, target, kind):
    members = ["Dataset001_X/", "Dataset001_X/fold_0/a.txt", "Dataset001_X/plans.json", "./top.txt"]
    if kind == "zip":
        a = _zip(tmp_path / "ok.zip", members)
    else:
        a = _tar(tmp_path / f"ok.{kind}", members, "w" if kind == "tar" else "w:" + kind.split(".")[1])
    names = safe_extract(a, target)
    assert names == ["Dataset001_X", "Dataset001_X/fold_0/a.txt", "Dataset001_X/plans.json", "top.txt"]
    assert (target / "Dataset001_X" / "fold_0" / "a.txt").read_text() == "data of Dataset001_X/fold_0/a.txt"
    assert (target / "top.txt").is_file() and (target / "existing" / "keep.txt").read_text() == "keep"
    assert oct(os.stat(target / "top.txt").st_mode & 0o7777) == "0o644"
    assert sorted(p.name for p in target.iterdir()) == ["Dataset001_X", "existing", "top.txt"]  # no staging left


def test_tar_of_a_folder_with_dot_root(tmp_path, target):
    src = tmp_path / "src"
    (src / "m").mkdir(parents=True)
    (src / "m" / "a.txt").write_text("A")
    a = tmp_path / "dot.tar"
    with tarfile.open(a, "w") as t:
        t.add(src, arcname=".")
    assert safe_extract(a, target) == ["m", "m/a.txt"]
    assert (target / "m" / "a.txt").read_text() == "A"


def test_setuid_bits_dropped(tmp_path, target):
    info = tarfile.TarInfo("m/suid")
    info.size = 1
    info.mode = 0o4755
    safe_extract(_tar(tmp_path / "s.tar", [info], "w"), target)
    assert os.stat(target / "m" / "suid").st_mode & 0o7777 == 0o644
