"""Fixtures shared by the test files: where the token cache is, one thread, no torchrun variables
and no loss plots.

Two caches: ``cache`` is an empty folder of its own test (still empty afterwards = no data was
read: the refusal tests), ``token_cache`` one folder for the whole session (tests that train tokenize
the same text once). A test file may define a fixture of the same name to change one (test_data's
``cache``, test_ft_config's)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _runs import TORCHRUN_VARS, cli_env


@pytest.fixture
def no_torchrun(monkeypatch) -> None:
    """None of torchrun's variables from the environment the tests run in: the CLI called in this
    process must not take itself for a torchrun worker."""
    for k in TORCHRUN_VARS:
        monkeypatch.delenv(k, raising=False)


@pytest.fixture
def no_plots(monkeypatch) -> None:
    """No loss plots at the end of a run (matplotlib would dominate the run time)."""
    monkeypatch.setattr("desloc.loop.plot_run", lambda *args, **kwargs: None)


@pytest.fixture
def cache(tmp_path, monkeypatch, no_torchrun) -> Path:
    """An empty cache folder of this test: still empty afterwards = no data was read."""
    c = tmp_path / "cache"
    monkeypatch.setenv("DESLOC_CACHE", str(c))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return c


@pytest.fixture(scope="session")
def token_cache_dir(tmp_path_factory) -> Path:
    """The session's token cache (made by the first run that needs it)."""
    return tmp_path_factory.getbasetemp() / "desloc-cache"


@pytest.fixture
def token_cache(token_cache_dir, monkeypatch, no_torchrun) -> Path:
    """Runs in this process use the session's token cache and one thread, as a plain process."""
    monkeypatch.setenv("DESLOC_CACHE", str(token_cache_dir))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    return token_cache_dir


@pytest.fixture(scope="module")
def env(token_cache_dir) -> dict[str, str]:
    """The environment of ``desloc`` subprocesses: the session's token cache, one thread (OpenMP and
    MKL), no torchrun variables."""
    return cli_env(token_cache_dir, MKL_NUM_THREADS="1")
