"""Datasets: pairing (scan), decoding (io), mask conventions (masks), checks; torch parts in dataset/transforms."""
