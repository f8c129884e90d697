#!/usr/bin/env python
"""Serve a local HF-format checkpoint as an OpenAI-compatible API (/v1/chat/completions,
/v1/models, and the Batch API subset), so it can act as teacher or critic for the feedback
stages with no other software.

  python scripts/serve_openai.py --hf_dir runs/sft/hf --name sft-7b --port 8000
  # then: FeedbackClient.base_url = "http://127.0.0.1:8000/v1", FeedbackClient.model = "sft-7b"

Set --api_key_env to require `Authorization: Bearer $THAT_VARIABLE` from clients.
"""

import argparse
import logging
import os
import sys


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf_dir", required=True)
    ap.add_argument("--name", default=None, help="model id clients ask for (default: the directory name)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--template", choices=["paper", "model"], default="paper")
    ap.add_argument("--max_length", type=int, default=2048, help="prompt + completion tokens")
    ap.add_argument("--max_prompt_length", type=int, default=1536)
    ap.add_argument("--max_batch", type=int, default=32)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--mesh", default=None, help="data,fsdp,tensor sizes, e.g. 1,-1,1")
    ap.add_argument("--api_key_env", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from rlaif_jax.feedback.server import make_app, serve_forever
    from rlaif_jax.feedback.server.model_backend import LocalModel, ModelBackend

    lm = LocalModel(args.hf_dir, template=args.template, max_prompt_length=args.max_prompt_length,
                    max_length=args.max_length, dtype=args.dtype,
                    mesh_shape=[int(x) for x in args.mesh.split(",")] if args.mesh else None)
    name = args.name or os.path.basename(os.path.normpath(args.hf_dir))
    key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.api_key_env and not key:
        ap.error(f"--api_key_env {args.api_key_env} is not set")
    serve_forever(make_app(ModelBackend(lm, name, max_batch=args.max_batch), api_key=key), args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
