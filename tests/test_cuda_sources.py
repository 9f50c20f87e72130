"""The CUDA C++ sources (csrc/<op>/cuda.cu) compile with a bare ``nvcc -c`` (no torch), for sm_80 and
sm_90, whenever nvcc is installed, so a syntax error cannot land even on machines without a GPU.

Also checks the rule that lets this work: the kernels (cuda.cu, and the local headers they include:
the op's cuda.h, csrc/common/cuda_launch.h and cuda_device.cuh) include no torch / ATen / c10 /
pybind11 header. Skipped where nvcc is not found (PATH,
$CUDA_HOME/bin, /usr/local/cuda/bin). All compiles start together in the background when the
module's first nvcc test asks for them, one nvcc per (file, architecture).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CU_FILES = sorted(CSRC.glob("*/cuda.cu"))
LAUNCH_HEADERS = [CSRC / "common" / "cuda_launch.h", *sorted(CSRC.glob("*/cuda.h"))]
# The local headers a kernel may pull in: its own op's cuda.h and these shared ones.
SHARED_CUDA_HEADERS = {CSRC / "common" / "cuda_launch.h", CSRC / "common" / "cuda_device.cuh"}
ARCHS = ("sm_80", "sm_90")
# The flags torch.utils.cpp_extension gives nvcc: the kernels must not rely on implicit
# half/bfloat16 operators or conversions.
TORCH_NVCC_DEFINES = ("-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__")
FORBIDDEN_INCLUDE = re.compile(r"^(torch|ATen|c10|caffe2|pybind11)/|^Python\.h$|^torch\.h$")
INCLUDE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]', re.M)
COMPILE_TIMEOUT_S = 300


def find_nvcc() -> str | None:
    candidates = [shutil.which("nvcc")]
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


NVCC = find_nvcc()


def test_there_are_cuda_sources():
    assert CU_FILES, f"no csrc/<op>/cuda.cu files under {CSRC}"
    for cu in CU_FILES:  # each op's kernels, launcher header and binding side by side
        assert (cu.parent / "cuda.h").is_file() and (cu.parent / "cuda_binding.cpp").is_file(), cu.parent


def local_includes(path: Path, seen: set[Path] | None = None) -> dict[Path, list[str]]:
    """``{file: [its includes]}`` for ``path`` and every local ("...") header it pulls in."""
    seen = set() if seen is None else seen
    if path in seen:
        return {}
    seen.add(path)
    found = INCLUDE.findall(path.read_text())
    result = {path: [name for _, name in found]}
    for kind, name in found:
        if kind == '"':
            header = (path.parent / name).resolve()
            assert header.is_file(), f"{path.name} includes missing local header {name!r}"
            result.update(local_includes(header, seen))
    return result


def _rel(p: Path) -> str:
    return str(p.relative_to(CSRC))


@pytest.mark.parametrize("source", [*CU_FILES, *LAUNCH_HEADERS], ids=_rel)
def test_kernels_include_no_torch_header(source):
    allowed = SHARED_CUDA_HEADERS | {source, source.parent / "cuda.h"}
    for path, includes in local_includes(source).items():
        bad = [name for name in includes if FORBIDDEN_INCLUDE.search(name)]
        assert not bad, f"{_rel(path)} includes {bad}: CUDA kernels may include only CUDA headers"
        assert path in allowed, f"{_rel(source)} pulls in {_rel(path)}, not its op's CUDA headers"


# ----------------------------------------------------------------------------- nvcc -c


def nvcc_command(source: Path, arch: str, out_dir: Path) -> list[str]:
    return [NVCC, "-c", "-std=c++17", "-O1", f"-arch={arch}", *TORCH_NVCC_DEFINES, str(source),
            "-o", str(out_dir / f"{source.parent.name}.{arch}.o")]


def compile_one(source: Path, arch: str, out_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(nvcc_command(source, arch, out_dir), capture_output=True, text=True,
                          timeout=COMPILE_TIMEOUT_S)


JOBS = [(src, arch) for src in CU_FILES for arch in ARCHS]
JOB_IDS = [f"{s.parent.name}-{a}" for s, a in JOBS]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Every (file, arch) compile started at once on a small pool, largest files first."""
    if NVCC is None:
        pytest.skip("nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
    out_dir = tmp_path_factory.mktemp("nvcc")
    pool = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)))
    order = sorted(JOBS, key=lambda job: -job[0].stat().st_size)
    futures = {job: pool.submit(compile_one, *job, out_dir) for job in order}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("source,arch", JOBS, ids=JOB_IDS)
def test_cu_compiles_with_nvcc(compiled, source, arch):
    result = compiled[(source, arch)].result()
    assert result.returncode == 0, (
        f"nvcc failed on {_rel(source)} for {arch}:\n{' '.join(nvcc_command(source, arch, Path('OUT')))}\n"
        f"{result.stderr}{result.stdout}")


@pytest.mark.parametrize("header", LAUNCH_HEADERS, ids=_rel)
def test_launchers_header_compiles_without_nvcc(header):
    """The launcher headers are what the torch bindings include: a plain host compiler takes them."""
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if NVCC is None or cxx is None:
        pytest.skip("needs nvcc's CUDA headers and a host C++ compiler")
    roots = [os.environ.get("CUDA_HOME"), str(Path(NVCC).resolve().parents[1]), "/usr/local/cuda"]
    include = next((Path(r) / "include" for r in roots if r and (Path(r) / "include" / "cuda_runtime.h").is_file()),
                   None)
    if include is None:
        pytest.skip("CUDA headers not found next to nvcc")
    result = subprocess.run([cxx, "-std=c++17", "-fsyntax-only", "-x", "c++", f"-I{include}",
                             str(header)], capture_output=True, text=True,
                            timeout=COMPILE_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
