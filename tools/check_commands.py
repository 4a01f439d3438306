"""Run every command of README.md and docs/getting-started.rst as a new user would.

    python3 tools/check_commands.py [--except-readme-tests] [--workdir DIR]

Each documented block runs as written, in a fresh clone of this checkout's HEAD:

* README.md's ```bash blocks from the clone's root (they name ``.venv/bin/...`` themselves);
* docs/getting-started.rst's command blocks in a fresh virtual environment, activated (the
  guide's ``pip`` and ``python`` are the user's environment's);
* the guide's plain ``pip install .`` (a built copy, not editable): ``python -m fastbn
  --quick`` must then print the source-tree message in the checkout and run elsewhere.

A command that fails fails the check. ``--except-readme-tests`` leaves out README's test
command, for a caller that runs it itself (.ci/run). The clones share one build cache
(setup.py's FASTBN_BUILD_CACHE): the first build compiles, later ones reuse its modules.
About 15 minutes on 2 cores; tests/test_commands.py checks that the blocks are found.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_TREE_MESSAGE = "fastbn is imported from its source tree"
TABLE_END = "Summary (fastbn's time / the peer's"


def readme_blocks(text):
    """The ```bash blocks of README.md, each a list of command lines."""
    return [_lines(b) for b in re.findall(r"```bash\n(.*?)```", text, re.S)]


def rst_blocks(text):
    """The literal blocks (after a paragraph ending in ``::``) of an .rst page whose lines
    run a command (pip or python), each a list of command lines."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].rstrip().endswith("::") and not lines[i].lstrip().startswith(".."):
            i += 1
            body = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith("    ")):
                body.append(lines[i][4:])
                i += 1
            cmds = _lines("\n".join(body))
            if cmds and all(re.match(r"(pip|python3?) ", c) for c in cmds):
                blocks.append(cmds)
        else:
            i += 1
    return blocks


def _lines(block):
    """The commands of a block: blank lines dropped, trailing comments removed."""
    out = []
    for line in block.splitlines():
        line = re.sub(r"\s+#\s.*$", "", line).strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def documented():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = readme_blocks(f.read())
    with open(os.path.join(ROOT, "docs", "getting-started.rst"), encoding="utf-8") as f:
        guide = rst_blocks(f.read())
    return readme, guide


def _run(cmd, cwd, env, expect_ok=True, expect_text=None):
    print(f"$ {cmd}    (in {cwd})", flush=True)
    t0 = time.monotonic()
    proc = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tail = "\n".join(proc.stdout.splitlines()[-6:])
    print(f"  rc {proc.returncode}, {time.monotonic() - t0:.0f} s\n  " +
          tail.replace("\n", "\n  "), flush=True)
    if expect_ok and proc.returncode != 0:
        sys.exit(f"FAIL: `{cmd}` exited {proc.returncode}:\n{proc.stdout[-4000:]}")
    if not expect_ok and proc.returncode == 0:
        sys.exit(f"FAIL: `{cmd}` succeeded where it should have refused")
    if expect_text and expect_text not in proc.stdout:
        sys.exit(f"FAIL: `{cmd}` did not print {expect_text!r}:\n{proc.stdout[-4000:]}")
    return proc.stdout


def _clone(work, name):
    path = os.path.join(work, name)
    subprocess.run(["git", "clone", "-q", ROOT, path], check=True)
    return path


def _venv(path, base_env):
    subprocess.run([sys.executable, "-m", "venv", path], check=True)
    env = dict(base_env)
    env["VIRTUAL_ENV"] = path
    env["PATH"] = os.path.join(path, "bin") + os.pathsep + env["PATH"]
    return env


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--except-readme-tests", action="store_true",
                    help="leave out README's test command (the caller runs it)")
    ap.add_argument("--workdir", help="where the clones go (default: a temporary directory)")
    args = ap.parse_args(argv)
    readme, guide = documented()
    work = args.workdir or tempfile.mkdtemp(prefix="fastbn-commands-")
    os.makedirs(work, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["FASTBN_BUILD_CACHE"] = os.path.join(work, "build-cache")

    # README.md, from the clone's root, block by block
    clone = _clone(work, "readme")
    for block in readme:
        if args.except_readme_tests and any("pytest" in c for c in block):
            print(f"(left to the caller: {block})")
            continue
        for cmd in block:
            speed_table = cmd.endswith("-m fastbn") or "-m fastbn --" in cmd
            _run(cmd, clone, env, expect_text=TABLE_END if speed_table else None)

    # the getting-started guide, in an activated virtual environment
    clone = _clone(work, "guide")
    venv_env = _venv(os.path.join(work, "guide-venv"), env)
    for block in guide:
        for cmd in block:
            speed_table = cmd.endswith("-m fastbn") or "-m fastbn --" in cmd
            _run(cmd, clone, venv_env, expect_text=TABLE_END if speed_table else None)

    # its non-editable install: refused with the message in the checkout, fine elsewhere
    clone = _clone(work, "plain")
    plain_env = _venv(os.path.join(work, "plain-venv"), env)
    _run("pip install .", clone, plain_env)
    _run("python -m fastbn --quick", clone, plain_env, expect_ok=False,
         expect_text=SOURCE_TREE_MESSAGE)
    elsewhere = os.path.join(work, "elsewhere")
    os.makedirs(elsewhere, exist_ok=True)
    _run("python -m fastbn --quick", elsewhere, plain_env)
    print("every documented command: OK")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
