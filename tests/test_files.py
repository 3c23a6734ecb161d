"""Outputs get the permissions of any file the user writes (umask), not the private ones of the
temporary files they are built in (mkdtemp 0700) or of the safetensors library (0600); and the
temporaries of a failed or killed write do not pile up beside them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models

from minimind_fast.checkpoint import save_model_dir
from minimind_fast.config import get_preset
from minimind_fast.data.tokenizer import save_tokenizer
from minimind_fast.files import write_text_whole
from minimind_fast.lora import LoraConfig, apply_lora, save_lora
from minimind_fast.model import MiniMindForCausalLM


@pytest.fixture
def umask_027():
    before = os.umask(0o027)
    yield
    os.umask(before)


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root.parent)): p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")]}


def assert_umask_modes(root: Path) -> None:
    found = modes(root)
    assert len(found) > 1, found
    for name, mode in found.items():
        wanted = 0o750 if (root.parent / name).is_dir() else 0o640
        assert mode == wanted, f"{name}: {oct(mode)} (wanted {oct(wanted)})"


def test_model_tokenizer_and_adapter_outputs_follow_the_umask(tmp_path, umask_027):
    torch.manual_seed(0)
    model = MiniMindForCausalLM(get_preset("tiny", vocab_size=64))
    save_model_dir(model, tmp_path / "model")
    assert_umask_modes(tmp_path / "model")
    save_tokenizer(Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")), tmp_path / "tok")
    assert_umask_modes(tmp_path / "tok")
    apply_lora(model, LoraConfig(rank=2, alpha=4))
    save_lora(model, tmp_path / "adapter")
    assert_umask_modes(tmp_path / "adapter")


# A writer killed between filling its temporary and renaming it into place (SIGKILL at the rename; for a
# directory, at renaming the old one aside), or one still at it (paused there until killed), writing
# argv[1] with argv[2]'s writer.
INTERRUPTED_WRITER = """
import os, signal, sys, time
from pathlib import Path
import minimind_fast.files as files

real_replace = os.replace

def stop_here(src, dst):
    if sys.argv[2] == "model" and Path(src) != out:
        return real_replace(src, dst)
    if sys.argv[3] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    print("writing", flush=True)
    time.sleep(120)

out = Path(sys.argv[1])
files.os.replace = stop_here
if sys.argv[2] == "text":
    files.write_text_whole(out, "from a writer that never finished")
else:
    import torch
    from minimind_fast.checkpoint import save_model_dir
    from minimind_fast.config import get_preset
    from minimind_fast.model import MiniMindForCausalLM
    save_model_dir(MiniMindForCausalLM(get_preset("tiny", vocab_size=64)), out)
"""


def _interrupted_writer(out: Path, what: str, how: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPTED_WRITER, str(out), what, how],
                            stdout=subprocess.PIPE, text=True)
    if how == "kill":
        assert proc.wait(timeout=120) == -signal.SIGKILL
    else:
        assert proc.stdout.readline().strip() == "writing"
    return proc


def _hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("what", ["text", "model"])
def test_the_next_write_removes_what_killed_writers_left_but_not_a_live_writers_temporary(tmp_path, what):
    """A writer killed between writes leaves its hidden temporary beside the output (a model's worth for a
    model directory, and for a replace its renamed-aside old one too): the next write of that output
    removes them, and leaves alone the temporary of a writer still at work, other outputs' and the
    user's own files."""
    out = tmp_path / ("notes.txt" if what == "text" else "model")

    def write() -> None:
        if what == "text":
            write_text_whole(out, "whole")
        else:
            save_model_dir(MiniMindForCausalLM(get_preset("tiny", vocab_size=64)), out)

    write()
    (tmp_path / f".other{out.name}.tmp-1").write_text("not ours")
    (tmp_path / f"{out.name}.tmp").write_text("the user's")
    for _ in range(2):
        _interrupted_writer(out, what, "kill")
    left = _hidden(tmp_path)
    assert len(left) >= 3 and any(".old-" in n for n in left) == (what == "model"), left
    live = _interrupted_writer(out, what, "pause")
    try:
        live_temporaries = sorted(set(_hidden(tmp_path)) - set(left))
        assert live_temporaries, _hidden(tmp_path)
        write()
        assert _hidden(tmp_path) == sorted([f".other{out.name}.tmp-1", *live_temporaries])
        assert (tmp_path / f"{out.name}.tmp").read_text() == "the user's"
    finally:
        live.kill()
        live.wait()


def _metrics_file(path: Path) -> None:
    path.write_text("".join(json.dumps({"step": s, "loss": 5.0 - s}) + "\n" for s in range(1, 5)))


@pytest.mark.parametrize("writer", ["text", "run json", "model config", "dpo reference", "metrics trim",
                                    "loss plot"])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch, writer):
    """A write that fails at its last step (a full disk at the rename) keeps the file it was replacing and
    removes its temporary, rather than leaving one beside it for every failure."""
    from minimind_fast.training import dpo, engine, metrics

    target = {"metrics trim": "metrics.jsonl", "loss plot": "loss.png"}.get(writer, "out.file")
    path = tmp_path / target
    if writer == "metrics trim":
        _metrics_file(path)
    elif writer == "loss plot":
        _metrics_file(tmp_path / "metrics.jsonl")
        metrics.plot_losses(tmp_path / "metrics.jsonl", path)
    else:
        path.write_text("old")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    write = {
        "text": lambda: write_text_whole(path, "new"),
        "run json": lambda: engine._write_json(path, {"new": 1}),
        "model config": lambda: get_preset("tiny").save(path),
        "dpo reference": lambda: dpo._write_tables(path, {"x": torch.zeros(3)}, {"new": 1}),
        "metrics trim": lambda: metrics.trim_metrics(path, 2),
        "loss plot": lambda: metrics.plot_losses(tmp_path / "metrics.jsonl", path),
    }[writer]

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    monkeypatch.setattr(Path, "replace", lambda self, dst: full_disk(self, dst))
    with pytest.raises(OSError, match="No space left"):
        write()
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
