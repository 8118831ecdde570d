"""Progress of a participant run: a line on stderr per stage, a status file, and stage timings."""

from __future__ import annotations

import re
import sys
import threading
import time
from pathlib import Path

from ..io import atomic_write_json, atomic_write_text

_IMAGE_RE = re.compile(r"image_(?P<id>[A-Za-z0-9_]+?)_wf")
SINK_NODE = "ds_outputs"


def image_of(node) -> str | None:
    """The image id of a node, from its place in the graph (`…image_<id>_wf…`)."""
    where = ".".join(filter(None, [getattr(node, "_hierarchy", "") or "", node.name]))
    m = _IMAGE_RE.search(where)
    return m.group("id") if m else None


class Progress:
    """Nipype status callback: counts images done/failed, logs each stage and its duration."""

    def __init__(
        self, log_dir: Path, image_ids: list[str], labels: dict[str, str], *, quiet: bool = False
    ):
        self.log_dir = Path(log_dir)
        self.total = len(image_ids)
        self.labels = labels
        self.done: set[str] = set()
        self.failed: set[str] = set()
        self.current: dict[str, str] = {}
        self.started: dict[tuple[str, str], float] = {}
        self.timings: list[tuple[str, str, float]] = []
        self.t0 = time.monotonic()
        self.quiet = quiet
        self._lock = threading.Lock()
        self.write_status()

    def __call__(self, node, status: str) -> None:
        image = image_of(node)
        stage = node.name
        key = (image or "-", f"{getattr(node, '_hierarchy', '')}.{stage}")
        with self._lock:
            if status == "start":
                self.started[key] = time.monotonic()
                if image:
                    self.current[image] = stage
                    self._say(f"{self.labels.get(image, image)}: {stage}")
            else:
                t = self.started.pop(key, None)
                if t is not None:
                    self.timings.append(
                        (self.labels.get(image, image or "-"), stage, time.monotonic() - t)
                    )
                if status == "exception" and image:
                    self.failed.add(image)
                    self._say(f"{self.labels.get(image, image)}: FAILED at {stage}")
                elif status == "end" and image and stage == SINK_NODE:
                    self.done.add(image)
                    self.current.pop(image, None)
                    self._say(f"{self.labels.get(image, image)}: done")
            self.write_status()

    def _say(self, text: str) -> None:
        if self.quiet:
            return
        elapsed = time.monotonic() - self.t0
        done = len(self.done)
        print(f"[{done}/{self.total} images, {elapsed:6.1f} s] {text}", file=sys.stderr, flush=True)

    def write_status(self, final: bool = False) -> None:
        status = {
            "images_total": self.total,
            "images_done": len(self.done),
            "images_failed": len(self.failed),
            "current": sorted(self.labels.get(i, i) for i in self.current),
            "current_stage": {self.labels.get(i, i): s for i, s in sorted(self.current.items())},
            "elapsed_s": round(time.monotonic() - self.t0, 1),
            "finished": final,
        }
        atomic_write_json(self.log_dir / "status.json", status)

    def write_timings(self) -> Path:
        lines = ["image\tstage\tseconds"] + [f"{i}\t{s}\t{d:.2f}" for i, s, d in self.timings]
        return atomic_write_text(self.log_dir / "timings.tsv", "\n".join(lines) + "\n")
