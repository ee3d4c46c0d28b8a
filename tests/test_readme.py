"""The Python examples in README.md run as written, in a fresh interpreter (default JAX settings, as a user has)."""

import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    for block in blocks:
        result = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"README example failed:\n{block}\n{result.stderr[-3000:]}"


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
