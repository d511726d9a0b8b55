"""`python -m phi1.serve` / `phi1-serve`: an OpenAI-compatible HTTP server over a phi1 checkpoint.

    phi1-serve --model runs/phi1-small/final --port 8000
    # then, with the official client:
    #   OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused").completions.create(model=NAME, prompt=...)

Binds 127.0.0.1 unless --host says otherwise. Concurrent requests are batched (see phi1/serve/engine.py); the
request parameters, their limits and the chat template are documented in phi1/serve/protocol.py, the server's
limits (concurrency, timeouts, body size) in phi1/serve/server.py. SIGINT or SIGTERM stops it gracefully.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import NoReturn

from phi1.cli import UserError, run_cli

PROG = "phi1-serve"


class _Parser(argparse.ArgumentParser):
    """argparse whose errors become one line through phi1.cli.run_cli (exit status 2) instead of usage + exit."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see {PROG} --help)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from phi1.serve.server import ServerLimits

    limits = ServerLimits()
    parser = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="phi1 or HuggingFace phi model directory, a training run directory or an iter_* "
                             "checkpoint")
    parser.add_argument("--tokenizer-type", help="default: the tokenizer inside --model")
    parser.add_argument("--tokenizer-model", help="tokenizer file or directory")
    parser.add_argument("--served-model-name", help="the 'model' clients name (default: the directory's name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--max-batch-size", type=int, default=32, help="sequences generated together")
    parser.add_argument("--batch-window-ms", type=float, default=5.0,
                        help="how long the engine waits for more requests before starting a batch")
    parser.add_argument("--default-max-tokens", type=int, default=256,
                        help="completion length when a request gives no max_tokens (at most what the context "
                             "leaves after the prompt)")
    guard = parser.add_argument_group("limits (what clients can make the server hold)")
    guard.add_argument("--max-concurrent-requests", type=int, default=limits.max_concurrent_requests,
                       help="generation requests in flight; more are answered 429 with Retry-After")
    guard.add_argument("--max-body-bytes", type=int, default=limits.max_body_bytes, help="larger bodies get 413")
    guard.add_argument("--header-timeout", type=float, default=limits.header_timeout_s,
                       help="seconds for a request's line and headers to arrive (then 408 and close)")
    guard.add_argument("--body-timeout", type=float, default=limits.body_timeout_s,
                       help="seconds for a request's body to arrive (then 408 and close)")
    guard.add_argument("--keep-alive-timeout", type=float, default=limits.keep_alive_s,
                       help="seconds an idle kept-alive connection stays open")
    guard.add_argument("--write-timeout", type=float, default=limits.write_timeout_s,
                       help="seconds a client may leave its response unread before it is disconnected")
    guard.add_argument("--request-timeout", type=float, default=limits.request_timeout_s,
                       help="seconds a generation may take before the request gets 503")
    guard.add_argument("--shutdown-timeout", type=float, default=limits.shutdown_timeout_s,
                       help="seconds running requests get to finish after SIGINT/SIGTERM")
    args = parser.parse_args(argv)
    for name in ("max_batch_size", "default_max_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.batch_window_ms <= 60_000:
        parser.error(f"--batch-window-ms must be between 0 and 60000, got {args.batch_window_ms}")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be between 0 and 65535, got {args.port}")
    args.limits = ServerLimits(
        max_concurrent_requests=args.max_concurrent_requests, max_body_bytes=args.max_body_bytes,
        max_drain_bytes=max(limits.max_drain_bytes, args.max_body_bytes), header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout, keep_alive_s=args.keep_alive_timeout, write_timeout_s=args.write_timeout,
        request_timeout_s=args.request_timeout, shutdown_timeout_s=args.shutdown_timeout,
    )
    try:
        args.limits.check()
    except ValueError as error:
        parser.error(str(error))
    return args


def build_service(args: argparse.Namespace):
    """Load the model and tokenizer named by `args` and wrap them in a CompletionService."""
    import torch

    from phi1.loading import check_vocab, load_model, load_tokenizer
    from phi1.serve.server import CompletionService

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.model, device=device, dtype=args.dtype)
    tokenizer = load_tokenizer(args.model, args.tokenizer_type, args.tokenizer_model)
    check_vocab(model, tokenizer, args.model)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    return CompletionService(model, tokenizer, name, args.max_batch_size, args.batch_window_ms, args.default_max_tokens)


def serve(argv: list[str] | None = None) -> int:
    """Parse, load, bind, serve until SIGINT/SIGTERM; returns 0. Raises ValueError/UserError for bad input."""
    from phi1.serve.server import bind_socket, serve_forever

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    sock = bind_socket(args.host, args.port)  # a port in use is reported before the model loads
    service = build_service(args)
    sock.listen(args.limits.backlog)
    host, port = sock.getsockname()[:2]
    print(f"{PROG}: model '{service.served_model}' on http://{host}:{port}/v1 (context {service.context} tokens, "
          f"at most {args.limits.max_concurrent_requests} requests in flight)", file=sys.stderr, flush=True)
    stopped_by = serve_forever(service, sock, args.limits)
    print(f"{PROG}: stopped" + (f" by {stopped_by}" if stopped_by else ""), file=sys.stderr, flush=True)
    return 0


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point of `python -m phi1.serve` and `phi1-serve`: a user error is one line and exit status 2."""
    run_cli(serve, prog=PROG, argv=argv)
