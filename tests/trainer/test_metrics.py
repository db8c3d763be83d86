"""metrics.jsonl across restarts."""

from __future__ import annotations

import json
from pathlib import Path

from trainer.metrics import JsonLinesSink


def test_a_torn_last_line_of_metrics_jsonl_does_not_stop_a_resume(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 10, "loss": 1.0}\n{"step": 20, "loss": 0.9}\n{"step": 30, "lo')  # killed mid-line
    sink = JsonLinesSink(path, resume_step=20)
    sink.log({"loss": 0.8}, 21)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["step"] for line in lines] == [10, 20, 21]
