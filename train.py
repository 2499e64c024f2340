"""Train InternVL: supervised fine-tuning / pre-training (the paper's SFT objective, square-averaged loss), and
the Cascade RL stages MPO and GSPO (`config.stage`, see internvl_jax/training/stages.py).

  python train.py --config=configs/digits.py --workdir=runs/digits
  python train.py --config=configs/internvl3_5_sft.py --workdir=runs/sft --config.optim.lr=1e-5
  python train.py --config=configs/digits_mpo.py --workdir=runs/digits_mpo --config.model.checkpoint=runs/digits/export

Rerunning the same command on the same workdir resumes from its latest checkpoint. The same command runs
on every host of a multi-host job (TPU pod slice, GPU cluster): `jax.distributed.initialize()` is called
when the environment describes one (see WORKSPACE.md, "Training").
"""
import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file with get_config()", lock_config=True)
flags.DEFINE_string("workdir", None, "checkpoints, metrics and the exported model go here", required=True)
flags.mark_flag_as_required("config")

# Set by TPU pod runtimes, SLURM, Open MPI, or by hand (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).
_MULTI_HOST_ENV = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def _multi_host() -> bool:
  for name in _MULTI_HOST_ENV:
    value = os.environ.get(name, "")
    if name == "JAX_COORDINATOR_ADDRESS" and value:
      return True
    if name == "TPU_WORKER_HOSTNAMES" and "," in value:
      return True
    if name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE") and value.isdigit() and int(value) > 1:
      return True
  return False


def main(argv):
  del argv
  import jax
  if _multi_host():
    # Cluster runtimes are auto-detected; a hand-made launch names its size and rank (jax reads only the address).
    kw = {k: int(os.environ[v]) for k, v in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID"))
          if v in os.environ}
    jax.distributed.initialize(**kw)
  from internvl_jax.training import stages
  stages.train(_CONFIG.value, flags.FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
