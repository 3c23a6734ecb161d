"""The metrics sink, in process: the JSONL file, the plain progress line where no terminal shows tqdm's
bar, TensorBoard and wandb (stand-ins recording what they are given) and the loss curve."""

from __future__ import annotations

import json
import re
import sys
import types

import pytest

from minimind_fast.training.metrics import MetricsLogger, progress_line


def record(step: int, loss: float) -> dict:
    return {"step": step, "loss": loss, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1234.0, "memory_mb": 12.4,
            "bad_steps": 0}


def test_each_logged_step_prints_a_plain_line_with_an_eta_when_output_is_not_a_terminal(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, total_steps=10, start_step=4, enabled=True)  # a resumed run
    for step in range(5, 9):
        logger.advance()
        logger.log(record(step, 3.0 - step / 10))
    logger.log({"step": 8, "val_loss": 2.5, "val_ppl": 12.18})
    logger.close()
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("step ")]
    assert lines[0].startswith("step 5/10  loss 2.5000  lr 1.00e-03  grad_norm 0.5  tok/s 1,234  mem 12 MB  eta ")
    assert [x.split()[1] for x in lines] == ["5/10", "6/10", "7/10", "8/10", "8:"]
    assert re.search(r"eta \d\d:\d\d$", lines[3]) and lines[4] == "step 8: val_loss 2.5000  ppl 12.18"
    written = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in written] == [5, 6, 7, 8, 8] and written[0]["loss"] == 2.5
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("extra, shown", [({"mfu": 0.4123}, "mfu 41.2%"), ({"grad_norm": float("nan")}, None)])
def test_progress_line_shows_mfu_and_leaves_out_an_unknown_grad_norm(extra, shown):
    line = progress_line({**record(3, 1.0), **extra}, 9, None)
    assert (shown in line) if shown else "grad_norm" not in line
    assert "eta" not in line


def test_tensorboard_and_wandb_get_every_metric(tmp_path, monkeypatch):
    scalars, wandb_calls = [], []

    class SummaryWriter:
        def __init__(self, log_dir, purge_step):
            scalars.append(("dir", log_dir, purge_step))

        def add_scalar(self, key, value, step):
            scalars.append((key, value, step))

        def close(self):
            scalars.append("closed")

    class Run:
        def log(self, data, step):
            wandb_calls.append(("log", dict(data), step))

        def finish(self):
            wandb_calls.append("finished")

    def init(project, dir, config, id, resume):
        wandb_calls.append(("init", project, dir, config, id, resume))
        return Run()

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    logger = MetricsLogger(tmp_path, 4, 0, True, tensorboard=True, wandb_project="proj", config={"args": {"lr": 1}})
    logger.log(record(2, 4.0))
    logger.log({"step": 2, "val_loss": 3.5, "val_ppl": 33.1})
    logger.close()
    assert scalars[0] == ("dir", str(tmp_path / "tensorboard"), 1) and scalars[-1] == "closed"
    assert ("loss", 4.0, 2) in scalars and ("grad_norm", 0.5, 2) in scalars and ("val_ppl", 33.1, 2) in scalars
    assert not any(s[0] == "step" for s in scalars if isinstance(s, tuple))
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert wandb_calls[0] == ("init", "proj", str(tmp_path), {"args": {"lr": 1}}, run_id, "allow")
    assert wandb_calls[1] == ("log", record(2, 4.0), 2) and wandb_calls[-1] == "finished"

    # A resume of this run directory continues the same wandb run; another run directory gets its own.
    MetricsLogger(tmp_path, 4, 2, True, wandb_project="proj").close()
    assert wandb_calls[-2][4] == run_id
    other = tmp_path / "other"
    other.mkdir()
    MetricsLogger(other, 4, 0, True, wandb_project="proj").close()
    assert wandb_calls[-2][4] not in ("", run_id)


@pytest.mark.parametrize("logged, start", [(9, 6), (3, 0)], ids=["resumed-at-6", "restarted-from-0"])
def test_a_resumed_run_purges_the_tensorboard_events_after_its_checkpoint(tmp_path, monkeypatch, logged, start):
    """A run killed at step `logged` resumes at `start` (6, or 0 when killed before its first checkpoint):
    TensorBoard drops its events after `start`, as metrics.jsonl drops those records; kept, TensorBoard would
    draw those steps twice."""
    made = []
    writer = types.SimpleNamespace(add_scalar=lambda *a: None, close=lambda: None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(
        SummaryWriter=lambda log_dir, purge_step: made.append(purge_step) or writer))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(record(s, 1.0)) + "\n" for s in range(1, logged + 1)))
    MetricsLogger(tmp_path, 12, start, True, tensorboard=True).close()
    assert made == [start + 1]
    kept = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == list(range(1, start + 1))


def test_a_rank_other_than_the_first_writes_nothing(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, 4, 0, enabled=False)
    logger.log(record(1, 1.0))
    logger.close()
    assert not list(tmp_path.iterdir()) and capsys.readouterr().out == ""


def test_non_finite_values_are_written_as_null_and_every_reader_takes_them(tmp_path):
    """json.dumps writes NaN and Infinity bare, which strict JSON readers (jq, JavaScript) refuse: an unknown
    grad norm (NaN) or an overflowed perplexity (inf) is written as null; the plot leaves such points out."""
    logger = MetricsLogger(tmp_path, total_steps=3, start_step=0, enabled=True)
    logger.log({**record(1, 3.0), "grad_norm": float("nan")})
    logger.log({**record(2, 2.0), "loss": float("inf")})
    logger.log({"step": 2, "val_loss": 800.0, "val_ppl": float("inf")})
    logger.log({"step": 3, "val_loss": float("nan")})
    logger.close()

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    written = [json.loads(x, parse_constant=refuse) for x in lines]
    assert written[0]["grad_norm"] is None and written[0]["loss"] == 3.0
    assert written[1]["loss"] is None and written[2] == {"step": 2, "val_loss": 800.0, "val_ppl": None}
    assert written[3] == {"step": 3, "val_loss": None}
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a resume reads the file back (to trim it), nulls included
    MetricsLogger(tmp_path, total_steps=3, start_step=2, enabled=True).close()
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == lines[:3]
