"""Issue 16, finding 7: ``folk import`` of a hostile folder. A symlink out of the folder is
refused (nothing stored), a symlink loop is refused instead of walked forever, a Hugging
Face cache snapshot whose links point into its own ``blobs/`` still imports, and the hub
is private: ``$FOLK_HOME`` 0700, blobs 0400."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from folklm.errors import FolkError
from folklm.hub import api


def copy_model(tiny_models, dest: Path) -> Path:
    _, folder = tiny_models("llama")
    shutil.copytree(folder, dest)
    return dest


def stored_blobs(home: Path) -> list[Path]:
    blobs = home / "hub" / "blobs"
    return sorted(blobs.iterdir()) if blobs.is_dir() else []


def test_symlink_out_of_the_folder_is_refused(home, tiny_models, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("password=hunter2\n")
    model = copy_model(tiny_models, tmp_path / "model")
    (model / "README.md").symlink_to(secret)
    with pytest.raises(FolkError, match="README.md is a symlink to a path outside"):
        api.import_path(model, "evil:v1")
    assert not any(b.read_bytes() == secret.read_bytes() for b in stored_blobs(home))
    assert api.list_models() == []
    # a folder link out of the tree too
    (model / "README.md").unlink()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "notes.md").write_text("private\n")
    (model / "docs").symlink_to(outside)
    with pytest.raises(FolkError, match="docs is a symlink to a path outside"):
        api.import_path(model, "evil:v1")


def test_symlink_loop_is_refused(home, tiny_models, tmp_path):
    model = copy_model(tiny_models, tmp_path / "model")
    (model / "a").symlink_to(".")
    (model / "b").symlink_to(".")
    with pytest.raises(FolkError, match="symlink loop"):
        api.import_path(model, "loop:v1")
    assert api.list_models() == []


def test_hugging_face_snapshot_links_into_its_blobs_are_allowed(home, tiny_models, tmp_path):
    _, folder = tiny_models("llama")
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(folder.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", blob.name))
    entry = api.import_path(snap, "snap:v1", license="apache-2.0")
    assert entry.name == "snap:v1"


def test_home_is_private_and_blobs_read_only(home, tiny_models, tmp_path):
    old = os.umask(0o022)
    try:
        api.import_path(copy_model(tiny_models, tmp_path / "model"), "m:v1", license="mit")
    finally:
        os.umask(old)
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    blobs = stored_blobs(home)
    assert blobs and all(stat.S_IMODE(b.stat().st_mode) == 0o400 for b in blobs)
