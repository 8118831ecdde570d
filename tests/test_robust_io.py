"""Defensive reading, fast: every broken or odd NIfTI gives a float32 3D image or one InputError.

Small images only (no app run); the same cases run end to end in test_robust_corpus.py.
"""

from __future__ import annotations

import gzip
import os
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cmb_bidsapp.bids import InputImage
from cmb_bidsapp.errors import InputError
from cmb_bidsapp.io import MAX_VOXELS, load_nifti
from cmb_bidsapp.preproc.steps import check_input

AFF = np.array([[-1.5, 0, 0, 40], [0, 1.5, 0, -50], [0, 0, 3.0, -20], [0, 0, 0, 1]])


def _data(shape=(20, 18, 12)) -> np.ndarray:
    rng = np.random.default_rng(0)
    data = np.zeros(shape, np.float32)
    data[3:-3, 3:-3, 2:-2] = 100 + 10 * rng.random((shape[0] - 6, shape[1] - 6, shape[2] - 4))
    return data


def _raw(data=None, affine=AFF, dtype=np.float32) -> bytes:
    img = nib.Nifti1Image(np.asarray(_data() if data is None else data).astype(dtype), affine)
    img.header.set_data_dtype(dtype)
    return img.to_bytes()


def _write(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def _refused(path, *words):
    with pytest.raises(InputError) as err:
        load_nifti(path)
    text = err.value.format()
    assert str(path) in text and "\n" not in text, text
    for word in words:
        assert word in text, text
    return text


def test_good_image_as_nii_and_gz(tmp_path):
    for name, content in (("a.nii", _raw()), ("a.nii.gz", gzip.compress(_raw()))):
        img = load_nifti(_write(tmp_path, name, content))
        assert img.shape == (20, 18, 12) and img.get_data_dtype() == np.float32
        assert np.array_equal(np.asarray(img.dataobj), _data())
        assert np.allclose(img.affine, AFF)


def test_truncated_and_corrupt(tmp_path):
    packed = gzip.compress(_raw())
    _refused(_write(tmp_path, "t.nii.gz", packed[: len(packed) // 2]), "truncated", "re-export")
    _refused(_write(tmp_path, "t.nii", _raw()[:1000]), "truncated (1000 bytes on disk")
    _refused(_write(tmp_path, "e.nii.gz", b""), "empty (0 bytes)")
    _refused(_write(tmp_path, "h.nii", _raw()[:200]), "too short")


def test_wrong_magic_pair_header_and_garbage(tmp_path):
    raw = bytearray(_raw())
    raw[344:348] = b"abc\x00"
    _refused(_write(tmp_path, "m.nii.gz", gzip.compress(bytes(raw))), "wrong magic")
    raw[344:348] = b"ni1\x00"
    _refused(_write(tmp_path, "p.nii", bytes(raw)), ".hdr/.img pair")
    _refused(_write(tmp_path, "g.nii.gz", os.urandom(2000)), "wrong magic")


def test_sizeof_hdr_corrupt_is_refused_not_misread(tmp_path):
    raw = bytearray(_raw())
    raw[0:4] = (0).to_bytes(4, "little")  # nibabel would guess big-endian and read garbage
    _refused(_write(tmp_path, "s.nii", bytes(raw)), "sizeof_hdr")


def test_compression_that_disagrees_with_the_name_is_read(tmp_path):
    for name, content in (("plain.nii.gz", _raw()), ("packed.nii", gzip.compress(_raw()))):
        notes: list[str] = []
        img = load_nifti(_write(tmp_path, name, content), notes=notes)
        assert np.array_equal(np.asarray(img.dataobj), _data())
        assert len(notes) == 1 and "gzip" in notes[0]


def test_not_a_regular_file_never_hangs(tmp_path):
    fifo = tmp_path / "pipe.nii"
    os.mkfifo(fifo)
    folder = tmp_path / "dir.nii.gz"
    folder.mkdir()
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(
            fifo=pytest.raises(InputError, load_nifti, fifo),
            folder=pytest.raises(InputError, load_nifti, folder),
        ),
        daemon=True,
    )
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "load_nifti blocked on a FIFO"
    assert "pipe" in str(result["fifo"].value) and "folder" in str(result["folder"].value)


def test_broken_symlink_and_annex_pointer(tmp_path):
    link = tmp_path / "l.nii.gz"
    link.symlink_to(tmp_path / ".git" / "annex" / "objects" / "x.nii.gz")
    _refused(link, "broken symbolic link", "datalad get")
    ptr = _write(tmp_path, "p.nii.gz", b"/annex/objects/SHA256E-s1--x.nii.gz\n")
    _refused(ptr, "git-annex pointer", "datalad get")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads chmod-000 files (see the corpus test)")
def test_unreadable(tmp_path):
    path = _write(tmp_path, "u.nii", _raw())
    path.chmod(0)
    _refused(path, "permission denied", "chmod")


def test_complex_rgb_and_huge_headers_refused_before_reading(tmp_path):
    _refused(_write(tmp_path, "c.nii", _raw(_data() * (1 + 1j), dtype=np.complex64)), "complex")
    rgb = np.zeros((4, 4, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    img = nib.Nifti1Image(rgb, AFF)
    _refused(_write(tmp_path, "r.nii", img.to_bytes()), "RGB")
    raw = bytearray(_raw())
    raw[42:48] = np.array([30000, 30000, 30000], dtype="<i2").tobytes()
    text = _refused(_write(tmp_path, "big.nii.gz", gzip.compress(bytes(raw))), "voxels")
    assert f"{MAX_VOXELS:.3g}" in text


def test_dimensions(tmp_path):
    four = np.stack([_data()] * 2, axis=-1)
    path = _write(tmp_path, "4d.nii", _raw(four))
    _refused(path, "3D image is expected")
    assert load_nifti(path, allow_4d=True).shape == (20, 18, 12, 2)
    single = _data()[..., None, None]  # 5D with singleton trailing dimensions
    assert load_nifti(_write(tmp_path, "5d.nii", _raw(single))).shape == (20, 18, 12)
    flat = _data()[:, :, 5]
    assert load_nifti(_write(tmp_path, "2d.nii", _raw(flat))).shape == (20, 18, 1)


def test_scaling_is_applied(tmp_path):
    data = _data()
    img = nib.Nifti1Image(np.round(data * 10).astype(np.int16), AFF)
    img.header.set_slope_inter(0.1, 5.0)
    out = np.asarray(load_nifti(_write(tmp_path, "s.nii", img.to_bytes())).dataobj)
    assert out.dtype == np.float32
    assert np.allclose(out, np.round(data * 10) * 0.1 + 5.0, atol=1e-4)


def test_big_endian_and_nifti2(tmp_path):
    data = _data()
    be = nib.Nifti1Image(data, AFF, header=nib.Nifti1Header().as_byteswapped(">"))
    be_path = _write(tmp_path, "be.nii", be.to_bytes())
    assert be_path.read_bytes()[:4] == (348).to_bytes(4, "big")
    assert np.array_equal(np.asarray(load_nifti(be_path).dataobj), data)
    n2 = nib.Nifti2Image(data, AFF)
    assert np.array_equal(
        np.asarray(load_nifti(_write(tmp_path, "2.nii", n2.to_bytes())).dataobj), data
    )


def test_non_finite_voxels(tmp_path):
    data = _data()
    data[10, 9, 6] = np.nan  # isolated, inside the object
    data[11, 9, 6] = np.inf
    data[0:2, :, :] = np.nan  # a NaN background slab
    notes: list[str] = []
    out = np.asarray(load_nifti(_write(tmp_path, "n.nii", _raw(data)), notes=notes).dataobj)
    assert np.isfinite(out).all()
    assert 100 <= out[10, 9, 6] <= 110 and 100 <= out[11, 9, 6] <= 110  # neighbours' mean
    assert (out[0:2] == 0).all()
    assert len(notes) == 1 and "NaN or infinite" in notes[0]


def test_non_finite_beside_huge_values(tmp_path):
    """Found by the atheris fuzzer: the neighbours' mean overflowed float32 (3e38 × 27)."""
    data = np.full((6, 5, 4), 3.0e38, np.float32)
    data[2, 2, 2] = np.nan
    out = np.asarray(load_nifti(_write(tmp_path, "h.nii", _raw(data))).dataobj)
    assert type(out) is np.ndarray and np.isfinite(out).all() and out[2, 2, 2] == 3.0e38


def test_affine_choices(tmp_path):
    img = nib.Nifti1Image(_data(), AFF)
    moved = AFF.copy()
    moved[0, 3] += 8
    img.header.set_sform(AFF, code=1)
    img.header.set_qform(moved, code=1)
    notes: list[str] = []
    out = load_nifti(_write(tmp_path, "qs.nii", img.to_bytes()), notes=notes)
    assert np.allclose(out.affine, AFF) and "disagree by up to 8.0 mm" in notes[0]

    img = nib.Nifti1Image(_data(), None)
    img.header.set_zooms((1.5, 1.5, 3.0))
    notes = []
    out = load_nifti(_write(tmp_path, "none.nii", img.to_bytes()), notes=notes)
    assert np.allclose(np.abs(np.diag(out.affine))[:3], (1.5, 1.5, 3.0))
    assert "no orientation" in notes[0]

    raw = bytearray(_raw())  # sform code 2, qform code 0: zero the sform's first row
    raw[280:296] = np.zeros(4, "<f4").tobytes()
    _refused(_write(tmp_path, "sing.nii", bytes(raw)), "singular")


def _input(files, kind="t2starw", echo_times=()):
    return InputImage("x", None, kind, [Path(f) for f in files], echo_times=list(echo_times))


def _save(path, data, affine=AFF):
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), affine), str(path))
    return path


def test_check_input_geometry(tmp_path):
    def aff(sizes):
        return np.diag([*sizes, 1.0])

    assert check_input(_input([_save(tmp_path / "ok.nii.gz", _data())])) == []
    for sizes, words in (((0.2,) * 3, "0.4–5 mm"), ((10.0,) * 3, "Resample")):
        with pytest.raises(InputError, match=words):
            check_input(_input([_save(tmp_path / "v.nii.gz", _data(), aff(sizes))]))
    warnings = check_input(_input([_save(tmp_path / "a.nii.gz", _data(), aff((0.4, 0.4, 6.0)))]))
    assert len(warnings) == 1 and "outside the validated" in warnings[0]
    with pytest.raises(InputError, match="fewer than 8 voxels"):
        check_input(_input([_save(tmp_path / "one.nii.gz", _data()[:, :, 5:6])]))
    with pytest.raises(InputError, match="all zeros"):
        check_input(_input([_save(tmp_path / "z.nii.gz", np.zeros((20, 18, 12)))]))
    with pytest.raises(InputError, match="constant image"):
        check_input(_input([_save(tmp_path / "c.nii.gz", np.full((20, 18, 12), 3.0))]))


def test_check_input_megre(tmp_path):
    e1 = _save(tmp_path / "e1.nii.gz", _data())
    e2 = _save(tmp_path / "e2.nii.gz", _data()[:-2])
    with pytest.raises(InputError, match="has shape") as err:
        check_input(_input([e1, e2], "megre", (0.01, 0.02)))
    assert "e2.nii.gz" in str(err.value)
    e2 = _save(tmp_path / "e2.nii.gz", _data() * 0.8)
    with pytest.raises(InputError, match="EchoTime"):
        check_input(_input([e1, e2], "megre", (0.01,)))
    assert check_input(_input([e1, e2], "megre", (0.01, 0.02))) == []


def test_broken_t1w_is_dropped_with_a_warning(tmp_path):
    image = _input([_save(tmp_path / "t2s.nii.gz", _data())])
    image.t1w = _write(tmp_path, "t1w.nii.gz", gzip.compress(_raw())[:100])
    warnings = check_input(image)
    assert image.t1w is None
    assert len(warnings) == 1 and "t1w.nii.gz" in warnings[0] and "not used" in warnings[0]
