"""Image archives on the client side, as containerd 1.6's client imports and exports them
(images/archive): a tar holding an OCI image layout, or what `docker save` writes.

    import_archive(client, "busybox.tar")               -> [image record, ...]
    export_archive(client, "out.tar", ["docker.io/library/busybox:latest"])

Import reads two formats (an `oci-layout` file makes it OCI, as containerd prefers):

- OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/<hex>`), as `skopeo copy …
  oci-archive:` and `export_archive` write it. Each `index.json` entry becomes an image named by
  its `io.containerd.image.name` annotation, or else by its `org.opencontainers.image.ref.name`:
  a bare tag (`latest`) is put after a base name (ctr's `--base-name`; by default
  `import-<yyyy-mm-dd>`), a full reference is kept as it is. With a base name given, only images
  whose names start with it are imported (what ctr's help promises).
- `docker save` (`manifest.json` listing Config, RepoTags and Layers members): a Docker schema 2
  manifest is built for each image from its config and its layers, kept as the archive has them
  (uncompressed layers stay uncompressed, `application/vnd.docker.image.rootfs.diff.tar`), and an
  image is made per RepoTag, normalised (`busybox:latest` -> `docker.io/library/busybox:latest`).

Every entry is imported whatever its platform; inside a multi-platform index, only the manifests
for `platform` (default: the host's) are, unless `all_platforms`. Blobs the images do not reach are
not read at all. Everything is written through `client.content.write` with its expected digest
(the content store verifies it before anything is visible), manifests and indexes carry the same
`containerd.io/gc.ref.content…` labels a pull sets, and all of it happens under one lease, so a
GC meanwhile takes nothing and an import cut short leaves nothing held once the lease is gone.

The archive is not trusted: members with absolute or `..` paths, links (symbolic or hard), device
files, sparse files and duplicate names are refused before anything is written, as is a blob whose
bytes do not match its digest; `index.json`, `manifest.json`, manifests and indexes are capped at
4 MiB. Such archives fail with InvalidArgument (ResourceExhausted for the caps).

Export writes an OCI layout tar: `oci-layout`, `index.json` listing each image's target with the
`io.containerd.image.name` (the full name) and `org.opencontainers.image.ref.name` (its tag)
annotations, the blobs under `blobs/sha256/`, streamed from the content store and verified on the
way, and, unless told not to, a Docker-compatible `manifest.json` so `docker load` takes it too.
Members are sorted by name with zero times and owners, so the same images give the same bytes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tarfile
import tempfile
import time
from typing import BinaryIO

from actors.transfer import (DOCKER_CONFIG, DOCKER_MANIFEST, MAX_DEPTH, MAX_MANIFEST, OCI_INDEX, PlatformMatcher,
                             check_descriptor, format_platform, gc_labels, is_index, is_manifest,
                             is_non_distributable, normalize_platform, parse_document, parse_reference, public,
                             ref_key)
from bus.errors import BerthError, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted

OCI_LAYOUT_FILE = "oci-layout"
OCI_LAYOUT_VERSION = "1.0.0"
ANNOTATION_IMAGE_NAME = "io.containerd.image.name"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"

MAX_JSON_FILE = MAX_MANIFEST      # index.json, manifest.json, oci-layout: 4 MiB
MAX_MEMBERS = 100_000             # entries in one archive
MAX_IMAGE_NAME = 512
CHUNK = 1 << 20


# --- names ----------------------------------------------------------------------------------------

def default_base_name() -> str:
    """ctr's name for images an archive names only by tag: import-<yyyy-mm-dd>."""
    return time.strftime("import-%Y-%m-%d")


def oci_ref_name(name: str) -> str:
    """What an OCI layout calls an image: the reference's object (its tag, `tag@digest` or
    `@digest`), as containerd's ociReferenceName; the name itself if it does not parse."""
    try:
        ref = parse_reference(name)
    except InvalidArgument:
        return name
    if ref.digest:
        return f"{ref.tag or ''}@{ref.digest}"
    return ref.tag or name


def familiar_name(name: str) -> str | None:
    """A name as `docker save` lists it in RepoTags (`busybox:latest`, `127.0.0.1:5000/app:1`);
    None for names Docker cannot take as a tag (digest references, unparsable ones)."""
    try:
        ref = parse_reference(name)
    except InvalidArgument:
        return None
    if ref.digest or not ref.tag:
        return None
    path = ref.repository
    if ref.host == "docker.io":
        if path.startswith("library/") and path.count("/") == 1:
            path = path[len("library/"):]
        return f"{path}:{ref.tag}"
    return f"{ref.host}/{path}:{ref.tag}"


def _has_prefix(name: str, prefix: str) -> bool:
    """containerd's isImagePrefix: `prefix` followed by nothing, or by `/`, `:` or `@`."""
    return name.startswith(prefix) and (len(name) == len(prefix) or name[len(prefix)] in "/:@")


def _check_name(name: str, label: str) -> str:
    if not name or len(name) > MAX_IMAGE_NAME or any(c.isspace() or not c.isprintable() for c in name):
        raise InvalidArgument(f"{label}: image name {name[:100]!r} is not valid")
    return name


# --- reading an archive ---------------------------------------------------------------------------

def _member_path(name: str, label: str) -> str:
    """A member's name as a clean relative path; absolute paths and `..` are refused."""
    if name.startswith("/"):
        raise InvalidArgument(f"{label}: member {name[:200]!r} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidArgument(f"{label}: member {name[:200]!r} has a '..' in its path")
    return "/".join(parts)


class _Archive:
    """The regular files of a tar, by clean path; every member is checked before any is read."""

    def __init__(self, fileobj: BinaryIO, label: str):
        self.label = label
        try:
            self.tar = tarfile.open(fileobj=fileobj, mode="r:*")
        except (tarfile.TarError, EOFError, OSError):
            raise InvalidArgument(f"{label}: not a tar archive (plain, gzip, bzip2 or xz)") from None
        self.files: dict[str, tarfile.TarInfo] = {}
        try:
            for count, info in enumerate(self.tar, 1):
                if count > MAX_MEMBERS:
                    raise ResourceExhausted(f"{label}: more than {MAX_MEMBERS} members")
                self._add(info)
        except (tarfile.TarError, EOFError) as e:
            raise InvalidArgument(f"{label}: broken tar archive ({_one_line(e)})") from None

    def _add(self, info: tarfile.TarInfo) -> None:
        path = _member_path(info.name, self.label)
        what = f"{self.label}: member {info.name[:200]!r}"
        if info.issym() or info.islnk():
            raise InvalidArgument(f"{what} is a {'symbolic' if info.issym() else 'hard'} link; "
                                  "archives with links are not imported")
        if info.isdir():
            return
        if not info.isreg() or info.issparse():
            raise InvalidArgument(f"{what} is not a regular file or a directory")
        if not path:
            raise InvalidArgument(f"{what} has no name")
        if path in self.files:
            raise InvalidArgument(f"{what} appears more than once")
        self.files[path] = info

    def close(self) -> None:
        self.tar.close()

    def has(self, path: str) -> bool:
        return path in self.files

    def member(self, path: str, what: str) -> tarfile.TarInfo:
        info = self.files.get(path)
        if info is None:
            raise InvalidArgument(f"{self.label}: {what} is missing (no {path!r} in the archive)")
        return info

    def open(self, path: str, what: str) -> BinaryIO:
        return self.tar.extractfile(self.member(path, what))

    def read(self, path: str, what: str, limit: int = MAX_JSON_FILE) -> bytes:
        info = self.member(path, what)
        if info.size > limit:
            raise ResourceExhausted(f"{self.label}: {path!r} is {info.size} bytes, over the {limit}-byte limit")
        with self.reading(path):
            with self.tar.extractfile(info) as f:
                data = f.read()
        if len(data) != info.size:
            raise InvalidArgument(f"{self.label}: {path!r} is cut short")
        return data

    @contextlib.contextmanager
    def reading(self, path: str):
        """Turns the tar module's complaints about a member's data (cut short, unreadable) into ours."""
        try:
            yield
        except (tarfile.TarError, EOFError) as e:
            raise InvalidArgument(f"{self.label}: {path!r} cannot be read ({_one_line(e)})") from None

    def read_json(self, path: str, what: str):
        try:
            return json.loads(self.read(path, what))
        except (ValueError, RecursionError):
            raise InvalidArgument(f"{self.label}: {path!r} is not valid JSON") from None

    def digest(self, path: str, what: str) -> tuple[str, int]:
        """(sha256 digest, size) of a member, read through once."""
        h, size = hashlib.sha256(), 0
        with self.reading(path), self.open(path, what) as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                size += len(chunk)
        if size != self.files[path].size:
            raise InvalidArgument(f"{self.label}: {path!r} is cut short")
        return "sha256:" + h.hexdigest(), size

    def head(self, path: str, n: int) -> bytes:
        with self.reading(path), self.open(path, path) as f:
            return f.read(n)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:200]


def _blob_path(digest: str) -> str:
    algorithm, _, hexdigest = digest.partition(":")
    return f"blobs/{algorithm}/{hexdigest}"


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def _open_source(source):
    """A seekable binary file for a path, "-" (stdin, spooled to a temporary file) or a file."""
    if isinstance(source, (str, os.PathLike)) and str(source) != "-":
        with open(source, "rb") as f:
            yield f, os.path.basename(os.fspath(source))
        return
    stream = sys.stdin.buffer if isinstance(source, (str, os.PathLike)) else source
    label = "stdin" if stream is sys.stdin.buffer else getattr(stream, "name", "archive")
    seekable = False
    with contextlib.suppress(AttributeError, OSError, ValueError):
        seekable = stream.seekable()
    if seekable:
        yield stream, str(label)
        return
    with tempfile.TemporaryFile(prefix="berth-import-") as spool:
        while chunk := stream.read(CHUNK):
            spool.write(chunk)
        spool.seek(0)
        yield spool, str(label)


# --- import ---------------------------------------------------------------------------------------

def import_archive(client, source, *, base_name: str | None = None, digests: bool = False,
                   index_name: str | None = None, platform: str | None = None,
                   all_platforms: bool = False) -> list[dict]:
    """Import the images of an OCI layout or `docker save` tar; returns the image records made or
    updated, in archive order.

    `base_name`: the name put before bare tags, and the prefix an image's name must have to be
    imported (ctr's --base-name); `digests`: also make `<base>@<digest>` images (ctr's --digests);
    `index_name`: keep the archive's index itself as this image (ctr's --index-name); `platform`,
    `all_platforms`: which manifests of a multi-platform index come in."""
    matcher = PlatformMatcher(platform)
    prefix = base_name or default_base_name()
    if base_name:
        _check_name(base_name, "base name")
    if index_name:
        _check_name(index_name, "index name")
    with _open_source(source) as (fileobj, label):
        archive = _Archive(fileobj, label)
        try:
            importer = _Importer(client, archive, label, matcher, all_platforms)
            if archive.has(OCI_LAYOUT_FILE):
                entries, index_desc = importer.read_oci_layout()
            elif archive.has("manifest.json"):
                entries, index_desc = importer.read_docker_save()
            else:
                raise InvalidArgument(f"{label}: unrecognised image archive (neither an OCI layout "
                                      "nor a docker save: no oci-layout nor manifest.json)")
            wanted = _select(entries, index_desc, prefix, bool(base_name), digests, index_name, label)
            with client.lease():
                targets = {}
                for _, desc in wanted:
                    if desc["digest"] not in targets:
                        targets[desc["digest"]] = importer.import_tree(desc)
                return [client.images.put(name, targets[desc["digest"]]) for name, desc in wanted]
        finally:
            archive.close()


def _select(entries: list[tuple[dict, dict]], index_desc: dict, prefix: str, filtering: bool,
            digests: bool, index_name: str | None, label: str) -> list[tuple[str, dict]]:
    """(image name, descriptor) for each image the archive's entries name (containerd's
    imageName with ctr's ref translators, plus digest images and the index image)."""
    wanted: list[tuple[str, dict]] = []
    if index_name:
        wanted.append((index_name, index_desc))
    for desc, notes in entries:
        name = notes.get(ANNOTATION_IMAGE_NAME) or ""
        if name:
            if filtering and not _has_prefix(name, prefix):
                name = ""
        elif notes.get(ANNOTATION_REF_NAME):
            ref = notes[ANNOTATION_REF_NAME]
            if any(c in ref for c in "/:@"):
                name = ref if not filtering or _has_prefix(ref, prefix) else ""
            else:
                name = f"{prefix}:{ref}"
        if name:
            wanted.append((_check_name(name, label), desc))
        if digests:
            wanted.append((_check_name(f"{prefix}@{desc['digest']}", label), desc))
    if not wanted:
        raise InvalidArgument(f"{label}: no image to import: no entry has a name"
                              + (f" starting with {prefix!r}" if filtering else "")
                              + "; use --digests or --index-name to import unnamed ones")
    return wanted


class _Importer:
    """One import's reads from the archive and writes to the content store."""

    def __init__(self, client, archive: _Archive, label: str, matcher: PlatformMatcher, all_platforms: bool):
        self.client = client
        self.archive = archive
        self.label = label
        self.matcher = matcher
        self.all_platforms = all_platforms
        self.paths: dict[str, str] = {}          # digest -> member, where not blobs/sha256/<hex>
        self.made: dict[str, bytes] = {}         # digest -> documents built here (docker save)
        self.written: set[str] = set()

    # --- the two formats ----------------------------------------------------------------------

    def read_oci_layout(self) -> tuple[list[tuple[dict, dict]], dict]:
        layout = self.archive.read_json(OCI_LAYOUT_FILE, "the oci-layout file")
        version = layout.get("imageLayoutVersion") if isinstance(layout, dict) else None
        if version != OCI_LAYOUT_VERSION:
            raise InvalidArgument(f"{self.label}: unsupported OCI layout version {str(version)[:40]!r}")
        data = self.archive.read("index.json", "the OCI layout's index.json")
        index_desc = {"mediaType": OCI_INDEX, "digest": _sha256(data), "size": len(data)}
        doc = parse_document(data, index_desc)
        if doc.kind != "index":
            raise InvalidArgument(f"{self.label}: index.json is not an image index")
        raw = json.loads(data)["manifests"]
        entries = [(desc, _annotations(item)) for desc, item in zip(doc.manifests, raw)]
        self.made[index_desc["digest"]] = data
        return entries, index_desc

    def read_docker_save(self) -> tuple[list[tuple[dict, dict]], dict]:
        listing = self.archive.read_json("manifest.json", "manifest.json")
        if not isinstance(listing, list) or not listing:
            raise InvalidArgument(f"{self.label}: manifest.json is not a non-empty list of images")
        entries, hashed = [], {}
        for i, item in enumerate(listing):
            where = f"manifest.json image {i}"
            if not isinstance(item, dict) or not isinstance(item.get("Config"), str) \
                    or not isinstance(item.get("Layers"), list) \
                    or not all(isinstance(x, str) for x in item["Layers"]) \
                    or not isinstance(item.get("RepoTags") or [], list) \
                    or not all(isinstance(x, str) for x in item.get("RepoTags") or []):
                raise InvalidArgument(f"{self.label}: {where} is not {{Config, RepoTags, Layers}}")
            config = self._docker_blob(item["Config"], DOCKER_CONFIG, f"{where} config", hashed)
            layers = [self._docker_blob(name, None, f"{where} layer {n}", hashed)
                      for n, name in enumerate(item["Layers"])]
            body = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST, "config": config,
                               "layers": layers}, separators=(",", ":")).encode()
            desc = {"mediaType": DOCKER_MANIFEST, "digest": _sha256(body), "size": len(body)}
            self.made[desc["digest"]] = body
            platform = self._config_platform(config)
            if platform:
                desc["platform"] = platform
            tags = item.get("RepoTags") or []
            if not tags:
                entries.append((desc, {}))
            for tag in tags:
                try:
                    name = str(parse_reference(tag))
                except InvalidArgument as e:
                    raise InvalidArgument(f"{self.label}: {where}: RepoTag {tag[:100]!r}: {e}") from None
                entries.append((desc, {ANNOTATION_IMAGE_NAME: name, ANNOTATION_REF_NAME: oci_ref_name(name)}))
        index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            dict(desc, annotations=notes) if notes else desc for desc, notes in entries]},
            separators=(",", ":")).encode()
        index_desc = {"mediaType": OCI_INDEX, "digest": _sha256(index), "size": len(index)}
        self.made[index_desc["digest"]] = index
        return entries, index_desc

    def _docker_blob(self, name: str, media_type: str | None, what: str, hashed: dict) -> dict:
        path = _member_path(name, self.label)
        if path not in hashed:
            digest, size = self.archive.digest(path, what)
            hashed[path] = (digest, size)
            self.paths.setdefault(digest, path)
        digest, size = hashed[path]
        return {"mediaType": media_type or self._layer_type(path), "digest": digest, "size": size}

    def _layer_type(self, path: str) -> str:
        """Layers go in as `docker save` wrote them; their media type says how they are packed."""
        magic = self.archive.head(path, 4)
        if magic[:2] == b"\x1f\x8b":
            return DOCKER_LAYER_GZIP
        if magic == b"\x28\xb5\x2f\xfd":
            return OCI_LAYER_ZSTD
        return DOCKER_LAYER

    def _config_platform(self, config: dict) -> dict | None:
        """os/architecture/variant from an image config, for the index entry (as containerd does)."""
        if config["size"] > MAX_MANIFEST:
            return None
        try:
            doc = json.loads(self.archive.read(self.paths[config["digest"]], "image config"))
        except (ValueError, RecursionError):
            raise InvalidArgument(f"{self.label}: image config {config['digest']} is not valid JSON") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("os"), str) \
                or not isinstance(doc.get("architecture"), str):
            return None
        os_, arch, variant = normalize_platform(doc["os"], doc["architecture"],
                                                doc.get("variant") if isinstance(doc.get("variant"), str) else "")
        if not os_ or not arch or len(os_) > 64 or len(arch) > 64 or len(variant) > 64:
            return None
        return {"os": os_, "architecture": arch, **({"variant": variant} if variant else {})}

    # --- the walk -----------------------------------------------------------------------------

    def import_tree(self, desc: dict, depth: int = 0) -> dict:
        """Write an index or manifest and everything under it (for the platform), children first;
        returns the descriptor an image record points at."""
        if depth > MAX_DEPTH:
            raise InvalidArgument(f"{self.label}: indexes nested more than {MAX_DEPTH} deep")
        if not (is_index(desc["mediaType"]) or is_manifest(desc["mediaType"])):
            raise InvalidArgument(f"{self.label}: {desc['digest']} is a {desc['mediaType']!r}, "
                                  "not an image manifest or index")
        data = self._document(desc)
        doc = parse_document(data, desc)
        if doc.kind == "index":
            # Images only (as a pull takes them): other artifacts an index lists are left out.
            images = [m for m in doc.manifests if is_manifest(m["mediaType"]) or is_index(m["mediaType"])]
            children = images if self.all_platforms else \
                [m for m in images if self.matcher.rank(m.get("platform")) is not None]
            if not children:
                offered = sorted({format_platform(normalize_platform(m["platform"].get("os", ""),
                                                                     m["platform"].get("architecture", ""),
                                                                     m["platform"].get("variant", "")))
                                  for m in doc.manifests if "platform" in m})
                raise NotFound(f"{self.label}: index {desc['digest']} has no manifest for platform "
                               f"{format_platform(self.matcher.platform)}"
                               + (f" (it has {', '.join(offered)})" if offered else "")
                               + "; use --platform or --all-platforms")
            children = [self.import_tree(child, depth + 1) for child in children]
        else:
            children = [doc.config, *doc.layers]
            for child in children:
                if is_non_distributable(child["mediaType"]) and not self._present(child):
                    continue                      # as a pull does: foreign layers are not shipped
                self._write_blob(child)
        target = dict(public(desc), mediaType=doc.media_type)
        self._write_bytes(target, data, gc_labels(children))
        if "platform" in desc:
            target["platform"] = desc["platform"]
        return target

    def _present(self, desc: dict) -> bool:
        return self.archive.has(self.paths.get(desc["digest"], _blob_path(desc["digest"])))

    def _source(self, desc: dict) -> str:
        digest = desc["digest"]
        if not digest.startswith("sha256:"):
            raise InvalidArgument(f"{self.label}: {digest[:80]!r} is not a sha256 digest")
        return self.paths.get(digest, _blob_path(digest))

    def _document(self, desc: dict) -> bytes:
        """A manifest's or index's bytes, verified against its descriptor before anything parses them."""
        what = f"{desc['mediaType']} {desc['digest']}"
        if desc["size"] > MAX_MANIFEST:
            raise ResourceExhausted(f"{self.label}: {what} is {desc['size']} bytes, over the "
                                    f"{MAX_MANIFEST}-byte limit")
        data = self.made.get(desc["digest"])
        if data is None:
            data = self.archive.read(self._source(desc), what, MAX_MANIFEST)
        if len(data) != desc["size"] or _sha256(data) != desc["digest"]:
            raise InvalidArgument(f"{self.label}: {what}: the archive's bytes do not match its digest and size")
        return data

    def _write_blob(self, desc: dict) -> None:
        digest = desc["digest"]
        if digest in self.written:
            return
        path = self._source(desc)
        what = f"{desc['mediaType']} {digest}"
        info = self.archive.member(path, what)
        if info.size != desc["size"]:
            raise InvalidArgument(f"{self.label}: {path!r} is {info.size} bytes, but {what} says {desc['size']}")

        @contextlib.contextmanager
        def reader():
            with self.archive.reading(path), self.archive.open(path, what) as f:
                yield f
        self._write(desc, reader, None, path)

    def _write_bytes(self, desc: dict, data: bytes, labels: dict) -> None:
        if desc["digest"] in self.written:
            if labels:
                self.client.content.set_labels(desc["digest"], labels)
            return
        self._write(desc, lambda: contextlib.nullcontext(data), labels, desc["digest"])

    def _write(self, desc: dict, reader, labels: dict | None, what: str) -> None:
        """Store a blob (`reader()` opens its bytes) with its expected digest, or, if the store
        has it already, put it in this import's lease; then make sure it has `labels`."""
        digest, content = desc["digest"], self.client.content
        existed = _exists(content, digest)
        if existed:
            self._hold(digest)
        if not existed or not _exists(content, digest):     # gone before the lease held it: write it
            info = self._send(desc, reader, labels, what)
        else:
            info = content.info(digest)
        if labels and any(info["labels"].get(k) != v for k, v in labels.items()):
            content.set_labels(digest, labels)
        self.written.add(digest)

    def _send(self, desc: dict, reader, labels: dict | None, what: str) -> dict:
        digest, content, ref = desc["digest"], self.client.content, ref_key(desc)
        for attempt in (1, 2):
            try:
                with reader() as data:
                    return content.write(ref, data, total=desc["size"], expected=digest, labels=labels)
            except (FailedPrecondition, InvalidArgument) as e:
                # The store refused the data (or a leftover ingest of the ref disagreed about the
                # blob's size or digest): no ingest of it is worth keeping for a resume.
                with contextlib.suppress(BerthError):
                    content.abort(ref)
                if isinstance(e, InvalidArgument):
                    raise
                if attempt == 2:
                    raise InvalidArgument(f"{self.label}: {what!r} does not match its digest {digest}") from None
        raise AssertionError("unreachable")

    def _hold(self, digest: str) -> None:
        """Put content that was there already in this import's lease (writes put theirs in it)."""
        self.client.call("metadata", "add_lease_resource",
                         {"lease": self.client.active_lease, "type": "content", "id": digest})


def _exists(content, digest: str) -> bool:
    try:
        content.info(digest)
        return True
    except NotFound:
        return False


def _annotations(item) -> dict[str, str]:
    annotations = item.get("annotations") if isinstance(item, dict) else None
    if not isinstance(annotations, dict):
        return {}
    return {k: v for k, v in annotations.items()
            if k in (ANNOTATION_IMAGE_NAME, ANNOTATION_REF_NAME) and isinstance(v, str)}


# --- export ---------------------------------------------------------------------------------------

def export_archive(client, dest, names: list[str], *, platform: str | None = None, all_platforms: bool = False,
                   docker_manifest: bool = True) -> dict:
    """Write the named images as an OCI layout tar to `dest` (a path, written whole or not at all;
    "-" for stdout; or a binary file). Indexes bring their manifests for `platform` (default: the
    host's), or all of them with `all_platforms` (then all must be present). Returns
    {"images", "blobs", "size"}."""
    if not names:
        raise InvalidArgument("name at least one image to export")
    plan = _ExportPlan(client, PlatformMatcher(platform), all_platforms)
    for name in names:
        plan.add_image(client.images.get(name))
    records = plan.records(docker_manifest)
    if isinstance(dest, (str, os.PathLike)) and str(dest) != "-":
        _write_file(os.fspath(dest), lambda f: _write_tar(client, f, records))
    else:
        out = sys.stdout.buffer if isinstance(dest, (str, os.PathLike)) else dest
        _write_tar(client, out, records)
        out.flush()
    return {"images": len(names), "blobs": len(plan.blobs), "size": sum(d["size"] for d in plan.blobs.values())}


class _ExportPlan:
    """What goes in the archive: index entries, blobs, and the Docker manifest.json entries."""

    def __init__(self, client, matcher: PlatformMatcher, all_platforms: bool):
        self.client = client
        self.matcher = matcher
        self.all_platforms = all_platforms
        self.entries: list[dict] = []
        self.blobs: dict[str, dict] = {}                 # digest -> descriptor, in walk order
        self.docs: dict[str, object] = {}                # digest -> parsed document
        self.docker: dict[str, list[str]] = {}           # manifest digest -> familiar names

    def add_image(self, image: dict) -> None:
        name, target = image["name"], image["target"]
        checked = check_descriptor(target, f"image {name} target")
        desc = public(checked)
        if checked.get("platform"):
            desc["platform"] = checked["platform"]
        annotations = {k: v for k, v in (target.get("annotations") or {}).items() if isinstance(v, str)}
        annotations[ANNOTATION_IMAGE_NAME] = name
        annotations[ANNOTATION_REF_NAME] = oci_ref_name(name)
        self.entries.append(dict(desc, annotations=annotations))
        manifest = self._walk(desc, name, 0)
        if manifest is not None:
            names = self.docker.setdefault(manifest, [])
            familiar = familiar_name(name)
            if familiar and familiar not in names:
                names.append(familiar)

    def _walk(self, desc: dict, name: str, depth: int) -> str | None:
        """Add a manifest or index and what it needs; returns the manifest a Docker loader would
        take from it (the best one for the platform), if there is one."""
        if depth > MAX_DEPTH:
            raise InvalidArgument(f"{name}: indexes nested more than {MAX_DEPTH} deep")
        if not (is_index(desc["mediaType"]) or is_manifest(desc["mediaType"])):
            raise InvalidArgument(f"{name}: only manifests and indexes can be exported, not {desc['mediaType']!r}")
        doc = self._document(desc, name)
        self.blobs.setdefault(desc["digest"], public(desc))
        if doc.kind == "manifest":
            for child in [doc.config, *doc.layers]:
                if is_non_distributable(child["mediaType"]) and not self._present(child):
                    continue
                self._require(child, name)
                self.blobs.setdefault(child["digest"], public(child))
            return desc["digest"]
        matching = [m for m in doc.manifests if self.matcher.rank(m.get("platform")) is not None]
        if not matching and not self.all_platforms:
            raise NotFound(f"{name}: index {desc['digest']} has no manifest for platform "
                           f"{format_platform(self.matcher.platform)}; use --platform or --all-platforms")
        for child in doc.manifests if self.all_platforms else matching:
            self._walk(child, name, depth + 1)
        for child in self.matcher.select(matching, limit=len(matching)):
            if is_manifest(child["mediaType"]):
                return child["digest"]
        return None

    def _present(self, desc: dict) -> bool:
        return _exists(self.client.content, desc["digest"])

    def _require(self, desc: dict, name: str) -> None:
        try:
            info = self.client.content.info(desc["digest"])
        except NotFound:
            raise NotFound(f"{name}: {desc['mediaType']} {desc['digest']} is not in the content store") from None
        if info["size"] != desc["size"]:
            raise FailedPrecondition(f"{name}: {desc['digest']} is stored with size {info['size']}, "
                                     f"not the {desc['size']} its descriptor says")

    def _document(self, desc: dict, name: str):
        if desc["digest"] not in self.docs:
            if desc["size"] > MAX_MANIFEST:
                raise ResourceExhausted(f"{name}: {desc['digest']} is {desc['size']} bytes, over the "
                                        f"{MAX_MANIFEST}-byte limit for manifests")
            self._require(desc, name)
            data = b"".join(self.client.content.read(desc["digest"], size=desc["size"]))
            if len(data) != desc["size"] or _sha256(data) != desc["digest"]:
                raise FailedPrecondition(f"{name}: stored {desc['digest']} does not match its digest")
            self.docs[desc["digest"]] = parse_document(data, desc)
        return self.docs[desc["digest"]]

    def records(self, docker_manifest: bool) -> list[tuple[tarfile.TarInfo, object]]:
        """(header, bytes or a blob descriptor to stream) for every member, sorted by name."""
        records = [
            (_tar_info(OCI_LAYOUT_FILE, 0o444), json.dumps({"imageLayoutVersion": OCI_LAYOUT_VERSION}).encode()),
            (_tar_info("index.json", 0o644), json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                                         "manifests": self.entries}).encode()),
        ]
        if docker_manifest and self.docker:
            listing = []
            for digest, names in self.docker.items():
                doc = self.docs[digest]
                listing.append({"Config": _blob_path(doc.config["digest"]), "RepoTags": names,
                                "Layers": [_blob_path(layer["digest"]) for layer in doc.layers
                                           if layer["digest"] in self.blobs]})
            records.append((_tar_info("manifest.json", 0o644), json.dumps(listing).encode()))
        if self.blobs:
            records.append((_tar_info("blobs/", 0o755, tarfile.DIRTYPE), b""))
            records.append((_tar_info("blobs/sha256/", 0o755, tarfile.DIRTYPE), b""))
        for desc in self.blobs.values():
            records.append((_tar_info(_blob_path(desc["digest"]), 0o444), desc))
        records.sort(key=lambda r: r[0].name)
        return records


def _tar_info(name: str, mode: int, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode, info.type, info.mtime = mode, kind, 0
    return info


def _write_tar(client, out: BinaryIO, records: list) -> None:
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for info, source in records:
            if isinstance(source, bytes):
                info.size = len(source)
                tar.addfile(info, _BytesReader(source) if source else None)
                continue
            info.size = source["size"]
            reader = _BlobReader(client, source)
            tar.addfile(info, reader)
            reader.verify()


class _BytesReader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n < 0 else self.pos + n
        chunk, self.pos = self.data[self.pos:end], min(end, len(self.data))
        return chunk


class _BlobReader:
    """A blob from the content store as a file, hashed as it is read (containerd's exporter
    verifies each blob on its way into the tar)."""

    def __init__(self, client, desc: dict):
        self.desc = desc
        self.chunks = client.content.read(desc["digest"], size=desc["size"])
        self.buffer = b""
        self.hasher = hashlib.sha256()
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self.buffer) < n:
            chunk = next(self.chunks, b"")
            if not chunk:
                break
            self.buffer += chunk
        out, self.buffer = (self.buffer, b"") if n < 0 else (self.buffer[:n], self.buffer[n:])
        self.hasher.update(out)
        self.count += len(out)
        return out

    def verify(self) -> None:
        if self.count != self.desc["size"] or "sha256:" + self.hasher.hexdigest() != self.desc["digest"]:
            raise FailedPrecondition(f"blob {self.desc['digest']} read back from the content store does "
                                     "not match its digest")


def _write_file(path: str, write) -> None:
    """Write through a temporary file beside `path`, renamed over it only once complete."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
