"""Process-wide memory settings: oneDNN's kernel cache is capped unless the user set it."""

import os

from agent_prune.heap import ONEDNN_KERNELS, cap_onednn_kernels

VARIABLE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"


def test_the_kernel_cache_is_capped_and_a_users_setting_wins(monkeypatch):
    monkeypatch.delenv(VARIABLE, raising=False)
    cap_onednn_kernels()
    assert os.environ[VARIABLE] == str(ONEDNN_KERNELS)
    monkeypatch.setenv(VARIABLE, "1024")
    cap_onednn_kernels()
    assert os.environ[VARIABLE] == "1024"
