"""The Python examples in README.md run as written, in a fresh interpreter (default JAX settings, as a user has)."""

import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


# Each block in a namespace of its own, one after another in one fresh interpreter (one JAX start-up, not four).
RUN_BLOCKS = """
import sys, traceback
for i, block in enumerate(sys.argv[1:], 1):
    try:
        exec(compile(block, f"README.md python block {i}", "exec"), {"__name__": "__main__"})
    except BaseException:
        traceback.print_exc()
        sys.exit(f"README example {i} failed:\\n{block}")
"""


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    result = subprocess.run([sys.executable, "-c", RUN_BLOCKS, *blocks], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def test_readme_commands_parse():
    """Every ``jaxcnn ...`` command line in README.md is accepted by the command's parser as written."""
    import shlex

    from jaxcnn import cli

    lines = [line.split("#")[0].strip() for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
             for line in block.splitlines() if line.startswith("jaxcnn ")]
    assert len(lines) >= 10
    parser = cli.build_parser()
    for line in lines:
        argv = shlex.split(line.replace("<time>", "0"))[1:]
        if "--help" in argv or "--version" in argv:
            continue
        parser.parse_args(argv)  # an unknown flag or bad choice exits with status 2 and fails the test
