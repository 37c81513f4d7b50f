"""Serving benchmark (printed, not asserted): aggregate tokens/s and time to first token for 1, 4 and 8 concurrent
clients, `persona-export serve` against llama.cpp's own server (llama-cpp-python's `llama_cpp.server`) on the
dense Q4_1 GGUF of the embedded model, measured in one run. Both serve the same model: the embedded SmolLM2
as the project loads it (its Q4_1 weights de-quantized), exported to `onnx/` and `genai/` in fp32.

Servers (each its own process, all started before the first measurement, idle while another is measured):
  ours, `onnx/` fp32, the requests' rows decoded together (--max-batch 8);
  ours, `onnx/` fp32, one request at a time (--max-batch 1: a queue);
  ours, `genai/` fp32 on onnxruntime-genai (one generator per request, stepped one after another);
  ours, a persona's `onnx/` rows decoded together, with --persona;
  llama.cpp on the dense Q4_1 GGUF (when --llama-python has llama-cpp-python[server]; else a printed note).
Every client sends its requests one after another through the openai package, streamed, greedy, at most
`--max-tokens` new tokens; a round measures every server at 1, 4 and 8 clients, the servers in an order
rotated per round; figures are medians over `--rounds` rounds. Tokens are counted as streamed chunks (one per
token in both servers).

  python ci/bench_serve.py --llama-python /path/to/python   # exports the dense model (minutes) in a temp folder
  python ci/bench_serve.py --dense DIR                       # reuse DIR/onnx and DIR/genai (fp32)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RECIPE = REPO / "recipes" / "smollm2-introvert-extravert.yaml"
PROMPTS = [
    "Describe your ideal weekend in detail, hour by hour.",
    "Write a short story about a lighthouse keeper who finds a letter.",
    "Explain how a bicycle works to a ten-year-old.",
    "Plan a three-day trip to a city you like, with reasons.",
    "What makes a good friend? Give several examples.",
    "Describe the kitchen of your dreams.",
    "Tell me about a hobby you would like to learn and why.",
    "Write a letter to your future self.",
]


@dataclass(frozen=True)
class Server:
    name: str
    model: str  # the `model` field of the requests
    port: int


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, seconds: float = 600) -> None:
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"server at {url} not ready after {seconds} s")


def start(argv: list[str], ready: str, log: Path, threads: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(argv, cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    wait_ready(ready, proc, log)
    return proc


def request(port: int, model: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(seconds to the first token, seconds to the end, tokens) of one streamed greedy request."""
    import openai

    api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", max_retries=0, timeout=600)
    start_t = time.perf_counter()
    first, tokens = None, 0
    stream = api.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - start_t
            tokens += 1
    return first or float("nan"), time.perf_counter() - start_t, tokens


def measure(server: Server, clients: int, per_client: int, max_tokens: int) -> tuple[float, float, float]:
    """(aggregate tokens/s, median time to first token in ms, mean tokens per reply) with `clients` at once."""
    results: list[tuple[float, float, int]] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for r in range(per_client):
            out = request(server.port, server.model, PROMPTS[(i + r) % len(PROMPTS)], max_tokens)
            with lock:
                results.append(out)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    tokens = sum(r[2] for r in results)
    return tokens / wall, 1000 * statistics.median(r[0] for r in results), tokens / len(results)


def build(tmp: Path) -> Path:
    """The embedded model as the project loads it, exported to hf/, onnx/ and genai/ (fp32) in tmp/dense."""
    from exporter.export.genai import build_genai
    from exporter.export.hf import export_hf
    from exporter.export.onnx import export_onnx
    from exporter.model.sources import load_model
    from exporter.recipe.load import load_recipe

    dense = tmp / "dense"
    m = load_model(load_recipe(RECIPE, ["eval=null"]))
    export_hf(m.model, m.export_tokenizer, dense / "hf", "float32")
    del m
    export_onnx(dense / "hf", dense / "onnx")
    build_genai(dense / "hf", dense / "genai", "fp32")
    return dense


def gguf_file() -> Path | None:
    from exporter.model.sources import EMBEDDED

    info = EMBEDDED["smollm2-135m-instruct"]
    spec = importlib.util.find_spec(info["package"])
    return Path(spec.origin).parent / info["file"] if spec and spec.origin else None


def start_servers(dense: Path, args: argparse.Namespace, logs: Path) -> tuple[list[Server], list[subprocess.Popen]]:
    py, threads = sys.executable, str(args.threads)
    servers, procs = [], []
    ours = [
        ("onnx fp32, batched", dense, ["--max-batch", "8", "--format", "onnx"]),
        ("onnx fp32, queue", dense, ["--max-batch", "1", "--format", "onnx"]),
        ("genai fp32", dense, ["--max-batch", "8", "--format", "onnx-genai"]),
    ]
    if args.persona:
        ours.append((f"{args.persona.name} onnx fp32, batched", args.persona, ["--max-batch", "8", "--format", "onnx"]))
    for i, (name, path, options) in enumerate(ours):
        port = free_port()
        cmd = [py, "-m", "exporter", "serve", str(path), *options, "--port", str(port), "--threads", threads]
        procs.append(start(cmd, f"http://127.0.0.1:{port}/health", logs / f"ours-{i}.log", args.threads))
        servers.append(Server(f"ours: {name}", path.name, port))
    gguf = gguf_file()
    probe = subprocess.run([args.llama_python, "-c", "import llama_cpp.server"], capture_output=True)
    if gguf is None or probe.returncode != 0:
        print(f"llama.cpp left out: {args.llama_python} cannot import llama_cpp.server (llama-cpp-python[server])")
        return servers, procs
    port = free_port()
    cmd = [args.llama_python, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--n_threads", threads, "--n_threads_batch", threads, "--n_ctx", "2048"]
    cmd += ["--interrupt_requests", "False"]  # by default a new request cuts the stream being served
    procs.append(start(cmd, f"http://127.0.0.1:{port}/v1/models", logs / "llama.log", args.threads))
    servers.append(Server("llama.cpp server: dense Q4_1 GGUF", "model", port))
    return servers, procs


def quality(dense: Path, llama: bool, args: argparse.Namespace) -> None:
    """The quality class of each server's model against the fp32 export (the floors of
    exporter/recipe/formats.py; 8-bit: top-1 >= 97 %): ours run the fp32 export itself; llama.cpp's Q4_1 file
    is measured here, its next-token argmax against the fp32 ONNX export's on the same neutral positions."""
    import numpy as np
    from transformers import AutoTokenizer

    from exporter.runtime.onnx import OnnxCausalLM

    print(
        "\nquality against the fp32 export: ours serve it (onnx/ is it; genai/ fp32 is proven against it per persona)"
    )
    gguf = gguf_file()
    if not llama or gguf is None:
        return
    sys.path.insert(0, str(REPO / "ci"))
    from bench_deploy import AGREEMENT_TOKENS, llama_cpp_agreement, neutral_ids

    ids = neutral_ids(AutoTokenizer.from_pretrained(dense / "onnx"))
    fp32 = OnnxCausalLM.from_dir(dense / "onnx", threads=args.threads)
    reference = fp32.forward(ids, np.ones_like(ids))[0][0].argmax(-1)
    agreement = llama_cpp_agreement(args.llama_python, gguf, ids, reference, args.threads)
    print(
        f"llama.cpp, dense Q4_1 GGUF: top-1 {100 * agreement:.1f} % against the fp32 ONNX export on "
        f"{AGREEMENT_TOKENS} neutral positions (the 8-bit floor is 97 %)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense", type=Path, help="a folder with the dense model's onnx/ and genai/ (fp32)")
    parser.add_argument("--persona", type=Path, help="also a persona folder of a run (its onnx/)")
    parser.add_argument("--llama-python", default=sys.executable, help="interpreter with llama-cpp-python[server]")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--per-client", type=int, default=2, help="requests each client sends, one after another")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dense = args.dense or build(Path(tmp))
        servers, procs = start_servers(dense, args, Path(tmp))
        try:
            report(servers, args)
            quality(dense, any(s.name.startswith("llama.cpp") for s in servers), args)
            return 0
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(60)


def report(servers: list[Server], args: argparse.Namespace) -> None:
    for server in servers:  # warm-up
        measure(server, 1, 1, 8)
    figures: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    for r in range(args.rounds):
        order = servers[r % len(servers) :] + servers[: r % len(servers)]
        for clients in args.clients:
            for server in order:
                rate, ttft, per = measure(server, clients, args.per_client, args.max_tokens)
                figures.setdefault((server.name, clients), []).append((rate, ttft, per))
                print(
                    f"round {r + 1}: {server.name}, {clients} clients: {rate:.1f} tok/s, TTFT {ttft:.0f} ms", flush=True
                )
    load = os.getloadavg()[0]
    print(
        f"\n## serving: streamed greedy requests of at most {args.max_tokens} new tokens, {args.per_client} per client, "
        f"{args.threads} threads per server, median of {args.rounds} rounds (load average {load:.1f} on "
        f"{os.cpu_count()} cores)"
    )
    print(f"{'server':42s} {'clients':>7s} {'tok/s':>8s} {'TTFT ms':>9s} {'tokens/reply':>12s}")
    rates: dict[tuple[str, int], float] = {}
    for (name, clients), runs in figures.items():
        rate, ttft, per = (statistics.median(x[i] for x in runs) for i in range(3))
        rates[(name, clients)] = rate
        print(f"{name:42s} {clients:7d} {rate:8.1f} {ttft:9.0f} {per:12.1f}")
    llama = next((s.name for s in servers if s.name.startswith("llama.cpp")), None)
    if llama is None:
        print("\nllama.cpp not measured (llama-cpp-python[server] is optional; pass --llama-python)")
        return
    print("\naggregate tokens/s over llama.cpp's (goal >= 1 at 4 and 8 clients):")
    for server in servers:
        if server.name != llama:
            ratios = ", ".join(f"{c}: {rates[(server.name, c)] / rates[(llama, c)]:.2f}" for c in args.clients)
            print(f"  {server.name:40s} {ratios}")


if __name__ == "__main__":
    sys.exit(main())
