"""Mutation fuzzing of the readers on small real files: whatever the bytes, ``read_image`` returns an
image or raises a DomainSRError; any other exception is a reader bug."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file

from domainsr.errors import DomainSRError
from domainsr.image import MultiResolutionImage, SpatialImage
from domainsr.io import read_image

FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# One mutation: ("flip", position fraction, xor mask) | ("truncate", keep fraction, _) |
# ("insert", position fraction, bytes) | ("overwrite", position fraction, bytes).
_frac = st.floats(0.0, 1.0, allow_nan=False)
MUTATION = st.one_of(
    st.tuples(st.just("flip"), _frac, st.integers(1, 255)),
    st.tuples(st.just("truncate"), _frac, st.just(0)),
    st.tuples(st.just("insert"), _frac, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("overwrite"), _frac, st.binary(min_size=1, max_size=16)),
)
MUTATIONS = st.lists(MUTATION, min_size=1, max_size=4)


def mutate(raw: bytes, mutations: list, head: int) -> bytes:
    """Apply ``mutations``; positions favour the first ``head`` bytes (headers, tags) half the time."""
    buf = bytearray(raw)
    for n, (op, frac, arg) in enumerate(mutations):
        span = min(head, len(buf)) if n % 2 == 0 else len(buf)
        pos = min(int(frac * span), max(len(buf) - 1, 0))
        if op == "flip" and buf:
            buf[pos] ^= arg
        elif op == "truncate":
            del buf[int(frac * len(buf)):]
        elif op == "insert":
            buf[pos:pos] = arg
        elif op == "overwrite":
            buf[pos:pos + len(arg)] = arg
    return bytes(buf)


def check_read(path: Path) -> None:
    try:
        img = read_image(path)
    except DomainSRError as exc:
        assert path.name in str(exc), f"error does not name the file: {exc}"
        return
    assert isinstance(img, (SpatialImage, MultiResolutionImage))
    if isinstance(img, SpatialImage):
        assert img.data.ndim == img.spatial_dims + 1
        assert np.asarray(img.data).size > 0


@pytest.fixture(scope="module")
def dicom_file(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("real") / "CT_small.dcm"
    shutil.copyfile(get_testdata_file("CT_small.dcm"), out)
    return out


def _fuzz(src: Path, tmp_path: Path, mutations: list, head: int, tally) -> None:
    path = tmp_path / f"fuzzed{''.join(src.suffixes)}"
    path.write_bytes(mutate(src.read_bytes(), mutations, head))
    tally("bad inputs tried")
    check_read(path)


def test_unmutated_files_read(small_geotiff, small_jp2, small_nifti, small_nifti_gz, dicom_file):
    for path in (small_geotiff, small_jp2, small_nifti, small_nifti_gz, dicom_file):
        assert isinstance(read_image(path), SpatialImage)
    np.testing.assert_array_equal(read_image(small_jp2).data, read_image(small_geotiff).data)


@FUZZ
@given(mutations=MUTATIONS)
def test_fuzz_geotiff(small_geotiff, tmp_path, mutations, tally):
    _fuzz(small_geotiff, tmp_path, mutations, head=512, tally=tally)  # TIFF header + IFD + GeoKeys live up front


@FUZZ
@given(mutations=MUTATIONS)
def test_fuzz_jp2(small_jp2, tmp_path, mutations, tally):
    _fuzz(small_jp2, tmp_path, mutations, head=256, tally=tally)  # JP2 boxes + codestream main header


@FUZZ
@given(mutations=MUTATIONS)
def test_fuzz_nifti(small_nifti, tmp_path, mutations, tally):
    _fuzz(small_nifti, tmp_path, mutations, head=352, tally=tally)


@FUZZ
@given(mutations=MUTATIONS)
def test_fuzz_nifti_gz(small_nifti_gz, tmp_path, mutations, tally):
    _fuzz(small_nifti_gz, tmp_path, mutations, head=64, tally=tally)


@FUZZ
@given(mutations=MUTATIONS)
def test_fuzz_dicom(dicom_file, tmp_path, mutations, tally):
    _fuzz(dicom_file, tmp_path, mutations, head=1024, tally=tally)
