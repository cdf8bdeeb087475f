"""Storage URIs on local files and on the S3-protocol server (no Ray)."""

from __future__ import annotations

import os
import socket

import pyarrow.fs as pafs
import pytest

from dakd import storage
from dakd.errors import StorageError


def test_local_paths_and_file_uris(tmp_path):
    for uri in (str(tmp_path / "a"), f"file://{tmp_path}/a"):
        loc = storage.resolve(uri)
        assert isinstance(loc.fs, pafs.LocalFileSystem) and loc.path == str(tmp_path / "a")
    storage.write_text(str(tmp_path / "a" / "x.txt"), "hello")
    assert storage.read_text(f"file://{tmp_path}/a/x.txt") == "hello"
    assert storage.list_files(str(tmp_path / "a")) == [str(tmp_path / "a" / "x.txt")]
    assert not [f for f in os.listdir(tmp_path / "a") if ".tmp-" in f]


def test_s3_round_trip(s3_uri):
    storage.write_bytes(storage.join_uri(s3_uri, "d/x.bin"), b"\x00\x01")
    assert storage.read_bytes(storage.join_uri(s3_uri, "d/x.bin")) == b"\x00\x01"
    assert storage.list_files(s3_uri) == [storage.join_uri(s3_uri, "d/x.bin")]
    assert storage.exists(storage.join_uri(s3_uri, "d/x.bin"))
    storage.check_writable(s3_uri)
    fs = storage.fsspec_filesystem(s3_uri)
    assert fs.cat(storage.join_uri(s3_uri, "d/x.bin")) == b"\x00\x01"


def test_unsupported_scheme_is_named():
    with pytest.raises(StorageError, match="gs://bucket"):
        storage.resolve("gs://bucket/x")


def test_unwritable_local_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StorageError, match=str(blocker)):
        storage.check_writable(str(blocker / "out"))


def test_s3_endpoint_down_is_a_clear_error(monkeypatch):
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sekret-marker-5521")
    with pytest.raises(StorageError) as err:
        storage.check_writable("s3://bucket/prefix")
    assert "s3://bucket/prefix" in str(err.value)
    assert "sekret-marker-5521" not in str(err.value)


def test_errors_survive_pickling():
    import pickle

    from dakd.errors import DataError

    err = pickle.loads(pickle.dumps(DataError("/a/b.png", "cannot decode image")))
    assert isinstance(err, DataError) and err.path == "/a/b.png" and str(err) == "/a/b.png: cannot decode image"


def test_list_files_keeps_the_form_of_the_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage.write_text("rel/dir/x.txt", "x")
    assert storage.list_files("rel") == ["rel/dir/x.txt"]
    assert storage.list_files(f"file://{tmp_path}/rel") == [f"file://{tmp_path}/rel/dir/x.txt"]
    assert storage.read_text(storage.list_files("rel")[0]) == "x"
