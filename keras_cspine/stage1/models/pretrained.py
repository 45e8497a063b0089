"""Pretrained weights: the table of every file the paper's models start from, and ``weights``.

The paper fine-tunes ImageNet-pretrained networks: the GCViT-tiny of Section 2.5 ("pre-trained
GCViT-tiny", Figure 5) and the baselines of Table 1 (ResNet152V2, InceptionV3, ConvNeXt, VGG19,
DenseNet; ViT and Swin through keras-hub). This module lists those weights in one table,
:data:`ENTRIES`, says where each one is looked for, checks a file against its pinned hash, and
is the only place in the package that may open a network connection: ``keras-cspine weights
fetch NAME``, and only when a user runs it. Models never download; they call :func:`require`,
whose error names the missing file, the folder searched and the command that gets it.

Caches (the folders the model code already reads):

- ``cache="keras"``: ``$KERAS_HOME/models`` (default ``~/.keras/models``), where
  ``keras.applications`` looks for its "notop" files under the same names and hashes;
- ``cache="keras_cspine"``: the first folder of
  :func:`keras_cspine.stage1.models.weights.weights_cache_dirs` (``$KERAS_CSPINE_WEIGHTS``, else
  ``~/.cache/keras_cspine``), under a name that ``weights="imagenet"`` of GCViT already finds.

Commands (``keras-cspine weights ...`` or ``python -m keras_cspine weights ...``)::

    weights list                 # every entry: models, licence, path, present / hash ok
    weights fetch NAME [--url U] # download, verify, rename into the cache (atomic)
    weights add FILE [--name N]  # a file brought by hand (e.g. a Kaggle dataset), verified

A download streams into a temporary file beside its destination; the hash (and the size the
server announced) are checked before the rename, so a failed, truncated or wrong transfer
leaves nothing in the cache. Nothing is ever unpickled: ``.h5`` files are read with h5py,
``.safetensors`` headers are parsed as JSON.

Licences: Keras Applications weights come with Keras (Apache-2.0) and were trained on ImageNet;
NVIDIA's GCViT weights are CC-BY-NC-SA-4.0 (non-commercial, share alike) and so is every model
fine-tuned from them.

TensorFlow and Keras are not imported here (the command is fast and works without them); only
:func:`check_keras_h5` touches a Keras model, which its caller has already built.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import sys
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keras_cspine.stage1.models.weights import WeightsFileError, weights_cache_dirs
from keras_cspine.utils import atomic_write

__all__ = [
    "ENTRIES",
    "WeightsEntry",
    "WeightsFileError",
    "add",
    "cache_dir",
    "cache_path",
    "check_keras_h5",
    "check_safetensors",
    "entries_for_model",
    "entry",
    "fetch",
    "file_hash",
    "find",
    "keras_models_dir",
    "read_safetensors_header",
    "require",
    "status",
    "verify",
    "weights_status",
]

HASH_ALGORITHMS = ("md5", "sha256")
CACHES = ("keras", "keras_cspine")
KINDS = ("file", "folder")
_HEX_LENGTH = {"md5": 32, "sha256": 64}
_CHUNK = 1 << 20

KERAS_APPLICATIONS_LICENCE = "Keras Applications (Apache-2.0); trained on ImageNet"
GCVIT_LICENCE = "CC-BY-NC-SA-4.0 (NVIDIA GCViT ImageNet weights, via timm); non-commercial"


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightsEntry:
    """One pretrained weights file (or preset folder) that a registry model can start from.

    Args:
        name: the entry's key, used on the command line (``weights fetch NAME``).
        file_name: its name in the cache folder (a folder name when ``kind="folder"``).
        url: where ``fetch`` downloads it (for a folder: a ``.tar.gz`` archive of it).
        hash: the expected hex digest of the downloaded file, or None when not pinned (then
            ``fetch`` / ``add`` check the file's structure and print the sha256 they got).
        hash_algorithm: ``"md5"`` or ``"sha256"`` (Keras' ``get_file`` reads a 32-hex hash as
            md5 and a 64-hex one as sha256).
        size: the expected size in bytes, when known.
        cache: ``"keras"`` (``$KERAS_HOME/models``, where keras.applications looks) or
            ``"keras_cspine"`` (the first of ``weights_cache_dirs()``).
        models: registry model names (``keras_cspine.stage1.models.registry.REGISTRY``) using it.
        licence: the weights' licence, in one line.
        description: one line for listings.
        kind: ``"file"``, or ``"folder"`` for a keras-hub preset (fetched as an archive and
            unpacked; ``hash`` and ``size`` are the archive's).
        members: for a folder, the files that must be inside it (e.g. ``config.json``).
        tensors: for a ``.safetensors`` file, ``(name, shape)`` pairs that must be in it.
        n_values: for a ``.safetensors`` file, its total number of values (buffers named
            ``relative_position_index`` not counted), or None.
        config: for a keras-hub preset folder, ``(key, value)`` pairs that its ``config.json``
            must hold under ``"config"`` (the architecture: a preset of another size is refused).
    """

    name: str
    file_name: str
    url: str
    hash: str | None
    hash_algorithm: str = "sha256"
    size: int | None = None
    cache: str = "keras_cspine"
    models: tuple[str, ...] = ()
    licence: str = ""
    description: str = ""
    kind: str = "file"
    members: tuple[str, ...] = ()
    tensors: tuple[tuple[str, tuple[int, ...]], ...] = field(default=(), repr=False)
    n_values: int | None = None
    config: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        if self.hash_algorithm not in HASH_ALGORITHMS:
            raise ValueError(f"{self.name}: hash_algorithm must be one of {HASH_ALGORITHMS}, "
                             f"got {self.hash_algorithm!r}")  # fmt: skip
        if self.hash is not None:
            digits = _HEX_LENGTH[self.hash_algorithm]
            if len(self.hash) != digits or any(c not in "0123456789abcdef" for c in self.hash):
                raise ValueError(f"{self.name}: a {self.hash_algorithm} hash is {digits} lower-case "
                                 f"hex digits, got {self.hash!r}")  # fmt: skip
        if self.cache not in CACHES:
            raise ValueError(f"{self.name}: cache must be one of {CACHES}, got {self.cache!r}")
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.size is not None and (not isinstance(self.size, int) or self.size <= 0):
            raise ValueError(f"{self.name}: size must be a positive int or None, got {self.size!r}")
        if not isinstance(self.models, tuple):
            raise ValueError(f"{self.name}: models must be a tuple, got {self.models!r}")

    @property
    def is_safetensors(self) -> bool:
        return self.kind == "file" and self.file_name.endswith(".safetensors")


_KERAS_APPS = "https://storage.googleapis.com/tensorflow/keras-applications/"


def _keras_app(name, subdir, file_name, digest, description, models=None):
    """A Keras Applications notop file: file name, URL and hash as keras.applications has them."""
    return WeightsEntry(
        name=name, file_name=file_name, url=f"{_KERAS_APPS}{subdir}/{file_name}", hash=digest,
        hash_algorithm="md5" if len(digest) == 32 else "sha256", size=None, cache="keras",
        models=(name,) if models is None else models, licence=KERAS_APPLICATIONS_LICENCE,
        description=description,
    )  # fmt: skip


#: gcvit_tiny: tensors of timm's ``gcvit_tiny`` state dict (``timm.create_model("gcvit_tiny")``,
#: timm 1.0): 473 tensors, 28,221,974 values; a few names and shapes from stem to head.
GCVIT_TINY_TENSORS: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("stem.conv1.weight", (64, 3, 3, 3)),
    ("stages.0.blocks.0.attn.qkv.weight", (192, 64)),
    ("stages.2.blocks.18.mlp.fc1.weight", (768, 256)),
    ("stages.3.norm.weight", (512,)),
    ("head.fc.weight", (1000, 512)),
)
GCVIT_TINY_VALUES = 28_221_974

_KAGGLE_MODELS = "https://www.kaggle.com/api/v1/models"
_PRESET_MEMBERS = ("config.json", "model.weights.h5")

#: Every known weights entry. Keras Applications rows: names, URLs and hashes copied from
#: keras/src/applications/{resnet,inception_v3,convnext,vgg19,densenet}.py (Keras 3.15; a test
#: compares them with the installed Keras).
ENTRIES: tuple[WeightsEntry, ...] = (
    _keras_app("resnet152v2", "resnet", "resnet152v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
               "ed17cf2e0169df9d443503ef94b23b33", "ResNet152V2 ImageNet notop (Table 1)"),
    _keras_app("inceptionv3", "inception_v3",
               "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
               "bcbd6486424b2319ff4ef7d526e38f63", "InceptionV3 ImageNet notop (Table 1)"),
    _keras_app("convnext_small", "convnext", "convnext_small_notop.h5",
               "6fc8009faa2f00c1c1dfce59feea9b0745eb260a7dd11bee65c8e20843da6eab",
               "ConvNeXt-Small ImageNet notop (Table 1 'ConvNeXt', small variant)"),
    _keras_app("convnext_tiny", "convnext", "convnext_tiny_notop.h5",
               "d547c096cabd03329d7be5562c5e14798aa39ed24b474157cef5e85ab9e49ef1",
               "ConvNeXt-Tiny ImageNet notop (Table 1 'ConvNeXt')"),
    _keras_app("vgg19", "vgg19", "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
               "253f8cb515780f3b799900260a226db6", "VGG19 ImageNet notop (named in the text)"),
    _keras_app("densenet121", "densenet",
               "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
               "30ee3e1110167f948a6b9946edeeb738",
               "DenseNet121 ImageNet notop (named in the text)"),
    # timm's gcvit_tiny.in1k: no sha256 could be found offline, so the file is checked by its
    # structure (tensor names, shapes, total values, data length); `fetch` prints the sha256 it
    # got: pin it here (hash=..., hash_algorithm="sha256") once known.
    WeightsEntry(
        name="gcvit_tiny", file_name="gcvit_tiny.in1k.safetensors",
        url="https://huggingface.co/timm/gcvit_tiny.in1k/resolve/main/model.safetensors",
        hash=None, hash_algorithm="sha256", size=None, cache="keras_cspine",
        models=("gcvit_tiny",), licence=GCVIT_LICENCE,
        description="GCViT-tiny ImageNet-1k, timm layout (the paper's backbone, Section 2.5)",
        tensors=GCVIT_TINY_TENSORS, n_values=GCVIT_TINY_VALUES,
    ),
    # ViT and Swin: keras-hub presets (folders), as Kaggle Models serves them (the archive of a
    # model version). No archive hash could be pinned offline: the folder is checked by its
    # files and its config.json's architecture; `fetch` prints the archive's sha256 to pin.
    WeightsEntry(
        name="vit", file_name="vit_base_patch32_384_imagenet",
        url=f"{_KAGGLE_MODELS}/keras/vit/keras/vit_base_patch32_384_imagenet/3/download",
        hash=None, kind="folder", cache="keras_cspine", members=_PRESET_MEMBERS,
        config=(("patch_size", [32, 32]), ("num_layers", 12), ("num_heads", 12),
                ("hidden_dim", 768), ("mlp_dim", 3072)),
        models=("vit",), licence="Apache-2.0 (Google's ViT ImageNet-21k + ImageNet-1k weights, "
        "keras-hub preset)",
        description="ViT-B/32 ImageNet (vit-keras' vit_b32 weights; position table resized "
        "from 384 to 256 px on load)",
    ),
    WeightsEntry(
        name="swin", file_name="swin_small_patch4_window7_224",
        url=f"{_KAGGLE_MODELS}/keras/swin-transformer/keras/swin_small_patch4_window7_224/1/"
        "download",
        hash=None, kind="folder", cache="keras_cspine", members=_PRESET_MEMBERS,
        config=(("embed_dim", 96), ("depths", [2, 2, 18, 2]), ("num_heads", [3, 6, 12, 24]),
                ("window_size", 7)),
        models=("swin",), licence="MIT (Microsoft's Swin ImageNet weights, keras-hub preset)",
        description="Swin-S patch 4 window 7 ImageNet backbone (its 1,000-class top starts "
        "from scratch)",
    ),
)  # fmt: skip


def entry(name: str | WeightsEntry) -> WeightsEntry:
    """The entry called ``name``; ValueError listing the known names otherwise."""
    if isinstance(name, WeightsEntry):
        return name
    for candidate in ENTRIES:
        if candidate.name == name:
            return candidate
    raise ValueError(f"unknown weights {name!r}; known: {', '.join(e.name for e in ENTRIES)}")


def entries_for_model(model_name: str) -> tuple[WeightsEntry, ...]:
    """Entries a registry model can start from (empty when it has none)."""
    return tuple(e for e in ENTRIES if model_name in e.models)


def configs_for(item: str | WeightsEntry) -> list[str]:
    """Bundled configs (``keras_cspine/configs``) whose ``model.name`` uses the entry."""
    import yaml

    from keras_cspine.config import CONFIG_DIR

    models = set(entry(item).models)
    names = []
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            continue
        model = data.get("model") if isinstance(data, dict) else None
        if isinstance(model, dict) and model.get("name") in models:
            names.append(path.stem)
    return names


# ----------------------------------------------------------------------------------------------
# Where files live
# ----------------------------------------------------------------------------------------------


def keras_models_dir() -> Path:
    """``$KERAS_HOME/models`` (default ``~/.keras/models``): where keras.applications and
    ``keras_cspine.stage1.models.baselines`` look for notop files."""
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras").expanduser() / "models"


def cache_dir(item: str | WeightsEntry) -> Path:
    """The folder an entry is written to by ``fetch`` / ``add``."""
    e = entry(item)
    return keras_models_dir() if e.cache == "keras" else weights_cache_dirs()[0]


def cache_path(item: str | WeightsEntry) -> Path:
    """The path an entry is written to by ``fetch`` / ``add`` (and looked for first)."""
    e = entry(item)
    return cache_dir(e) / e.file_name


def _search_paths(e: WeightsEntry) -> list[Path]:
    if e.cache == "keras":
        return [cache_path(e)]
    return [d / e.file_name for d in weights_cache_dirs()]


# ----------------------------------------------------------------------------------------------
# Checking files
# ----------------------------------------------------------------------------------------------


def _hasher(algorithm: str):
    if algorithm not in HASH_ALGORITHMS:
        raise ValueError(f"algorithm must be one of {HASH_ALGORITHMS}, got {algorithm!r}")
    if algorithm == "md5":
        return hashlib.md5(usedforsecurity=False)
    return hashlib.sha256()


def _hash_many(path: Path, algorithms: Iterable[str]) -> dict[str, str]:
    hashers = {a: _hasher(a) for a in algorithms}
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            for h in hashers.values():
                h.update(chunk)
    return {a: h.hexdigest() for a, h in hashers.items()}


def file_hash(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """The hex digest of a file (``"md5"`` or ``"sha256"``), read in 1 MiB chunks."""
    return _hash_many(Path(path), [algorithm])[algorithm]


_HASH_MEMO: dict[tuple[str, int, int, str], str] = {}


def _memo_hash(path: Path, algorithm: str) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, algorithm)
    if key not in _HASH_MEMO:
        _HASH_MEMO[key] = file_hash(path, algorithm)
    return _HASH_MEMO[key]


def read_safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a ``.safetensors`` file (8-byte little-endian length, then JSON).

    Raises:
        WeightsFileError: not a safetensors file, or its data is shorter or longer than the
            header says (a truncated or padded transfer).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise WeightsFileError(path, f"not a safetensors file ({size} bytes)")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, 100 << 20):
            raise WeightsFileError(path, "not a safetensors file (bad header length)")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise WeightsFileError(path, f"not a safetensors file (header: {err})") from None
    if not isinstance(header, dict):
        raise WeightsFileError(path, "not a safetensors file (header is not a mapping)")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise WeightsFileError(path, f"not a safetensors file (tensor {key!r})") from None
    if 8 + length + end != size:
        raise WeightsFileError(
            path, f"truncated or damaged: the header describes {8 + length + end} bytes, the file "
            f"has {size}",
        )  # fmt: skip
    return header


def check_safetensors(path: str | os.PathLike, item: str | WeightsEntry) -> None:
    """Check a ``.safetensors`` file against an entry's tensor names, shapes and value count.

    Raises:
        WeightsFileError: naming the file and the first tensor that does not fit.
    """
    _check_header(read_safetensors_header(path), entry(item), path)


def _check_header(header: dict[str, Any], e: WeightsEntry, path: str | os.PathLike) -> None:
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    for key, shape in e.tensors:
        if key not in tensors:
            raise WeightsFileError(path, f"not the {e.name} weights: no tensor {key!r}")
        got = tuple(tensors[key].get("shape", ()))
        if got != tuple(shape):
            raise WeightsFileError(
                path, f"not the {e.name} weights: {key} has shape {got}, expected {tuple(shape)}"
            )
    if e.n_values is not None:
        total = 0
        for key, info in tensors.items():
            if "relative_position_index" in key:
                continue
            n = 1
            for dim in info.get("shape", ()):
                n *= int(dim)
            total += n
        if total != e.n_values:
            raise WeightsFileError(
                path, f"not the {e.name} weights: {total:,} values, expected {e.n_values:,}"
            )


_H5_MAGIC = b"\x89HDF\r\n\x1a\n"


def _cheap_problem(path: Path, e: WeightsEntry) -> str | None:
    """What is wrong with a present file or folder without hashing it (None: looks fine)."""
    if e.kind == "folder":
        if not path.is_dir():
            return "not a folder"
        missing = [m for m in e.members if not (path / m).is_file()]
        if missing:
            return f"incomplete preset folder: missing {', '.join(missing)}"
        return _preset_config_problem(path, e)
    if not path.is_file():
        return "not a file"
    if e.size is not None and path.stat().st_size != e.size:
        return f"size {path.stat().st_size} bytes, expected {e.size}"
    if e.file_name.endswith(".h5"):
        with open(path, "rb") as handle:
            if handle.read(8) != _H5_MAGIC:
                return "not an HDF5 file (an error page saved by a failed download?)"
    if e.is_safetensors:
        try:
            check_safetensors(path, e)
        except (WeightsFileError, OSError) as err:
            return getattr(err, "problem", str(err))
    return None


def _preset_config_problem(folder: Path, e: WeightsEntry) -> str | None:
    """The first architecture field of a preset's config.json that differs from the entry's."""
    if not e.config:
        return None
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))["config"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"config.json is not a keras-hub preset config ({type(err).__name__}: {err})"

    def plain(value):
        return list(value) if isinstance(value, tuple | list) else value

    for key, expected in e.config:
        if plain(config.get(key)) != plain(expected):
            return (f"config.json: {key} is {config.get(key)!r}, the {e.name} weights of Table 1 "
                    f"have {expected!r} (another variant?)")  # fmt: skip
    return None


def verify(path: str | os.PathLike, item: str | WeightsEntry) -> str | None:
    """Check a file (or preset folder) against an entry: hash when pinned, else its structure.

    Returns:
        the file's digest in the entry's algorithm (sha256 when not pinned), None for folders.

    Raises:
        WeightsFileError: naming the file and what does not fit (expected and actual hashes).
    """
    e, path = entry(item), Path(path)
    problem = _cheap_problem(path, e)
    if problem:
        raise WeightsFileError(path, problem)
    if e.kind == "folder":
        return None
    digest = _memo_hash(path, e.hash_algorithm)
    if e.hash is not None and digest != e.hash:
        raise WeightsFileError(
            path, f"{e.hash_algorithm} mismatch for {e.name}: expected {e.hash}, got {digest}"
        )
    return digest


def _locate(e: WeightsEntry) -> Path | None:
    for path in _search_paths(e):
        if path.is_dir() if e.kind == "folder" else path.is_file():
            return path
    return None


def find(name: str | WeightsEntry, verify_hash: bool = False) -> Path | None:
    """The local file of an entry when present and sound, else None (never downloads).

    Cheap checks always run (size when known, HDF5 signature, safetensors header and tensor
    shapes, preset folder members); ``verify_hash=True`` also hashes the file (memoised per
    process by path, size and modification time).
    """
    e = entry(name)
    path = _locate(e)
    if path is None:
        return None
    try:
        if verify_hash:
            verify(path, e)
        elif _cheap_problem(path, e):
            return None
    except (WeightsFileError, OSError):
        return None
    return path


def _get_hint(e: WeightsEntry) -> str:
    return (f"get it with `keras-cspine weights fetch {e.name}` (downloads {e.url}), or bring "
            f"the file and run `keras-cspine weights add FILE --name {e.name}`")  # fmt: skip


def require(name: str | WeightsEntry, verify_hash: bool = False) -> Path:
    """The local file of an entry; WeightsFileError saying how to get it otherwise.

    The message names the missing file, the folder looked in and the exact command:
    ``keras-cspine weights fetch NAME`` (or ``weights add FILE --name NAME``).
    """
    e = entry(name)
    path = _locate(e)
    if path is None:
        where = " or ".join(str(p.parent) for p in _search_paths(e))
        raise WeightsFileError(
            cache_path(e), f"{e.name} weights not found ({e.file_name} is not in {where}; "
            f"nothing is downloaded automatically): {_get_hint(e)}. Licence: {e.licence}",
        )  # fmt: skip
    try:
        if verify_hash:
            verify(path, e)
        elif problem := _cheap_problem(path, e):
            raise WeightsFileError(path, problem)
    except WeightsFileError as err:
        raise WeightsFileError(path, f"{err.problem}; replace it: {_get_hint(e)}") from None
    return path


def status(item: str | WeightsEntry, verify_hash: bool = True) -> tuple[str, Path]:
    """``(state, path)``: ``"absent"``, ``"present, md5 ok"``, ``"BAD: <problem>"``..."""
    e = entry(item)
    path = _locate(e)
    if path is None:
        return "absent", cache_path(e)
    try:
        if e.kind == "folder":
            verify(path, e)
            return "present (folder)", path
        if not verify_hash:
            problem = _cheap_problem(path, e)
            if problem:
                return f"BAD: {problem}", path
            return "present (hash not checked)", path
        digest = verify(path, e)
    except (WeightsFileError, OSError) as err:
        return f"BAD: {getattr(err, 'problem', err)}", path
    if e.hash is None:
        return f"present, structure ok (sha256 {digest[:12]}..., not pinned)", path
    return f"present, {e.hash_algorithm} ok", path


def weights_status(model_name: str, weights: str | os.PathLike | None) -> dict[str, Any]:
    """Where a model's configured ``weights`` would come from, without loading or downloading.

    Args:
        model_name: a registry model name.
        weights: a config's ``model.weights``: None (random), ``"imagenet"``, an entry name, or
            a path.

    Returns:
        ``weights_present`` (True, False, or None for random weights), ``weights_source`` (the
        file or folder, or what is missing), ``weights_command`` (how to get them, or None) and
        ``weights_licence``.
    """
    if weights is None:
        return {"weights_present": None, "weights_source": "random initialisation",
                "weights_command": None, "weights_licence": None}  # fmt: skip
    weights = os.fspath(weights)
    names = {e.name for e in ENTRIES}
    if weights != "imagenet" and weights not in names:
        present = Path(weights).expanduser().exists()
        return {"weights_present": present, "weights_source": weights,
                "weights_command": None if present else f"{weights}: no such file or folder",
                "weights_licence": None}  # fmt: skip
    candidates = (entry(weights),) if weights in names else entries_for_model(model_name)
    if not candidates:
        return {"weights_present": False,
                "weights_source": f"no entry for {model_name} in keras_cspine.stage1.models.pretrained.ENTRIES",
                "weights_command": f"pass a local file or preset folder as model.weights for "
                                   f"{model_name}",
                "weights_licence": None}  # fmt: skip
    e = candidates[0]
    path = find(e)
    if path is None and e.is_safetensors and e.cache == "keras_cspine":
        from keras_cspine.stage1.models.weights import resolve_weights

        with contextlib.suppress(WeightsFileError):  # GCViT also finds other local names
            path = resolve_weights("imagenet", model_name)
    return {"weights_present": path is not None,
            "weights_source": str(path or cache_path(e)),
            "weights_command": None if path else f"keras-cspine weights fetch {e.name}",
            "weights_licence": e.licence}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Keras legacy .h5 weights against a model
# ----------------------------------------------------------------------------------------------


def _h5_names(group, name: str) -> list[str]:
    """A list attribute of a Keras legacy .h5 group (possibly split as name0, name1, ...)."""
    if name in group.attrs:
        values = list(group.attrs[name])
    else:
        values, chunk = [], 0
        while f"{name}{chunk}" in group.attrs:
            values.extend(group.attrs[f"{name}{chunk}"])
            chunk += 1
    return [v.decode("utf8") if hasattr(v, "decode") else str(v) for v in values]


def check_keras_h5(path: str | os.PathLike, model) -> None:
    """Check a Keras Applications legacy ``.h5`` weights file against a built keras.Model.

    Keras loads such a file by order: the i-th layer with weights in the file (``layer_names``
    attribute, each group's ``weight_names``) goes to the i-th layer with weights in the model,
    trainable weights then non-trainable ones. This check follows the same rule without
    loading anything, so a model that passes loads the file with ``model.load_weights``.

    Raises:
        WeightsFileError: naming the file and the first layer that does not fit: a layer
            missing from the file or the model, a weight count, or a shape (both shapes given).
    """
    import h5py

    path = Path(path)
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise WeightsFileError(path, f"not a readable HDF5 file: {err}") from None
    with handle:
        group = handle
        if "layer_names" not in handle.attrs and "model_weights" in handle:
            group = handle["model_weights"]
        layer_names = _h5_names(group, "layer_names")
        if not layer_names:
            raise WeightsFileError(
                path, "no layer_names attribute: not a Keras legacy .h5 weights file (a Keras 3 "
                ".weights.h5 file is loaded with model.load_weights instead)",
            )  # fmt: skip
        saved: list[tuple[str, list[tuple[str, tuple[int, ...]]]]] = []
        for name in layer_names:
            if name not in group:
                raise WeightsFileError(path, f"layer_names lists {name!r} but it has no group")
            weight_names = _h5_names(group[name], "weight_names")
            if weight_names:
                shapes = [(w, tuple(group[name][w].shape)) for w in weight_names]
                saved.append((name, shapes))
    layers = [layer for layer in model.layers if layer.trainable_weights + layer.non_trainable_weights]
    if len(saved) != len(layers):
        _raise_layer_count(path, model, saved, layers)
    for k, ((saved_name, saved_weights), layer) in enumerate(zip(saved, layers)):
        variables = layer.trainable_weights + layer.non_trainable_weights
        label = f"layer #{k} {layer.name!r} of {model.name}"
        if saved_name != layer.name:
            label += f" (the file's #{k} is {saved_name!r})"
        if len(saved_weights) != len(variables):
            raise WeightsFileError(
                path, f"{label}: the file has {len(saved_weights)} weights, the layer "
                f"{len(variables)}",
            )  # fmt: skip
        for (weight_name, shape), variable in zip(saved_weights, variables):
            expected = tuple(variable.shape)
            if shape != expected:
                raise WeightsFileError(
                    path, f"{label}: {weight_name} has shape {shape} in the file, the model "
                    f"expects {expected}",
                )  # fmt: skip


def _raise_layer_count(path, model, saved, layers) -> None:
    saved_names = [name for name, _ in saved]
    model_names = [layer.name for layer in layers]
    for k in range(max(len(saved_names), len(model_names))):
        s = saved_names[k] if k < len(saved_names) else None
        m = model_names[k] if k < len(model_names) else None
        if s == m:
            continue
        if m is not None and m not in saved_names:
            problem = f"layer #{k} {m!r} of {model.name} has no weights in the file"
        elif s is not None and s not in model_names:
            problem = f"the file's layer #{k} {s!r} is not in {model.name}"
        else:
            problem = f"layer #{k}: the file has {s!r} where {model.name} has {m!r}"
        break
    else:  # pragma: no cover - counts differ, so some position differs
        problem = "layer lists differ"
    raise WeightsFileError(
        path, f"{problem} (the file has {len(saved)} layers with weights, {model.name} "
        f"{len(layers)})",
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Downloading and adding (the only network access of the package)
# ----------------------------------------------------------------------------------------------


def _network_problem(url: str, reason: object) -> str:
    import socket
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or "?"
    if isinstance(reason, socket.gaierror):
        return f"download failed: the host name {host!r} did not resolve (no network?)"
    if isinstance(reason, ConnectionRefusedError):
        return f"download failed: connection to {host!r} refused (no network, or no server there)"
    if isinstance(reason, TimeoutError):
        return f"download failed: {host!r} did not answer in time (no network?)"
    return f"download failed: {reason} (no network?)"


def _download(url: str, sink, e: WeightsEntry, progress: bool, timeout: float) -> dict[str, Any]:
    """Stream ``url`` into the open binary file ``sink``; hashes, byte count, announced size."""
    import http.client
    import urllib.error
    import urllib.request

    from tqdm import tqdm

    from keras_cspine import __version__

    request = urllib.request.Request(url, headers={"User-Agent": f"keras_cspine/{__version__}"})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - user's command
    except urllib.error.HTTPError as err:
        raise WeightsFileError(url, f"download failed: HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        raise WeightsFileError(url, _network_problem(url, err.reason)) from None
    except (OSError, http.client.HTTPException) as err:
        raise WeightsFileError(url, _network_problem(url, err)) from None
    algorithms = {"sha256", e.hash_algorithm}
    hashers = {a: _hasher(a) for a in algorithms}
    received = 0
    with response:
        announced = response.headers.get("Content-Length")
        announced = int(announced) if announced and announced.strip().isdigit() else None
        if e.size is not None and announced is not None and announced != e.size:
            raise WeightsFileError(
                url, f"the server offers {announced} bytes, {e.name} is {e.size}: not this file"
            )
        with tqdm(total=announced, unit="B", unit_scale=True, unit_divisor=1024, desc=e.name,
                  file=sys.stderr, disable=not progress, leave=False) as bar:  # fmt: skip
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except http.client.IncompleteRead as err:
                    received += len(err.partial)
                    raise WeightsFileError(
                        url, f"truncated transfer: received {received} of {announced} bytes; "
                        "nothing was kept",
                    ) from None  # fmt: skip
                except (OSError, http.client.HTTPException) as err:
                    raise WeightsFileError(
                        url, f"download interrupted after {received} bytes: {err}"
                    ) from None
                if not chunk:
                    break
                sink.write(chunk)
                for h in hashers.values():
                    h.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if announced is not None and received != announced:
        raise WeightsFileError(
            url, f"truncated transfer: received {received} of {announced} bytes; nothing was kept"
        )
    return {"received": received, **{a: h.hexdigest() for a, h in hashers.items()}}


def _check_digest(e: WeightsEntry, digests: dict[str, str], label: str | Path) -> None:
    if e.hash is not None and digests[e.hash_algorithm] != e.hash:
        raise WeightsFileError(
            label, f"{e.hash_algorithm} mismatch for {e.name}: expected {e.hash}, got "
            f"{digests[e.hash_algorithm]}; nothing was kept",
        )  # fmt: skip
    if e.size is not None and digests.get("received", e.size) != e.size:
        raise WeightsFileError(label, f"{digests['received']} bytes, expected {e.size}")


def _check_written(tmp: Path, e: WeightsEntry, label: str | Path) -> None:
    """Structure of a freshly written file (temporary name), reported under ``label``."""
    problem = _cheap_problem(tmp, e)
    if problem:
        raise WeightsFileError(label, f"{problem}; nothing was kept")


def fetch(name: str | WeightsEntry, url: str | None = None, *, force: bool = False,
          progress: bool = True, timeout: float = 60.0) -> Path:  # fmt: skip
    """Download an entry into its cache folder, verify it, and rename it into place atomically.

    The only function of the package that opens a network connection. The download streams
    into a temporary file beside the destination; the size the server announced, the hash
    (or, when not pinned, the file's structure) are checked before the rename. On any failure
    nothing is left in the cache.

    Args:
        name: an entry name (see :data:`ENTRIES`).
        url: another source for the same file (a mirror); default ``entry.url``.
        force: download even when a sound copy is already present.
        progress: a tqdm progress bar on stderr.
        timeout: seconds to wait for the server at each step.

    Returns:
        the path of the verified file (or preset folder) in the cache.

    Raises:
        WeightsFileError: naming the URL or file and the problem (no network, HTTP error,
            truncated transfer, wrong hash with expected and actual values).
    """
    return fetch_report(name, url, force=force, progress=progress, timeout=timeout)["path"]


def fetch_report(name, url=None, *, force=False, progress=True, timeout=60.0) -> dict[str, Any]:
    """:func:`fetch`, returning what the command line prints: ``path``, ``downloaded`` and the
    ``sha256`` got."""
    e = entry(name)
    dest = cache_path(e)
    if not force:
        present = find(e, verify_hash=True)
        if present is not None:
            return {"path": present, "downloaded": False,
                    "sha256": None if e.kind == "folder" else _memo_hash(present, "sha256")}
    source = url or e.url
    if e.kind == "folder":
        return {"path": _fetch_folder(e, source, progress, timeout), "downloaded": True,
                "sha256": None}  # fmt: skip
    with atomic_write(dest, "wb") as sink:
        digests = _download(source, sink, e, progress, timeout)
        _check_digest(e, digests, source)
        sink.flush()
        _check_written(Path(sink.name), e, source)
    return {"path": dest, "downloaded": True, "sha256": digests["sha256"]}


def _fetch_folder(e: WeightsEntry, source: str, progress: bool, timeout: float) -> Path:
    dest = cache_path(e)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _temporary_file(dest) as archive:
        with open(archive, "wb") as sink:
            digests = _download(source, sink, e, progress, timeout)
        _check_digest(e, digests, source)
        _install_archive(archive, e, source)
    return dest


# ---- folders (keras-hub presets) -------------------------------------------------------------


@contextlib.contextmanager
def _temporary_file(dest: Path):
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    os.close(fd)
    try:
        yield Path(name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


@contextlib.contextmanager
def _temporary_dir(dest: Path):
    name = tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        yield Path(name)
    finally:
        shutil.rmtree(name, ignore_errors=True)


def _replace_dir(new: Path, dest: Path) -> None:
    """Move the folder ``new`` onto ``dest``, replacing an old one only once ``new`` is in place."""
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
        os.replace(dest, old / dest.name)
    try:
        os.replace(new, dest)
    except BaseException:
        if old is not None:
            os.replace(old / dest.name, dest)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _preset_root(folder: Path, e: WeightsEntry) -> Path:
    """The folder holding the preset's files: ``folder`` or its single sub-folder."""
    if all((folder / m).is_file() for m in e.members):
        return folder
    children = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if len(children) == 1 and children[0].is_dir():
        return _preset_root(children[0], e)
    return folder


def _install_archive(archive: Path, e: WeightsEntry, label: str | Path) -> None:
    dest = cache_path(e)
    try:
        tar = tarfile.open(archive)
    except (tarfile.TarError, OSError) as err:
        raise WeightsFileError(label, f"not a tar archive: {err}") from None
    with _temporary_dir(dest) as tmp, tar:
        unpack = tmp / "unpacked"
        if hasattr(tarfile, "data_filter"):
            tar.extractall(unpack, filter="data")
        else:  # pragma: no cover - Python without extraction filters
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if not (member.isfile() or member.isdir()) or member.name.startswith("/") or (
                    ".." in parts
                ):
                    raise WeightsFileError(label, f"unsafe archive member {member.name!r}")
            tar.extractall(unpack)  # noqa: S202 - members checked above
        root = _preset_root(unpack, e)
        _install_folder(root, e, label)


def _install_folder(folder: Path, e: WeightsEntry, label: str | Path) -> None:
    missing = [m for m in e.members if not (folder / m).is_file()]
    if missing:
        raise WeightsFileError(label, f"not the {e.name} preset: missing {', '.join(missing)}")
    dest = cache_path(e)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _temporary_dir(dest) as tmp:
        staged = tmp / e.file_name
        shutil.copytree(folder, staged)
        _replace_dir(staged, dest)


# ---- add -----------------------------------------------------------------------------------


def _identify(path: Path) -> WeightsEntry:
    """Which entry a hand-brought file is: by hash, else by file name, else by structure."""
    pinned = [e for e in ENTRIES if e.hash is not None and e.kind == "file"]
    if path.is_file() and pinned:
        digests = _hash_many(path, {e.hash_algorithm for e in pinned})
        for e in pinned:
            if digests[e.hash_algorithm] == e.hash:
                return e
    for e in ENTRIES:
        if path.name == e.file_name:
            return e
    if path.is_file() and path.suffix == ".safetensors":
        for e in ENTRIES:
            if e.is_safetensors and e.tensors:
                with contextlib.suppress(WeightsFileError, OSError):
                    check_safetensors(path, e)
                    return e
    raise WeightsFileError(
        path, "cannot tell which weights this is (no hash, file name or structure matches): "
        f"pass --name, one of {', '.join(e.name for e in ENTRIES)}",
    )  # fmt: skip


def add(path: str | os.PathLike, name: str | None = None) -> Path:
    """Copy a hand-brought weights file into its cache folder, verified, atomically.

    The entry is ``name`` if given, else the one whose hash, file name or (for safetensors)
    tensor layout matches. The copy is hashed while it is written and renamed into place only
    when it matches, so a wrong file leaves nothing behind. For a folder entry, ``path`` is the
    preset folder or its ``.tar.gz`` archive.

    Returns:
        the path in the cache.

    Raises:
        WeightsFileError: naming the file: missing, unidentified, or its hash (expected and
            actual) or structure does not fit.
    """
    return add_report(path, name)["path"]


def add_report(path, name=None) -> dict[str, Any]:
    """:func:`add`, returning what the command line prints (``path``, the entry, its digest)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise WeightsFileError(path, "file not found")
    e = entry(name) if name else _identify(path)
    dest = cache_path(e)
    if e.kind == "folder":
        if path.is_dir():
            _install_folder(_preset_root(path, e), e, path)
        else:
            if e.hash is not None:
                digest = file_hash(path, e.hash_algorithm)
                _check_digest(e, {e.hash_algorithm: digest}, path)
            _install_archive(path, e, path)
        return {"path": dest, "entry": e, "sha256": None}
    if not path.is_file():
        raise WeightsFileError(path, f"not a file ({e.name} is a single file)")
    if dest.exists() and dest.resolve() == path.resolve():
        verify(dest, e)
        return {"path": dest, "entry": e, "sha256": _memo_hash(dest, "sha256")}
    hashers = {a: _hasher(a) for a in {"sha256", e.hash_algorithm}}
    received = 0
    with atomic_write(dest, "wb") as sink, open(path, "rb") as source:
        while chunk := source.read(_CHUNK):
            sink.write(chunk)
            for h in hashers.values():
                h.update(chunk)
            received += len(chunk)
        digests = {"received": received, **{a: h.hexdigest() for a, h in hashers.items()}}
        _check_digest(e, digests, path)
        sink.flush()
        _check_written(Path(sink.name), e, path)
    return {"path": dest, "entry": e, "sha256": digests["sha256"]}
