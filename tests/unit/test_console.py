"""The console's pieces without Ray: the table is never cut, progress is one line, logs go to files."""

from __future__ import annotations

import io
import logging
import warnings
from types import SimpleNamespace

from cluster.run.console import ProgressPrinter, bar_line, set_verbose
from cluster.run.driver_logs import route_driver_logs
from cluster.run.summary import summary_table, text_table
from engine.loop.worker_output import worker_log_file


def test_table_is_whole_and_aligned_whatever_its_width():
    best = {f"val_metric_with_a_long_name_{i}": 0.5 + i / 10 for i in range(8)}
    run = SimpleNamespace(best={"step": 4, **best}, test={"accuracy": 0.875, "loss": 0.3})
    scratch = SimpleNamespace(best=best, test={"accuracy": 0.25})
    lines = summary_table(run, scratch)
    assert len(lines) == 4 and max(map(len, lines)) > 200  # no 80-column cut, no ellipsis
    assert "test_accuracy" in lines[0] and "test_loss" in lines[0] and "…" not in "".join(lines)
    assert lines[2].startswith("pre-trained") and lines[2].split()[-2:] == ["0.8750", "0.3000"]
    assert lines[3].startswith("from scratch") and lines[3].split()[-2:] == ["0.2500", "-"]
    assert len({len(line) for line in lines[:2]}) == 1 and lines[0].index("test_loss") + 9 == len(lines[0])
    assert text_table(["a", "bb"], [["xyz", "1"]]) == ["a    bb", "---  --", "xyz   1"]


def test_progress_is_a_few_plain_lines_without_a_terminal_and_one_rewritten_line_on_one():
    plain, tty = io.StringIO(), io.StringIO()
    for out, is_tty in ((plain, False), (tty, True)):
        printer = ProgressPrinter(out, tty=is_tty)
        for step in range(1, 101):
            printer.handle({"event": "progress", "step": step, "total": 100, "loss": 1.0 / step, "eta": 100 - step})
            if step == 50:
                printer.handle({"event": "eval", "metrics": {"step": 50, "train_loss": 0.1, "val_accuracy": 0.75, "lr_head": 1e-3}})
        printer.close()
    lines = plain.getvalue().splitlines()
    assert [line.split()[1] for line in lines if line.startswith("step")] == ["25/100", "50/100", "75/100", "100/100"]
    assert "eval @ step 50  train_loss 0.1000  val_accuracy 0.7500" in lines
    assert tty.getvalue().count("\n") == 2  # the eval line, and the bar's last state
    assert tty.getvalue().count("\r") >= 100
    assert "━" in tty.getvalue() and "100/100" in tty.getvalue()  # rich's bar, drawn to the end
    assert "eval @ step 50  train_loss 0.1000  val_accuracy 0.7500" in tty.getvalue()
    assert bar_line(40, 96, 0.8123, 35) == "step 40/96 [##########--------------]  42%  loss 0.8123  eta 35s"


def test_driver_logs_go_to_the_run_folder_and_only_own_warnings_and_errors_to_the_console(tmp_path, capsys):
    import ray._private.worker as ray_worker

    root = logging.getLogger()
    saved, ray_printer = (list(root.handlers), root.level), ray_worker.print_to_stdstream
    set_verbose(False)
    data_level = logging.getLogger("ray.data").level
    logging.getLogger("ray.data").setLevel(logging.NOTSET)  # an earlier run in this session (ensure_ray) raised it
    try:
        path = route_driver_logs(tmp_path / "run")
        for line in ("WARNING: 8 PYTHON worker processes have been started", "a worker died unexpectedly",
                     "Task _map_task failed. There are infinite retries remaining, so the task will be retried. Error: "):
            ray_worker.print_to_stdstream({"lines": [line], "pid": "raylet", "is_err": False}, ignore_prefix=False)
        logging.getLogger("ray.data").info("execution plan: ReadParquet -> MapBatches")
        logging.getLogger("transformers.modeling_utils").warning("Some weights were newly initialized")
        logging.getLogger("cluster.run.trainer").warning("own warning")
        logging.getLogger("ray.train").error("a worker died")
        warnings.warn("a library's FutureWarning", FutureWarning)
        for handler in root.handlers:
            handler.flush()
    finally:
        logging.captureWarnings(False)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        ray_worker.print_to_stdstream = ray_printer
        logging.getLogger("ray.data").setLevel(data_level)
    out, err = capsys.readouterr()
    assert "a worker died unexpectedly" in out and "PYTHON worker processes" not in out  # raylet: errors print, warnings don't
    assert "retries remaining" not in out  # nor the retry notes of a stopped trial's data tasks
    assert "own warning" in err and "a worker died" in err
    assert "execution plan" not in err and "newly initialized" not in err and "FutureWarning" not in err
    text = path.read_text()
    missing = [s for s in ("execution plan", "newly initialized", "own warning", "a worker died", "FutureWarning", "PYTHON worker processes",
                                 "infinite retries remaining") if s not in text]
    assert not missing, (missing, text)
    assert path == tmp_path / "run" / "logs" / "driver.log"


def test_worker_output_goes_to_its_log_file(tmp_path, capsys):
    with worker_log_file(str(tmp_path / "logs"), rank=1) as path:
        print("a print from a library")
        logging.getLogger("engine.loop").info("training 4 steps")
    assert path == tmp_path / "logs" / "worker-1.log"
    assert "a print from a library" in path.read_text() and "training 4 steps" in path.read_text()
    assert "a print" not in capsys.readouterr().out
    with worker_log_file(None, rank=0) as path:  # --verbose: output stays where it was
        assert path is None


def test_tune_trials_are_one_row_each_as_they_end():
    from cluster.tune.trial_table import TrialTable

    out = io.StringIO()
    table = TrialTable("val_accuracy", "max", planned_steps=8, stream=out)
    trials = [SimpleNamespace(trial_id=f"t{i}", config={"overrides": {"finetune.freeze_depth": i, "finetune.backbone_lr_ratio": 0.123456}})
              for i in range(2)]
    for trial in trials:
        table.on_trial_start(0, trials, trial)
    for step in (2, 4, 6, 8):
        table.on_trial_result(0, trials, trials[0], {"step": step, "val_accuracy": 0.5 + step / 100, "time_total_s": 10.0 * step})
    table.on_trial_result(0, trials, trials[1], {"step": 2, "val_accuracy": 0.3, "time_total_s": 12.0})
    table.on_trial_complete(0, trials, trials[1])  # ASHA stopped it after one evaluation
    table.on_trial_complete(0, trials, trials[0])
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and lines[0].split()[:2] == ["trial", "ended"]
    assert lines[1].split() == ["t1", "stopped", "early", "1", "2", "0.3000", "0.3000", "12s", "freeze_depth=1", "backbone_lr_ratio=0.123"]
    assert lines[2].split() == ["t0", "done", "4", "8", "0.5800", "0.5800", "1m20s", "freeze_depth=0", "backbone_lr_ratio=0.123"]
