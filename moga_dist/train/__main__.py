"""`python -m moga_dist.train --config configs/tiny_cpu.toml [--set section.key=value ...]`.

Launch with torchrun, the deepspeed launcher (`deepspeed --num_gpus N --module moga_dist.train`)
or mpirun; see launch/."""
import argparse
import sys

from .config import load
from .loop import run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moga_dist.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="TOML preset (configs/*.toml); defaults apply without one")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a preset value, e.g. --set training.steps=50 (repeatable)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        cfg = load(args.config, args.set)
        run(cfg)
    except ValueError as exc:
        print(f"moga_dist.train: error: {exc}", file=sys.stderr, flush=True)
        return 2
    _drain_and_shutdown()
    return 0


def _drain_and_shutdown() -> None:
    """Wait for every collective still in flight, then tear the process group down. Without it a
    gloo worker can drop a finished async all-gather (DeepSpeed issues them) while the interpreter
    shuts down, and the process aborts ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
