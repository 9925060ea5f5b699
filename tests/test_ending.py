"""How a training run ended (`gptmini.ending`): the summary.json a run leaves, and what its launcher's caller
does about it. The flow's train task and `gptmini launch slurm` act on `outcome`; the real task's retries are
in tests/test_flows.py, the real trainer's summaries in tests/test_train_config.py and tests/test_faults.py."""
from __future__ import annotations

import pytest
import torch

from gptmini import ending
from gptmini.config import ConfigError
from gptmini.data.sources import DataError


@pytest.mark.parametrize("exc, status", [(DataError("x"), ending.BAD_DATA), (ConfigError("x"), ending.BAD_CONFIG),
                                         (torch.OutOfMemoryError("x"), ending.OOM), (RuntimeError("x"), ending.FAILED)])
def test_an_error_maps_to_its_status_and_exit_code(exc, status, tmp_path):
    ending.write_error(tmp_path, ending.status_of(exc), "why")
    assert ending.read(tmp_path) == {"status": status, "error": "why", "exit_code": ending.EXIT_CODES[status]}
    ending.clear(tmp_path)
    assert ending.read(tmp_path) is None


@pytest.mark.parametrize("summary, retryable, says", [
    ({"status": ending.BAD_CONFIG, "error": "ConfigError: --lr"}, False, "rejected its configuration: ConfigError"),
    ({"status": ending.BAD_DATA, "error": "DataError: damaged"}, False, "training data is unusable: DataError"),
    ({"status": ending.PREEMPTED, "steps": 3}, True, "preempted at step 3"),
    ({"status": ending.OOM, "error": "CUDA out of memory"}, True, "lower the batch size"),
    ({"status": ending.FAILED, "error": "RuntimeError: NCCL timeout"}, True, "RuntimeError: NCCL timeout"),
    (None, True, "without a summary.json"),
    ({"status": ending.COMPLETED}, True, "it reported 'completed' but torchrun exited with code 1"),
])
def test_an_unfinished_run_says_what_happened_and_whether_a_retry_helps(summary, retryable, says):
    with pytest.raises(ending.TrainingFailed) as info:
        ending.outcome(summary, False, "torchrun exited with code 1", ["the trainer's last line"])
    assert info.value.retryable == retryable and says in str(info.value)
    assert ("a retry resumes from the" in str(info.value)) == retryable


def test_a_completed_run_is_its_summary():
    summary = {"status": ending.COMPLETED, "steps": 2}
    assert ending.outcome(summary, True, "torchrun exited with code 0") is summary


@pytest.mark.parametrize("summary, state, code, says", [
    ({"status": ending.COMPLETED, "steps": 2}, "COMPLETED", 0, ""),
    ({"status": ending.COMPLETED, "steps": 2}, "CANCELLED", 1, "the Slurm job ended CANCELLED"),
    ({"status": ending.PREEMPTED, "steps": 1}, "PREEMPTED", 1, "run the same command again"),
    (None, "NODE_FAIL", 1, "the Slurm job ended NODE_FAIL"),
    ({"status": ending.BAD_CONFIG, "error": "ConfigError: --lr"}, "FAILED", 2, "rejected its configuration"),
])
def test_gptmini_launch_exits_0_only_when_the_job_and_the_trainer_completed(summary, state, code, says, tmp_path,
                                                                           capsys):
    from gptmini.cli import run
    from gptmini.cli.launch import job_ended

    if summary is not None:
        ending.write(tmp_path, summary)
    assert run("gptmini launch", lambda: job_ended(tmp_path, state)) == code
    assert says in capsys.readouterr().err
