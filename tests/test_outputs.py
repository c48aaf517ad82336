"""mlx_evit.outputs: outputs never destroy data (issue 13, item 3)."""

from __future__ import annotations

import os
import socket
import stat
import threading
from pathlib import Path

import pytest

from mlx_evit.outputs import (
    OutputError,
    atomic_directory,
    check_output_dir,
    check_output_file,
    write_file,
)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _one_line_naming(e: pytest.ExceptionInfo, path) -> str:
    message = str(e.value)
    assert "\n" not in message and os.fspath(path) in message, message
    assert isinstance(e.value, ValueError)
    return message


# ---------------------------------------------------------------- streams


def test_dash_is_stdout(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    target = check_output_file("-")
    assert target.is_stdout and target.is_stream
    target.write_text("hello\n")
    assert capsys.readouterr().out == "hello\n"
    assert not (tmp_path / "-").exists()  # the bug: a file named "-"


def test_dev_stdout_is_written_not_replaced(capsys):
    before = os.lstat("/dev/stdout")
    target = check_output_file("/dev/stdout", force=True)
    assert target.kind == "stdout"
    with target.open() as sink:
        sink.stream.write("through\n")
    assert capsys.readouterr().out == "through\n"
    after = os.lstat("/dev/stdout")
    assert stat.S_ISLNK(after.st_mode) and after.st_ino == before.st_ino


def test_character_device_is_written_not_replaced(tmp_path):
    link = tmp_path / "null.txt"
    link.symlink_to("/dev/null")
    for path in ("/dev/null", link):
        target = check_output_file(path, force=False)  # writing a stream overwrites nothing
        assert target.kind == "stream"
        target.write_text("gone\n")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert link.is_symlink() and os.readlink(link) == "/dev/null"


def test_fifo_is_written_not_replaced(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(open(fifo, "rb").read()), daemon=True)
    reader.start()
    target = check_output_file(fifo)
    target.write_bytes(b"through the pipe")
    reader.join(10)
    assert received == [b"through the pipe"]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_socket_and_block_device_are_refused(tmp_path):
    sock_path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(os.fspath(sock_path))
        with pytest.raises(OutputError, match="socket") as e:
            check_output_file(sock_path, force=True)
        _one_line_naming(e, sock_path)
    assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    block = tmp_path / "blk"
    try:
        os.mknod(block, 0o600 | stat.S_IFBLK, os.makedev(7, 200))
    except (PermissionError, OSError):
        pytest.skip("cannot create a block device node here")
    with pytest.raises(OutputError, match="block device"):
        check_output_file(block, force=True)
    assert stat.S_ISBLK(os.lstat(block).st_mode)


def test_descriptor_names(tmp_path):
    r, w = os.pipe()
    try:
        target = check_output_file(f"/dev/fd/{w}")
        assert target.kind == "fd"
        target.write_bytes(b"abc")
        assert os.read(r, 3) == b"abc"
    finally:
        os.close(r)
        os.close(w)
    with pytest.raises(OutputError, match="standard input"):
        check_output_file("/dev/stdin")


# ---------------------------------------------------------------- files


def test_new_file_is_atomic_with_umask_mode(tmp_path):
    out = tmp_path / "r.csv"
    target = check_output_file(out)
    assert target.kind == "new" and not out.exists()  # checking creates nothing
    target.write_text("a,b\n")
    assert out.read_text() == "a,b\n"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask
    assert _leftovers(tmp_path) == []


def test_existing_file_needs_force(tmp_path):
    out = tmp_path / "r.txt"
    out.write_text("old")
    with pytest.raises(OutputError, match="--force") as e:
        check_output_file(out)
    _one_line_naming(e, out)
    check_output_file(out, force=True).write_text("new")
    assert out.read_text() == "new"


def test_replaced_file_keeps_its_mode(tmp_path):
    out = tmp_path / "secret.json"
    out.write_text("old")
    os.chmod(out, 0o600)
    check_output_file(out, force=True).write_text("new")
    assert out.read_text() == "new"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_symlink_is_written_through(tmp_path):
    real = tmp_path / "data" / "real.csv"
    real.parent.mkdir()
    real.write_text("old")
    os.chmod(real, 0o640)
    link = tmp_path / "link.csv"
    link.symlink_to(real)
    target = check_output_file(link, force=True)
    assert target.path == os.fspath(real)
    target.write_text("new")
    assert link.is_symlink() and os.readlink(link) == os.fspath(real)
    assert real.read_text() == "new" and stat.S_IMODE(real.stat().st_mode) == 0o640
    assert _leftovers(tmp_path) == [] and _leftovers(real.parent) == []


def test_dangling_symlink_creates_its_target(tmp_path):
    link = tmp_path / "link.txt"
    link.symlink_to(tmp_path / "made.txt")
    check_output_file(link).write_text("x")
    assert link.is_symlink() and (tmp_path / "made.txt").read_text() == "x"


def test_hard_links_stay_linked(tmp_path):
    out = tmp_path / "a.txt"
    out.write_text("old")
    other = tmp_path / "b.txt"
    os.link(out, other)
    inode = out.stat().st_ino
    target = check_output_file(out, force=True)
    assert target.kind == "inplace"
    with target.open() as sink:
        sink.stream.write("new and longer")
        assert out.read_text() == "old"  # staged: nothing changes before the commit
    assert other.read_text() == "new and longer" and out.stat().st_ino == inode
    check_output_file(out, force=True).write_text("s")  # shorter: truncated
    assert other.read_text() == "s" and out.stat().st_nlink == 2
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink", "relative"])
def test_an_input_is_never_written(tmp_path, monkeypatch, how):
    photo = tmp_path / "victim.jpg"
    photo.write_bytes(b"\xff\xd8 jpeg")
    out = photo
    if how == "symlink":
        out = tmp_path / "out.txt"
        out.symlink_to(photo)
    elif how == "hardlink":
        out = tmp_path / "out.txt"
        os.link(photo, out)
    elif how == "relative":
        monkeypatch.chdir(tmp_path)
        out = Path("victim.jpg")
    with pytest.raises(OutputError, match="input") as e:
        check_output_file(out, inputs=[os.fspath(photo)], force=True)
    _one_line_naming(e, out)
    assert photo.read_bytes() == b"\xff\xd8 jpeg"


def test_input_created_as_output_meanwhile_is_not_replaced(tmp_path):
    out = tmp_path / "out.txt"
    src = tmp_path / "in.txt"
    target = check_output_file(out, inputs=[src], force=True)
    src.write_text("input")
    os.link(src, out)  # the target became the input during the work
    target._inputs = type(target._inputs)([src])
    with pytest.raises(OutputError, match="input"):
        target.write_text("results")
    assert src.read_text() == "input" and _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "case, message",
    [("folder", "is a folder"), ("trailing", "names a folder"), ("no_parent", "does not exist"),
     ("parent_file", "not a folder"), ("read_only", "read-only")],
)
def test_bad_targets_fail_at_check_time(tmp_path, case, message):
    path = {
        "folder": tmp_path,
        "trailing": f"{tmp_path}/x/",
        "no_parent": tmp_path / "missing" / "r.txt",
        "parent_file": tmp_path / "file" / "r.txt",
        "read_only": tmp_path / "ro.txt",
    }[case]
    (tmp_path / "file").write_text("f")
    (tmp_path / "ro.txt").write_text("keep")
    os.chmod(tmp_path / "ro.txt", 0o444)
    with pytest.raises(OutputError, match=message) as e:
        check_output_file(path, force=True, option="--output")
    assert _one_line_naming(e, path).startswith("--output ")
    assert (tmp_path / "ro.txt").read_text() == "keep"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write any folder")
def test_unwritable_folder_fails_at_check_time(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(OutputError, match="not writable"):
        check_output_file(locked / "r.txt")


def test_failed_run_leaves_the_old_file(tmp_path):
    out = tmp_path / "r.txt"
    out.write_text("old")
    with pytest.raises(RuntimeError):
        with check_output_file(out, force=True).open() as sink:
            sink.stream.write("partial")
            raise RuntimeError("work failed")
    assert out.read_text() == "old" and _leftovers(tmp_path) == []
    sink = check_output_file(out, force=True).open(binary=True)
    sink.stream.write(b"dropped")
    sink.discard()
    assert out.read_text() == "old" and _leftovers(tmp_path) == []


# ---------------------------------------------------------------- folders


def test_output_dir_rules(tmp_path):
    assert not check_output_dir(tmp_path / "new" / "deeper").existed
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_output_dir(empty).existed
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="--force") as e:
        check_output_dir(full)
    _one_line_naming(e, full)
    with pytest.raises(OutputError, match="not a model folder"):
        check_output_dir(full, force=True, marker="config.json", describe="a model folder")
    (full / "config.json").write_text("{}")
    assert check_output_dir(full, force=True, marker="config.json").existed
    assert check_output_dir(full, force=True, marker=lambda p: (p / "notes.txt").exists()).existed
    with pytest.raises(OutputError, match="is a file"):
        check_output_dir(full / "notes.txt", force=True)
    with pytest.raises(OutputError, match="input") as e:
        check_output_dir(full, inputs=[full / "notes.txt"], force=True)
    with pytest.raises(OutputError, match="folder name"):
        check_output_dir("-")
    broken = tmp_path / "broken"
    broken.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputError, match="broken"):
        check_output_dir(broken)
    with pytest.raises(OutputError, match="not a folder"):
        check_output_dir(full / "notes.txt" / "sub")


def test_write_file_into_a_folder(tmp_path):
    photo = tmp_path / "in" / "cat.png"
    photo.parent.mkdir()
    photo.write_bytes(b"png")
    out = check_output_dir(tmp_path / "masks", inputs=[photo])
    assert out.write_file("cat.png", b"mask") == tmp_path / "masks" / "cat.png"
    out.write_file("sub/dog.json", "{}")
    out.write_file("cat.png", b"mask2")  # written by this run: may be rewritten
    assert (tmp_path / "masks" / "cat.png").read_bytes() == b"mask2"
    assert (tmp_path / "masks" / "sub" / "dog.json").read_text() == "{}"
    for bad in ("../escape.txt", "/abs.txt", ""):
        with pytest.raises(OutputError, match="not a file name"):
            out.write_file(bad, b"x")
    assert not (tmp_path / "escape.txt").exists()
    # the folder is the input folder: the input itself is never written
    same = check_output_dir(tmp_path / "in2")
    (tmp_path / "in2").mkdir()
    (tmp_path / "in2" / "x.png").write_bytes(b"keep")
    same._inputs = type(same._inputs)([tmp_path / "in2" / "x.png"])
    with pytest.raises(OutputError, match="input"):
        same.write_file("x.png", b"over")
    assert (tmp_path / "in2" / "x.png").read_bytes() == b"keep"
    # the module-level helper checks a plain path first
    write_file(tmp_path / "plain", "a.txt", "A")
    assert (tmp_path / "plain" / "a.txt").read_text() == "A"
    with pytest.raises(OutputError, match="--force"):
        write_file(tmp_path / "plain", "b.txt", "B")


def test_symlinked_output_dir_is_written_through(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    check_output_dir(link).write_file("a.txt", "A")
    assert link.is_symlink() and (real / "a.txt").read_text() == "A"


def test_atomic_directory(tmp_path):
    out = tmp_path / "model"
    with atomic_directory(out) as tmp:
        assert tmp.parent == tmp_path and not out.exists()
        (tmp / "config.json").write_text("1")
    assert (out / "config.json").read_text() == "1"
    os.chmod(out, 0o750)
    target = check_output_dir(out, force=True, marker="config.json")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "config.json").write_text("2")
            raise RuntimeError("conversion failed")
    assert (out / "config.json").read_text() == "1" and _leftovers(tmp_path) == []
    with atomic_directory(target) as tmp:
        (tmp / "config.json").write_text("3")
    assert (out / "config.json").read_text() == "3"
    assert stat.S_IMODE(out.stat().st_mode) == 0o750 and _leftovers(tmp_path) == []
    with pytest.raises(OutputError, match="--force"):
        with atomic_directory(out):
            pass
    # a source inside the folder to be replaced is refused before any work
    (out / "src.pt").write_bytes(b"weights")
    with pytest.raises(OutputError, match="input"):
        check_output_dir(out, inputs=[out / "src.pt"], force=True, marker="config.json")
    # through a symbolic link: the link stays, its target is replaced
    link = tmp_path / "link"
    link.symlink_to(out)
    with atomic_directory(link, force=True, marker="config.json") as tmp:
        (tmp / "config.json").write_text("4")
    assert link.is_symlink() and (out / "config.json").read_text() == "4"


def test_output_dir_allow_empty_false_needs_force_even_when_empty(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OutputError, match="--force"):
        check_output_dir(empty, allow_empty=False)
    out = check_output_dir(empty, allow_empty=False, force=True, marker="config.json")
    with atomic_directory(out) as tmp:
        (tmp / "x").write_text("x")
    assert (empty / "x").read_text() == "x"
