"""What each diversity / prior-following number is, decided by the extractor that produced its features.

Kinds (written into every metrics record as ``diversity_kind`` / ``fid_kind``, and into plot axes):

* ``diversity_kind``: ``dreamsim`` (DreamSim embeddings), ``clip-features`` (the fallback: CLIP image features) or
  ``pixel-features`` (the weight-free fallback: downsampled pixels);
* ``fid_kind``: ``inception-fid`` (Inception-v3 with the FID weights and graph: FID), ``inception-torchvision-fid``
  (Inception-v3 with torchvision's ImageNet weights: an FID whose values are not comparable with published FIDs),
  ``clip-frechet`` (the fallback: Frechet distance of CLIP image features, not FID) or ``pixel-frechet`` (the
  weight-free fallback: Frechet distance of downsampled pixels).

The value keys are the same for every kind (``diversity_pairwise_distance``, ``diversity_feature_variance``,
``frechet_distance``): no key is named after DreamSim or FID, so a fallback value never sits under the real
metric's name; the kind next to it says what it is.
"""

from __future__ import annotations

from fastnabla.eval.extractor import ImageFeatureExtractor

DIVERSITY_KINDS = {"dreamsim": "dreamsim", "clip": "clip-features", "pixels": "pixel-features"}
FID_KINDS = {"inception-fid": "inception-fid", "inception-torchvision": "inception-torchvision-fid",
             "clip": "clip-frechet", "pixels": "pixel-frechet"}
DIVERSITY_LABELS = {
    "dreamsim": "diversity: mean pairwise DreamSim distance",
    "clip-features": "diversity: mean pairwise cosine distance of CLIP image features (fallback, not DreamSim)",
    "pixel-features": "diversity: mean pairwise cosine distance of 16x16 pixels (weight-free fallback, not DreamSim)",
}
FID_LABELS = {
    "inception-fid": "FID to the pretrained model (per prompt, Inception-v3 FID weights)",
    "inception-torchvision-fid": "FID to the pretrained model (per prompt, torchvision Inception-v3 weights; "
    "not comparable with published FIDs)",
    "clip-frechet": "Frechet distance of CLIP image features to the pretrained model (fallback, not FID)",
    "pixel-frechet": "Frechet distance of 16x16 pixels to the pretrained model (weight-free fallback, not FID)",
}
SHORT_LABELS = {
    "dreamsim": "DreamSim diversity",
    "clip-features": "CLIP-feature diversity (not DreamSim)",
    "inception-fid": "FID",
    "inception-torchvision-fid": "FID (torchvision Inception)",
    "clip-frechet": "CLIP-feature Frechet distance (not FID)",
    "pixel-features": "pixel-space diversity (not DreamSim)",
    "pixel-frechet": "pixel-space Frechet distance (not FID)",
}


def diversity_kind(extractor: ImageFeatureExtractor) -> str:
    """``dreamsim``, ``clip-features`` or ``pixel-features`` for the extractor of the diversity metric."""
    if extractor.kind not in DIVERSITY_KINDS:
        raise ValueError(f"no diversity metric is defined on {extractor.kind!r} features; use DreamSim, CLIP or "
                         "pixels")
    return DIVERSITY_KINDS[extractor.kind]


def fid_kind(extractor: ImageFeatureExtractor) -> str:
    """``inception-fid``, ``inception-torchvision-fid``, ``clip-frechet`` or ``pixel-frechet`` for the prior-following
    extractor."""
    if extractor.kind not in FID_KINDS:
        raise ValueError(f"no prior-following metric is defined on {extractor.kind!r} features; use Inception, CLIP "
                         "or pixels")
    return FID_KINDS[extractor.kind]
