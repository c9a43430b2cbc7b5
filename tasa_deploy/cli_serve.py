"""`tasa-deploy serve` and `tasa-deploy bench`: the commands that face the runtime (registered on the main app
in `cli.py`). Thin: `tasa_deploy.serve` starts llama-server or vLLM, `tasa_deploy.bench` talks to it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from tasa_deploy import UsageError
from tasa_deploy.cli_common import console, out_console, table
from tasa_deploy.outputs import check_output, write_json_atomic


def serve(
    path: Annotated[Path, typer.Argument(help="A .gguf file, an `export --format vllm` directory, or a quantized "
                                         "artifact (exported first: GGUF, or vLLM with --runtime vllm).")],
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 8080,
    runtime: Annotated[str, typer.Option(help="auto (by what PATH is), llamacpp or vllm.")] = "auto",
    ctx: Annotated[int, typer.Option(help="Context tokens, shared by the parallel slots.")] = 4096,
    parallel: Annotated[int, typer.Option(help="Requests decoded at once (llama-server slots).")] = 4,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads (default: all).")] = None,
) -> None:
    """Serve a GGUF with llama-server, or a vLLM export with vLLM (OpenAI-compatible API), until interrupted."""
    from tasa_deploy.serve import start_server

    with start_server(path, port=port, ctx=ctx, parallel=parallel, threads=threads, runtime=runtime,
                      log=lambda m: console.print(m)) as server:
        out_console.print(f"serving {path} with {server.runtime} at {server.url} (OpenAI-compatible: /completions, "
                          "/chat/completions); "
                          "Ctrl-C stops")
        try:
            while server.process.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass


def bench(
    target: Annotated[Optional[Path], typer.Argument(help="A .gguf, a vLLM export or an artifact to serve for the "
                                                     "benchmark (or give --url of a running server).")] = None,
    url: Annotated[Optional[str], typer.Option(help="An OpenAI-compatible base URL already serving, e.g. "
                                               "http://127.0.0.1:8080/v1.")] = None,
    tokenizer: Annotated[Optional[str], typer.Option(help="Model or directory whose tokenizer and chat template "
                                                     "render the prompts (default: the artifact's).")] = None,
    tasks: Annotated[str, typer.Option(help="Generation tasks scored on the server's answers: gsm8k, "
                                       "humaneval; empty for none.")] = "",
    limit: Annotated[Optional[int], typer.Option(help="Problems per task.")] = None,
    clients: Annotated[str, typer.Option(help="Load test: concurrent clients, comma-separated; empty for none.")] = "1,4,8",
    requests: Annotated[int, typer.Option(help="Load test: requests per client count (at least the clients).")] = 16,
    prompt_tokens: Annotated[int, typer.Option(help="Load test: prompt length in tokens.")] = 128,
    output_tokens: Annotated[int, typer.Option(help="Load test: output tokens per request (EOS ignored).")] = 64,
    parallel: Annotated[int, typer.Option(help="Server slots (when this command starts the server) and task "
                                          "requests in flight.")] = 8,
    runtime: Annotated[str, typer.Option(help="Runtime that serves TARGET: auto, llamacpp or vllm.")] = "auto",
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the results as JSON.")] = None,
    force: Annotated[bool, typer.Option("--force")] = False,
) -> None:
    """Task accuracy and latency of a served model, through its OpenAI-compatible API."""
    from tasa_deploy.bench import load_prompt, load_test, run_tasks
    from tasa_deploy.serve import start_server

    if (target is None) == (url is None):
        raise UsageError("give a TARGET to serve or the --url of a running server, not both")
    if out is not None:
        check_output(out, force=force, inputs=tuple(p for p in (target,) if p is not None))
    task_names = tuple(t for t in tasks.split(",") if t)
    counts = [int(c) for c in clients.split(",") if c.strip()]
    tok = _tokenizer(tokenizer, target)
    prompt = load_prompt(tok, prompt_tokens) if counts else []
    server = (start_server(target, parallel=parallel, runtime=runtime, log=lambda m: console.print(m))
              if target is not None else None)
    base = server.url if server else url.rstrip("/")
    try:
        report = {"target": str(target or url), "tasks": run_tasks(base, tok, task_names, limit, parallel) if task_names else {},
                  "load": [load_test(base, prompt, clients=c, requests=max(requests, c),
                                     output_tokens=output_tokens) for c in counts]}
        report["server_peak_rss_mib"] = server.peak_rss_mib() if server else None
    finally:
        if server:
            server.stop()
    _print(report)
    if out is not None:
        write_json_atomic(out, {"schema": "tasa-bench/1", **report}, force=force)


def _tokenizer(name: str | None, target: Path | None):
    from transformers import AutoTokenizer

    from tasa_deploy.model import resolve_model_dir

    if name is None:
        if target is None or not Path(target).is_dir():
            raise UsageError("--tokenizer is needed to render prompts for a .gguf or a --url (the model name or "
                             "HF directory the file was made from)")
        name = str(target)
    return AutoTokenizer.from_pretrained(resolve_model_dir(name), trust_remote_code=False)


def _print(report: dict) -> None:
    if report["tasks"]:
        out_console.print(table("tasks (scored on the server's answers)",
                                [{"task": k, **{m: v for m, v in r.items() if isinstance(v, (int, float))}}
                                 for k, r in report["tasks"].items()]))
    if report["load"]:
        out_console.print(table("load test", [
            {"clients": r["clients"], "req/s": r["requests_per_s"], "out tok/s": r["output_tok_per_s"],
             **{f"ttft {q} (s)": r["ttft_s"][q] for q in ("p50", "p90", "p99")},
             **{f"tpot {q} (ms)": 1000 * r["tpot_s"][q] if r["tpot_s"][q] is not None else None
                for q in ("p50", "p90", "p99")}} for r in report["load"]]))
    if report.get("server_peak_rss_mib"):
        out_console.print(f"server peak memory: {report['server_peak_rss_mib']:.0f} MiB")
