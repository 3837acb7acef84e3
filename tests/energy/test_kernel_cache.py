"""The compiled kernel cache honours the umask (issue 15: files were created owner-only)."""

from __future__ import annotations

import os
import stat

import pytest

from boltzflow.energy.native_cpu import build_shared_library, find_compiler


@pytest.mark.skipif(find_compiler() is None, reason="no C++ compiler")
def test_kernel_library_mode_follows_the_umask(tmp_path, monkeypatch):
    src = tmp_path / "tiny.cpp"
    src.write_text('extern "C" int tiny_answer() { return 42; }\n')
    monkeypatch.setenv("BOLTZFLOW_CACHE", str(tmp_path / "cache"))
    old = os.umask(0o022)
    try:
        lib = build_shared_library(find_compiler(), src)
    finally:
        os.umask(old)
    assert stat.S_IMODE(lib.stat().st_mode) == 0o755
    assert not list(lib.parent.glob("*.tmp"))
