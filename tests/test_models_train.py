"""Training: subject-wise split, a smoke run that learns, bundle save/reload/predict, resume."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from cmb_bidsapp.errors import InputError
from cmb_bidsapp.models import networks
from cmb_bidsapp.models.bundle import load_bundle, sha256_file
from cmb_bidsapp.models.data import prepare, raw_from_toy, split_by_subject
from cmb_bidsapp.models.infer import detect
from cmb_bidsapp.models.losses import segmentation_loss
from cmb_bidsapp.models.sampling import detector_pools
from cmb_bidsapp.models.train import Context, TrainSettings, detector_batch, fit


def test_split_by_subject_never_shares_a_subject():
    items = []
    kinds = ["swi", "t2starw", "megre", "qsm"]
    for s in range(23):
        for ses in range(1 + s % 3):  # 1-3 sessions per subject
            items.append(
                {"key": f"sub-{s:02d}_ses-{ses}", "subject": f"{s:02d}", "kind": kinds[s % 4]}
            )
    for seed in range(5):
        train, val = split_by_subject(items, 0.25, seed)
        subj = {it["key"]: it["subject"] for it in items}
        ts, vs = {subj[k] for k in train}, {subj[k] for k in val}
        assert not ts & vs
        assert sorted(train + val) == sorted(it["key"] for it in items)
        assert len(vs) == round(0.25 * 23)
        # every kind is validated
        assert {items[[i["key"] for i in items].index(k)]["kind"] for k in val} == set(kinds)
    assert split_by_subject(items, 0.25, 1) == split_by_subject(items, 0.25, 1)
    with pytest.raises(ValueError):
        split_by_subject(items[:1], 0.5, 0)


@pytest.fixture(scope="module")
def toy_cohort():
    subs = [prepare(raw_from_toy(i), keep_source=i >= 5) for i in range(7)]
    return subs[:5], subs[5:]


def test_detector_loss_decreases(toy_cohort, tmp_path):
    train, _ = toy_cohort
    torch.manual_seed(0)
    model = networks.UNet3D((4, 8, 16))
    pools = [
        detector_pools(p.ref, p.brain, p.image[1], p.mimics_vox, i) for i, p in enumerate(train)
    ]
    x, y = detector_batch(train, pools, 6, 24, np.random.default_rng(0), augmented=False)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    with torch.no_grad():
        first = float(segmentation_loss(model(xt), yt))
    for _ in range(40):
        opt.zero_grad()
        loss = segmentation_loss(model(xt), yt)
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.8 * first


def test_fit_checkpoints_and_resume(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    cur = {"m": model}
    ctx = Context(TrainSettings(seed=1, patience=10, progress=False), tmp_path, torch.device("cpu"))
    target = torch.tensor([[1.0, -1.0]])

    def step(rng):
        x = torch.from_numpy(rng.normal(size=(8, 3)).astype(np.float32))
        loss = ((cur["m"](x) - target) ** 2).mean()
        opt = cur["m"]._optimizer
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss)

    crash = {"at": None, "calls": 0}

    def validate():
        crash["calls"] += 1
        if crash["at"] is not None and crash["calls"] == crash["at"]:
            raise KeyboardInterrupt  # killed during epoch 3, after epoch 2's checkpoint
        with torch.no_grad():
            return float(((cur["m"](torch.ones(1, 3)) - target) ** 2).mean()), {}

    st = fit(ctx, "lin", 9, model, step, validate, max_epochs=3, iters=5)
    assert st["epoch"] == 3 and (tmp_path / "checkpoints" / "lin.pt").exists()
    full = {k: v.clone() for k, v in model.state_dict().items()}
    # Interrupt during epoch 3, then resume: the same weights as the uninterrupted run.
    shutil.rmtree(tmp_path / "checkpoints")
    torch.manual_seed(0)
    model = cur["m"] = torch.nn.Linear(3, 2)
    crash.update(at=3, calls=0)
    with pytest.raises(KeyboardInterrupt):
        fit(ctx, "lin", 9, model, step, validate, max_epochs=3, iters=5)
    crash["at"] = None
    model2 = cur["m"] = torch.nn.Linear(3, 2)
    ctx.resume = True
    st2 = fit(ctx, "lin", 9, model2, step, validate, max_epochs=3, iters=5)
    assert st2["epoch"] == 3
    for k in full:
        assert torch.allclose(full[k], model2.state_dict()[k])


def test_cli_smoke_bundle_saves_reloads_predicts(tmp_path, capsys):
    from cmb_bidsapp.cli.train import run

    out = tmp_path / "bundle"
    code = run(
        [
            str(out),
            "--simulate",
            "6",
            "--toy",
            "-w",
            str(tmp_path / "w"),
            "--epochs",
            "1",
            "--iters",
            "2",
            "--no-progress",
            "--device",
            "cpu",
            "--seed",
            "3",
        ]
    )
    assert code == 0
    for f in (
        "detector.pt",
        "teacher.pt",
        "student.pt",
        "bundle.json",
        "model_card.json",
        "model_card.md",
        "thresholds.tsv",
    ):
        assert (out / f).is_file(), f
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["files"]["student.pt"] == sha256_file(out / "student.pt")
    card = json.loads((out / "model_card.json").read_text())
    assert "SIMULATED" in (out / "model_card.md").read_text()
    assert card["training_command"].startswith("cmb-bidsapp-train")
    assert (
        card["training_data"]["training_images"] + card["training_data"]["validation_images"] == 6
    )
    b = load_bundle(out, "cpu")
    assert 0 < b.t_det < 1 and 0 < b.default_threshold < 1
    raw = raw_from_toy(11)
    from cmb_bidsapp.models.data import preprocess

    lb, fr = preprocess(raw.image, raw.affine, raw.brain, "swi")
    res = detect(lb, fr, raw.brain, raw.affine, b, t_det=0.01, threshold=0.0)
    assert res.probseg.shape == raw.image.shape and res.probseg.dtype == np.float32
    assert res.labels.max() == res.n_lesions == len(res.scores)
    assert meta["inference"]["student_tta"] == "flip8"
    # --resume with every stage finished: no training and no harvest of training candidates;
    # the same weights re-bundled with another test-time setting, the candidate counts kept.
    capsys.readouterr()
    out2 = tmp_path / "bundle2"
    args = [str(out2), "--simulate", "6", "--toy", "-w", str(tmp_path / "w"), "--epochs", "1"]
    args += ["--iters", "2", "--no-progress", "--device", "cpu", "--seed", "3", "--resume"]
    assert run([*args, "--student-tta", "none"]) == 0
    log = "".join(capsys.readouterr())
    assert "[harvest]" not in log and "resumed" in log
    meta2 = json.loads((out2 / "bundle.json").read_text())
    assert meta2["inference"]["student_tta"] == "none"
    assert meta2["files"]["student.pt"] == meta["files"]["student.pt"]
    card2 = json.loads((out2 / "model_card.json").read_text())
    assert card2["training_candidates"] == card["training_candidates"] is not None
    # An altered weight file is refused.
    with open(out / "student.pt", "ab") as fh:
        fh.write(b"0")
    with pytest.raises(InputError, match="sha256"):
        load_bundle(out, "cpu")
