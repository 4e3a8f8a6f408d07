"""
The command lines' shared pieces: an extra that a learner may skip.

UserError is what bad input raises anywhere in the project (a flag, a file, a folder, a device):
its message says what is wrong, where, and what to do. run() is the one place where it becomes a
single line on stderr and an exit code, instead of a traceback; any other exception is a bug and
keeps its traceback. The flag types check a value where argparse parses it, so a wrong number
fails in the first second with the flag's name and the valid range.
"""

import argparse
import math
import os
import sys
import tempfile

import torch


class UserError(ValueError):
    """Bad input from the person running the code; the message is the whole story."""


class Interrupted(Exception):
    """Ctrl-C, with the line that says what is kept and how to go on ("" on a process that stays quiet)."""


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose error is one line (the flag, what is wrong) and not the whole usage:
    `train.py: error: argument --batch-size: must be an integer >= 1, got '0' (see --help)`, exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def run(main):
    """Call main(); a UserError ends in one line 'error: ...' and exit code 2, Ctrl-C in one line and
    exit code 130 (128 + SIGINT, as a shell reports it). Any other exception keeps its traceback."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        if str(e):
            print(e, file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def given(parser, argv=None):
    """The dests of the flags written on the command line, as opposed to left at their defaults:
    argv parsed a second time with every default suppressed."""
    defaults = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in defaults:
            action.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(argv)))
    finally:
        for action, default in defaults:
            action.default = default


def pick_device(name):
    """--device: auto (cuda, else mps, else cpu) or a device this machine has; else a UserError that
    names it and what to use instead."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available()
                            else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "this PyTorch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
        raise UserError(f"--device {name}: CUDA is not available here ({why}); use --device cpu (or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to "
                        f"cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: Apple's MPS is not available here; use --device cpu (or auto)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: {device.type} is not supported; use auto, cpu, cuda, cuda:N or mps")
    return device


def writable_folder(path, flag):
    """Refuse a folder path that cannot be written (a file, or a folder this process may not write
    in) before any work starts; nothing is created: the nearest existing folder on the path is probed
    with a temporary file."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file, not a folder: give a folder (it is created if missing)")
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"{flag} {path}: {probe} is a file, so no folder can be made there: give another path")
    try:
        tempfile.TemporaryFile(dir=probe).close()
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write in {probe} ({e.strerror}): give a folder you may write "
                        "in") from None


def first_free(pattern):
    """pattern.format(n) for the first n = 1, 2, ... that names nothing yet: a new file or folder beside
    earlier ones, never over them (e.g. "out/eval-{}")."""
    return next(pattern.format(n) for n in range(1, 10**6) if not os.path.exists(pattern.format(n)))


def number(convert, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: text -> convert(text), which must be finite and within [low, high]
    (an open end excludes it); the error names the range."""
    kind = "an integer" if convert is int else "a finite number" if low is None and high is None else "a number"
    bounds = ([f"> {low}" if low_open else f">= {low}"] if low is not None else []) + \
             ([f"< {high}" if high_open else f"<= {high}"] if high is not None else [])
    wanted = f"{kind} {' and '.join(bounds)}".strip()

    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
        ok = math.isfinite(value) and (low is None or (value > low if low_open else value >= low)) and \
            (high is None or (value < high if high_open else value <= high))
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
        return value
    parse.__name__ = wanted  # argparse shows it in its messages
    return parse


POSITIVE_INT, COUNT = number(int, low=1), number(int, low=0)   # >= 1; >= 0
NONNEGATIVE, FINITE = number(float, low=0), number(float)       # >= 0; any finite number
POSITIVE = number(float, low=0, low_open=True)                  # > 0
SEED = number(int, low=0, high=2**32 - 1)                      # a seed, as numpy takes them too


def duration(value):
    """An argparse type: a time, "90s", "10m", "1.5h" or a bare number of minutes -> seconds (> 0)."""
    units = {"s": 1, "m": 60, "h": 3600}
    number_part, unit = (value[:-1], value[-1].lower()) if value[-1:].lower() in units else (value, "m")
    try:
        return POSITIVE(number_part) * units[unit]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be a time > 0 such as 90s, 10m or 1.5h (a bare number: minutes), "
                                         f"got {value!r}") from None


duration.__name__ = "a time such as 90s, 10m or 1.5h"


def text(value):
    """An argparse type: a non-empty string."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value
