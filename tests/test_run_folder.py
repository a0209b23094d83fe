"""Atomic writes: readers see the old file or the new one, and files get ordinary permissions."""

import os
import stat

import pytest

from lmforge.run_folder import atomic_write_text, write_json


def test_written_files_get_the_permissions_open_would_give(tmp_path):
    path = tmp_path / "config.json"
    write_json(path, {"a": 1})
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "report.md"
    atomic_write_text(path, "old")

    def full_disk(descriptor):
        raise OSError("No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)  # fails after the temporary file was written
    with pytest.raises(OSError):
        atomic_write_text(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.md"]
