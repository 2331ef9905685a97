"""Test helpers that the tests and bench share: checkpoint presets with transformers' reference
results and test images (`reference`), and the hostile-input corpus (`corpus`).

Not imported by the serving path. Like the rest of the package it imports only `llava_triton`
modules (and third-party libraries), never `tests/`, `export/`, `client/` or `bench/`.
"""
