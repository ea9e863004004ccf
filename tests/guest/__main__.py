"""The guest's command line: `python -m tests.guest prepare` and `python -m tests.guest run -- CMD...` (as root)."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from types import FrameType

from tests.guest import build
from tests.guest.build import GuestError
from tests.guest.vm import Guest

# Like timeout(1): the command timed out, or the harness itself failed.
EXIT_TIMEOUT = 124
EXIT_HARNESS = 125


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so the guest is powered off and its files removed."""
    raise KeyboardInterrupt(f"signal {signum}")


def _text(output: str | bytes | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def cmd_prepare(args: argparse.Namespace) -> int:
    begin = time.monotonic()
    art = build.prepare()
    print(f"kernel     {art.kernel_version}\nvmlinux    {art.vmlinux}\ninitramfs  {art.initramfs}")
    print(f"prepared in {time.monotonic() - begin:.1f}s", file=sys.stderr)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    argv: list[str] = list(args.cmd)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise GuestError("run: no command given (run -- CMD ...)")
    with Guest(memory_mib=args.memory, cpus=args.cpus, boot_timeout=args.boot_timeout) as guest:
        begin = time.monotonic()
        try:
            result = guest.run(argv, cwd=args.cwd, timeout=args.timeout)
        except subprocess.TimeoutExpired as exc:
            sys.stdout.write(_text(exc.output))
            sys.stderr.write(f"{_text(exc.stderr)}guest: timed out after {args.timeout:g}s\n")
            return EXIT_TIMEOUT
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        print(f"guest: exit {result.returncode} after {time.monotonic() - begin:.1f}s", file=sys.stderr)
        if args.console:
            print(guest.console_tail(lines=200), file=sys.stderr)
        return result.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.guest", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="download and build the guest kernel and initramfs (cached)").set_defaults(
        func=cmd_prepare)
    run = sub.add_parser("run", help="boot the guest, run one command in it, print its output, exit with its code")
    run.add_argument("--cwd", default=None, help="working directory in the guest (default: the current one)")
    run.add_argument("--timeout", type=float, default=600.0, help="seconds before the command is killed")
    run.add_argument("--memory", type=int, default=1024, help="guest memory in MiB")
    run.add_argument("--cpus", type=int, default=2, help="guest CPUs")
    run.add_argument("--boot-timeout", type=float, default=120.0, help="seconds the guest may take to boot")
    run.add_argument("--console", action="store_true", help="print the guest's console afterwards")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the command and its arguments")
    run.set_defaults(func=cmd_run)
    args = parser.parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    try:
        code: int = args.func(args)
    except GuestError as exc:
        print(f"guest: {exc}", file=sys.stderr)
        return EXIT_HARNESS
    return code


if __name__ == "__main__":
    sys.exit(main())
