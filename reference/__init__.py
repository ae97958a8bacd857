"""Slow, obviously right PyTorch for every op of API.md: token-by-token recurrences and per-expert loops.

Every function computes in float64 whatever its inputs, returns outputs in the dtype API.md names,
and returns recurrent states in float64 when the inputs are float64 (float32 otherwise), so that a
float64 run of the reference is the yardstick of every parity test.
"""
