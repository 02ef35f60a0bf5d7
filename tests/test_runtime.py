"""The allocator tuning the `longcat` command applies at start-up."""

from __future__ import annotations

import platform
import sys

import pytest

from longcat.runtime import tune_cpu_allocator


def test_tuning_can_be_switched_off(monkeypatch) -> None:
    monkeypatch.setenv("LONGCAT_MALLOC_TUNING", "0")
    assert tune_cpu_allocator() is False


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="needs glibc's mallopt"
)
def test_tuning_takes_effect_under_glibc(monkeypatch) -> None:
    monkeypatch.delenv("LONGCAT_MALLOC_TUNING", raising=False)
    assert tune_cpu_allocator() is True
