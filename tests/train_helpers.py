"""Shared by the trainers' tests: a run killed right after it logs a given step; a run's logged losses."""
from pathlib import Path

import pytest

from cogvx.train.log import CSVLog, read_log


class Killed(BaseException):
    """What the killed run raises (a BaseException, as KeyboardInterrupt: no handler swallows it)."""


def run_killed_after_step(monkeypatch, trainer_module, train, step: int) -> None:
    """train() with the trainer's CSV log raising Killed once it has written `step`; the patch is undone."""
    class KilledLog(CSVLog):
        def write(self, row):
            super().write(row)
            if row["step"] == step:
                raise Killed()
    monkeypatch.setattr(trainer_module, "CSVLog", KilledLog)
    with pytest.raises(Killed):
        train()
    monkeypatch.undo()


def losses(out: Path) -> dict[int, dict]:
    _, rows = read_log(out / "log.csv")
    return {int(r["step"]): r for r in rows}
