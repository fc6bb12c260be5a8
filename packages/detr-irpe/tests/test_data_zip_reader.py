"""ImageFileReader: folder or zip chosen once, per-process handles, clear errors."""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from detr_irpe.data.zip_reader import ImageFileReader

FILES = {f"{i:03d}.bin": os.urandom(200 + 37 * i) for i in range(12)}


def write_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name, data in FILES.items():
        (folder / name).write_bytes(data)
    return folder


def write_zip(folder: Path) -> Path:
    """``<folder>.zip`` with members ``<basename>/<name>``, the folder itself absent."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(f"{folder}.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in FILES.items():
            archive.writestr(f"{folder.name}/{name}", data)
    return folder


def test_folder_and_zip_give_the_same_bytes(tmp_path):
    folder_reader = ImageFileReader(write_folder(tmp_path / "a" / "train2017"))
    zip_reader = ImageFileReader(write_zip(tmp_path / "b" / "train2017"))
    assert folder_reader.mode == "folder" and zip_reader.mode == "zip"
    assert zip_reader.archive == tmp_path / "b" / "train2017.zip"
    for name, data in FILES.items():
        assert folder_reader.read(name) == data
        assert zip_reader.read(name) == data
    zip_reader.close()


def test_folder_is_preferred_when_both_exist(tmp_path):
    folder = write_folder(tmp_path / "val2017")
    write_zip(folder)
    assert ImageFileReader(folder).mode == "folder"


def test_the_choice_is_made_once(tmp_path):
    """A failed folder read never switches the reader to the archive (unlike the original)."""
    folder = write_folder(tmp_path / "val2017")
    write_zip(folder)
    reader = ImageFileReader(folder)
    (folder / "000.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"val2017[/\\]000\.bin"):
        reader.read("000.bin")
    assert reader.mode == "folder"
    assert reader.read("001.bin") == FILES["001.bin"]


def test_neither_folder_nor_zip_names_both(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        ImageFileReader(tmp_path / "train2017")
    message = str(info.value)
    assert str(tmp_path / "train2017") in message
    assert str(tmp_path / "train2017.zip") in message


def test_missing_member_names_archive_and_member(tmp_path):
    reader = ImageFileReader(write_zip(tmp_path / "train2017"))
    with pytest.raises(FileNotFoundError) as info:
        reader.read("nope.jpg")
    assert "train2017/nope.jpg" in str(info.value)
    assert str(tmp_path / "train2017.zip") in str(info.value)
    reader.close()


def test_corrupt_archive_is_named_at_construction(tmp_path):
    (tmp_path / "train2017.zip").write_bytes(b"this is not a zip file" * 10)
    with pytest.raises(zipfile.BadZipFile, match=r"train2017\.zip"):
        ImageFileReader(tmp_path / "train2017")


def test_corrupt_member_is_named(tmp_path):
    folder = write_zip(tmp_path / "train2017")
    archive = Path(f"{folder}.zip")
    data = bytearray(archive.read_bytes())
    # Flip bytes in the first member's compressed data (just after its local header).
    with zipfile.ZipFile(archive) as handle:
        info = handle.infolist()[0]
    start = info.header_offset + 30 + len(info.filename.encode()) + 5
    data[start : start + 20] = bytes(b ^ 0xFF for b in data[start : start + 20])
    archive.write_bytes(bytes(data))
    reader = ImageFileReader(folder)
    with pytest.raises(zipfile.BadZipFile) as error:
        reader.read(info.filename.split("/", 1)[1])
    assert info.filename in str(error.value) and str(archive) in str(error.value)
    reader.close()


def test_handle_is_reopened_after_a_pid_change(tmp_path, monkeypatch):
    reader = ImageFileReader(write_zip(tmp_path / "train2017"))
    parent_handle = reader._handle()
    assert reader._handle() is parent_handle, "one handle per process"
    monkeypatch.setattr(os, "getpid", lambda: -12345)  # as seen by a forked child
    child_handle = reader._handle()
    assert child_handle is not parent_handle
    assert parent_handle.fp is None, "the inherited handle is closed, not shared"
    assert reader.read("003.bin") == FILES["003.bin"]
    reader.close()
    assert child_handle.fp is None


def test_pickling_drops_the_handle(tmp_path):
    reader = ImageFileReader(write_zip(tmp_path / "train2017"))
    reader.read("000.bin")
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._zip is None
    assert clone.read("005.bin") == FILES["005.bin"]
    reader.close()
    clone.close()


def test_close_and_context_manager(tmp_path):
    with ImageFileReader(write_zip(tmp_path / "train2017")) as reader:
        handle = reader._handle()
    assert handle.fp is None and reader._zip is None
    assert reader.read("000.bin") == FILES["000.bin"], "reading after close re-opens"
    reader.close()


class _ReadEverything(Dataset):
    def __init__(self, reader: ImageFileReader, repeats: int) -> None:
        self.reader, self.names = reader, sorted(FILES) * repeats

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int):
        name = self.names[index]
        digest = hashlib.sha256(self.reader.read(name)).hexdigest()
        return name, digest, os.getpid()


@pytest.mark.slow
def test_zip_reads_are_correct_in_forked_dataloader_workers(tmp_path):
    reader = ImageFileReader(write_zip(tmp_path / "train2017"))
    parent_handle = reader._handle()  # opened before the fork, as in training
    loader = DataLoader(
        _ReadEverything(reader, repeats=8),
        batch_size=3,
        num_workers=2,
        collate_fn=lambda items: items,
        multiprocessing_context=torch.multiprocessing.get_context("fork"),
    )
    pids = set()
    for batch in loader:
        for name, digest, pid in batch:
            assert digest == hashlib.sha256(FILES[name]).hexdigest(), name
            pids.add(pid)
    assert len(pids) == 2 and os.getpid() not in pids
    assert reader._handle() is parent_handle, "the parent's handle survives its workers"
    assert reader.read("007.bin") == FILES["007.bin"]
    reader.close()
