"""The paper's bandit experiment (the mechanistic explanation of RLAIF vs SFT):

  rlaif bandit --out_dir runs/bandit                      # the paper's setting
  rlaif bandit --teacher_mean 60 --beta 1 --out_dir runs/bandit_t60

Prints the expected true reward of the student, the RLAIF policy, the SFT policy and the
teacher; writes bandit.png and results.json to --out_dir. Every field of
rlaif_jax.bandit.BanditConfig is a flag, so the setting can be swept from the shell.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from rlaif_jax.bandit import BanditConfig, plot, run


def main(argv=None):

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out_dir", default="runs/bandit")
    for f in dataclasses.fields(BanditConfig):
        ap.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    args = ap.parse_args(argv)
    cfg = BanditConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BanditConfig)})
    res = run(cfg)
    os.makedirs(args.out_dir, exist_ok=True)
    er = res["expected_reward"]
    for name in ("student", "rlaif", "sft", "teacher"):
        print(f"E[r] {name:8s} {er[name]:7.3f}")
    print(f"seconds {res['seconds']:.2f}")
    png = os.path.join(args.out_dir, "bandit.png")
    plot(res, png, title=f"teacher mean {cfg.teacher_mean:g}, student mean {cfg.student_mean:g}, beta {cfg.beta:g}")
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump(
            {
                "config": res["config"],
                "expected_reward": er,
                "seconds": res["seconds"],
                "reward_hat": res["reward_hat"].tolist(),
                "policies": {k: v.tolist() for k, v in res["policies"].items()},
            },
            f,
            indent=1,
        )
    print(f"wrote {png}")
    return res
