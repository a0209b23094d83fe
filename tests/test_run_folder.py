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


def tiny_run(folder, poison=None):
    """A tiny decoder saved as a run folder; `poison` is put into norm.weight[0] before saving."""
    import torch

    from lmforge.models import save_model
    from lmforge.models.decoder import Decoder, DecoderConfig

    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32))
    if poison is not None:
        with torch.no_grad():
            model.norm.weight[0] = poison
    save_model(folder, model)
    return folder


def flip_bit(weights, tensor_name, bit):
    """Flip one bit of the first element of `tensor_name` inside a safetensors file, in place."""
    import json

    data = bytearray(weights.read_bytes())
    header_length = int.from_bytes(data[:8], "little")
    start = json.loads(data[8 : 8 + header_length])[tensor_name]["data_offsets"][0]
    position = 8 + header_length + start + bit // 8
    data[position] ^= 1 << (bit % 8)
    weights.write_bytes(bytes(data))


def test_saving_records_a_checksum_and_a_flipped_bit_is_refused(tmp_path, monkeypatch):
    from lmforge.errors import UserError
    from lmforge.models import load_model
    from lmforge.run_folder import RunFolder

    run = RunFolder(tiny_run(tmp_path / "run"))
    assert set(run.read_checksums()) == {RunFolder.WEIGHTS}
    load_model(run.path)  # intact: loads
    flip_bit(run.weights, "norm.weight", bit=3)  # a low mantissa bit: the value stays finite, only the hash tells
    with pytest.raises(UserError, match="model.safetensors is damaged: its SHA-256"):
        load_model(run.path)
    load_model(run.path, verify=False)  # the skip argument
    monkeypatch.setenv("LMFORGE_SKIP_CHECKSUMS", "1")  # and the environment variable (for the CLI and the server)
    load_model(run.path)


def test_non_finite_weights_are_refused_by_name(tmp_path):
    import lmforge
    from lmforge.errors import UserError
    from lmforge.models import load_model

    run = tiny_run(tmp_path / "run", poison=float("nan"))
    with pytest.raises(UserError, match="weight norm.weight holds 1 NaN or infinite values"):
        load_model(run)
    with pytest.raises(UserError, match="norm.weight"):
        load_model(run, verify=False)  # skipping the hash never skips this
    # An exponent bit flipped after saving, with the checksum skipped: infinity is caught too.
    clean = tiny_run(tmp_path / "clean")
    (clean / "checksums.json").unlink()  # as in a run saved before checksums existed: it still loads
    load_model(clean)
    flip_bit(clean / "model.safetensors", "norm.weight", bit=30)
    with pytest.raises(UserError, match="norm.weight holds"):
        lmforge.models.load_model(clean)
