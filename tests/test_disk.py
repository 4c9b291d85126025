"""A full or read-only disk: a failing save prints one line naming the folder and exits 2, and leaves the previous
checkpoint and every finished stage as they were. The disks are real (a small tmpfs: ENOSPC; a read-only bind mount:
EROFS) in a user and mount namespace (`unshare --user --map-root-user --mount`: root cannot be stopped by chmod)."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CHILD_ENV, REPO, short_pipeline_config

from kochat_trl.errors import KochatError
from kochat_trl.run.disk import disk_errno, writing_to
from kochat_trl.run.outputs import remove_leftovers, remove_tree
from kochat_trl.run.resume import is_complete_checkpoint, last_complete_checkpoint

PYTHON = f"{sys.executable} -m kochat_trl"
ENOSPC = "no space left on device (ENOSPC); free space or choose another"
EROFS = "read-only file system (EROFS); choose a writable"


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = ["unshare", "--user", "--map-root-user", "--mount", "true"]
    return subprocess.run(probe, capture_output=True).returncode == 0


needs_namespaces = pytest.mark.skipif(not _namespaces_work(), reason="unshare --user --mount is not permitted here")


def in_namespace(script: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """`script` (sh) as root of a new user and mount namespace: its mounts vanish with it."""
    return subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=CHILD_ENV,
        timeout=timeout,
    )


def exit_codes(result: subprocess.CompletedProcess) -> list[int]:
    return [int(line[3:]) for line in result.stdout.splitlines() if line.startswith("rc=")]


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return [line for line in result.stderr.splitlines() if "error:" in line]


def hashes(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


# --- fast: the data command, and what tells a disk failure -------------------------------------------------


@needs_namespaces
@pytest.mark.parametrize(
    ("mount", "message"),
    [("mount -t tmpfs -o size=16k tmpfs {d}", ENOSPC), ("mount --bind {d} {d} && mount -o remount,ro,bind {d}", EROFS)],
    ids=["full", "read-only"],
)
def test_data_convert_to_a_full_or_read_only_disk_is_one_line_and_exit_2(tmp_path, mount, message):
    disk = tmp_path / "disk"
    disk.mkdir()
    output = disk / "sft.jsonl"
    script = (
        f"{mount.format(d=disk)} && {PYTHON} data convert --stage sft bundled:sft -o {output}; echo rc=$?; ls -A {disk}"
    )
    result = in_namespace(script, timeout=120)
    assert exit_codes(result) == [2], result.stderr[-3000:]
    assert error_lines(result) == [f"kochat-trl: error: {output}: {message} --output"]
    lines = result.stdout.splitlines()
    assert lines[lines.index("rc=2") + 1 :] == []  # nothing written, no temporary file left


def test_disk_failures_are_told_from_other_errors_whichever_library_wrote(tmp_path):
    """The errors each writer raised on a real full or read-only tmpfs (messages as measured), and others."""
    safetensors_full = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    torch_read_only = RuntimeError(
        "[enforce fail at inline_container.cc:747] . open file failed with strerror: Read-only file system"
    )
    assert disk_errno(OSError(errno.ENOSPC, "No space left on device"), tmp_path) == errno.ENOSPC
    assert disk_errno(safetensors_full, tmp_path) == errno.ENOSPC
    assert disk_errno(torch_read_only, tmp_path) == errno.EROFS
    # torch.save's short write names no errno: a full disk only where the folder's disk is nearly full.
    assert (
        disk_errno(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), tmp_path)
        is None
    )
    # Permission denied on a file being read elsewhere is not the output folder's fault.
    assert disk_errno(PermissionError(errno.EACCES, "Permission denied", "/models/base/config.json"), tmp_path) is None
    assert disk_errno(PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "a")), tmp_path) == errno.EACCES
    assert disk_errno(ValueError("No space left on my desk? no: a value error"), tmp_path) is None
    with pytest.raises(KochatError) as raised, writing_to(tmp_path):
        raise OSError(errno.EROFS, "Read-only file system")
    assert str(raised.value) == f"{tmp_path}: {EROFS} --output_dir"
    with pytest.raises(ValueError), writing_to(tmp_path):  # anything else passes through unchanged
        raise ValueError("bad")


def test_half_a_trainer_state_is_an_incomplete_checkpoint(tmp_path):
    """The Trainer writes trainer_state.json in place: a kill during that write leaves a prefix of it."""
    for step, text in ((2, '{"global_step": 2, "log_history": []}'), (4, '{"global_step": 4, "log_hist')):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(text)
    assert not is_complete_checkpoint(tmp_path / "checkpoint-4")
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-2"


def test_leftovers_of_a_killed_writer_are_removed_and_results_kept(tmp_path):
    for name in (".merged.tmp-abc", ".policy.tmp-x1", ".sft.deleting-123"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_text("half")
    (tmp_path / ".report.json.tmp-99").write_text("{")
    (tmp_path / "report.json").write_text("{}")
    (tmp_path / ".hidden").write_text("mine")
    removed = remove_leftovers(tmp_path)
    assert len(removed) == 4 and sorted(path.name for path in tmp_path.iterdir()) == [".hidden", "report.json"]
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "metrics.json").write_text("{}")
    remove_tree(tmp_path / "sft")
    assert sorted(path.name for path in tmp_path.iterdir()) == [".hidden", "report.json"]


# --- slow: training and the pipeline on a disk that fills up or turns read-only ----------------------------

SFT = "sft --config tiny/sft.yaml --init_tiny false --max_samples 160 --eval_steps 4 --logging_steps 1 --save_steps 2"


@needs_namespaces
@pytest.mark.slow
def test_sft_checkpoint_save_on_a_full_disk_keeps_the_earlier_checkpoint(tmp_path, tiny_model_dir):
    """16 MB: checkpoint-2 (10.2 MB: weights 3.3, optimizer 6.7) fits, checkpoint-4 does not (torch.save's short
    write, told by the free space left)."""
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    disk.mkdir()
    out = disk / "sft"
    script = (
        f"mount -t tmpfs -o size=16m tmpfs {disk} && "
        f"{PYTHON} {SFT} --model_name_or_path {tiny_model_dir} --max_steps 8 --output_dir {out}; echo rc=$?; "
        f"cp -a {disk} {kept}"
    )
    result = in_namespace(script)
    assert exit_codes(result) == [2], result.stderr[-3000:]
    assert error_lines(result) == [f"error: {out}: {ENOSPC} --output_dir"]
    stage = kept / "sft"
    assert last_complete_checkpoint(stage) == stage / "checkpoint-2"
    assert json.loads((stage / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2
    from safetensors.torch import load_file

    assert load_file(stage / "checkpoint-2" / "model.safetensors")  # whole: it loads
    assert not (stage / "metrics.json").exists() and not (stage / "checkpoint-4" / "trainer_state.json").exists()


@needs_namespaces
@pytest.mark.slow
def test_final_model_save_on_a_full_disk_then_resumed_with_room(tmp_path, tiny_model_dir):
    """12 MB: checkpoint-2 fits, the final model (3.3 MB more) does not (safetensors' error); the same disk grown to
    64 MB, --resume_from_checkpoint last finishes the stage from checkpoint-2 without training again."""
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    disk.mkdir()
    out = disk / "sft"
    command = f"{PYTHON} {SFT} --model_name_or_path {tiny_model_dir} --max_steps 2 --output_dir {out}"
    script = (
        f"mount -t tmpfs -o size=12m tmpfs {disk} && {command}; echo rc=$?; ls -A {out} > {tmp_path}/after-failure; "
        f"mount -o remount,size=64m tmpfs {disk} && {command} --resume_from_checkpoint last; echo rc=$?; "
        f"cp -a {disk} {kept}"
    )
    result = in_namespace(script)
    assert exit_codes(result) == [2, 0], result.stderr[-3000:]
    assert error_lines(result) == [f"error: {out}: {ENOSPC} --output_dir"]
    left = (tmp_path / "after-failure").read_text().split()
    assert "checkpoint-2" in left and "metrics.json" not in left
    metrics = json.loads((kept / "sft" / "metrics.json").read_text())
    history = json.loads((kept / "sft" / "log_history.json").read_text())
    assert metrics["global_step"] == 2 and [entry["step"] for entry in history if "loss" in entry] == [1, 2]


@needs_namespaces
@pytest.mark.slow
def test_pipeline_merge_on_a_full_disk_leaves_every_finished_stage(tmp_path, short_pipeline_run):
    """A finished run on a disk with 1 MB to spare: the rerun's merge (3.4 MB) fails; nothing changes."""
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    disk.mkdir()
    before = hashes(short_pipeline_run)
    config = short_pipeline_config(tmp_path)
    script = (
        f"mount -t tmpfs -o size=$(( $(du -sk {short_pipeline_run} | cut -f1) + 1024 ))k tmpfs {disk} && "
        f"cp -a {short_pipeline_run}/. {disk}/ && {PYTHON} pipeline --config {config} --output_dir {disk}; "
        f"echo rc=$?; cp -a {disk} {kept}"
    )
    result = in_namespace(script)
    assert exit_codes(result) == [2], result.stderr[-3000:]
    assert error_lines(result) == [f"kochat-trl: error: {disk}: {ENOSPC} --output_dir"]
    assert hashes(kept) == before  # stages, merged models, report: as they were; no staging folder left


@needs_namespaces
@pytest.mark.slow
def test_pipeline_report_on_a_read_only_disk_leaves_every_finished_stage(tmp_path, short_pipeline_run):
    """The run folder turns read-only once the merge is done (the process stopped meanwhile): the decoding report
    cannot be written; no report appears and the stages and merged models stay whole."""
    run, err = tmp_path / "run", tmp_path / "stderr"
    shutil.copytree(short_pipeline_run, run, symlinks=True)
    for name in ("merged", "decoding.md", "report.md", "report.json"):
        remove_tree(run / name) if (run / name).is_dir() else (run / name).unlink()
    before = hashes(run)
    config = short_pipeline_config(tmp_path)
    script = (
        f"mount --bind {run} {run} && {{ {PYTHON} pipeline --config {config} --output_dir {run} 2>{err} & }}; "
        f"pid=$!; while [ ! -d {run}/merged/reward ] && kill -0 $pid 2>/dev/null; do sleep 0.005; done; "
        f"kill -STOP $pid; mount -o remount,ro,bind {run}; kill -CONT $pid; wait $pid; echo rc=$?"
    )
    result = in_namespace(script)
    result.stderr = err.read_text()
    assert exit_codes(result) == [2], result.stderr[-3000:]
    assert error_lines(result) == [f"kochat-trl: error: {run}: {EROFS} --output_dir"]
    after = hashes(run)
    assert {name: digest for name, digest in after.items() if not name.startswith("merged/")} == before
    assert {"merged/policy/model.safetensors", "merged/reward/model.safetensors"} <= set(after)
    assert not any((run / name).exists() for name in ("decoding.md", "report.md", "report.json"))
