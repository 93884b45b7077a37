"""A reward worker: `python -m visalign.rewards.worker NAME [--options JSON]` loads one reward, serves it on a free
local port and prints that address (one line, `http://127.0.0.1:PORT`) on stdout, which `WorkerReward` reads. It
stops when its stdin closes, so it never outlives the process that started it. Its stdout carries that line only:
anything else printed goes to stderr."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading

from visalign.rewards.registry import check_options, load
from visalign.rewards.server import address, bind, make_server


def _stop_when_stdin_closes(server) -> None:
    sys.stdin.read()
    server.should_exit = True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m visalign.rewards.worker", description=__doc__)
    parser.add_argument("reward", help="registered name or dotted path")
    parser.add_argument("--options", default="{}", help="the reward's constructor options as a JSON object")
    args = parser.parse_args(argv)
    # stdout carries the address line only: everything else (a reward's own prints included) goes to stderr, so
    # the parent's pipe never fills and never holds anything before the address
    announce = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    try:
        options = json.loads(args.options)
        if not isinstance(options, dict):
            raise ValueError(f"--options must be a JSON object, got {args.options!r}")
        check_options(args.reward, options)
        server = make_server({args.reward: load(args.reward, **options)}, {args.reward: options}, log_level="warning")
    except ValueError as err:  # unknown reward, bad option, or a reward that cannot import here
        print(f"visalign reward worker: error: {err}", file=sys.stderr)
        return 2
    sock = bind("127.0.0.1", 0)
    print(address(sock), file=announce, flush=True)
    announce.close()
    threading.Thread(target=_stop_when_stdin_closes, args=(server,), daemon=True).start()
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
