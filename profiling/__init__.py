"""Explaining where a kernel's time goes, with or without a GPU.

- `python -m profiling.static`: every GPU kernel of the lab compiled for sm_90 without a GPU (Triton AOT_SPECS,
  kernellab/cuda/*.cu through nvcc, numba.cuda AOT_SPECS): registers, shared memory, spills, stack, occupancy on an
  H100/H200 SM and the tensor-core instructions in the SASS -> reports/static/kernels.{csv,md}.
- `python -m profiling.trace --op OP --backend NAME [--shape k=v ...] [--device cpu|cuda]`: a torch.profiler
  Chrome trace and the top operators / kernels by time; on a GPU also the matching `ncu` command line.
- `python -m profiling.roofline --csv reports/<device>/results.csv`: achieved FLOP/s against operational
  intensity for every backend of a sweep, under the measured ceilings -> reports/<device>/roofline.png.
The one GPU run that ties parity, sweeps and these plots together is `python -m bench.gpu_check`.
"""
