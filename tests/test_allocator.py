"""The allocator re-exec decision of manifold_lab.allocator (no process is re-executed here)."""

import platform

import pytest

from manifold_lab.allocator import HUGETLB_TUNABLE, JEMALLOC_CONF, allocator_env, find_jemalloc

glibc_linux = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
pytestmark = pytest.mark.skipif(not glibc_linux, reason="LD_PRELOAD and glibc tunables are Linux/glibc-only")


def found() -> str:
    return "/lib/libjemalloc.so.2"


def missing() -> None:
    return None


def test_auto_prefers_jemalloc_and_keeps_the_callers_settings():
    env = allocator_env({"LD_PRELOAD": "/x/libfoo.so", "PATH": "/bin"}, find=found)
    assert env["LD_PRELOAD"] == "/lib/libjemalloc.so.2 /x/libfoo.so"
    assert env["MALLOC_CONF"] == JEMALLOC_CONF and env["PATH"] == "/bin"
    assert allocator_env({"MALLOC_CONF": "narenas:1"}, find=found)["MALLOC_CONF"] == "narenas:1"


def test_auto_falls_back_to_huge_pages():
    assert allocator_env({}, find=missing)["GLIBC_TUNABLES"] == HUGETLB_TUNABLE
    env = allocator_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, find=missing)
    assert env["GLIBC_TUNABLES"] == f"{HUGETLB_TUNABLE}:glibc.malloc.arena_max=2"
    assert "LD_PRELOAD" not in env
    assert "LD_PRELOAD" not in allocator_env({"MANIFOLD_LAB_ALLOCATOR": "hugetlb"}, find=found)


def test_no_reexec_when_set_or_declined():
    assert allocator_env({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, find=found) is None
    assert allocator_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, find=found) is None
    assert allocator_env({"MANIFOLD_LAB_ALLOCATOR": "system"}, find=found) is None


def test_bad_choices():
    with pytest.raises(ValueError, match="must be one of"):
        allocator_env({"MANIFOLD_LAB_ALLOCATOR": "tcmalloc"}, find=found)
    with pytest.raises(ValueError, match="apt-get install -y libjemalloc2"):
        allocator_env({"MANIFOLD_LAB_ALLOCATOR": "jemalloc"}, find=missing)


def test_find_jemalloc(tmp_path):
    assert find_jemalloc((str(tmp_path),)) is None
    (tmp_path / "libjemalloc.so.2").write_bytes(b"")
    assert find_jemalloc(("/nonexistent", str(tmp_path))) == str(tmp_path / "libjemalloc.so.2")
