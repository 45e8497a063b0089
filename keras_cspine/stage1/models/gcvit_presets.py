"""GCViT presets, apart from the layers (as keras-hub keeps ``*_presets.py``; Figure 2, Section 2.5).

- :data:`GCVIT_VARIANTS`: the architecture of each published variant (timm ``gcvit_*`` /
  NVlabs GCViT), used by :func:`keras_cspine.stage1.models.gcvit.build_gcvit`;
- :data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`: the data settings their ImageNet weights expect
  (0-1 pixels, then mean/std), kept apart from the architecture as timm does;
- :data:`TIMM_RELEASE_FILES`: the file names of timm's original release of the weights, one of
  the names :func:`keras_cspine.stage1.models.weights.imagenet_candidates` looks for.
"""

from __future__ import annotations

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Architecture settings of the published variants (timm ``gcvit_*`` / NVlabs GCViT).
GCVIT_VARIANTS: dict[str, dict] = {
    "gcvit_xxtiny": dict(embed_dim=64, depths=(2, 2, 6, 2), num_heads=(2, 4, 8, 16), mlp_ratio=3.0),
    "gcvit_xtiny": dict(embed_dim=64, depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3.0),
    "gcvit_tiny": dict(embed_dim=64, depths=(3, 4, 19, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3.0),
    "gcvit_small": dict(
        embed_dim=96, depths=(3, 4, 19, 5), num_heads=(3, 6, 12, 24), mlp_ratio=2.0,
        layer_scale=1e-5,
    ),
    "gcvit_base": dict(
        embed_dim=128, depths=(3, 4, 19, 5), num_heads=(4, 8, 16, 32), mlp_ratio=2.0,
        layer_scale=1e-5,
    ),
}


#: File names of timm's original release of each variant (github.com/rwightman/pytorch-image-models
#: releases, tag v0.1-weights-morevit).
TIMM_RELEASE_FILES = {
    "gcvit_xxtiny": "gcvit_xxtiny_224_nvidia-d1d86009.pth",
    "gcvit_xtiny": "gcvit_xtiny_224_nvidia-274b92b7.pth",
    "gcvit_tiny": "gcvit_tiny_224_nvidia-ac783954.pth",
    "gcvit_small": "gcvit_small_224_nvidia-4e98afa2.pth",
    "gcvit_base": "gcvit_base_224_nvidia-f009139b.pth",
}
