"""One process of the multi-process CPU test (tests/test_multiprocess.py), or the
single-process reference. Trains the toy SFT for a few steps and exports the model.

  python tests/multiprocess_worker.py OUT_DIR DATA_DIR PROCESS_ID NUM_PROCESSES PORT
PROCESS_ID = -1 runs the single-process reference that feeds the same global batches.
"""

import functools
import os
import sys


def main():
    out, data, pid, nproc, port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    import jax

    if pid >= 0:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)
    import numpy as np

    from rlaif_jax import sharding as shd
    from rlaif_jax.data.pipeline.builders import sft_pipeline
    from rlaif_jax.data.tokenize.tokenizer import load_tokenizer
    from rlaif_jax.models import DecoderConfig
    from rlaif_jax.train import SFT, make_optimizer
    from rlaif_jax.train.loop import LoopSettings, train

    tok = load_tokenizer(os.path.join(data, "tokenizer"))
    pipeline = functools.partial(
        sft_pipeline,
        os.path.join(data, "demonstrations"),
        batch_size=4,
        seq_len=32,
        max_length=32,
        max_prompt_length=16,
        prefetch=0,
    )

    class Concat:
        """The global batches a 2-process run sees, built in one process."""

        def __init__(self, tokenizer, state=None):
            self.its = [pipeline(tokenizer=tokenizer, process_index=p, process_count=nproc) for p in range(nproc)]

        def __next__(self):
            parts = [next(it) for it in self.its]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

        def get_state(self):
            return {}

        epoch = 0

    data_fn = (lambda tokenizer, state: Concat(tokenizer)) if pid < 0 else pipeline
    cfg = DecoderConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=64,
    )
    train(
        run_dir=out,
        objective=SFT(),
        train_data=data_fn,
        num_steps=4,
        model_config=cfg,
        tokenizer=tok,
        optimizer=functools.partial(make_optimizer, learning_rate=1e-2),
        mesh=functools.partial(shd.make_mesh, -1, 2, 1),
        loop=LoopSettings(log_every=2, async_checkpoint=False),
    )
    print(f"process {pid}: devices {jax.device_count()} done")


if __name__ == "__main__":
    main()
