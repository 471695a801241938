"""The node-loss guard's decisions and lines, without Ray: a fake node table, a fake clock, a fake abort."""

from __future__ import annotations

import threading

import pytest

from cluster.run.node_loss import (
    LostNode, NodeLossGuard, NodeLostError, guard_node_loss, lost_line, newly_lost, node_lost_message, resume_hint,
    should_give_up,
)

A, B, C = "a" * 56, "b" * 56, "c" * 56


def table(*alive: str, dead: tuple[str, ...] = ()) -> list[dict]:
    return [{"NodeID": n, "NodeManagerAddress": f"10.0.0.{i}", "Alive": True} for i, n in enumerate(alive)] + [
        {"NodeID": n, "NodeManagerAddress": "10.0.0.9", "Alive": False} for n in dead]


def test_should_give_up_only_after_the_timeout_with_no_step_since_the_loss():
    assert not should_give_up(None, None, 1000.0, 60)  # nothing lost
    assert not should_give_up(100.0, None, 159.9, 60)
    assert should_give_up(100.0, None, 160.0, 60)
    assert should_give_up(100.0, 99.0, 200.0, 60)  # the last step was before the loss
    assert not should_give_up(100.0, 130.0, 500.0, 60)  # a step after the loss: recovered


def test_newly_lost_names_known_nodes_missing_or_dead():
    assert newly_lost({A: "1", B: "2", C: "3"}, {A: "1", C: "3"}) == {B: "2"}
    assert newly_lost({A: "1"}, {A: "1", B: "2"}) == {}


def test_lines_name_the_node_its_ip_the_step_the_storage_and_the_resume_command():
    node = LostNode(B, "10.0.0.7", 5.0, 4)
    assert lost_line(node).startswith(f"node {B[:12]} (10.0.0.7) was lost after step 4;")
    line = node_lost_message(node, 61.2, 4, "s3://bucket/runs/x", resume_hint("jobs/x.yaml name=x", submitted=True))
    assert "\n" not in line
    assert line.startswith(f"node {B} (10.0.0.7) was lost at step 4 and training made no progress in the 61 s after it")
    assert "s3://bucket/runs/x" in line and line.endswith("resume with `shoulders submit jobs/x.yaml name=x --resume`")
    failed = node_lost_message(node, 70, None, "/runs/x", resume_hint(None, submitted=False), cause="Traceback...\nboom\n")
    assert "before the first step" in failed and "(Traceback...)" in failed and "\n" not in failed
    assert failed.endswith("`shoulders train JOB.yaml --resume`") and "max_failures" not in failed
    unasked = node_lost_message(node, 3, 4, "/runs/x", "shoulders train x.yaml --resume", cause="WorkerGroupError", max_failures=0)
    assert "(scaling.max_failures is 0: set it to 1 or more to recover from a lost node)" in unasked


class Clock:
    def __init__(self):
        self.now = 0.0


def make_guard(nodes: list[list[dict]], timeout_s: float = 60):
    calls = {"abort": 0, "said": []}
    state = {"table": nodes[0]}
    guard = NodeLossGuard(
        timeout_s, lambda node, waited, step, cause=None: f"lost {node.node_id[:1]} after {waited:.0f}s at {step}",
        nodes=lambda: state["table"], abort=lambda: calls.__setitem__("abort", calls["abort"] + 1), say=calls["said"].append,
    )
    return guard, state, calls


def test_guard_announces_a_dead_node_and_aborts_when_no_step_follows():
    guard, state, calls = make_guard([table(A, B, C)])
    guard.progress(3)
    state["table"] = table(A, C, dead=(B,))
    guard.check(now=guard.last_progress_at + 1)
    lost_at = guard.lost.lost_at
    assert guard.lost.node_id == B and guard.lost.step == 3 and calls["said"] == [lost_line(guard.lost)]
    guard.check(now=lost_at + 59)
    assert calls["abort"] == 0 and guard.gave_up is None
    guard.check(now=lost_at + 60)
    assert calls["abort"] == 1 and guard.gave_up == "lost b after 60s at 3"
    guard.check(now=lost_at + 120)
    assert calls["abort"] == 1  # once


def test_guard_lets_a_recovered_run_go_on():
    guard, state, calls = make_guard([table(A, B)])
    state["table"] = table(A)
    guard.check(now=10_000.0)
    guard.last_progress_at, guard.step = 10_030.0, 5  # the restarted workers stepped
    guard.check(now=10_100.0)
    assert calls["abort"] == 0 and not guard.waiting() and len(calls["said"]) == 1


def test_a_second_loss_after_recovery_restarts_the_clock():
    guard, state, calls = make_guard([table(A, B, C)])
    state["table"] = table(A, C)
    guard.check(now=100.0)
    guard.last_progress_at = 120.0
    state["table"] = table(A)
    guard.check(now=150.0)
    assert guard.lost.node_id == C
    guard.check(now=200.0)
    assert calls["abort"] == 0
    guard.check(now=210.0)
    assert calls["abort"] == 1


def test_events_with_a_step_count_as_progress():
    guard, _, _ = make_guard([table(A)])
    guard.on_event({"event": "start", "total_steps": 8})
    assert guard.last_progress_at is None
    guard.on_event({"event": "progress", "step": 2, "total": 8})
    assert guard.step == 2
    guard.on_event({"event": "eval", "metrics": {"step": 4}})
    assert guard.step == 4


def test_guard_context_turns_the_abort_into_one_line_and_ray_failures_after_a_loss_too(monkeypatch):
    import cluster.run.node_loss as node_loss

    monkeypatch.setattr(node_loss, "POLL_S", 0.01)
    tables = {"t": table(A, B)}
    message = lambda node, waited, step, cause=None: f"node {node.node_id[:1]} lost; cause={cause}"  # noqa: E731
    aborted = threading.Event()
    with pytest.raises(NodeLostError, match="^node b lost; cause=None$"):
        with guard_node_loss(0.05, message, nodes=lambda: tables["t"], abort=aborted.set, say=lambda _: None, poll_s=0.01):
            tables["t"] = table(A)
            assert aborted.wait(5)
            raise KeyboardInterrupt  # what Ray's SIGINT path raises
    tables["t"] = table(A, B)
    with pytest.raises(NodeLostError, match="^node b lost; cause=worker group failed$"):
        with guard_node_loss(600, message, nodes=lambda: tables["t"], say=lambda _: None, poll_s=0.01):
            tables["t"] = table(A)
            import time

            time.sleep(0.2)
            raise RuntimeError("worker group failed")
    with pytest.raises(RuntimeError, match="unrelated"):  # no node lost: errors pass unchanged
        with guard_node_loss(600, message, nodes=lambda: table(A), say=lambda _: None, poll_s=0.01):
            raise RuntimeError("unrelated")


def test_submit_resume_runs_train_resume_and_the_driver_knows_the_job_as_given(tmp_path, tiny_bert, monkeypatch, capsys):
    import tiny
    from cluster.cli.main import main
    from cluster.remote import submit
    from cluster.run.node_loss import JOB_ARGS_ENV

    data = tiny.write_topic_data(tmp_path / "data", rows=40, files=2)
    job = tmp_path / "job.yaml"
    job.write_text(f"name: again\nmodel: {{name: {tiny_bert}}}\ndata: {{train: {data['train']}, validation: {data['validation']}}}\n")
    calls = []

    class Client:
        def submit_job(self, **kwargs):
            calls.append(kwargs)
            return kwargs["submission_id"]

    monkeypatch.setattr(submit, "connect", lambda address=None: Client())
    assert main(["submit", str(job), "optim.batch_size=4", "--resume", "--address", "http://127.0.0.1:1"]) == 0
    (call,) = calls
    assert call["entrypoint"] == "python -m cluster.cli.main train job.yaml --resume"
    assert call["runtime_env"]["env_vars"][JOB_ARGS_ENV] == f"{job} optim.batch_size=4"
