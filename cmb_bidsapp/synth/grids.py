"""Voxel grids sharing one orientation, and the linear operators between them.

Every grid of one simulated subject (coarse background-field grid, mid anatomy grid, fine
susceptibility grid, acquired grid) has the same rotation: its axes are the acquisition's
read, phase and slice directions. A grid is ``origin + R @ (index * spacing)`` in scanner mm,
so moving between grids is separable, axis by axis:

* :func:`resample_aligned`: linear interpolation (anatomy, fields);
* :func:`truncate_axis`: k-space truncation of a complex signal (what a 3D encoding does);
  the DFT convention puts fine sample 0 and acquired sample 0 at the same place, and the
  fine field of view equals the acquired one (``n_fine * fine_spacing = n_acq * acq_spacing``);
* :func:`slice_average`: through-slice integration of a 2D multi-slice acquisition (slice
  profile: a box of ``n_sub`` fine planes, repeated every ``n_pitch`` planes; the rest is gap).

:func:`truncation_matrix` and :func:`slice_matrix` give the same operators as small dense
matrices between index ranges, used to reduce a local patch exactly (reference masks).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Grid:
    """A 3D voxel grid: voxel (0, 0, 0) centre at `origin` (scanner mm), axes = columns of `rotation`."""

    origin: np.ndarray
    rotation: np.ndarray
    spacing: np.ndarray
    shape: tuple[int, int, int]

    @property
    def affine(self) -> np.ndarray:
        """4x4 voxel-to-scanner matrix (mm)."""
        aff = np.eye(4)
        aff[:3, :3] = self.rotation * self.spacing[None, :]
        aff[:3, 3] = self.origin
        return aff

    @property
    def fov(self) -> np.ndarray:
        """Field of view along each axis (mm): shape * spacing."""
        return np.asarray(self.shape) * self.spacing

    def to_voxel(self, points: np.ndarray) -> np.ndarray:
        """Scanner mm (n, 3) to continuous voxel indices (n, 3)."""
        return ((np.asarray(points, float) - self.origin) @ self.rotation) / self.spacing

    def to_world(self, ijk: np.ndarray) -> np.ndarray:
        """Continuous voxel indices (n, 3) to scanner mm (n, 3)."""
        return self.origin + (np.asarray(ijk, float) * self.spacing) @ self.rotation.T

    def axis_positions(self, axis: int) -> np.ndarray:
        """Positions of the voxel centres along `axis` (mm, in the grid frame, origin at 0)."""
        return np.arange(self.shape[axis]) * self.spacing[axis]

    def world_points(self, dtype=torch.float32) -> torch.Tensor:
        """Scanner mm of every voxel centre, shape (*shape, 3) (memory: 12 bytes per voxel)."""
        axes = [
            torch.arange(n, dtype=torch.float64) * float(s)
            for n, s in zip(self.shape, self.spacing)
        ]
        rot = torch.as_tensor(self.rotation, dtype=torch.float64)
        out = torch.empty((*self.shape, 3), dtype=dtype)
        for c in range(3):
            val = float(self.origin[c])
            out[..., c] = (
                val
                + axes[0][:, None, None] * rot[c, 0]
                + axes[1][None, :, None] * rot[c, 1]
                + axes[2][None, None, :] * rot[c, 2]
            ).to(dtype)
        return out


def b0_direction(grid: Grid) -> np.ndarray:
    """Unit vector of B0 (scanner z) in the grid's axis frame."""
    return grid.rotation.T @ np.array([0.0, 0.0, 1.0])


def _lerp_axis(x: np.ndarray, q: np.ndarray, axis: int) -> np.ndarray:
    n = x.shape[axis]
    q = np.clip(q, 0.0, n - 1.0)
    if n == 1:
        return np.take(x, np.zeros(len(q), np.int64), axis=axis)
    i0 = np.minimum(np.floor(q).astype(np.int64), n - 2)
    shape = [1] * x.ndim
    shape[axis] = -1
    w = (q - i0).astype(np.float32).reshape(shape)
    a = np.take(x, i0, axis=axis)
    b = np.take(x, i0 + 1, axis=axis)
    b -= a
    b *= w
    a += b
    return a


def resample_aligned(x: torch.Tensor, src: Grid, dst: Grid) -> torch.Tensor:
    """Linear interpolation of real `x` (on `src`, any leading dims) onto `dst` (same rotation).

    Outside `src` the border value is repeated.
    """
    offset = (dst.origin - src.origin) @ src.rotation  # mm along src axes
    if (
        np.allclose(offset, 0, atol=1e-6)
        and np.allclose(src.spacing, 2 * dst.spacing, rtol=1e-9)
        and all(d in (2 * n - 1, 2 * n) for d, n in zip(dst.shape, src.shape))
        and x.ndim == 3
    ):
        return upsample2(x, dst.shape)
    lead = x.ndim - 3
    order = np.argsort(np.asarray(dst.shape) / np.asarray(src.shape))  # shrink first
    out = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    out = out.astype(np.float32, copy=False)
    for axis in order:
        pos = (offset[axis] + dst.axis_positions(axis)) / src.spacing[axis]
        if out.shape[lead + axis] == dst.shape[axis] and np.allclose(pos, np.arange(len(pos))):
            continue
        out = _lerp_axis(out, pos, lead + axis)
    return torch.from_numpy(np.ascontiguousarray(out))


def upsample2(
    x: torch.Tensor, shape: tuple[int, int, int], contiguous: bool = True
) -> torch.Tensor:
    """Linear upsampling by 2 with coinciding sample 0 (fine sample 2i = coarse sample i).

    One border sample is appended along each axis, then torch's multithreaded trilinear
    interpolation with ``align_corners=True`` to 2(n+1) − 1 samples maps output j to input
    j / 2 exactly; the result is cropped to `shape` (each at most 2n), a copy unless
    `contiguous` is False (then a view).
    """
    t = torch.as_tensor(x, dtype=torch.float32)
    t = torch.nn.functional.pad(t[None, None], (0, 1, 0, 1, 0, 1), mode="replicate")
    size = tuple(2 * n - 1 for n in t.shape[2:])
    up = torch.nn.functional.interpolate(t, size=size, mode="trilinear", align_corners=True)[0, 0]
    up = up[: shape[0], : shape[1], : shape[2]]
    return up.contiguous() if contiguous else up


def truncate_axis(
    x: torch.Tensor, dim: int, n_out: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Keep the central `n_out` k-space samples of `x` along `dim` (complex in, complex out).

    Values are scaled so that a constant is preserved. Sample 0 stays at the same place.
    `out` (optional) receives the result.
    """
    n_in = x.shape[dim]
    if n_out == n_in:
        if out is not None:
            out.copy_(x)
            return out
        return x
    k = torch.fft.fft(x, dim=dim)
    keep_pos = (n_out + 1) // 2
    keep_neg = n_out // 2
    shape = list(k.shape)
    shape[dim] = n_out
    kept = torch.empty(shape, dtype=k.dtype)
    kept.narrow(dim, 0, keep_pos).copy_(k.narrow(dim, 0, keep_pos))
    if keep_neg:
        kept.narrow(dim, keep_pos, keep_neg).copy_(k.narrow(dim, n_in - keep_neg, keep_neg))
    del k
    if out is None:
        out = torch.fft.ifft(kept, dim=dim)
    else:
        torch.fft.ifft(kept, dim=dim, out=out)
    out.mul_(n_out / n_in)
    return out


def slice_average(
    x: torch.Tensor, dim: int, n_slices: int, n_pitch: int, n_sub: int
) -> torch.Tensor:
    """2D multi-slice integration: slice s = mean of fine planes [s*n_pitch, s*n_pitch + n_sub)."""
    x = x.narrow(dim, 0, n_slices * n_pitch)
    x = x.unflatten(dim, (n_slices, n_pitch)).narrow(dim + 1, 0, n_sub)
    return x.mean(dim=dim + 1)


def truncation_matrix(n_fine: int, n_acq: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Rows `rows` (acquired indices) x columns `cols` (fine indices) of the truncation operator."""
    keep_pos = (n_acq + 1) // 2
    keep_neg = n_acq // 2
    freqs = np.concatenate([np.arange(keep_pos), -np.arange(keep_neg, 0, -1)])
    phase = (
        np.asarray(rows, float)[:, None, None] / n_acq
        - np.asarray(cols, float)[None, :, None] / n_fine
    ) * freqs[None, None, :]
    return np.exp(2j * np.pi * phase).sum(axis=2) / n_fine


def slice_matrix(n_pitch: int, n_sub: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Rows `rows` (slices) x columns `cols` (fine planes) of the 2D slice-integration operator."""
    rows = np.asarray(rows)[:, None]
    cols = np.asarray(cols)[None, :]
    inside = (cols >= rows * n_pitch) & (cols < rows * n_pitch + n_sub)
    return inside.astype(float) / n_sub


def fast_size(n: int) -> int:
    """Smallest integer >= n whose prime factors are 2, 3 and 5 (fast FFT sizes)."""
    n = max(int(n), 1)
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1
