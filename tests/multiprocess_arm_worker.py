"""One process of the two-process arm test (tests/test_arm.py): runs the tiny chained arm
with jax.distributed on 127.0.0.1, as every worker of a TPU slice would run scripts/run_arm.py.

  python tests/multiprocess_arm_worker.py WORLD_JSON PROCESS_ID NUM_PROCESSES PORT
"""

import json
import os
import sys


def main():
    world, pid, nproc, port = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)
    import gin

    from rlaif_jax.cli import import_configurables
    from rlaif_jax.pipeline import run_arm

    import_configurables()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    gin.parse_config_files_and_bindings(
        [os.path.join(root, "configs", "experiments", "tiny_arm.gin")],
        [
            f"API_BASE = '{world['url']}'",
            f"ARM_DIR = '{world['arm_dir']}'",
            f"DATA_DIR = '{world['data_dir']}'",
            f"run_arm.base_model = '{world['base_model']}'",
            f"run_arm.prompt_source = '{world['prompts']}'",
            f"run_arm.eval_set = '{world['eval_set']}'",
            "run_arm.num_shards = 2",
            "run_arm.host0_timeout_s = 300",
            "make_mesh.data = -1",
            "sft_pipeline.batch_size = 4",
            "sft_pipeline.num_epochs = 2",
            "preference_pipeline.batch_size = 4",
            "preference_pipeline.num_epochs = 1",
            "evaluate.lc_bootstrap = 0",
        ],
        skip_unknown=False,
    )
    summary = run_arm()
    print(
        f"process {jax.process_index()} of {jax.process_count()} devices {jax.device_count()} done "
        f"{json.dumps(summary, sort_keys=True)}",
        flush=True,
    )


if __name__ == "__main__":
    main()
