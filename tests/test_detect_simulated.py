"""The numerical chain on a simulated MEGRE subject: echoes, N4, normalisation, FRST, candidates."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from cmb_bidsapp.detect.candidates import DEFAULT_THRESHOLD, candidate_probability, label_candidates
from cmb_bidsapp.detect.frst import frst
from cmb_bidsapp.detect.lesions import lesion_table
from cmb_bidsapp.evaluation import score_pair
from cmb_bidsapp.preproc.bias import n4_correct
from cmb_bidsapp.preproc.brain import has_skull
from cmb_bidsapp.preproc.echoes import combine_echoes
from cmb_bidsapp.preproc.normalise import lesion_bright


def _array(img):
    # In-memory int16 images carry scl_slope in the header only: round-trip through bytes.
    img = img.__class__.from_bytes(img.to_bytes())
    return np.asarray(img.get_fdata(dtype=np.float32)), img.affine


@pytest.fixture(scope="module")
def subject():
    synth = pytest.importorskip("cmb_bidsapp.synth.subject")
    s = synth.simulate_subject(1, "megre", size="small", skull=True, n_microbleeds=20)
    names = sorted(
        (k for k in s.images if "part-mag" in k),
        key=lambda k: int(k.split("echo-")[1].split("_")[0]),
    )
    mags, affine = zip(*(_array(s.images[k]) for k in names))
    return {
        "mags": list(mags),
        "echo_times": list(s.echo_times),
        "affine": affine[0],
        "brain": np.asarray(s.brain_mask.dataobj) > 0,
        "ref": np.asarray(s.reference_mask.dataobj) > 0,
    }


def test_skull_detection_on_simulated_head(subject):
    img = combine_echoes(subject["mags"], subject["echo_times"])
    assert has_skull(img, subject["affine"])
    assert not has_skull(np.where(subject["brain"], img, 0), subject["affine"])


def test_t2star_combination_gives_more_lesion_contrast_than_rms(subject):
    lab, n = ndi.label(subject["ref"], np.ones((3, 3, 3)))
    assert n >= 5

    def cnr(img):
        out = []
        for i in range(1, n + 1):
            les = lab == i
            shell = ndi.binary_dilation(les, iterations=4) & ~ndi.binary_dilation(les, iterations=2)
            shell &= subject["brain"] & (lab == 0)
            bg = img[shell]
            out.append((np.median(bg) - img[les].mean()) / (bg.std() + 1e-9))
        return np.median(out)

    mags, tes = subject["mags"], subject["echo_times"]
    assert cnr(combine_echoes(mags, tes, method="t2star")) > cnr(
        combine_echoes(mags, tes, method="rms")
    )


def test_candidates_find_simulated_microbleeds(subject):
    affine, brain = subject["affine"], subject["brain"]
    vs = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    img = combine_echoes(subject["mags"], subject["echo_times"])
    corrected, bias = n4_correct(img, brain, affine)
    assert np.isfinite(corrected).all()
    bright = lesion_bright(corrected, brain, "megre")
    fmap = frst(bright, vs, mask=brain)
    prob = candidate_probability(bright, fmap, brain, vs)
    labels, n = label_candidates(prob, DEFAULT_THRESHOLD, vs)
    score = score_pair(labels > 0, subject["ref"], affine)
    assert score.sensitivity >= 0.8, score.to_dict()
    assert score.fp <= 30, score.to_dict()
    table = lesion_table(labels, affine, prob)
    assert len(table) == n and (table["probability"] >= DEFAULT_THRESHOLD).all()
