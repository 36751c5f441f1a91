"""pipeline.openblas: faiss's bundled OpenBLAS gets the CPU's own kernels, unless the user chose."""
import os
import subprocess
import sys

import pytest

from pipeline.openblas import ENV, cpu_flags, kernel_for, prefer_cpu_kernels

AVX512 = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}


@pytest.mark.parametrize("flags, kernel", [
    (AVX512 | {"avx2", "fma", "sse3"}, "SkylakeX"),
    ({"avx2", "fma", "avx", "sse3"}, "Haswell"),
    ({"avx512f", "avx2", "fma"}, "Haswell"),  # AVX-512 foundation alone: not SkylakeX's instruction set
    ({"avx", "sse3"}, None),  # no AVX2: OpenBLAS's own detection stands
    (set(), None),  # no flags known (not Linux x86)
])
def test_kernel_for_flags(flags, kernel):
    assert kernel_for(frozenset(flags)) == kernel


def test_sets_the_kernel_when_unset():
    environ = {}
    assert prefer_cpu_kernels(environ, frozenset(AVX512)) == "SkylakeX"
    assert environ == {ENV: "SkylakeX"}


def test_keeps_what_the_user_set():
    environ = {ENV: "Haswell"}
    assert prefer_cpu_kernels(environ, frozenset(AVX512)) == "Haswell"
    assert environ == {ENV: "Haswell"}


def test_leaves_it_unset_without_avx2():
    environ = {}
    assert prefer_cpu_kernels(environ, frozenset({"sse3"})) is None
    assert environ == {}


def test_cpu_flags_reads_the_first_processor(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse3 avx2 fma\n\n"
                    "processor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(str(info)) == frozenset({"fpu", "sse3", "avx2", "fma"})
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_faiss_loads_the_chosen_kernel():
    """In a fresh process, importing pipeline before faiss hands faiss's OpenBLAS the kernel for this
    CPU: OPENBLAS_VERBOSE=2 makes each OpenBLAS library print the core it runs on as it loads."""
    wanted = kernel_for(cpu_flags())
    if wanted is None:
        pytest.skip("this CPU has no AVX2: OpenBLAS keeps its own choice")
    env = {k: v for k, v in os.environ.items() if k != ENV} | {"OPENBLAS_VERBOSE": "2"}
    code = "import pipeline, faiss, os; print(os.environ['OPENBLAS_CORETYPE'])"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == wanted
    cores = [line.split(":", 1)[1].strip() for line in (done.stdout + done.stderr).splitlines() if line.startswith("Core:")]
    assert cores and set(cores) == {wanted}, cores


def test_ray_workers_inherit_the_kernel(ray_local):
    """The stages' faiss runs in Ray workers: they start from the driver's environment, set on import."""
    import ray

    @ray.remote(num_cpus=1)
    def kernel():
        import faiss  # noqa: F401  what a stage's task would load

        return os.environ.get(ENV)

    assert ray.get(kernel.remote()) == os.environ.get(ENV)
    if kernel_for(cpu_flags()) is not None:
        assert os.environ.get(ENV) is not None
