"""Write the `berth` and `berthd` commands: scripts that start the interpreter without `site`.

`site` runs every `.pth` file in site-packages at start-up; an editable install's finder, or a
host's certificate hook, can cost more than a whole `berth run`, and delays every berthd start.
The scripts this module writes start Python with `-S` and put on `sys.path` exactly the
directories where this interpreter found berth and its dependencies when it was installed.
Should anything be missing there (a package moved or installed some other way since), they fall
back to `site` and try again.

    python -m berth.cli.launcher berth /usr/local/bin/berth
    python -m berth.cli.launcher berthd /usr/local/bin/berthd
"""
from __future__ import annotations

import importlib.util
import os
import sys

# Each command: its entry point, and what it imports, so every directory holding one is on the path.
COMMANDS = {
    "berth": ("berth.cli.main", ("berth", "bus", "zmq", "msgpack", "rich", "tenacity")),
    "berthd": ("actors.supervisor", ("actors", "bus", "shimd", "berth", "zmq", "msgpack", "setproctitle",
                                     "sdnotify", "prometheus_client", "tenacity", "httpx", "httpcore", "h11",
                                     "anyio", "sniffio", "idna", "certifi", "zstandard", "isal", "re2")),
}

TEMPLATE = '''#!{python} -S
# {command}, started without site's .pth hooks (see berth/cli/launcher.py).
import sys
sys.path[len(sys.path):] = {paths!r}
try:
    from {module} import main
except ImportError:
    import site
    site.main()
    from {module} import main
sys.exit(main())
'''


def module_paths(modules) -> list[str]:
    """The sys.path entries (in sys.path's order) that hold `modules`."""
    holders = set()
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin:
            raise SystemExit(f"berth.cli.launcher: {name} is not importable by {sys.executable}")
        package_dir = os.path.dirname(spec.origin)
        holders.add(os.path.dirname(package_dir) if spec.submodule_search_locations else package_dir)
    ordered = [p for p in sys.path if p and os.path.realpath(p) in {os.path.realpath(h) for h in holders}]
    missing = [h for h in holders if os.path.realpath(h) not in {os.path.realpath(p) for p in ordered}]
    return ordered + sorted(missing)


def render(command: str, python: str = sys.executable) -> str:
    module, modules = COMMANDS[command]
    return TEMPLATE.format(python=os.path.realpath(python), command=command, module=module,
                           paths=module_paths(modules))


def write(command: str, target: str) -> None:
    tmp = f"{target}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(render(command))
    os.chmod(tmp, 0o755)
    os.replace(tmp, target)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in COMMANDS:
        raise SystemExit(f"usage: python -m berth.cli.launcher {{{'|'.join(COMMANDS)}}} TARGET")
    write(sys.argv[1], sys.argv[2])
