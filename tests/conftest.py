"""Shared fixtures: the embedded default checkpoint, an exported model repository, a real server."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BUILD = ROOT / "build"


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Path:
    """The embedded default checkpoint, built once (reused across runs by its preset stamp)."""
    from llava_triton.checkpoint import build_checkpoint

    return build_checkpoint("tiny", BUILD / "tiny-llava")
