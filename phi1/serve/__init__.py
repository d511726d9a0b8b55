"""`python -m phi1.serve` / `phi1-serve`: an OpenAI-compatible HTTP server over a phi1 checkpoint.

    phi1-serve --model runs/phi1-small/final --port 8000
    # then, with the official client:
    #   OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused").completions.create(model=NAME, prompt=...)

Binds 127.0.0.1 unless --host says otherwise. Concurrent requests are batched (see phi1/serve/engine.py); the
chat template is documented in phi1/serve/protocol.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="phi1-serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="phi1 or HuggingFace phi model directory")
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
    parser.add_argument("--default-max-tokens", type=int, default=256, help="chat answers' length when not given")
    args = parser.parse_args(argv)
    if args.max_batch_size < 1 or args.batch_window_ms < 0 or args.default_max_tokens < 1:
        parser.error("--max-batch-size and --default-max-tokens must be >= 1, --batch-window-ms >= 0")
    return args


def build_service(args: argparse.Namespace):
    """Load the model and tokenizer named by `args` and wrap them in a CompletionService."""
    import torch

    from phi1.eval.loading import check_vocab, load_model, load_tokenizer
    from phi1.serve.server import CompletionService

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.model, device=device, dtype=args.dtype)
    tokenizer = load_tokenizer(args.model, args.tokenizer_type, args.tokenizer_model)
    check_vocab(model, tokenizer, args.model)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    return CompletionService(model, tokenizer, name, args.max_batch_size, args.batch_window_ms, args.default_max_tokens)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m phi1.serve` and `phi1-serve`."""
    from phi1.serve.server import start_server

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    service = build_service(args)
    server, thread = start_server(service, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"phi1-serve: model '{service.served_model}' on http://{host}:{port}/v1 "
          f"(context {service.context} tokens)", file=sys.stderr, flush=True)
    try:
        thread.join()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        service.engine.stop()
    return 0
