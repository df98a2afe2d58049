"""What the CLI's own modules import: every `berth` command is a fresh interpreter, so a module
one of them loads for nothing is paid for on every run (inspect and dataclasses alone were a
fifth of `berth version`). The client transport (bus.client, berth.client) is not covered here."""
import os
import subprocess
import sys

import pytest

# Modules that cost milliseconds to import and that the paths below do not need.
HEAVY = ("inspect", "dataclasses", "typing", "shutil", "tempfile", "csv", "platform", "ctypes", "hashlib")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PATHS = {
    "version": "from berth.cli.main import build_parser; build_parser(['version']).parse_args(['version'])",
    "tasks ls": "from berth.cli.main import build_parser; build_parser(['tasks', 'ls']).parse_args(['tasks', 'ls'])",
    "run": """
from berth.cli.main import build_parser
from berth.cli.output import parse_labels
from berth.cli.run import spec_options
from berth import oci
from bus.envelope import Reply, Request
argv = ['run', '--rm', '--env', 'A=1', '--net-host', '--cpus', '1', 'busybox', 'c1', 'true']
args = build_parser(argv).parse_args(argv)
parse_labels(args.label)
oci.generate('default', args.id, oci.with_process_args(*args.args), *spec_options(args))
Request.decode(Request(1, 'metadata', 'get_image', 'default', None, 1.0, {'name': args.image}).encode())
Reply.decode(Reply(1, result={'ok': 1}).encode()).unwrap()
""",
}


@pytest.mark.parametrize("path", sorted(PATHS))
def test_cli_path_does_not_import_heavy_modules(path):
    code = (f"import sys\nsys.path.insert(0, {ROOT!r})\n{PATHS[path]}\n"
            f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [], f"{path} imports {out.stdout.strip()}"
