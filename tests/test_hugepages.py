"""The huge-page re-exec decision of manifold_lab.hugepages (no process is re-executed here)."""

import platform

import pytest

from manifold_lab.hugepages import hugetlb_wanted

glibc_linux = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not glibc_linux, reason="the tunable is glibc-only")
def test_hugetlb_wanted():
    assert hugetlb_wanted({})
    assert hugetlb_wanted({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert not hugetlb_wanted({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    assert not hugetlb_wanted({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0"})
    assert not hugetlb_wanted({"MANIFOLD_LAB_NO_HUGETLB": "1"})
    assert hugetlb_wanted({"MANIFOLD_LAB_NO_HUGETLB": "0"})
