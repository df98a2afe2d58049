"""`berth images ls|rm|tag|check|pull|push|import|export|mount|unmount`: image records, with sizes
and platforms read from their content; transfers to and from registries (the transfer actor) and
archives (berth.archive, on this side of the bus, as containerd's client does them); an image's
root filesystem mounted on a directory.

`images mount REF DIR`, as ctr's: a lease named after DIR (`mount-<sha256 of DIR>`, no expiry)
holds a view (with --rw, an active snapshot) keyed by DIR's absolute path, whose parent is the
image's top chainID; it is mounted on DIR and DIR is printed. The image must have been unpacked
into that snapshotter (ctr unpacks it there and then; berth has no unpack apart from a pull, so it
says so). `images unmount [--rm] DIR` unmounts everything at DIR; --rm also removes the snapshot
and the lease.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

from berth.labels import GC_REF_SNAPSHOT
from berth.cli.output import add_format, as_json, labels_text, remove_each, table

INDEX_TYPES = {"application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json"}
MANIFEST_TYPES = {"application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json"}
MAX_JSON_BLOB = 4 << 20       # manifests, indexes and configs larger than this are not read
DEFAULT_SNAPSHOTTER = "overlayfs"


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

    chk = cmds.add_parser("check", help="check that images' content is all here, as ctr does")
    chk.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                     help="check an index's manifest for this platform (default: this host's)")
    add_snapshotter_flag(chk, "the snapshotter UNPACKED is about")
    add_format(chk)
    chk.add_argument("filters", nargs="*", metavar="FILTER", help="e.g. 'name~=busybox'; any one may match")
    chk.set_defaults(func=check)

    from berth.cli.pull import add_pull_arguments, add_registry_arguments, add_unpack_arguments
    pl = cmds.add_parser("pull", help="fetch an image from a registry and create or update its record")
    add_unpack_arguments(pl)
    add_pull_arguments(pl)
    pl.set_defaults(func=_pull)

    ps = cmds.add_parser("push", help="push a local image to a registry")
    add_registry_arguments(ps)
    ps.add_argument("remote", metavar="REMOTE", help="where to push: registry/repository:tag")
    ps.add_argument("local", nargs="?", metavar="LOCAL", help="the local image (default: REMOTE)")
    ps.set_defaults(func=push)

    imp = cmds.add_parser("import", help="import images from an OCI layout or `docker save` tar; print each")
    imp.add_argument("--base-name", metavar="NAME",
                     help="name put before bare tags (default: import-<yyyy-mm-dd>); when given, only "
                          "images whose names start with it are imported")
    imp.add_argument("--digests", action="store_true", help="also create <base-name>@<digest> images")
    imp.add_argument("--index-name", metavar="NAME", help="keep the archive's index as this image")
    imp.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                     help="the platform to take from multi-platform indexes (default: this host's)")
    imp.add_argument("--all-platforms", action="store_true", help="take every platform of indexes")
    imp.add_argument("file", metavar="FILE", help="the tar archive; - reads stdin")
    imp.set_defaults(func=import_)

    exp = cmds.add_parser("export", help="write images to an OCI layout tar")
    exp.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                     help="the platform to take from multi-platform indexes (default: this host's)")
    exp.add_argument("--all-platforms", action="store_true",
                     help="take every platform of indexes (all must have been pulled)")
    exp.add_argument("--skip-manifest-json", action="store_true",
                     help="leave out the manifest.json that `docker load` reads")
    exp.add_argument("file", metavar="FILE", help="the archive to write; - writes stdout")
    exp.add_argument("names", nargs="+", metavar="REF")
    exp.set_defaults(func=export)

    mnt = cmds.add_parser("mount", help="mount an image's root filesystem on a directory; print it")
    add_snapshotter_flag(mnt, "the snapshotter the image was unpacked into")
    mnt.add_argument("--rw", action="store_true", help="a writable (active) snapshot, not a read-only view")
    mnt.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                     help="the platform's image of an index (default: this host's)")
    mnt.add_argument("ref", metavar="REF")
    mnt.add_argument("target", metavar="DIR", help="an existing directory")
    mnt.set_defaults(func=mount)

    umnt = cmds.add_parser("unmount", aliases=["umount"], help="unmount an image mounted on DIR; print DIR")
    add_snapshotter_flag(umnt, "where to look for the snapshot, for a mount whose lease is gone")
    umnt.add_argument("--rm", action="store_true", help="also remove the snapshot and its lease")
    umnt.add_argument("target", metavar="DIR")
    umnt.set_defaults(func=unmount)


def add_snapshotter_flag(parser, help: str) -> None:
    parser.add_argument("--snapshotter", metavar="NAME",
                        default=os.environ.get("BERTH_SNAPSHOTTER") or DEFAULT_SNAPSHOTTER,
                        help=f"{help} (env BERTH_SNAPSHOTTER; default %(default)s)")


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
    failed, deleted = remove_each(args.names, client.images.delete, "image", missing_ok=True)
    if args.sync and deleted:
        client.gc()                  # one collection for them all, done before we return
    return failed


def tag_(client, args) -> int:
    for target in args.targets:
        client.images.tag(args.source, target, force=args.force)
        print(target)
    return 0


def _pull(client, args) -> int:
    from berth.cli.pull import pull
    return pull(client, args)


def push(client, args) -> int:
    from berth.cli.pull import progress_display, registry_credentials
    credentials = registry_credentials(args)
    with progress_display() as show:
        target = client.push(args.remote, image=args.local, plain_http=args.plain_http,
                             credentials=credentials, progress=show)
    print(f"pushed: {args.remote} digest: {target['digest']}", flush=True)
    return 0


def import_(client, args) -> int:
    try:
        images = client.import_archive(args.file, base_name=args.base_name, digests=args.digests,
                                       index_name=args.index_name, platform=args.platform,
                                       all_platforms=args.all_platforms)
    except OSError as e:
        print(f"berth: {args.file}: {e.strerror or e}", file=sys.stderr)
        return 1
    for image in images:
        print(f"image: {image['name']} digest: {image['target']['digest']}")
    return 0


def export(client, args) -> int:
    if args.file == "-" and sys.stdout.isatty():
        print("berth: refusing to write an archive to a terminal; give a file or redirect stdout",
              file=sys.stderr)
        return 1
    try:
        client.export_archive(args.file, args.names, platform=args.platform, all_platforms=args.all_platforms,
                              docker_manifest=not args.skip_manifest_json)
    except OSError as e:
        print(f"berth: {args.file}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


def check(client, args) -> int:
    """ctr's `images check`: for each image, whether the config and layers of its manifest (in an
    index: the one for the platform) are in the content store."""
    from actors.transfer import PlatformMatcher
    from berth.cli.content import human_size
    matcher = PlatformMatcher(args.platform)
    rows, failed = [], 0
    cache: dict = {}
    images = client.images.list(args.filters)
    if images:
        from berth.cli.pull import check_snapshotter
        check_snapshotter(client, args.snapshotter)
    for image in images:
        result = check_image(client, image["target"], matcher, cache)
        failed |= result["status"] == "error"
        unpacked = result["available"] and is_unpacked(
            client, _platform_manifest(client, image["target"], matcher, cache, top=True, depth=0),
            args.snapshotter)
        rows.append({"name": image["name"], "mediaType": image["target"]["mediaType"],
                     "digest": image["target"]["digest"], **result, "unpacked": unpacked})
    if args.format == "json":
        as_json(rows)
        return failed
    table_rows = []
    for row in rows:
        status, size = row["status"], "-"
        if row["status"] != "error":
            if row["available"]:
                status += f" ({row['present']}/{row['required']})"
                size = f"{human_size(row['present_size'])}/{human_size(row['required_size'])}"
            else:
                status += f" ({row['present']}/?)"
                size = f"{human_size(row['present_size'])}/?"
        table_rows.append([row["name"], row["mediaType"], row["digest"], status, size,
                           "true" if row["unpacked"] else "false"])
    table(["REF", "TYPE", "DIGEST", "STATUS", "SIZE", "UNPACKED"], table_rows)
    return failed


def check_image(client, target: dict, matcher, cache: dict) -> dict:
    """containerd's images.Check: {"status": complete|incomplete|unavailable|error, "available",
    "present", "required" (counts), "present_size", "required_size", "error"?}. Unavailable: the
    manifest itself (for the platform) is not here, so what it needs is not known."""
    from bus.errors import BerthError, NotFound
    try:
        manifest = _platform_manifest(client, target, matcher, cache, top=True, depth=0)
    except NotFound:
        manifest = None
    except BerthError as e:
        print(f"berth: unable to check {target.get('digest')}: {e}", file=sys.stderr)
        return {"status": "error", "available": False, "present": 0, "required": 0,
                "present_size": 0, "required_size": 0, "error": str(e)}
    if manifest is None:
        return {"status": "unavailable", "available": False, "present": 0, "required": 0,
                "present_size": 0, "required_size": 0}
    required = [manifest.config, *manifest.layers]
    present = [d for d in required if _stored(client, d, cache)]
    return {"status": "complete" if len(present) == len(required) else "incomplete", "available": True,
            "present": len(present), "required": len(required),
            "present_size": sum(d["size"] for d in present), "required_size": sum(d["size"] for d in required)}


def unpacked_chain(client, manifest, snapshotter: str) -> str | None:
    """The top chainID the image's config names for `snapshotter`
    (`containerd.io/gc.ref.snapshot.<snapshotter>`, set when a pull has unpacked it), if that is
    a committed snapshot in this namespace; else None."""
    from bus.errors import NotFound
    try:
        labels = client.content.info(manifest.config["digest"])["labels"]
        chain = labels.get(GC_REF_SNAPSHOT + snapshotter)
        if not chain or client.snapshots.stat(chain, snapshotter=snapshotter)["kind"] != "committed":
            return None
    except NotFound:
        return None
    return chain


def is_unpacked(client, manifest, snapshotter: str) -> bool:
    return unpacked_chain(client, manifest, snapshotter) is not None


def _platform_manifest(client, desc: dict, matcher, cache: dict, top: bool, depth: int):
    """The manifest an image resolves to on `matcher`'s platform (containerd's images.Manifest):
    a top-level manifest as it is; in an index, the best-ranked entry whose platform (or, lacking
    one, whose config's) matches. NotFound when that content is missing or nothing matches."""
    from actors.transfer import MAX_DEPTH
    from bus.errors import InvalidArgument, NotFound
    if depth > MAX_DEPTH:
        raise InvalidArgument(f"indexes nested more than {MAX_DEPTH} deep")
    doc = _document(client, desc, cache)
    if doc.kind == "manifest":
        if not top and "platform" not in desc:
            config = _json_blob(client, doc.config, cache)
            if config is None or matcher.rank({k: config.get(k) for k in ("os", "architecture", "variant")
                                               if isinstance(config.get(k), str)}) is None:
                return None
        return doc
    for child in matcher.select(doc.manifests, limit=len(doc.manifests)):
        found = _platform_manifest(client, child, matcher, cache, top=False, depth=depth + 1)
        if found is not None:
            return found
    if top:
        raise NotFound(f"no manifest for the platform in {desc['digest']}")
    return None


def _document(client, desc: dict, cache: dict):
    """A stored manifest or index, verified and parsed (actors.transfer.parse_document)."""
    import hashlib
    from actors.transfer import MAX_MANIFEST, check_descriptor, parse_document
    from bus.errors import FailedPrecondition, ResourceExhausted
    desc = check_descriptor(desc, "image target")
    key = ("doc", desc["digest"])
    if key not in cache:
        if desc["size"] > MAX_MANIFEST:
            raise ResourceExhausted(f"{desc['digest']} is {desc['size']} bytes, over the manifest limit")
        data = b"".join(client.content.read(desc["digest"], size=desc["size"]))
        if "sha256:" + hashlib.sha256(data).hexdigest() != desc["digest"]:
            raise FailedPrecondition(f"stored {desc['digest']} does not match its digest")
        cache[key] = parse_document(data, desc)
    return cache[key]


def _stored(client, desc: dict, cache: dict) -> bool:
    from bus.errors import NotFound
    key = ("info", desc["digest"])
    if key not in cache:
        try:
            cache[key] = client.content.info(desc["digest"])["size"] == desc["size"]
        except NotFound:
            cache[key] = False
    return cache[key]


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


# --- mounting an image ----------------------------------------------------------------------

def mount_lease_id(target: str) -> str:
    """The lease holding what `images mount` made for `target` (an absolute path): ctr names it
    after the path itself, which a berth identifier cannot hold."""
    import hashlib
    return "mount-" + hashlib.sha256(target.encode()).hexdigest()


def image_chain(client, ref: str, platform: str | None) -> str:
    """The top chainID of image `ref` on `platform`, from its config's rootfs.diff_ids."""
    from actors.transfer import PlatformMatcher, chain_ids
    from bus.errors import FailedPrecondition, NotFound
    cache: dict = {}
    image = client.images.get(ref)
    manifest = _platform_manifest(client, image["target"], PlatformMatcher(platform), cache, top=True, depth=0)
    config = _json_blob(client, manifest.config, cache)
    if config is None:
        raise NotFound(f"image {ref}: its config {manifest.config['digest']} is not here")
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") if isinstance(config.get("rootfs"), dict) else None
    if not isinstance(diff_ids, list) or not diff_ids or not all(isinstance(d, str) for d in diff_ids):
        raise FailedPrecondition(f"image {ref}: its config lists no layers (rootfs.diff_ids)")
    return chain_ids(diff_ids)[-1]


def mount(client, args) -> int:
    from berth.cli.snapshots import mount_commands
    from bus.errors import AlreadyExists, BerthError, FailedPrecondition, NotFound
    target = os.path.realpath(args.target)
    if not os.path.isdir(target):
        print(f"berth: mount target {args.target}: not a directory", file=sys.stderr)
        return 1
    snapshots = client.snapshots
    chain = image_chain(client, args.ref, args.platform)
    try:
        unpacked = snapshots.stat(chain, snapshotter=args.snapshotter)["kind"] == "committed"
    except NotFound:
        unpacked = False
    if not unpacked:
        raise FailedPrecondition(f"image {args.ref} not unpacked into {args.snapshotter}; "
                                 "pull it again with unpack")
    lease_id = mount_lease_id(target)
    made_lease = made_snapshot = False
    try:
        client.leases.create(lease_id, {GC_REF_SNAPSHOT + args.snapshotter: target})
        made_lease = True
    except AlreadyExists:                         # mounted before and not removed: reuse it
        pass
    previous, client.active_lease = client.active_lease, lease_id
    mounted = 0
    try:
        try:
            make = snapshots.prepare if args.rw else snapshots.view
            mounts = make(target, chain, snapshotter=args.snapshotter)
            made_snapshot = True
        except AlreadyExists:
            mounts = snapshots.mounts(target, snapshotter=args.snapshotter)
        for cmd in mount_commands(target, mounts):
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                why = (done.stderr.strip().splitlines() or [f"mount exited {done.returncode}"])[-1]
                raise FailedPrecondition(f"mounting {args.ref} on {args.target} failed: {why}")
            mounted += 1
    except BaseException:
        for _ in range(mounted):                  # only what this command mounted
            subprocess.run(["umount", target], capture_output=True)
        with contextlib.suppress(BerthError):
            if made_snapshot:
                snapshots.remove(target, snapshotter=args.snapshotter)
            if made_lease:
                client.leases.delete(lease_id)
        raise
    finally:
        client.active_lease = previous
    print(args.target)
    return 0


def unmount(client, args) -> int:
    from bus.errors import NotFound
    target = os.path.realpath(args.target)
    why = _unmount_all(target)
    if why:
        print(f"berth: unmounting {args.target}: {why}", file=sys.stderr)
        return 1
    if args.rm:
        lease_id = mount_lease_id(target)
        try:
            held = [r["type"].removeprefix("snapshots/") for r in client.leases.resources(lease_id)
                    if r["type"].startswith("snapshots/") and r["id"] == target]
        except NotFound:
            held = []
        for snapshotter in held or [args.snapshotter]:
            with contextlib.suppress(NotFound):
                client.snapshots.remove(target, snapshotter=snapshotter)
        with contextlib.suppress(NotFound):
            client.leases.delete(lease_id)
    print(args.target)
    return 0


def _unmount_all(target: str) -> str | None:
    """Unmount everything at or below `target`, deepest first and each stacked mount in turn
    (containerd's mount.UnmountAll); None, or why not."""
    from actors.snapshot import mounts_under
    for _ in range(100):
        points = mounts_under(target)
        if not points:
            return None
        done = subprocess.run(["umount", points[0]], capture_output=True, text=True)
        if done.returncode != 0:
            return (done.stderr.strip().splitlines() or [f"umount exited {done.returncode}"])[-1]
    return "still mounted after 100 unmounts"
