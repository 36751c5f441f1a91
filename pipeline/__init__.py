"""The knn-diffusion pipeline: stages, their runner and the `knnd` command line."""
from pipeline.openblas import prefer_cpu_kernels

prefer_cpu_kernels()  # before any stage imports faiss: its bundled OpenBLAS reads the choice when it loads
