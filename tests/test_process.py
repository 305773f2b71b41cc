"""Process-wide state a run changes comes back as it was, even when the work inside raises."""

import os

import pytest

from optimizer.process import polygraphy_quiet, process_state, working_dir


def test_threads_seed_cwd_and_log_level_are_restored_after_an_error(tmp_path):
    import torch
    from polygraphy.logger import G_LOGGER

    threads, cwd, level = torch.get_num_threads(), os.getcwd(), G_LOGGER.module_severity.get()
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    with pytest.raises(RuntimeError):
        with (
            process_state(threads=1 if threads > 1 else 2, seed=7),
            working_dir(tmp_path),
            polygraphy_quiet(),
        ):
            assert torch.get_num_threads() != threads and os.getcwd() == str(tmp_path)
            assert G_LOGGER.module_severity.get() == G_LOGGER.ERROR != level
            torch.rand(5)  # consumes the run's own stream, not the caller's
            raise RuntimeError("stage failed")
    assert torch.get_num_threads() == threads and os.getcwd() == cwd
    assert G_LOGGER.module_severity.get() == level
    assert torch.equal(torch.rand(3), want)  # the caller's RNG stream continues where it was
