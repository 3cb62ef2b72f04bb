import json

import pytest

from diffaccel.optimize.artifact.errors import ArtifactError
from diffaccel.optimize.artifact.manifest import Manifest, file_entry
from diffaccel.optimize.artifact.files import atomic_write_json, tree_sha256


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    atomic_write_json(tmp_path / "a.json", {"x": 2})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_incomplete_manifest_does_not_verify(tmp_path):
    m = Manifest.new(tmp_path, {"spec": "x", "sha256": "0"})
    m.save()
    with pytest.raises(ArtifactError, match="incomplete.*re-run the same diffaccel optimize"):
        Manifest.load(tmp_path).verify()


def test_verify_names_missing_and_modified_files(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "b.bin").write_bytes(b"def")
    m = Manifest.new(tmp_path, {"spec": "x", "sha256": "0"})
    m.data["status"] = "complete"
    m.components["unet"] = {"files": [file_entry(tmp_path, tmp_path / "a.bin"), file_entry(tmp_path, tmp_path / "b.bin")]}
    m.save()
    Manifest.load(tmp_path).verify()
    (tmp_path / "a.bin").write_bytes(b"abd")
    (tmp_path / "b.bin").unlink()
    with pytest.raises(ArtifactError) as e:
        Manifest.load(tmp_path).verify()
    assert "a.bin (sha256 mismatch)" in str(e.value) and "b.bin (missing)" in str(e.value)


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="no manifest.json"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(ArtifactError, match="unreadable"):
        Manifest.load(tmp_path)


def test_tree_hash_ignores_hidden_and_location(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d / "sub").mkdir(parents=True)
        (tmp_path / d / "sub" / "w.txt").write_text("weights")
    (tmp_path / "b" / ".cache").write_text("noise")
    assert tree_sha256(tmp_path / "a") == tree_sha256(tmp_path / "b")
