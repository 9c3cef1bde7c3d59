"""`python -m moga_dist.train --config configs/tiny_cpu.toml [--set section.key=value ...]`.

Launch with torchrun, the deepspeed launcher (`deepspeed --num_gpus N --module moga_dist.train`)
or mpirun; see launch/.

Exit status: 0 done; 2 bad input (config, corpus, checkpoints, a failed checkpoint write such as a
full disk), one line on stderr; 3 the run diverged (non-finite loss or state, too many skipped
steps): the last finite checkpoint is kept and named."""
import argparse
import os
import sys

from .config import load
from .loop import TrainingDiverged, run


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
    except TrainingDiverged as exc:
        return _fail(f"diverged: {exc}", 3)
    except ValueError as exc:
        return _fail(f"error: {exc}", 2)
    except OSError as exc:          # e.g. the summary or TensorBoard files on a full disk
        return _fail(f"error: {exc.strerror or exc}: {exc.filename or ''}", 2)
    _drain_and_shutdown()
    return 0


def _fail(text: str, code: int) -> int:
    """One line per rank (ranks of a multi-process run name themselves), no traceback."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    who = f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""
    print(f"moga_dist.train: {who}{' '.join(text.split())}", file=sys.stderr, flush=True)
    return code


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
