"""Container and CI recipes: singularity.def sections, and the CircleCI jobs and their order."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CIRCLECI = ROOT / ".circleci" / "config.yml"
SINGULARITY = ROOT / "singularity.def"


# --------------------------------------------------------------------------- singularity.def


def def_sections(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """Header keys (Bootstrap, From) and `%section` bodies of an Apptainer definition file."""
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^%(\w+)\s*$", line)
        if m:
            current = m.group(1)
            assert current not in sections, f"section %{current} appears twice"
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
        elif re.match(r"^\w+:", line):
            key, _, value = line.partition(":")
            header[key.strip()] = value.strip()
    return header, {k: "\n".join(v).strip() for k, v in sections.items()}


def test_singularity_def_builds_from_the_docker_image():
    header, _ = def_sections(SINGULARITY.read_text())
    assert header["Bootstrap"] in ("docker-daemon", "docker")
    assert header["From"].split("/")[-1].startswith("cmb-bidsapp")


def test_singularity_def_sections():
    _, sections = def_sections(SINGULARITY.read_text())
    assert {"labels", "environment", "runscript", "test", "help"} <= set(sections)
    runscript = [
        ln.strip() for ln in sections["runscript"].splitlines() if not ln.strip().startswith("#")
    ]
    assert runscript == ['exec cmb-bidsapp "$@"']
    test = sections["test"]
    assert "cmb-bidsapp --version" in test and "cmb-bidsapp --help" in test
    assert "set -e" in test
    assert "TEMPLATEFLOW_HOME=/opt/templateflow" in sections["environment"]
    assert "TEMPLATEFLOW_AUTOUPDATE=0" in sections["environment"]
    assert "org.opencontainers.image.source" in sections["labels"]
    assert re.search(r"apptainer run --cleanenv -B /data:/data -B /out:/out", sections["help"])


def test_section_parser_can_fail():
    with pytest.raises(AssertionError):
        def_sections("Bootstrap: docker\nFrom: x\n%runscript\nexec a\n%runscript\nexec b\n")
    _, sections = def_sections("Bootstrap: docker\nFrom: x\n%runscript\n  exec other\n")
    assert "test" not in sections


# --------------------------------------------------------------------------- CircleCI

JOBS = {
    "make-test",
    "build",
    "test-image",
    "participant-group",
    "validate-outputs",
    "rerun-resume",
    "deploy",
}


def _config() -> dict:
    return yaml.safe_load(CIRCLECI.read_text())


def _workflow(config: dict) -> dict[str, dict]:
    (workflow,) = [w for k, w in config["workflows"].items() if k != "version"]
    out = {}
    for entry in workflow["jobs"]:
        name, settings = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
        out[name] = settings or {}
    return out


def _ancestors(flow: dict[str, dict], job: str) -> set[str]:
    seen: set[str] = set()
    todo = list(flow[job].get("requires", []))
    while todo:
        j = todo.pop()
        if j not in seen:
            seen.add(j)
            todo += flow[j].get("requires", [])
    return seen


def _commands(config: dict, job: str) -> str:
    steps = config["jobs"][job]["steps"]
    text = []
    for step in steps:
        if isinstance(step, dict) and "run" in step:
            run = step["run"]
            text.append(run["command"] if isinstance(run, dict) else run)
        elif isinstance(step, str) and step in config.get("commands", {}):
            text.append(yaml.safe_dump(config["commands"][step]))
        elif isinstance(step, dict):
            name = next(iter(step))
            if name in config.get("commands", {}):
                text.append(yaml.safe_dump(config["commands"][name]))
    return "\n".join(text)


def test_circleci_jobs_exist_and_are_all_in_the_workflow():
    config = _config()
    assert config["version"] == 2.1
    assert set(config["jobs"]) == JOBS
    assert set(_workflow(config)) == JOBS


def test_circleci_order():
    flow = _workflow(_config())
    assert not flow["build"].get("requires") and not flow["make-test"].get("requires")
    assert flow["test-image"]["requires"] == ["build"]
    assert flow["participant-group"]["requires"] == ["build"]
    assert flow["validate-outputs"]["requires"] == ["participant-group"]
    assert flow["rerun-resume"]["requires"] == ["participant-group"]
    # deploy waits for every check
    assert _ancestors(flow, "deploy") == JOBS - {"deploy"}


def test_circleci_deploy_runs_on_tags_only_and_its_chain_runs_on_tags():
    flow = _workflow(_config())
    deploy = flow["deploy"]
    assert deploy["filters"]["branches"]["ignore"] == "/.*/"
    tag_re = deploy["filters"]["tags"]["only"].strip("/")
    assert re.match(tag_re, "v1.2.3") and re.match(tag_re, "0.4.0")
    assert not re.match(tag_re, "nightly")
    assert deploy.get("context"), "registry credentials come from a context"
    # CircleCI runs nothing on a tag unless every job in the chain has a tag filter
    for job in _ancestors(flow, "deploy"):
        assert flow[job].get("filters", {}).get("tags", {}).get("only") == "/.*/", job


def test_circleci_jobs_do_what_they_say():
    config = _config()
    build = _commands(config, "build")
    assert "docker buildx build" in build and "--cache-from" in build and "--cache-to" in build
    assert any(
        isinstance(s, dict)
        and "save_cache" in s
        and "/tmp/buildx-cache" in s["save_cache"]["paths"]
        for s in config["jobs"]["build"]["steps"]
    )
    assert "pytest" in _commands(config, "test-image")
    assert "./.ci/run" in _commands(config, "make-test")

    e2e = _commands(config, "participant-group")
    assert "cmb-bidsapp-synth" in e2e
    runs = [c for c in re.split(r"\n(?=\s*docker run)", e2e) if "docker run" in c]
    assert runs and all("--network none" in c for c in runs)
    assert all('-u "$(id -u):$(id -g)"' in c for c in runs), "runs as a non-root user"
    part = e2e.index(" participant ")
    group = e2e.index(" group")
    assert part < group, "participant runs before group"

    assert "bids-validator-deno" in _commands(config, "validate-outputs")
    rerun = _commands(config, "rerun-resume")
    assert "-w /work" in rerun and "sha256sum -c" in rerun
    deploy = _commands(config, "deploy")
    assert "docker push" in deploy and "--password-stdin" in deploy and "CIRCLE_TAG" in deploy


def test_circleci_order_check_can_fail():
    config = _config()
    flow = _workflow(config)
    flow["deploy"]["requires"] = ["build"]
    assert _ancestors(flow, "deploy") != JOBS - {"deploy"}


def test_circleci_rerun_repeats_the_participant_command_exactly():
    """Resume means the same command: other options (e.g. threads) may change the outputs."""
    config = _config()
    pattern = r"cmb-bidsapp:ci (/data /out participant[^\n]*)"
    first = re.findall(pattern, _commands(config, "participant-group"))
    again = re.findall(pattern, _commands(config, "rerun-resume"))
    assert len(first) == 1 and again == first
    assert "-w /work" in first[0]
