"""Tests of offline template look-up: TemplateFlow cache when real, shipped copies otherwise."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import nibabel as nib
import numpy as np
import pytest

from cmb_bidsapp.anatomy import templates


@pytest.fixture
def tf_home(tmp_path, monkeypatch):
    home = tmp_path / "templateflow"
    home.mkdir()
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(home))
    return home


def test_empty_cache_uses_shipped_fallback(tf_home):
    path = templates.template_path()
    assert path == templates.shipped_template("MNI152NLin2009cAsym")
    assert tf_home not in path.parents
    assert path.stat().st_size > 100_000
    img = nib.load(str(path))
    assert img.shape == (193, 229, 193)
    assert list(tf_home.iterdir()) == []  # nothing written into the cache


def test_zero_byte_stub_is_never_returned(tf_home):
    stub = templates.templateflow_file("MNI152NLin2009cAsym", "T1w", "brain", 1)
    stub.parent.mkdir(parents=True)
    stub.write_bytes(b"")
    path = templates.template_path()
    assert path != stub and path.stat().st_size > 0
    # a stub of another file that has no fallback raises, with the fix in the message
    mask_stub = templates.templateflow_file("MNI152NLin2009cAsym", "mask", "brain", 1)
    mask_stub.write_bytes(b"")
    with pytest.raises(templates.TemplateNotFoundError, match="TEMPLATEFLOW_HOME"):
        templates.template_path(suffix="mask")


def test_real_cached_file_is_preferred(tf_home):
    target = templates.templateflow_file("MNI152NLin2009cAsym", "T1w", "brain", 2)
    target.parent.mkdir(parents=True)
    nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)).to_filename(str(target))
    assert templates.template_path(resolution=2) == target
    # and a res-02 request without a cached file has no path fallback
    target.unlink()
    with pytest.raises(templates.TemplateNotFoundError):
        templates.template_path(resolution=2)


def test_mask_and_priors_from_fallbacks(tf_home):
    t1w = templates.load_template()
    mask = np.asanyarray(templates.template_mask().dataobj)
    assert mask.shape == t1w.shape and set(np.unique(mask)) == {0, 1}
    assert 1.4e6 < mask.sum() < 2.2e6  # mm^3: a brain
    priors = templates.tissue_priors()
    total = sum(np.asanyarray(p.dataobj) for p in priors.values())
    inside = mask > 0
    assert np.all(total[~inside] == 0)
    assert np.median(total[inside]) == pytest.approx(1.0, abs=0.05)
    # white matter prior is high in the centrum semiovale (MNI 30, -10, 28), GM in cortex
    ijk = np.rint(np.linalg.inv(t1w.affine) @ [30, -10, 28, 1])[:3].astype(int)
    assert np.asanyarray(priors["WM"].dataobj)[tuple(ijk)] > 0.8


def test_other_resolution_is_resampled(tf_home):
    img = templates.load_template(resolution=2)
    assert np.allclose(np.abs(np.diag(img.affine)[:3]), 2.0)
    assert img.shape == (97, 115, 97)

    # same world position of the brain: centres of mass within 1 mm
    def com(im):
        d = np.asanyarray(im.dataobj)
        ijk = np.array(np.nonzero(d > 0)).mean(1)
        return im.affine[:3, :3] @ ijk + im.affine[:3, 3]

    assert np.linalg.norm(com(img) - com(templates.load_template())) < 1.0


def test_no_network_and_no_templateflow_import(tmp_path):
    code = textwrap.dedent(
        """
        import socket, sys
        def refuse(*a, **k):
            raise RuntimeError("network access attempted")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse
        from cmb_bidsapp.anatomy import templates
        templates.template_path()
        templates.template_mask()
        templates.tissue_priors()
        import os
        assert os.environ["TEMPLATEFLOW_AUTOUPDATE"] == "0"
        assert "templateflow" not in sys.modules, "templateflow imported"
        print("ok")
        """
    )
    env = {
        "TEMPLATEFLOW_HOME": str(tmp_path / "tf"),
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
    }
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
    assert not (tmp_path / "tf").exists()
