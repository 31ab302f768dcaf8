"""Output paths that are not regular files (issue 36): a FIFO, a character device or a file descriptor is
written into, never replaced by the atomic rename; a symlink is followed (its target replaced atomically,
the link kept); a socket is refused up front. Only symlinks in tmp_path point at /dev/null, so that these
tests cannot replace a system file even when run as root against code with the bug."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
from pathlib import Path

import pytest

from jaxauction import cli
from jaxauction.outputs import atomic_path, check_output_path, destination, write_json

FOLDER = Path(__file__).parent / "fixtures" / "tiny_llama3"


class FifoReader:
    """Reads everything written into a FIFO, from a thread (opening a FIFO for writing waits for a reader)."""

    def __init__(self, path: Path):
        self.path, self.data = path, None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        with open(self.path, "rb") as handle:
            self.data = handle.read()

    def text(self) -> str:
        self.thread.join(timeout=60)
        assert not self.thread.is_alive()
        return self.data.decode()


def make_fifo(tmp_path: Path, name="out.fifo") -> Path:
    path = tmp_path / name
    os.mkfifo(path)
    return path


def assert_only(folder: Path, *names: str) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)  # no temporary left beside


def test_a_fifo_is_written_into(tmp_path):
    fifo = make_fifo(tmp_path)
    assert check_output_path("--out", fifo) == fifo  # the check neither blocks nor opens it
    reader = FifoReader(fifo)
    write_json(fifo, {"a": 1})
    assert json.loads(reader.text()) == {"a": 1}
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert_only(tmp_path, "out.fifo")


def test_a_symlink_to_a_fifo_is_written_into_and_stays_a_link(tmp_path):
    fifo = make_fifo(tmp_path)
    link = tmp_path / "link.json"
    link.symlink_to(fifo)
    reader = FifoReader(fifo)
    write_json(link, [1, 2])
    assert json.loads(reader.text()) == [1, 2]
    assert link.is_symlink() and os.readlink(link) == str(fifo) and stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_symlink_to_a_character_device_is_written_into(tmp_path):
    link = tmp_path / "null.json"
    link.symlink_to("/dev/null")
    assert destination(link) == (Path("/dev/null"), False)
    assert check_output_path("--json", link) == link
    write_json(link, {"a": 1})
    assert link.is_symlink() and os.readlink(link) == "/dev/null"
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert_only(tmp_path, "null.json")


def test_a_symlink_to_a_file_descriptor_is_written_into(tmp_path):
    """What ``--out /dev/stdout`` is: a link to /proc/self/fd/1, itself a link to a pipe or terminal."""
    read_end, write_end = os.pipe()
    try:
        link = tmp_path / "stdout.json"
        link.symlink_to(f"/proc/self/fd/{write_end}")
        assert destination(link) == (Path(f"/proc/self/fd/{write_end}"), False)
        write_json(link, {"b": 2})
        os.close(write_end)
        write_end = None
        with os.fdopen(read_end, "rb") as handle:
            read_end = None
            assert json.loads(handle.read()) == {"b": 2}
        assert link.is_symlink() and os.readlink(link).startswith("/proc/self/fd/")
    finally:
        for fd in (read_end, write_end):
            if fd is not None:
                os.close(fd)


def test_a_symlink_to_a_regular_file_replaces_the_target_atomically_and_keeps_the_link(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    target = data / "results.json"
    target.write_text("old\n")
    link = tmp_path / "results.json"
    link.symlink_to(Path("data") / "results.json")  # relative, as ln -s writes it
    before = target.stat().st_ino
    with pytest.raises(KeyboardInterrupt), atomic_path(link) as temporary:
        assert temporary.parent == data  # the temporary is beside the target: the rename stays in one folder
        temporary.write_text("half")
        raise KeyboardInterrupt
    assert target.read_text() == "old\n" and link.is_symlink()
    write_json(link, {"new": True})
    assert link.is_symlink() and os.readlink(link) == str(Path("data") / "results.json")
    assert json.loads(target.read_text()) == {"new": True} and target.stat().st_ino != before  # renamed onto
    assert_only(data, "results.json")
    assert_only(tmp_path, "data", "results.json")


def test_a_chain_of_links_and_a_dangling_link(tmp_path):
    final = tmp_path / "final.json"
    (tmp_path / "b").symlink_to(final)
    (tmp_path / "a").symlink_to(tmp_path / "b")
    assert destination(tmp_path / "a") == (final, True)  # dangling: the write creates the target, as open() would
    write_json(tmp_path / "a", 1)
    assert final.read_text() == "1\n" and (tmp_path / "a").is_symlink() and (tmp_path / "b").is_symlink()
    (tmp_path / "deep" / "er").mkdir(parents=True)
    (tmp_path / "up").symlink_to(tmp_path / "deep" / "er")
    write_json(tmp_path / "up" / ".." / "x.json", 2)  # ".." after a link goes up from the link's target
    assert (tmp_path / "deep" / "x.json").read_text() == "2\n" and not (tmp_path / "x.json").exists()


def test_a_regular_file_is_replaced_atomically_as_before(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old\n")
    before = target.stat().st_ino
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old\n"
    write_json(target, [3])
    assert json.loads(target.read_text()) == [3] and target.stat().st_ino != before
    assert_only(tmp_path, "out.json")


def test_a_socket_and_a_symlink_loop_are_refused_up_front(tmp_path):
    path = tmp_path / "s.sock"
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(path))
        with pytest.raises(ValueError, match=r"--out: .*s\.sock is a socket"):
            check_output_path("--out", path)
        with pytest.raises(ValueError, match="is a socket"), atomic_path(path):
            pass
    finally:
        server.close()
    (tmp_path / "x").symlink_to(tmp_path / "y")
    (tmp_path / "y").symlink_to(tmp_path / "x")
    with pytest.raises(ValueError, match="--out: .*symbolic links"):
        check_output_path("--out", tmp_path / "x")


def test_batch_out_into_a_fifo(tmp_path, capsys):
    source = tmp_path / "auctions.jsonl"
    source.write_text(json.dumps({"prompts": ["Tell me about Hawaii."], "bids": [1.0]}) + "\n")
    fifo = make_fifo(tmp_path, "results.jsonl")
    reader = FifoReader(fifo)
    argv = ["batch", str(source), "--out", str(fifo), "--model", str(FOLDER), "--max-new-tokens", "3"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert json.loads(reader.text())["line"] == 1
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert_only(tmp_path, "auctions.jsonl", "results.jsonl")
