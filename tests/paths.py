"""Paths the tests read: the repository, this folder, the bundled samples and ../shared/data."""

from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SAMPLES = REPO / "sample_data"
# ../shared/data next to the repository (read-only real tokenizers, templates and data; see its SOURCES.md).
SHARED_DATA = REPO.parent / "shared" / "data"
