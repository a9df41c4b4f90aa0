"""`hisa serve` and `hisa bench-serve`: argument parsing and the two commands.

`add_serve_parser(sub)` / `add_bench_serve_parser(sub)` add the subcommands to hisa's argparse
subparsers; each sets `func` (run_serve / run_bench_serve, returning an exit code). Every engine flag
comes from `hisa.cli.add_engine_args` and reaches the engine through `hisa.cli.engine_kwargs`, so new
engine options work here without changes. This module also runs alone:

    python -m hisa.server.cli serve --device cpu --port 8000
    python -m hisa.server.cli bench-serve --num-requests 64 --concurrency 16 --out results.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import threading

from hisa.cli import writable_out
from hisa.errors import HisaError

API_KEY_ENV = "HISA_API_KEY"
ENGINE_DEATH_EXIT_DELAY_S = 5.0  # /health says 503 this long before the process exits

SERVE_EXAMPLES = """\
examples:
  hisa serve                                   # embedded SmolLM2 on http://127.0.0.1:8000/v1
  hisa serve --model ./Qwen2.5-0.5B-Instruct --device cuda --served-model-name qwen --port 8001
  HISA_API_KEY=sk-local hisa serve --host 0.0.0.0   # clients must send 'Authorization: Bearer sk-local'
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}'
"""

BENCH_EXAMPLES = """\
examples:
  hisa bench-serve --num-requests 64 --concurrency 16 --input-len 128 --output-len 32
  hisa bench-serve --endpoint chat --base-url http://127.0.0.1:8001 --out bench/results/serve.json
"""


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Add `serve` (OpenAI-compatible HTTP server) to hisa's subparsers."""
    p = subparsers.add_parser(
        "serve", help="run the OpenAI-compatible HTTP server",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                    "/v1/models, /health, /metrics). See docs/server.md.",
        epilog=SERVE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    g.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    g.add_argument("--served-model-name", default=None,
                   help="the model name clients send and /v1/models lists (default: --model as given, or "
                        "the embedded model's name)")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="server log level (default: info)")
    g.add_argument("--disable-access-log", action="store_true", help="do not log each HTTP request")
    g.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1 requests (401 without it); default: the "
                        f"{API_KEY_ENV} environment variable, which keeps the key out of `ps` (unset: no key)")
    from hisa.cli import add_engine_args  # here, not at the top: hisa.cli imports this module

    add_engine_args(p)
    p.set_defaults(func=run_serve)
    return p


def add_bench_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Add `bench-serve` (load generator against a running server) to hisa's subparsers."""
    p = subparsers.add_parser(
        "bench-serve", help="load-test a running server (TTFT, TPOT, ITL, throughput)",
        description="Send streamed requests with bounded concurrency to an OpenAI-compatible server and report "
                    "latency and throughput. Targets only this machine unless --allow-remote.",
        epilog=BENCH_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server URL (default: http://127.0.0.1:8000)")
    p.add_argument("--num-requests", type=int, default=64, help="requests to send in all (default: 64)")
    p.add_argument("--concurrency", type=int, default=16, help="most requests in flight (default: 16)")
    p.add_argument("--input-len", type=int, default=128, help="prompt length in words or token ids (default: 128)")
    p.add_argument("--output-len", type=int, default=32, help="tokens to generate per request (default: 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts (default: 0)")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions",
                   help="which API to load (default: completions)")
    p.add_argument("--prompt-type", choices=["words", "token-ids"], default="words",
                   help="random words (any tokenizer) or random token ids (models without one); default: words")
    p.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0, greedy)")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request (default: 300)")
    p.add_argument("--max-duration", type=float, default=1800.0,
                   help="stop the whole run after this many seconds (default: 1800)")
    p.add_argument("--allow-remote", action="store_true", help="allow a base URL that is not this machine")
    p.add_argument("--api-key", default=None,
                   help=f"the server's API key (default: the {API_KEY_ENV} environment variable); not recorded")
    p.add_argument("--out", default=None, help="write the results as JSON to this file")
    p.set_defaults(func=run_bench_serve)
    return p


def default_served_name(model: str | None, engine) -> str:
    """--model as given; for the embedded default, its file name without extensions (SmolLM2-135M-Instruct)."""
    if model:
        return model
    path = getattr(engine.loaded.source, "path", None)
    return path.name.split(".")[0] if path is not None else engine.model_config.name


def run_serve(args: argparse.Namespace) -> int:
    """Load the model, then serve until interrupted. Returns the exit code."""
    import uvicorn

    from hisa.cli import engine_kwargs
    from hisa.config import EngineConfig
    from hisa.engine.llm_engine import LLMEngine
    from hisa.server.app import create_app
    from hisa.server.async_engine import EngineDeadError

    from hisa.chat_template import load_chat_template, set_chat_template

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    if not 0 < args.port < 65536:
        raise HisaError(f"port must be in 1..65535, got {args.port}")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if api_key is not None and not api_key.strip():
        raise HisaError("--api-key is empty")
    template = load_chat_template(args.chat_template) if args.chat_template is not None else None
    _check_can_listen(args.host, args.port)   # before the model loads, which can take minutes
    engine = LLMEngine(EngineConfig(**engine_kwargs(args)))
    if template is not None:
        set_chat_template(engine.tokenizer, template)
    name = args.served_model_name or default_served_name(args.model, engine)
    server: uvicorn.Server | None = None

    def on_engine_dead(error: BaseException) -> None:  # engine thread: the device is broken, exit soon
        logging.getLogger("hisa.server").critical(
            "the engine has stopped for good (%r); /health reports 503 and the server exits in %.0f s",
            error, ENGINE_DEATH_EXIT_DELAY_S)
        if server is not None:
            threading.Timer(ENGINE_DEATH_EXIT_DELAY_S, lambda: setattr(server, "should_exit", True)).start()

    app = create_app(engine, served_model_name=name, api_key=api_key, on_engine_dead=on_engine_dead)
    print(f"[hisa] serving {name} on {engine.config.device} ({engine.config.torch_dtype}), context "
          f"{engine.max_model_len} tokens, {engine.allocator.num_pages} KV pages of {engine.config.page_size}, "
          f"{engine.config.max_num_batched_tokens} tokens per step, API key {'required' if api_key else 'off'}: "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           access_log=not args.disable_access_log, timeout_graceful_shutdown=5))
    server.run()
    return 0 if app.state.async_engine.error is None or isinstance(app.state.async_engine.error, EngineDeadError) \
        else 1


def _check_can_listen(host: str, port: int) -> None:
    """A HisaError if `host:port` cannot be listened on (taken by another process, an address not here).
    uvicorn binds the same way (SO_REUSEADDR) once the model is loaded."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise HisaError(f"--host {host}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as e:
            raise HisaError(f"cannot listen on {host}:{port}: {e.strerror} (another server there? use --port)") from None


def run_bench_serve(args: argparse.Namespace) -> int:
    """Run the load test, print the table, write JSON if --out. Exit code 1 if any request failed."""
    from hisa.bench.serve import BenchConfig, format_table, run_benchmark

    cfg = BenchConfig(base_url=args.base_url, num_requests=args.num_requests, concurrency=args.concurrency,
                      input_len=args.input_len, output_len=args.output_len, seed=args.seed, endpoint=args.endpoint,
                      prompt_type=args.prompt_type, model=args.model, temperature=args.temperature,
                      request_timeout_s=args.request_timeout, max_duration_s=args.max_duration,
                      allow_remote=args.allow_remote,
                      api_key=args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None)
    path = writable_out(args.out) if args.out else None   # before the run: a bad path must not lose its results
    results = run_benchmark(cfg)
    results["command"] = _bench_command(args)
    print(format_table(results))
    if path is not None:
        text = json.dumps(results, indent=2) + "\n"
        try:
            path.write_text(text)
        except OSError as e:
            print(text, end="")   # the results, where they can still be kept
            raise HisaError(f"cannot write --out {path}: {e.strerror}; the JSON is printed above") from None
        print(f"results written to {path}")
    return 1 if results["failed"] else 0


def _bench_command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (every option spelled out)."""
    parts = ["hisa", "bench-serve"]
    for action in add_bench_serve_parser(argparse.ArgumentParser().add_subparsers())._actions:
        if not action.option_strings or action.dest in ("help", "api_key"):
            continue
        value = getattr(args, action.dest, None)
        if isinstance(value, bool):
            parts += [action.option_strings[0]] if value else []
        elif value is not None:
            parts += [action.option_strings[0], str(value)]
    return " ".join(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hisa.server.cli",
                                     description="hisa's OpenAI-compatible server and its load generator")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_serve_parser(sub)
    add_bench_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from hisa.cli import run_parser

    return run_parser(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
