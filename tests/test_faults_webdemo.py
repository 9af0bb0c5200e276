"""A crowd at the web demo (issue #18): benchmarks/webdemo_load.py, run for real as its own process
(a demo on a loopback port, a tiny random model, gradio's HTTP queue), sends more text-to-image
requests at once than the queue holds: each is served or refused as busy, none fails, the server
serves the next request, and memory stays bounded."""

import json
import subprocess
import sys

from launching import REPO, env

REQUESTS, QUEUE = 24, 4


def test_more_requests_than_the_queue_holds_are_served_or_refused_as_busy(tmp_path):
    report_file = tmp_path / "load.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "webdemo_load.py"), "--requests", str(REQUESTS),
                           "--queue_size", str(QUEUE), "--json", str(report_file)],
                          env={**env(), "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(tmp_path / "gr")},
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(report_file.read_text())
    assert report["errors"] == 0, report["error_messages"]
    assert report["served"] + report["refused"] == REQUESTS
    # One request runs while QUEUE wait; the rest of the crowd arrives at a full queue.
    assert report["served"] >= QUEUE and report["refused"] >= 1
    assert report["refusal_messages"] == [f"Queue is full. Max size is {QUEUE} and size is {QUEUE}."]
    assert report["served_after"]  # the server keeps serving
    assert report["p50_s"] <= report["p95_s"] and report["served_per_s"] > 0
    # Bounded: refused requests cost nothing, waiting ones hold only their inputs.
    assert report["rss_mb"]["peak"] - report["rss_mb"]["before"] < 200, report["rss_mb"]
    print(json.dumps(report))


def test_the_load_script_only_talks_to_this_machine():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "webdemo_load.py"), "--url",
                           "http://example.com:7860"], env=env(), cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and "only talks to a demo on this machine" in proc.stderr
