"""`berth images ls|rm|tag`: image records, with sizes and platforms read from their content.

(pull, push, import, export, check and mount come with the transfer and snapshot services.)
"""
from __future__ import annotations

import sys

from berth.cli.output import add_format, as_json, labels_text, table

INDEX_TYPES = {"application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json"}
MANIFEST_TYPES = {"application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json"}
MAX_JSON_BLOB = 4 << 20       # manifests, indexes and configs larger than this are not read


def register(sub) -> None:
    p = sub.add_parser("images", aliases=["image", "i"], help="manage images")
    cmds = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    ls = cmds.add_parser("ls", aliases=["list"], help="list images")
    ls.add_argument("-q", "--quiet", action="store_true", help="print only the image names")
    add_format(ls)
    ls.add_argument("filters", nargs="*", metavar="FILTER", help="e.g. 'name~=^docker.io/'; any one may match")
    ls.set_defaults(func=list_)

    rm = cmds.add_parser("rm", aliases=["remove", "delete", "del"], help="remove images; print each one removed")
    rm.add_argument("--sync", action="store_true",
                    help="collect the content only they held before returning")
    rm.add_argument("names", nargs="+", metavar="NAME")
    rm.set_defaults(func=remove)

    tag = cmds.add_parser("tag", help="name an image's target anew; print each new name")
    tag.add_argument("--force", action="store_true", help="repoint DST if it exists already")
    tag.add_argument("source", metavar="SRC")
    tag.add_argument("targets", nargs="+", metavar="DST")
    tag.set_defaults(func=tag_)


def list_(client, args) -> int:
    images = client.images.list(args.filters)
    if args.quiet:
        for image in images:
            print(image["name"])
        return 0
    if args.format == "json":
        as_json(images)
        return 0
    from berth.cli.content import human_size
    cache: dict = {}
    rows = []
    for image in images:
        target = image["target"]
        size, platforms = summarize(client, target, cache)
        rows.append([image["name"], target["mediaType"], target["digest"],
                     "-" if size is None else human_size(size),
                     ",".join(platforms) if platforms else "-", labels_text(image["labels"])])
    table(["REF", "TYPE", "DIGEST", "SIZE", "PLATFORMS", "LABELS"], rows)
    return 0


def remove(client, args) -> int:
    from bus.errors import BerthError, NotFound
    failed, deleted = 0, 0
    for name in args.names:
        try:
            client.images.delete(name)
        except NotFound:
            print(f"berth: {name}: image not found", file=sys.stderr)
            continue
        except BerthError as e:
            print(f"berth: unable to delete {name}: {e}", file=sys.stderr)
            failed = 1
            continue
        deleted += 1
        print(name)
    if args.sync and deleted:
        client.gc()                  # one collection for them all, done before we return
    return failed


def tag_(client, args) -> int:
    for target in args.targets:
        client.images.tag(args.source, target, force=args.force)
        print(target)
    return 0


# --- what an image's content says about it --------------------------------------------------

def summarize(client, target: dict, cache: dict) -> tuple[int | None, list[str] | None]:
    """(size, platforms) of an image: the config and layers of its manifest, or of as many of
    its index's manifests as are present; None for what its missing content cannot tell."""
    doc = _json_blob(client, target, cache)
    if doc is None:
        return None, None
    media_type = target.get("mediaType") or doc.get("mediaType")
    if media_type in INDEX_TYPES or (media_type not in MANIFEST_TYPES and "manifests" in doc):
        size, platforms = 0, set()
        for entry in _descriptors(doc.get("manifests")):
            if isinstance(entry.get("platform"), dict):
                platforms.add(platform_text(entry["platform"]))
            manifest = _json_blob(client, entry, cache)
            if manifest is not None:
                size += manifest_size(manifest)
        return size, sorted(p for p in platforms if p)
    if media_type in MANIFEST_TYPES or "layers" in doc:
        config = doc.get("config")
        config_doc = _json_blob(client, config, cache) if isinstance(config, dict) else None
        platform = platform_text(config_doc) if config_doc is not None else ""
        return manifest_size(doc), [platform] if platform else None
    return None, None


def manifest_size(manifest: dict) -> int:
    """The bytes a manifest's config and layers take."""
    config = manifest.get("config")
    return sum(_size(d) for d in [config] + list(_descriptors(manifest.get("layers"))) if isinstance(d, dict))


def platform_text(platform: dict) -> str:
    """os/architecture[/variant], from an index entry's platform or an image config."""
    os_name, arch = platform.get("os"), platform.get("architecture")
    if not isinstance(os_name, str) or not isinstance(arch, str) or not os_name or not arch:
        return ""
    variant = platform.get("variant")
    return f"{os_name}/{arch}/{variant}" if isinstance(variant, str) and variant else f"{os_name}/{arch}"


def _descriptors(value) -> list[dict]:
    return [d for d in value if isinstance(d, dict)] if isinstance(value, list) else []


def _size(desc: dict) -> int:
    size = desc.get("size")
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else 0


def _json_blob(client, desc: dict, cache: dict) -> dict | None:
    """The JSON object a descriptor names, if its blob is present, small and well-formed."""
    import json
    from bus.errors import InvalidArgument, NotFound
    digest = desc.get("digest")
    if not isinstance(digest, str):
        return None
    if digest not in cache:
        cache[digest] = None
        if _size(desc) <= MAX_JSON_BLOB:
            try:
                doc = json.loads(b"".join(client.content.read(digest, size=MAX_JSON_BLOB)))
            except (NotFound, InvalidArgument, ValueError):
                doc = None
            cache[digest] = doc if isinstance(doc, dict) else None
    return cache[digest]
