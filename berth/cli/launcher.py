"""Write the `berth` command: a script that starts the interpreter without `site`.

`site` runs every `.pth` file in site-packages at start-up; an editable install's finder, or a
host's certificate hook, can cost more than a whole `berth run`. The script this module writes
starts Python with `-S` and puts on `sys.path` exactly the directories where this interpreter
found berth and its dependencies when it was installed. Should anything be missing there (a
package moved or installed some other way since), it falls back to `site` and tries again.

    python -m berth.cli.launcher /usr/local/bin/berth
"""
from __future__ import annotations

import importlib.util
import os
import sys

# What `berth` imports on its common paths, so every directory that holds one is on the path.
MODULES = ("berth", "bus", "zmq", "msgpack", "rich", "tenacity")

TEMPLATE = '''#!{python} -S
# berth's command line, started without site's .pth hooks (see berth/cli/launcher.py).
import sys
sys.path[len(sys.path):] = {paths!r}
try:
    from berth.cli.main import main
except ImportError:
    import site
    site.main()
    from berth.cli.main import main
sys.exit(main())
'''


def module_paths(modules=MODULES) -> list[str]:
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


def render(python: str = sys.executable) -> str:
    return TEMPLATE.format(python=os.path.realpath(python), paths=module_paths())


def write(target: str) -> None:
    tmp = f"{target}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(render())
    os.chmod(tmp, 0o755)
    os.replace(tmp, target)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m berth.cli.launcher TARGET")
    write(sys.argv[1])
