"""Shared fixtures. Real test assets live in ../shared/data next to the repo; tests skip cleanly without them."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real Alpaca / src-tgt files and tokenizers; skip (with the reason) when the checkout has no ../shared."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test assets not found at {SHARED_DATA} (clone with ../shared beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def qwen(shared_data: Path) -> str:
    """The shared Qwen2.5 tokenizer directory, as the pack tests pass it to `--tokenizer`."""
    return str(shared_data / "tokenizers" / "qwen2_5")
