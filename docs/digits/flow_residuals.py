"""Diagnostic behind docs/digits.md, "Why nabla-GFlowNet stops half-way": per state of fresh trajectories of a
finished digits run (its last checkpoint), the forward-looking baseline ``FL = beta grad log R(x_hat(x))``, the
learned flow residual ``g`` and the policy's change ``eps_theta - eps#``.

    python docs/digits/flow_residuals.py RUN_DIR     # a run of the digits preset (checkpoints/ kept)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from fastnabla.config.loader import build_config
from fastnabla.methods.nabla_gfn.fl_states import forward_looking_fn
from fastnabla.run.config import RunConfig
from fastnabla.run.driver import build_task_run, build_trainer
from fastnabla.training.checkpoint import CheckpointManager
from fastnabla.training.distributed import DistContext


def main(run_dir: Path, seed: int = 123) -> None:
    torch.set_num_threads(1)
    cfg = build_config(RunConfig, None, run_dir / "config.yaml", [])
    dist = DistContext()
    run = build_task_run(cfg, dist)
    task = run.task
    trainer = build_trainer(task, cfg, dist)
    CheckpointManager(run_dir / "checkpoints", 2, dist).load(trainer)
    torch.manual_seed(seed)
    traj = trainer.sample(10_000)  # an iteration number the run never used: fresh trajectories
    mdp, T = task.mdp, task.mdp.num_steps
    fl = forward_looking_fn(task, cfg.method)
    print(f"mean log R of the {traj.states.shape[0]} fresh trajectories: {float(traj.log_reward.mean()):.3f}")
    print("step mean|FL| median|FL|  |g|  spread(g)/|g| cos(g,FL) |eps_theta-eps#|")
    with torch.no_grad():
        for s in range(1, T + 1):
            x = traj.states[:, s].float()
            step = torch.full((x.shape[0],), s, dtype=torch.long)
            sc = step.clamp(max=T - 1)
            ab = mdp.gather(sc, x.ndim, x.dtype)["alpha_bar"]
            with torch.enable_grad():
                f = fl(x, sc, ab, step == T, traj.cond, None).detach().flatten(1)
            g = task.flow(x, step, traj.cond).float().flatten(1)
            de = float("nan")
            if s < T:
                de = float((task.policy_eps(x, sc, traj.cond) - task.pretrained_eps(x, sc, traj.cond)).flatten(1)
                           .norm(dim=1).mean())
            fn, gn = f.norm(dim=1), g.norm(dim=1)
            spread = float((g - g.mean(0, keepdim=True)).norm(dim=1).mean() / gn.mean())
            cos = float(torch.nn.functional.cosine_similarity(f, g, dim=1).mean())
            print(f"{s:4d} {fn.mean():8.3f} {fn.median():10.4f} {gn.mean():6.3f} {spread:13.3f} {cos:+9.3f} {de:10.3f}")
    run.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
