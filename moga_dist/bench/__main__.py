"""Dispatch `python -m moga_dist.bench {step,comm,train,data,gpu,memory} [options]`; `--help` lists the commands,
`python -m moga_dist.bench COMMAND --help` the options of one."""
import sys

COMMANDS = {
    "step": "one optimizer step at LLaMA layer shapes: MOGA vs fused AdamW, Muon and the memory bound",
    "comm": "bytes each rank hands to collectives on one LLaMA-7B layer, beside the analytic minimum",
    "train": "the main job with MOGA and with DeepSpeed's AdamW, tokens/s of each",
    "data": "prepare MB/s, the job's per-rank RSS at 10 MB and 500 MB corpora, loader vs job tokens/s",
    "gpu": "the GPU check: exactness, MOGA vs fused AdamW time, launches, bandwidth, 2 ranks, CUDA graph",
    "memory": "per-rank peak RSS of steps, save and load at ~350M params, MOGA vs AdamW per engine",
}


def usage() -> str:
    lines = ["usage: python -m moga_dist.bench {" + ",".join(COMMANDS) + "} [options]", "", "commands:"]
    lines += [f"  {name:<6} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines + ["", "python -m moga_dist.bench COMMAND --help: the options of one command"])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(f"{usage()}\nmoga_dist.bench: error: expected a command, got {argv[:1] or 'none'}", file=sys.stderr)
        return 2
    import importlib

    importlib.import_module(f"moga_dist.bench.{argv[0]}").main(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
