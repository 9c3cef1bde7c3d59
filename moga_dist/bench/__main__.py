"""Dispatch `python -m moga_dist.bench {step,comm}`."""
import sys


def main() -> None:
    commands = {"step": "moga_dist.bench.step", "comm": "moga_dist.bench.comm", "train": "moga_dist.bench.train"}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: python -m moga_dist.bench {{{','.join(commands)}}} [options]; got {sys.argv[1:]!r}")
    import importlib

    importlib.import_module(commands[sys.argv[1]]).main(sys.argv[2:])


if __name__ == "__main__":
    main()
