"""Serve a local HF-format checkpoint as an OpenAI-compatible API (/v1/chat/completions,
/v1/models, and the Batch API subset), so it can act as teacher or critic for the feedback
stages with no other software.

  rlaif serve --hf_dir runs/sft/hf --name sft-7b --port 8000
  # then: FeedbackClient.base_url = "http://127.0.0.1:8000/v1", FeedbackClient.model = "sft-7b"

  rlaif serve --synthetic --port 8000
  # the synthetic world's weak-teacher, strong-teacher, reference and critic (the knobs are
  # gin bindings of synthetic_world: --gin_param="synthetic_world.critic_noise=0.2")

Set --api_key_env to require `Authorization: Bearer $THAT_VARIABLE` from clients.
"""

import argparse
import logging
import os

import gin

from rlaif_jax.feedback.server import make_app, serve_forever
from rlaif_jax.feedback.server.model_backend import LocalModel, ModelBackend
from rlaif_jax.synthetic.backend import synthetic_world


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf_dir", help="serve this HF-format checkpoint")
    src.add_argument("--synthetic", action="store_true", help="serve the synthetic world (rlaif_jax.synthetic)")
    ap.add_argument("--gin_param", action="append", default=[], help="synthetic_world bindings (repeatable)")
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

    key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.api_key_env and not key:
        ap.error(f"--api_key_env {args.api_key_env} is not set")
    if args.synthetic:
        gin.parse_config(args.gin_param)
        serve_forever(make_app(synthetic_world(), api_key=key), args.host, args.port)
        return 0

    lm = LocalModel(
        args.hf_dir,
        template=args.template,
        max_prompt_length=args.max_prompt_length,
        max_length=args.max_length,
        dtype=args.dtype,
        mesh_shape=[int(x) for x in args.mesh.split(",")] if args.mesh else None,
    )
    name = args.name or os.path.basename(os.path.normpath(args.hf_dir))
    serve_forever(make_app(ModelBackend(lm, name, max_batch=args.max_batch), api_key=key), args.host, args.port)
    return 0
