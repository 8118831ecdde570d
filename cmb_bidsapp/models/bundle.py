"""Model bundles: a folder of weights, architecture, operating points and model card; load and save.

Layout of a bundle folder
    ``detector.pt``, ``teacher.pt``, ``student.pt``
        PyTorch state dicts (float32), loaded with ``weights_only=True``.
    ``student_nokd.pt`` (optional)
        The same student trained without distillation (α = 0): kept only to measure the KD gain.
    ``bundle.json``
        ``format`` (1), ``name``, ``version``, ``created``, the architectures (``networks``: widths,
        patch size), the working grid (``grid``: voxel mm, margin mm), the preprocessing
        (``preprocessing``: normalisation, FRST radii in mm), ``t_det`` (detector threshold),
        ``default_threshold`` (student score), ``inference`` (window, overlap, candidate size
        bounds), ``kd`` (T, α), ``versions`` (package, torch, numpy) and ``files``: the sha256 of
        every weight file.
    ``thresholds.tsv``
        Student-score threshold → lesion-wise sensitivity, FP per subject, precision, F1 on the
        validation subjects.
    ``model_card.json``, ``model_card.md``
        Training data (simulated), exact command, seed, validation metrics, KD gain, limits.

``load_bundle`` checks every weight file against its sha256 in ``bundle.json`` and refuses a
bundle that does not match (a truncated download, an edited file). The bundle's identity in
output sidecars is ``Bundle.sha256``: the sha256 of ``bundle.json``, which itself lists the
sha256 of every weight file.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..detect.frst import DEFAULT_RADII_MM
from ..errors import InputError
from ..io import atomic_write_bytes, atomic_write_json, atomic_write_text
from . import networks

BUNDLE_FORMAT = 1
WEIGHT_FILES: tuple[str, ...] = ("detector.pt", "teacher.pt", "student.pt")
OPTIONAL_WEIGHT_FILES: tuple[str, ...] = ("student_nokd.pt",)


def default_bundle_path() -> Path:
    """The bundle shipped in the package (``cmb_bidsapp/data/models/default``)."""
    return Path(str(resources.files("cmb_bidsapp") / "data" / "models" / "default"))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is a user error."""
    if isinstance(device, torch.device):
        return device
    device = str(device).lower()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(
            "--device cuda was asked for but no CUDA GPU is available to PyTorch",
            fix="Use --device cpu (or auto), or install a CUDA build of PyTorch.",
        )
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise InputError(f"unknown device {device!r}", fix="Use auto, cpu or cuda.")
    return torch.device(device)


@dataclass
class Bundle:
    """A loaded bundle: the networks (eval mode, on ``device``) and the bundle's settings."""

    path: Path
    meta: dict[str, Any]
    detector: nn.Module
    student: nn.Module
    device: torch.device
    sha256: str
    teacher: nn.Module | None = None
    student_nokd: nn.Module | None = None
    thresholds: list[dict[str, float]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.meta.get("name", self.path.name))

    @property
    def version(self) -> str:
        return str(self.meta.get("version", "0"))

    @property
    def t_det(self) -> float:
        return float(self.meta["t_det"])

    @property
    def default_threshold(self) -> float:
        return float(self.meta["default_threshold"])

    @property
    def frst_grid(self) -> str:
        """``working`` (the FRST channel computed on the working grid) or ``source`` (the source
        grid's map resampled; bundles written before this setting existed)."""
        return str(self.meta.get("preprocessing", {}).get("frst_grid", "source"))

    @property
    def frst_radii_mm(self) -> tuple[float, ...]:
        pre = self.meta.get("preprocessing", {})
        return tuple(float(r) for r in pre.get("frst_radii_mm", DEFAULT_RADII_MM))

    @property
    def student_tta(self) -> str:
        """The student's test-time augmentation (``inference.student_tta``; ``none`` in bundles
        written before this setting existed): a key of
        :data:`cmb_bidsapp.models.infer.STUDENT_TTA`."""
        return str(self.meta.get("inference", {}).get("student_tta", "none"))

    @property
    def patch_size(self) -> int:
        return int(self.meta["networks"]["student"].get("patch_size", networks.PATCH_SIZE))

    def sidecar_fields(self) -> dict[str, Any]:
        """What the mask sidecar records about the model."""
        return {
            "ModelName": self.name,
            "ModelVersion": self.version,
            "ModelSHA256": self.sha256,
        }


def _load_state(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location=device, weights_only=True)
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def read_thresholds(path: Path) -> list[dict[str, float]]:
    """Rows of ``thresholds.tsv`` as dicts of floats (``n/a`` → None)."""
    if not path.exists():
        return []
    rows = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            rows.append({k: (None if v in ("n/a", "") else float(v)) for k, v in row.items()})
    return rows


def load_bundle(
    path: str | Path | None = None,
    device: str | torch.device = "auto",
    *,
    load_teacher: bool = False,
    load_ablation: bool = False,
    fuse: bool = True,
) -> Bundle:
    """Load a bundle (the package's default when ``path`` is None), verifying every sha256.

    Returns a :class:`Bundle` with the detector and the student in eval mode on ``device``
    (``auto``: CUDA if available). The teacher (training only) is loaded on request. With
    ``fuse`` (default) BatchNorm is folded into the convolutions of the detector and students
    for speed (:func:`~cmb_bidsapp.models.networks.fuse_batchnorm`); ``fuse=False`` keeps the
    trainable layout (fine-tuning).
    Raises :class:`~cmb_bidsapp.errors.InputError` for a missing, incomplete or altered bundle.
    """
    folder = default_bundle_path() if path is None else Path(path)
    meta_path = folder / "bundle.json"
    if not meta_path.is_file():
        raise InputError(
            "is not a model bundle (no bundle.json)",
            path=folder,
            fix="Point --models-dir at a folder written by cmb-bidsapp-train.",
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(
            f"is not valid JSON ({err.msg})", path=meta_path, fix="Re-write the bundle."
        ) from None
    dev = resolve_device(device)
    wanted = ["detector.pt", "student.pt"]
    if load_teacher:
        wanted.append("teacher.pt")
    if load_ablation and "student_nokd.pt" in meta.get("files", {}):
        wanted.append("student_nokd.pt")
    for name in wanted:
        f = folder / name
        expected = meta.get("files", {}).get(name)
        if not f.is_file():
            raise InputError(
                f"lacks {name}", path=folder, fix="Copy the complete bundle folder, or re-train."
            )
        if expected is None or sha256_file(f) != expected:
            raise InputError(
                f"{name} does not match the sha256 recorded in bundle.json",
                path=folder,
                fix="The file is altered or truncated: copy the bundle again, or re-train it.",
            )
    models: dict[str, nn.Module] = {}
    for name in wanted:
        key = name[:-3]
        arch_key = "student" if key == "student_nokd" else key
        model = networks.build(arch_key, meta["networks"][arch_key])
        model.load_state_dict(_load_state(folder / name, dev))
        if fuse:
            networks.fuse_batchnorm(model)
        models[key] = model.to(dev).eval()
    return Bundle(
        path=folder,
        meta=meta,
        detector=models["detector"],
        student=models["student"],
        teacher=models.get("teacher"),
        student_nokd=models.get("student_nokd"),
        device=dev,
        sha256=sha256_file(meta_path),
        thresholds=read_thresholds(folder / "thresholds.tsv"),
    )


def _state_bytes(model: nn.Module) -> bytes:
    import io

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def save_bundle(
    out_dir: str | Path,
    models: dict[str, nn.Module],
    meta: dict[str, Any],
    *,
    thresholds: list[dict[str, Any]] | None = None,
    card_json: dict[str, Any] | None = None,
    card_md: str | None = None,
) -> Path:
    """Write a bundle folder (module docstring); every file is written atomically.

    ``models`` maps ``detector``, ``teacher``, ``student`` (and optionally ``student_nokd``) to
    the networks. ``meta`` is completed with ``format`` and ``files`` (sha256 of each weight file).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for key, model in models.items():
        name = f"{key}.pt"
        data = _state_bytes(model)
        atomic_write_bytes(out / name, data)
        files[name] = hashlib.sha256(data).hexdigest()
    meta = dict(meta)
    meta["format"] = BUNDLE_FORMAT
    meta["files"] = files
    atomic_write_json(out / "bundle.json", meta)
    if thresholds is not None:
        write_thresholds(out / "thresholds.tsv", thresholds)
    if card_json is not None:
        card_json = dict(card_json)
        card_json.setdefault("sha256", {}).update(files)
        card_json["sha256"]["bundle.json"] = sha256_file(out / "bundle.json")
        atomic_write_json(out / "model_card.json", card_json)
    if card_md is not None:
        atomic_write_text(out / "model_card.md", card_md)
    return out


THRESHOLD_COLUMNS = (
    "threshold",
    "sensitivity",
    "fp_per_subject",
    "precision",
    "f1",
    "tp",
    "fp",
    "fn",
)


def write_thresholds(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write the threshold table as TSV (``n/a`` for undefined ratios)."""

    def fmt(v: Any) -> str:
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return f"{v:.4f}"
        return str(v)

    lines = ["\t".join(THRESHOLD_COLUMNS)]
    for row in rows:
        lines.append("\t".join(fmt(row.get(c)) for c in THRESHOLD_COLUMNS))
    return atomic_write_text(path, "\n".join(lines) + "\n")


def copy_bundle(src: str | Path, dst: str | Path) -> Path:
    """Copy a bundle folder (e.g. the default one, before fine-tuning)."""
    dst = Path(dst)
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst
