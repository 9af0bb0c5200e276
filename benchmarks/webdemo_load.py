"""A crowd at the web demo: N text-to-image requests at once, more than its queue holds.

    python benchmarks/webdemo_load.py                          # a tiny random model served here
    python benchmarks/webdemo_load.py --requests 64 --queue_size 8 --num_images 2
    python benchmarks/webdemo_load.py --model outputs/digits-demo/final
    python benchmarks/webdemo_load.py --url http://127.0.0.1:7860   # a demo already running

Every request goes through gradio's HTTP API (``POST /gradio_api/call/text_to_image``, then the
event stream), the same queue the page uses. Each one is either served (images back), refused
(HTTP 503: the queue is full; the message is recorded) or an error. Afterwards one more request
must be served (the server still works). Reports requests/s, p50/p95 latency of the served
ones, refusals and, when the demo runs in this process, its resident memory before, at the peak
and after. Loopback only: any other host is refused, so this never loads someone else's server.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
import psutil

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class Outcome:
    kind: str  # "served", "refused" or "error"
    seconds: float
    message: str = ""


@dataclass
class LoadReport:
    requests: int
    concurrency: int
    queue_size: int | None
    served: int
    refused: int
    errors: int
    wall_s: float
    served_per_s: float
    p50_s: float | None
    p95_s: float | None
    refusal_messages: list[str]
    error_messages: list[str]
    served_after: bool  # one more request after the crowd was served
    rss_mb: dict[str, float] = field(default_factory=dict)  # before / peak / after (in-process server)


def _defaults(client: httpx.Client) -> list:
    """The text-to-image endpoint's parameters at their page defaults (prompt, count and seed set
    by name), so the script keeps working when the demo gains settings."""
    info = client.get("/gradio_api/info").raise_for_status().json()
    params = info["named_endpoints"]["/text_to_image"]["parameters"]
    return [(p["parameter_name"], p.get("parameter_default")) for p in params]


def one_request(client: httpx.Client, params: list, prompt: str, num_images: int, seed: int,
                timeout: float) -> Outcome:
    """Submit one text-to-image request and wait for its result."""
    values = {"prompt": prompt, "num_images": num_images, "seed": seed}
    data = [values.get(name, default) for name, default in params]
    start = time.perf_counter()
    try:
        submitted = client.post("/gradio_api/call/text_to_image", json={"data": data}, timeout=timeout)
        if submitted.status_code == 503:
            return Outcome("refused", time.perf_counter() - start, submitted.json().get("detail", submitted.text))
        submitted.raise_for_status()
        event = submitted.json()["event_id"]
        with client.stream("GET", f"/gradio_api/call/text_to_image/{event}", timeout=timeout) as stream:
            kind = None
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    kind = line.removeprefix("event: ")
                elif line.startswith("data: ") and kind in ("complete", "error"):
                    payload = line.removeprefix("data: ")
                    seconds = time.perf_counter() - start
                    if kind == "complete" and len(json.loads(payload)[0]) == num_images:
                        return Outcome("served", seconds)
                    return Outcome("error", seconds, payload[:300])
        return Outcome("error", time.perf_counter() - start, "the event stream ended without a result")
    except (httpx.HTTPError, ValueError, KeyError) as error:
        return Outcome("error", time.perf_counter() - start, f"{type(error).__name__}: {error}"[:300])


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


def run_load(url: str, requests: int = 32, concurrency: int | None = None, num_images: int = 1,
             timeout: float = 300.0, queue_size: int | None = None) -> LoadReport:
    """Send ``requests`` text-to-image requests, ``concurrency`` at a time (default: all at once),
    to the demo at ``url`` (loopback only), then one more; see the module docstring."""
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise SystemExit(f"refusing to load {url}: this script only talks to a demo on this machine (127.0.0.1)")
    concurrency = concurrency or requests
    me = psutil.Process()
    rss = {"before": me.memory_info().rss / 2**20}
    peak, done = [rss["before"]], threading.Event()

    def watch_memory():
        while not done.wait(0.05):
            peak.append(me.memory_info().rss / 2**20)

    watcher = threading.Thread(target=watch_memory, daemon=True)
    watcher.start()
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    with httpx.Client(base_url=url, limits=limits, timeout=timeout) as client:
        params = _defaults(client)
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            outcomes = list(pool.map(lambda i: one_request(client, params, f"a handwritten digit {i % 10}",
                                                           num_images, i, timeout), range(requests)))
        wall = time.perf_counter() - start
        after = one_request(client, params, "a handwritten digit seven", num_images, 0, timeout)
    done.set()
    watcher.join()
    rss.update(peak=max(peak), after=me.memory_info().rss / 2**20)
    served = sorted(o.seconds for o in outcomes if o.kind == "served")
    return LoadReport(
        requests=requests, concurrency=concurrency, queue_size=queue_size, served=len(served),
        refused=sum(o.kind == "refused" for o in outcomes), errors=sum(o.kind == "error" for o in outcomes),
        wall_s=wall, served_per_s=len(served) / wall if wall else 0.0, p50_s=_percentile(served, 50),
        p95_s=_percentile(served, 95), refusal_messages=sorted({o.message for o in outcomes if o.kind == "refused"}),
        error_messages=sorted({o.message for o in outcomes if o.kind == "error"})[:5],
        served_after=after.kind == "served", rss_mb=rss)


def tiny_pipeline():
    """A random tiny Llama extended with a 4x4 grey pixel tokenizer (16 image tokens): the demo's
    queue, not the model, is what this measures by default."""
    from unimodal import PixelTokenizer, PixelTokenizerConfig, UnimodalPipeline, add_image_tokens
    from unimodal.offline import build_causal_lm, train_text_tokenizer

    tokenizer = train_text_tokenizer()
    model = build_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=32)
    processor = add_image_tokens(model, tokenizer, PixelTokenizer(PixelTokenizerConfig(codebook_size=16,
                                                                                       image_size=4)))
    return UnimodalPipeline(model.eval(), processor)


def main(argv: list[str] | None = None) -> LoadReport:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a demo already running on this machine (default: serve one here)")
    parser.add_argument("--model", help="output folder to serve (default: a tiny random model)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=None, help="requests in flight (default: all)")
    parser.add_argument("--queue_size", type=int, default=8, help="the served demo's queue (DemoLimits.queue_size)")
    parser.add_argument("--num_images", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    demo = None
    url = args.url
    if url is None:
        import torch

        from unimodal.webdemo import DemoLimits, load_pipeline, serve

        torch.set_num_threads(1)
        pipeline = load_pipeline(args.model) if args.model else tiny_pipeline()
        demo, url = serve(pipeline, block=False, quiet=True, limits=DemoLimits(queue_size=args.queue_size))
    try:
        report = run_load(url, args.requests, args.concurrency, args.num_images, args.timeout,
                          args.queue_size if args.url is None else None)
    finally:
        if demo is not None:
            demo.close()
    if args.url is not None:
        report.rss_mb = {}  # another process's memory is not ours to read
    text = json.dumps(asdict(report), indent=2)
    print(text)
    print(f"{report.served}/{report.requests} served, {report.refused} refused (busy), {report.errors} errors in "
          f"{report.wall_s:.1f} s: {report.served_per_s:.2f} requests/s, p50 {report.p50_s or 0:.2f} s, "
          f"p95 {report.p95_s or 0:.2f} s; served afterwards: {report.served_after}")
    if args.json:
        args.json.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
