"""argparse types shared by the benchmarks' command lines: each checks its option when the
command line is parsed, before any work, and says what is wrong."""
import argparse
import os


def positive_count(text):
    """argparse type of --threads and --rounds: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def writable_file(text):
    """argparse type of an output file: a path where a file can be written, tried now
    (before any work) by opening it for appending; a file this creates is removed again."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a file")
    existed = os.path.exists(text)
    try:
        with open(text, "a"):
            pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {exc.strerror}") from None
    if not existed:
        os.remove(text)
    return text
