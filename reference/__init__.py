"""Slow, obviously right PyTorch for every op of API.md: token-by-token recurrences and per-expert loops.

Every function computes in float64 whatever its inputs, returns outputs in the dtype API.md names,
and returns recurrent states in float64 when the inputs are float64 (float32 otherwise), so that a
float64 run of the reference is the yardstick of every parity test.

One file per op family: reference/<family>.py defines each op of that family of kernellab/ops.py under the op's
name, and the registry declares it as the op's `reference` backend (differentiated by torch's autograd: the
gradients' yardstick). It imports kernellab's records and checks only, never a backend (pyproject.toml's import
contracts). How close a backend must come to it: bench/check.py.
"""
