"""Build configuration: the CUDA compiler must match the CUDA version torch was built with, and a
mismatch is one clear CMake message (cmake/RlhfCuda.cmake, called by CMakeLists.txt)."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CMAKE = shutil.which("cmake", path=os.path.dirname(sys.executable)) or shutil.which("cmake")


def check(tmp_path, nvcc, torch_cuda):
    script = tmp_path / "check.cmake"
    script.write_text(
        f'include("{ROOT}/cmake/RlhfCuda.cmake")\nrlhf_check_cuda_version("{nvcc}" "{torch_cuda}")\n'
        'message(STATUS "accepted")\n'
    )
    return subprocess.run([CMAKE, "-P", str(script)], capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(CMAKE is None, reason="cmake not found")
@pytest.mark.parametrize(
    "nvcc, torch_cuda, accepted, message",
    [
        ("13.0.88", "13.0", True, ""),
        ("12.9.41", "13.0", False, "nvcc is CUDA 12.9 but torch was built with CUDA 13.0: point CUDACXX at a "
                                   "CUDA 13.x nvcc, or build the CPU ops only with -C cmake.define.RLHF_CUDA=OFF"),
        ("13.2.10", "13.0", True, "nvcc is CUDA 13.2, torch's is 13.0"),  # same major: a warning
        ("garbage", "13.0", False, "cannot read CUDA versions"),
    ],
)
def test_nvcc_must_match_torchs_cuda(tmp_path, nvcc, torch_cuda, accepted, message):
    out = check(tmp_path, nvcc, torch_cuda)
    assert (out.returncode == 0) == accepted, out.stderr
    assert ("accepted" in out.stdout) == accepted
    assert message in " ".join(out.stderr.split()), out.stderr


def test_cmakelists_checks_the_version_before_building_cuda():
    text = open(os.path.join(ROOT, "CMakeLists.txt")).read()
    enable = text.index("enable_language(CUDA)")
    call = text.index('rlhf_check_cuda_version("${CMAKE_CUDA_COMPILER_VERSION}" "${TORCH_CUDA_VERSION}")')
    assert enable < call < text.index("set(RLHF_WITH_CUDA ON)")
