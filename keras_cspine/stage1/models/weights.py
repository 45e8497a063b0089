"""Loading timm GCViT weights into the Keras GCViT (paper Section 2.5: pre-trained GCViT-tiny).

The paper fine-tunes a pre-trained GCViT-tiny. The published (ImageNet) weights are NVIDIA's,
converted to timm's layout (``gcvit_tiny.in1k``); this module ports a timm state dict onto
:class:`keras_cspine.stage1.models.gcvit.GCViT` exactly (the tests check features and logits to 1e-4).

Licence: NVIDIA's GCViT ImageNet weights are released under CC-BY-NC-SA-4.0 (non-commercial,
share-alike), unlike this code (Apache-2.0). A warning says so whenever weights are loaded.

Nothing is ever downloaded. ``weights="imagenet"`` looks for a local file in
``$KERAS_CSPINE_WEIGHTS`` (if set), ``~/.cache/keras_cspine/`` and the Hugging Face hub cache,
under the names listed by :func:`imagenet_candidates`; a missing file raises
:class:`WeightsFileError` telling where to put it.

File formats: ``.safetensors`` is read with ``safetensors.numpy`` (no torch needed, the
recommended format). ``.pth`` / ``.pt`` / ``.bin`` need torch: if torch is already imported in
this process it is used directly; otherwise the file is converted in a subprocess, because
importing torch after TensorFlow crashes the process.

Layout differences handled here (timm -> ours):
- timm puts each downsample at the start of stages 1..3; here it ends levels 0..2;
- timm's SE and pointwise convs are 1x1 convs, ours Dense layers; conv kernels go from
  ``(O, I, kh, kw)`` to ``(kh, kw, I, O)``, depthwise ``(C, 1, 3, 3)`` to ``(3, 3, C, 1)``;
- linear weights are transposed; ``relative_position_index`` buffers are recomputed, not loaded.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from keras_cspine.errors import CSpineDataError
from keras_cspine.stage1.models.gcvit_presets import GCVIT_VARIANTS, TIMM_RELEASE_FILES

logger = logging.getLogger(__name__)

LICENSE_NOTICE = (
    "GCViT ImageNet weights by NVIDIA are licensed CC-BY-NC-SA-4.0 "
    "(https://creativecommons.org/licenses/by-nc-sa/4.0/): non-commercial use, share alike; "
    "models fine-tuned from them inherit these terms"
)

_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class WeightsFileError(CSpineDataError):
    """A weights file that is missing, unreadable or does not fit the model."""


# ----------------------------------------------------------------------------------------------
# Finding and reading files
# ----------------------------------------------------------------------------------------------


def weights_cache_dirs() -> list[Path]:
    """Folders searched for ``weights="imagenet"``, in order."""
    dirs = []
    if os.environ.get("KERAS_CSPINE_WEIGHTS"):
        dirs.append(Path(os.environ["KERAS_CSPINE_WEIGHTS"]).expanduser())
    dirs.append(Path("~/.cache/keras_cspine").expanduser())
    return dirs


def imagenet_candidates(variant: str) -> list[Path]:
    """Every local path where the ImageNet weights of ``variant`` may be, in search order."""
    names = [
        f"{variant}.in1k.safetensors",
        f"{variant}.safetensors",
        f"{variant}.in1k/model.safetensors",
        f"{variant}/model.safetensors",
        f"{variant}.in1k.pth",
        f"{variant}.pth",
    ]
    if variant in TIMM_RELEASE_FILES:
        names.append(TIMM_RELEASE_FILES[variant])
    paths = [d / n for d in weights_cache_dirs() for n in names]
    hub = Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"
    paths.extend(sorted((hub / f"models--timm--{variant}.in1k").glob("snapshots/*/model.safetensors")))
    return paths


def resolve_weights(weights: str | os.PathLike, variant: str | None) -> Path:
    """Turn ``weights`` (a path, or ``"imagenet"``) into an existing local file.

    Raises:
        WeightsFileError: the file does not exist; for ``"imagenet"`` the message lists the
            places searched and where to put a file (nothing is downloaded).
    """
    if str(weights) == "imagenet":
        if variant is None:
            raise WeightsFileError(None, "weights='imagenet' needs a known GCViT variant")
        candidates = imagenet_candidates(variant)
        for path in candidates:
            if path.is_file():
                return path
        where = weights_cache_dirs()[0]
        raise WeightsFileError(
            where,
            f"no local ImageNet weights for {variant} (nothing is downloaded on its own). Get "
            f"them with `keras-cspine weights fetch {variant}`, or bring timm's {variant}.in1k "
            f"model.safetensors and run `keras-cspine weights add FILE --name {variant}`. "
            f"Searched: " + ", ".join(str(p) for p in candidates[:6])
            + f" ... {LICENSE_NOTICE}.",
        )
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsFileError(path, "weights file not found")
    return path


def _unwrap(state: dict, path) -> dict:
    for key in ("state_dict_ema", "state_dict", "model_ema", "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    out = {}
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key
        out[key] = value
    if not out:
        raise WeightsFileError(path, "the file holds no tensors")
    return out


_PTH_CONVERTER = r"""
import sys
import numpy as np
import torch
state = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
for key in ("state_dict_ema", "state_dict", "model_ema", "model"):
    if isinstance(state, dict) and isinstance(state.get(key), dict):
        state = state[key]
        break
arrays = {k: v.detach().float().numpy() for k, v in state.items() if torch.is_tensor(v)}
np.savez(sys.argv[2], **arrays)
"""


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a timm/torch state dict as float32 NumPy arrays, without importing torch after TF.

    ``.safetensors`` goes through ``safetensors.numpy``; torch formats use torch in this process
    only when torch was imported first, else a subprocess converts them.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.numpy import load_file

            state = load_file(str(path))
        elif suffix in _TORCH_SUFFIXES or suffix == ".npz":
            if suffix == ".npz":
                with np.load(path) as data:
                    state = {k: data[k] for k in data.files}
            elif "torch" in sys.modules:
                import torch

                raw = torch.load(str(path), map_location="cpu", weights_only=True)
                raw = _unwrap(raw, path) if isinstance(raw, dict) else raw
                state = {
                    k: v.detach().float().numpy() for k, v in raw.items() if torch.is_tensor(v)
                }
            else:
                state = _read_torch_file_in_subprocess(path)
        else:
            raise WeightsFileError(
                path, f"unknown weights format {suffix!r}: use .safetensors, .pth, .pt or .bin"
            )
    except WeightsFileError:
        raise
    except Exception as err:  # corrupt file, wrong format: say which file
        raise WeightsFileError(path, f"cannot read weights: {type(err).__name__}: {err}") from err
    return {k: np.asarray(v, dtype="float32") for k, v in _unwrap(state, path).items()}


def _read_torch_file_in_subprocess(path: Path) -> dict[str, np.ndarray]:
    with tempfile.TemporaryDirectory(prefix="keras_cspine_weights_") as tmp:
        out = Path(tmp) / "state.npz"
        proc = subprocess.run(
            [sys.executable, "-c", _PTH_CONVERTER, str(path), str(out)],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise WeightsFileError(
                path,
                "cannot read torch weights (needs torch; convert to .safetensors to avoid it): "
                + " | ".join(tail),
            )
        with np.load(out) as data:
            return {k: data[k] for k in data.files}


# ----------------------------------------------------------------------------------------------
# Porting
# ----------------------------------------------------------------------------------------------


def _linear(w):
    return w.T


def _conv(w):
    return w.transpose(2, 3, 1, 0)


def _depthwise(w):
    return w.transpose(2, 3, 0, 1)


def _pointwise(w):
    return w[:, :, 0, 0].T


def _same(w):
    return w


def _norm(prefix, layer):
    return [(f"{prefix}.weight", layer.gamma, _same), (f"{prefix}.bias", layer.beta, _same)]


def _mbconv(prefix, layer):
    return [
        (f"{prefix}.conv_dw.weight", layer.conv_dw.kernel, _depthwise),
        (f"{prefix}.se.fc1.weight", layer.se.fc1.kernel, _pointwise),
        (f"{prefix}.se.fc2.weight", layer.se.fc2.kernel, _pointwise),
        (f"{prefix}.conv_pw.weight", layer.conv_pw.kernel, _pointwise),
    ]


def _reduce(prefix, layer):
    return [
        *_norm(f"{prefix}.norm1", layer.norm1),
        *_mbconv(f"{prefix}.conv_block", layer.conv),
        (f"{prefix}.reduction.weight", layer.reduction.kernel, _conv),
        *_norm(f"{prefix}.norm2", layer.norm2),
    ]


def _dense(prefix, layer):
    out = [(f"{prefix}.weight", layer.kernel, _linear)]
    if layer.use_bias:
        out.append((f"{prefix}.bias", layer.bias, _same))
    return out


def _block(prefix, block):
    out = [
        *_norm(f"{prefix}.norm1", block.norm1),
        (
            f"{prefix}.attn.rel_pos.relative_position_bias_table",
            block.attn.relative_position_bias_table, _same,
        ),
        *_dense(f"{prefix}.attn.qkv", block.attn.qkv),
        *_dense(f"{prefix}.attn.proj", block.attn.proj),
        *_norm(f"{prefix}.norm2", block.norm2),
        *_dense(f"{prefix}.mlp.fc1", block.fc1),
        *_dense(f"{prefix}.mlp.fc2", block.fc2),
    ]
    if block.layer_scale is not None:
        out += [(f"{prefix}.ls1.gamma", block.gamma1, _same),
                (f"{prefix}.ls2.gamma", block.gamma2, _same)]
    return out


def timm_gcvit_mapping(model) -> list[tuple[str, object, object]]:
    """``(timm key, Keras variable, transform)`` for every weight of a :class:`GCViT`."""
    patch = model.get_layer("patch_embed")
    entries = [
        ("stem.conv1.weight", patch.proj.kernel, _conv),
        ("stem.conv1.bias", patch.proj.bias, _same),
        *_reduce("stem.down", patch.conv_down),
    ]
    num_levels = len(model.depths)
    for i in range(num_levels):
        level = model.get_layer(f"levels_{i}")
        for j, conv in enumerate(level.q_global_gen.convs):
            entries += _mbconv(f"stages.{i}.global_block.blocks.conv{j + 1}", conv)
        for b, block in enumerate(level.blocks):
            entries += _block(f"stages.{i}.blocks.{b}", block)
        if level.reduce is not None:
            entries += _reduce(f"stages.{i + 1}.downsample", level.reduce)
    entries += _norm(f"stages.{num_levels - 1}.norm", model.get_layer("norm"))
    if model.include_top:
        entries += _dense("head.fc", model.get_layer("head"))
    return entries


def port_timm_state_dict(model, state_dict: dict[str, np.ndarray], source="<state dict>") -> dict:
    """Copy a timm GCViT state dict into ``model`` (a :class:`GCViT`), checking every tensor.

    The classifier head is loaded only when the model has one of the same shape (otherwise it
    keeps its fresh initialisation); every other timm tensor must be used and every Keras
    weight filled.

    Returns:
        ``{"loaded": n_tensors, "skipped": [timm keys not loaded]}``.

    Raises:
        WeightsFileError: missing or unexpected keys, or a shape that does not fit (e.g. weights of
            a different variant or of a different window size / image size).
    """
    if any(k.startswith(("levels.", "patch_embed.")) for k in state_dict):
        raise WeightsFileError(
            source, "this is an NVlabs-layout checkpoint; use timm's converted gcvit_*.in1k weights"
        )
    entries = timm_gcvit_mapping(model)
    skipped = []
    missing = [key for key, _, _ in entries if key not in state_dict]
    if model.include_top and "head.fc.weight" in missing:
        missing = [k for k in missing if not k.startswith("head.")]
    if missing:
        raise WeightsFileError(
            source, f"{len(missing)} weights missing for {model.name}, e.g. {missing[:4]}"
        )
    used = {key for key, _, _ in entries}
    ignorable = ("relative_position_index", "head.")
    unexpected = [k for k in state_dict if k not in used and not any(s in k for s in ignorable)]
    if unexpected:
        raise WeightsFileError(
            source,
            f"{len(unexpected)} tensors do not belong to {model.name} (another variant?), "
            f"e.g. {unexpected[:4]}",
        )
    updates = []
    for key, variable, transform in entries:
        if key not in state_dict:
            skipped.append(key)
            continue
        value = transform(state_dict[key])
        if tuple(value.shape) != tuple(variable.shape):
            if key.startswith("head."):
                skipped.append(key)
                continue
            hint = (
                " (the window size differs: build the model at the weights' image size, 224)"
                if "relative_position_bias_table" in key else ""
            )
            raise WeightsFileError(
                source,
                f"{key}: shape {tuple(state_dict[key].shape)} does not fit {variable.path} "
                f"{tuple(variable.shape)}{hint}",
            )
        updates.append((variable, value))
    for variable, value in updates:
        variable.assign(value.astype(variable.dtype))
    skipped += [k for k in state_dict if k.startswith("head.") and k not in used]
    return {"loaded": len(updates), "skipped": sorted(set(skipped))}


def _infer_variant(model) -> str | None:
    if getattr(model, "variant", None):
        return model.variant
    for name, cfg in GCVIT_VARIANTS.items():
        if (
            cfg["embed_dim"] == model.embed_dim
            and tuple(cfg["depths"]) == tuple(model.depths)
            and tuple(cfg["num_heads"]) == tuple(model.num_heads)
        ):
            return name
    return None


def load_gcvit_weights(model, weights: str | os.PathLike, variant: str | None = None) -> dict:
    """Load timm GCViT weights (a path, or ``"imagenet"`` from the local cache) into ``model``.

    Logs NVIDIA's CC-BY-NC-SA-4.0 licence notice. Returns the report of
    :func:`port_timm_state_dict`.
    """
    variant = variant or _infer_variant(model)
    path = resolve_weights(weights, variant)
    logger.warning("Loading GCViT weights from %s. %s.", path, LICENSE_NOTICE)
    report = port_timm_state_dict(model, read_state_dict(path), source=path)
    if report["skipped"]:
        logger.info("%s: not loaded (head of another size): %s", path, report["skipped"])
    return report
