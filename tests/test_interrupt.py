"""Ctrl-C end to end: a real ``fewstep`` command, interrupted mid-work, leaves nothing behind.

Each test starts ``python -m fewstep ...`` as a subprocess, waits until it is demonstrably working
(a progress bar that has counted work, or a network that announces it is being called inside the
search loop), sends SIGINT as a terminal's Ctrl-C does, and asserts: the process exits with 130
within a generous time, prints one clean line instead of a traceback, and the output folder holds no
file at the expected path and no temporary leftover (``atomic_path`` writes ``.NAME.*.tmp`` beside
the target).

No sleeps race the work: the commands are sized to run for minutes (or, for ``search``, block in the
network until interrupted), so the signal always lands mid-work however loaded the machine is.

The in-process tests at the end interrupt the *write* itself (KeyboardInterrupt raised half way
through writing the file) and check the same promise.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from fewstep import cli

#: how long a command may take to start and reach its work loop on a loaded 2-core machine
START_TIMEOUT = 120.0
#: how long it may take to exit after SIGINT (one network call or one optimiser step must finish)
EXIT_TIMEOUT = 60.0

# A fewstep.Model for `fewstep search --model test_interrupt:blocking_gmm2d`: the exact gmm2d
# testbed whose network, once called with gradients on (the search's differentiable rollouts; the
# teacher runs without), writes a marker file and then waits until it is interrupted. The search can
# therefore never finish before the signal, whatever the machine's speed.
MARKER_ENV = "FEWSTEP_TEST_MARKER"


def blocking_gmm2d():
    from fewstep.search.cli import resolve_model

    model, _, _ = resolve_model("gmm2d")
    inner = model.net
    marker = os.environ[MARKER_ENV]

    def net(x, model_time, **cond):
        if torch.is_grad_enabled():
            Path(marker).write_text("searching\n")
            while True:  # time.sleep returns early on a signal, so SIGINT raises KeyboardInterrupt here
                time.sleep(0.05)
        return inner(x, model_time, **cond)

    model.net = net
    return model


class Command:
    """A ``python -m fewstep`` subprocess whose stderr is read as it comes (tqdm writes ``\\r``)."""

    def __init__(self, args: list[str], cwd: Path, env: dict | None = None):
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        tests_dir = str(Path(__file__).resolve().parent)
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (tests_dir, full_env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fewstep", *args], cwd=cwd, env=full_env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            # a shell that started pytest in the background may have set SIGINT to "ignore", which a
            # child inherits and Python then keeps: restore the default so Ctrl-C means KeyboardInterrupt
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self.stderr = ""
        self.stdout = ""
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._pump, args=(self.proc.stderr, "stderr"), daemon=True),
                         threading.Thread(target=self._pump, args=(self.proc.stdout, "stdout"), daemon=True)]
        for t in self._threads:
            t.start()

    def _pump(self, stream, name):
        while True:
            chunk = stream.read1(4096) if hasattr(stream, "read1") else stream.read(4096)
            if not chunk:
                return
            with self._lock:
                setattr(self, name, getattr(self, name) + chunk.decode(errors="replace"))

    def wait_for(self, condition, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            with self._lock:
                text = self.stderr
            if condition(text):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"command ended (rc {self.proc.returncode}) before {what}:\n{self.stderr[-3000:]}")
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"no sign of {what} within {START_TIMEOUT} s:\n{self.stderr[-3000:]}")

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            rc = self.proc.wait(timeout=EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running {EXIT_TIMEOUT} s after SIGINT:\n{self.stderr[-3000:]}")
        for t in self._threads:
            t.join(timeout=10)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def progress_counted(desc: str):
    """A tqdm line ``desc: ... k/N`` with k >= 1: the loop has done work (not only started)."""
    import re

    pattern = re.compile(re.escape(desc) + r":[^\r\n]*?\|\s*([0-9]+)/[0-9]+")
    return lambda text: any(int(m.group(1)) >= 1 for m in pattern.finditer(text))


def assert_clean_exit(cmd: Command, rc: int, folder: Path, expected: list[Path]) -> None:
    assert rc == 130, f"exit status {rc}, expected 130 (interrupted):\n{cmd.stderr[-3000:]}"
    assert "Traceback" not in cmd.stderr, cmd.stderr[-3000:]
    assert "interrupted; no partial output was left behind" in cmd.stderr
    for path in expected:
        assert not path.exists(), f"{path} exists after the interrupt"
    leftovers = [p.name for p in folder.rglob("*") if p.is_file()]
    assert leftovers == [], f"files left in {folder}: {leftovers}"


@pytest.fixture
def workdir(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    yield tmp_path, out


@pytest.mark.parametrize("suffix", [".png", ".pt"])
def test_ctrl_c_during_fewstep_sample_leaves_no_file(workdir, suffix):
    cwd, out = workdir
    target = out / f"samples{suffix}"
    # 2,000 evaluations of digits16 on 64 samples: minutes of work; interrupted after the first ones
    cmd = Command(["sample", "--model", "digits16", "--solver", "ddim", "--nfe", "2000", "--num", "64",
                   "--out", str(target)], cwd)
    try:
        cmd.wait_for(progress_counted("sampling"), "sampling progress")
        rc = cmd.interrupt()
    finally:
        cmd.kill()
    assert_clean_exit(cmd, rc, out, [target])


def test_ctrl_c_during_fewstep_bench_leaves_no_report(workdir):
    cwd, out = workdir
    report_dir = out / "order"
    # the order benchmark at 20,000 and 40,000 steps per run: many minutes; interrupted in its first run
    cmd = Command(["bench", "order", "--nfe", "20000,40000", "--samples", "256", "--out", str(report_dir)], cwd)
    try:
        cmd.wait_for(lambda text: "order:" in text, "the benchmark's progress bar")
        rc = cmd.interrupt()
    finally:
        cmd.kill()
    assert_clean_exit(cmd, rc, out, [report_dir / "report.md", report_dir / "order.png"])


def test_ctrl_c_during_fewstep_search_leaves_no_solver_file(workdir):
    cwd, out = workdir
    target = out / "solver.safetensors"
    marker = cwd / "searching.marker"
    cmd = Command(["search", "--model", "test_interrupt:blocking_gmm2d", "--nfe", "4", "--samples", "32",
                   "--val-samples", "16", "--teacher-steps", "20", "--no-cache", "--out", str(target)],
                  cwd, env={MARKER_ENV: str(marker)})
    try:
        cmd.wait_for(lambda text: marker.exists(), "the search loop calling the network")
        rc = cmd.interrupt()
    finally:
        cmd.kill()
    assert_clean_exit(cmd, rc, out, [target])


# ------------------------------------------------------------------ interrupting the write itself
class _HalfWriteThenInterrupt:
    """A file object that writes half of what it is given, then raises KeyboardInterrupt."""

    def __init__(self, path, mode="r", *args, **kwargs):
        self._f = open(path, mode, *args, **kwargs)

    def write(self, data):
        self._f.write(data[: max(1, len(data) // 2)])
        self._f.flush()
        raise KeyboardInterrupt

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()
        return False


def _no_files(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.is_file()]


def test_interrupt_while_writing_a_png_leaves_nothing(tmp_path, monkeypatch, capsys):
    from fewstep.zoo import images

    monkeypatch.setattr(images, "open", _HalfWriteThenInterrupt, raising=False)
    rc = cli.main(["sample", "--nfe", "2", "--num", "2", "--no-progress", "--out", str(tmp_path / "x.png")])
    assert rc == 130 and "interrupted" in capsys.readouterr().err
    assert _no_files(tmp_path) == []


def test_interrupt_while_writing_a_tensor_leaves_nothing(tmp_path, monkeypatch, capsys):
    real_save = torch.save

    def half_save(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(size // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", half_save)
    rc = cli.main(["sample", "--nfe", "2", "--num", "2", "--no-progress", "--out", str(tmp_path / "x.pt")])
    assert rc == 130 and "interrupted" in capsys.readouterr().err
    assert _no_files(tmp_path) == []


def test_interrupt_while_writing_a_report_or_a_solver_file_leaves_nothing(tmp_path, monkeypatch):
    from fewstep.bench.report import Report, atomic_write_text
    from fewstep.search import fileformat, parameterisation as P
    from fewstep import grids, schedules

    real_write_text = Path.write_text

    def half_write_text(self, data, *args, **kwargs):
        real_write_text(self, data[: len(data) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", half_write_text)
    report = Report(title="t")
    report.add("a", "b" * 1000)
    with pytest.raises(KeyboardInterrupt):
        report.write(tmp_path / "bench")
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(tmp_path / "notes.md", "x" * 1000)
    assert _no_files(tmp_path) == []

    import safetensors.torch

    real_save_file = safetensors.torch.save_file

    def half_save_file(tensors, filename, *args, **kwargs):
        real_save_file(tensors, filename, *args, **kwargs)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", half_save_file)
    sch = schedules.DiscreteVP.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    params = P.SolverParameters.from_grid(sch, grids.make("logsnr", sch, 4), base_order=2)
    with pytest.raises(KeyboardInterrupt):
        fileformat.save(tmp_path / "solver.safetensors", params, sch, prediction="eps", model="t")
    assert _no_files(tmp_path) == []
