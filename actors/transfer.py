"""Pull and push against OCI distribution registries (containerd's remotes/docker and its pull
and push handlers), as plain logic over a content store.

    parse_reference(ref)   "127.0.0.1:5000/busybox:latest", "busybox", "repo@sha256:…" -> Reference
    RegistryClient         one registry and repository: resolve, fetch, push, with auth
    Puller.pull(...)       resolve, walk index -> manifest -> config + layers into the content store
    Pusher.push(...)       the reverse: blobs, then manifests, then indexes

What the registry says is not trusted. Every digest it names is checked (bus.validate) before it is
used; manifests are capped at MAX_MANIFEST and verified in memory before anything parses them;
blobs stream into the content store's ingests and become visible only when the store's commit has
re-verified their size and digest. A response that announces or sends more bytes than the
descriptor says is cut off at once. Credentials go only to the registry host they were given for
and to the token realm that host's own challenge names -- never to a redirect target on another
origin (an S3 bucket, a CDN) nor to a host an untrusted document names: `urls` on layers are
never followed, and non-distributable ("foreign") layers are skipped, as containerd does.

Errors, in the one table (bus.errors):

    PermissionDenied    401/403: no credentials, or rejected ones (registry or token server)
    NotFound            the reference, or a blob it names, is not in the registry
    InvalidArgument     a malformed reference, or a malformed document from the registry
    ResourceExhausted   a manifest over MAX_MANIFEST
    FailedPrecondition  content that does not match its descriptor (digest, size, byte count)
    Unavailable         the registry cannot be reached, answers 5xx/429, or a stream broke off
                        (an interrupted blob stays in its ingest and the next pull resumes it)
    NotImplemented      Docker schema 1 manifests
"""
from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import importlib.util
import ipaddress
import json
import logging
import platform as host_machine
import queue
import re
import ssl
import threading
import sys
import time
from typing import Callable, Iterable, Iterator



def _lazy_import(name: str):
    """`name`, loaded at its first use: berthd imports this module at every start, and most of
    its starts pull nothing."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# httpx's own command line (httpx._main) imports rich's syntax highlighting and pygments when they
# are installed: a tenth of a second and megabytes, for nothing here.
sys.modules.setdefault("httpx._main", None)
httpx = _lazy_import("httpx")

from berth.labels import GC_REF_CONTENT, GC_REF_SNAPSHOT, UNCOMPRESSED
from berth.version import VERSION
from bus import failpoints
from bus.errors import (AlreadyExists, BerthError, FailedPrecondition, InvalidArgument, NotFound,
                        NotImplementedErr, PermissionDenied, ResourceExhausted, Unavailable)
from bus.validate import check_digest
from bus.worker import Actor, Call, method

log = logging.getLogger("berth.transfer")

MAX_MANIFEST = 4 << 20          # bytes in one manifest or index (containerd: ~4 MB)
MAX_BLOB = 1 << 40              # a descriptor's size beyond this is not believed
MAX_DEPTH = 4                   # index -> index -> ... -> manifest
MAX_REDIRECTS = 5
MAX_TOKEN_RESPONSE = 1 << 20
MAX_ERROR_BODY = 64 << 10
CHUNK = 1 << 20                 # bytes per content-store write and per upload read
CONCURRENCY = 3                 # blobs in flight per pull or push (containerd's default)
LOCKED_REF_WAIT = 300.0         # seconds to wait for another pull writing the same blob
USER_AGENT = f"berth/{VERSION}"

# --- media types ---------------------------------------------------------------------------------

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v1+prettyjws")
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
RESOLVE_ACCEPT = ", ".join([DOCKER_MANIFEST, DOCKER_LIST, OCI_MANIFEST, OCI_INDEX, "*/*"])
NON_DISTRIBUTABLE = ("application/vnd.oci.image.layer.nondistributable.",
                     "application/vnd.docker.image.rootfs.foreign.")
LAYER_PREFIXES = ("application/vnd.oci.image.layer.", "application/vnd.docker.image.rootfs.")
_MEDIA_TYPE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}\Z")



def is_index(media_type: str) -> bool:
    return media_type in INDEX_TYPES


def is_manifest(media_type: str) -> bool:
    return media_type in MANIFEST_TYPES


def is_layer(media_type: str) -> bool:
    return media_type.startswith(LAYER_PREFIXES)


def is_non_distributable(media_type: str) -> bool:
    return media_type.startswith(NON_DISTRIBUTABLE)


def ref_key(desc: dict) -> str:
    """The ingest ref for a descriptor, as containerd's remotes.MakeRefKey names it."""
    mt, digest = desc["mediaType"], desc["digest"]
    if is_manifest(mt):
        return f"manifest-{digest}"
    if is_index(mt):
        return f"index-{digest}"
    if is_layer(mt):
        return f"layer-{digest}"
    if mt in (OCI_CONFIG, DOCKER_CONFIG):
        return f"config-{digest}"
    return f"unknown-{digest}"


def gc_label_prefix(media_type: str) -> str:
    """containerd's images.ChildGCLabels: the label a parent holds for a child of this type."""
    if is_manifest(media_type) or is_index(media_type):
        return f"{GC_REF_CONTENT}.m."
    if is_layer(media_type):
        return f"{GC_REF_CONTENT}.l."
    if media_type in (OCI_CONFIG, DOCKER_CONFIG):
        return f"{GC_REF_CONTENT}.config"
    return f"{GC_REF_CONTENT}."


def gc_labels(children: list[dict]) -> dict[str, str]:
    """containerd's SetChildrenMappedLabels: one counter per label prefix; a prefix ending in "."
    is always numbered, another only from its second use (config, config.1, ...)."""
    labels, counts = {}, {}
    for child in children:
        key = gc_label_prefix(child["mediaType"])
        n = counts.get(key, 0)
        counts[key] = n + 1
        labels[f"{key}{n}" if n > 0 or key.endswith(".") else key] = child["digest"]
    return labels


# --- references -----------------------------------------------------------------------------------

DEFAULT_DOMAIN = "docker.io"
DOCKER_HUB_ENDPOINT = "registry-1.docker.io"
MAX_NAME = 255

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*\Z")
_DOMAIN_RE = re.compile(r"(?:(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
                        r"(?:\.(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9]))*"
                        r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?\Z")
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}\Z", re.ASCII)


@dataclasses.dataclass(frozen=True)
class Reference:
    host: str                    # the registry as named: "docker.io", "127.0.0.1:5000"
    repository: str              # "library/busybox"
    tag: str | None = None
    digest: str | None = None

    @property
    def endpoint(self) -> str:
        """Where its API answers (Docker Hub's differs from its name)."""
        return DOCKER_HUB_ENDPOINT if self.host == DEFAULT_DOMAIN else self.host

    @property
    def locator(self) -> str:
        return f"{self.host}/{self.repository}"

    @property
    def object(self) -> str:
        """What to ask the registry for: the digest if there is one (it wins over a tag)."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        name = self.locator
        if self.tag:
            name += f":{self.tag}"
        if self.digest:
            name += f"@{self.digest}"
        return name


def parse_reference(ref: str) -> Reference:
    """Parse `[host[:port]/]path[:tag][@sha256:hex]` the way Docker normalises names: no host
    means docker.io, a one-component docker.io path gains `library/`, no tag nor digest means
    `latest`."""
    if not isinstance(ref, str) or not ref:
        raise InvalidArgument("image reference must be a non-empty string")
    if len(ref) > MAX_NAME + 200 or any(c.isspace() or not c.isprintable() for c in ref):
        raise InvalidArgument(f"image reference {ref[:100]!r} is not valid: too long or contains spaces")
    name, tag, digest = ref, None, None
    if "@" in name:
        name, digest = name.split("@", 1)
        try:
            check_digest(digest)
        except InvalidArgument:
            raise InvalidArgument(f"image reference {ref!r}: digest {digest[:100]!r} is not sha256: "
                                  "followed by 64 lower-case hex digits") from None
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
        if not _TAG_RE.match(tag):
            raise InvalidArgument(f"image reference {ref!r}: tag {tag!r} is not valid "
                                  "(letters, digits, _ . -, at most 128, not starting with . or -)")
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        host, path = first, rest
        if not _DOMAIN_RE.match(host):
            raise InvalidArgument(f"image reference {ref!r}: {host!r} is not a valid registry host")
        if host == "index.docker.io":
            host = DEFAULT_DOMAIN
    else:
        host, path = DEFAULT_DOMAIN, name
    if host == DEFAULT_DOMAIN and path and "/" not in path:
        path = f"library/{path}"
    if not path:
        raise InvalidArgument(f"image reference {ref!r} names no repository")
    if path != path.lower() and _PATH_RE.match(path.lower()):
        raise InvalidArgument(f"image reference {ref!r}: repository name must be lowercase")
    if not _PATH_RE.match(path):
        raise InvalidArgument(f"image reference {ref!r}: repository {path!r} is not valid "
                              "(lower-case components of letters and digits, joined by . _ __ or -)")
    if len(f"{host}/{path}") > MAX_NAME:
        raise InvalidArgument(f"image reference {ref[:100]!r}…: name longer than {MAX_NAME} characters")
    if tag is None and digest is None:
        tag = "latest"
    return Reference(host, path, tag, digest)


def is_localhost(host: str) -> bool:
    """containerd's MatchLocalhost: such registries are spoken to in plain HTTP by default."""
    hostname = httpx.URL(f"http://{host}/").host
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


# --- platforms ------------------------------------------------------------------------------------

_ARCH_ALIASES = {"x86_64": ("amd64", ""), "x86-64": ("amd64", ""), "amd64": ("amd64", ""),
                 "aarch64": ("arm64", "v8"), "arm64": ("arm64", "v8"),
                 "armhf": ("arm", "v7"), "armel": ("arm", "v6"), "armv7l": ("arm", "v7"),
                 "armv6l": ("arm", "v6"), "armv5tel": ("arm", "v5"),
                 "i386": ("386", ""), "i486": ("386", ""), "i586": ("386", ""), "i686": ("386", ""),
                 "386": ("386", "")}
_OSES = {"linux", "windows", "darwin", "freebsd", "netbsd", "openbsd", "solaris", "illumos", "aix"}
_PLATFORM_PART = re.compile(r"[a-z0-9_.-]{1,64}\Z")


def normalize_platform(os_: str, arch: str, variant: str = "") -> tuple[str, str, str]:
    os_, arch, variant = (os_ or "").lower(), (arch or "").lower(), (variant or "").lower()
    if os_ == "macos":
        os_ = "darwin"
    base, default_variant = _ARCH_ALIASES.get(arch, (arch, ""))
    if base == "arm64":
        variant = {"": "v8", "8": "v8", "v8": "v8"}.get(variant, variant)
    elif base == "arm":
        variant = variant or default_variant or "v7"
        if variant.isdigit():
            variant = f"v{variant}"
    elif base == "amd64":
        variant = "" if variant in ("", "v1") else variant
    return os_, base, variant


def host_platform() -> tuple[str, str, str]:
    """linux/<arch>[/variant] of this machine, from platform.machine()."""
    return normalize_platform("linux", host_machine.machine())


def parse_platform(value: str | None) -> tuple[str, str, str]:
    """`os/arch[/variant]`, `os` or `arch` (containerd's platforms.Parse); None: the host's."""
    if value is None or value == "":
        return host_platform()
    if not isinstance(value, str):
        raise InvalidArgument("platform must be a string like linux/arm64")
    parts = value.lower().split("/")
    if len(parts) > 3 or not all(_PLATFORM_PART.match(p) for p in parts):
        raise InvalidArgument(f"platform {value[:100]!r} is not os/arch[/variant]")
    if len(parts) == 1:
        if parts[0] in _OSES:
            host = host_platform()
            return normalize_platform(parts[0], host[1], host[2])
        return normalize_platform("linux", parts[0])
    return normalize_platform(*parts)


def format_platform(p: tuple[str, str, str]) -> str:
    return "/".join(x for x in p if x)


class PlatformMatcher:
    """Which index entries a pull takes: containerd's platforms.Only(p) — the platform itself,
    then what it can also run (amd64: 386; arm64: arm v8..v5; arm vN: lower vN) — best first."""

    def __init__(self, platform: str | None = None):
        self.platform = parse_platform(platform)
        os_, arch, variant = self.platform
        order = [(os_, arch, variant)]
        if arch == "amd64":
            order.append((os_, "386", ""))
        elif arch == "arm64":
            order += [(os_, "arm", f"v{n}") for n in (8, 7, 6, 5)]
        elif arch == "arm" and variant[1:].isdigit():
            order += [(os_, "arm", f"v{n}") for n in range(int(variant[1:]) - 1, 4, -1)]
        self.order = order

    def rank(self, platform: dict | None) -> int | None:
        """0 is the best match; None: no match. An entry without a platform matches, last."""
        if platform is None:
            return len(self.order)
        candidate = normalize_platform(platform.get("os", ""), platform.get("architecture", ""),
                                       platform.get("variant", ""))
        for i, want in enumerate(self.order):
            if candidate == want:
                return i
        return None

    def select(self, manifests: list[dict], limit: int = 1) -> list[dict]:
        """The best `limit` manifests of an index for this platform (containerd's LimitManifests)."""
        ranked = []
        for i, desc in enumerate(manifests):
            if not (is_manifest(desc["mediaType"]) or is_index(desc["mediaType"])):
                continue
            r = self.rank(desc.get("platform"))
            if r is not None:
                ranked.append((r, i, desc))
        ranked.sort(key=lambda t: (t[0], t[1]))
        return [desc for _, _, desc in ranked[:limit]]

    def __str__(self) -> str:
        return format_platform(self.platform)


# --- descriptors and documents --------------------------------------------------------------------

def check_descriptor(value: object, what: str) -> dict:
    """A descriptor from an untrusted document: {mediaType, digest, size} checked, plus its
    platform if it names one. `urls` and annotations are dropped: nothing here follows them."""
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} is not a descriptor object")
    mt = value.get("mediaType")
    if not isinstance(mt, str) or not _MEDIA_TYPE_RE.match(mt):
        raise InvalidArgument(f"{what} has an invalid mediaType {str(mt)[:100]!r}")
    digest = value.get("digest")
    check_digest(digest, f"{what} digest")
    size = value.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_BLOB:
        raise InvalidArgument(f"{what} has an invalid size {str(size)[:40]!r}")
    desc = {"mediaType": mt, "digest": digest, "size": size}
    platform = value.get("platform")
    if platform is not None:
        if not isinstance(platform, dict) or not all(
                isinstance(platform.get(k, ""), str) and len(platform.get(k, "")) <= 64
                for k in ("os", "architecture", "variant")):
            raise InvalidArgument(f"{what} has an invalid platform")
        desc["platform"] = {k: platform[k] for k in ("os", "architecture", "variant") if platform.get(k)}
    if value.get("urls") is not None:
        desc["has_urls"] = True
    return desc


def public(desc: dict) -> dict:
    return {"mediaType": desc["mediaType"], "digest": desc["digest"], "size": desc["size"]}


@dataclasses.dataclass
class Document:
    kind: str                          # "index" or "manifest"
    media_type: str
    manifests: list[dict] = dataclasses.field(default_factory=list)
    config: dict | None = None
    layers: list[dict] = dataclasses.field(default_factory=list)


def parse_document(data: bytes, desc: dict) -> Document:
    """An index or a manifest whose bytes were already verified against `desc`. Its kind comes
    from the descriptor's media type, and the document must agree: one that is both an index and
    a manifest is refused (containerd's validateMediaType), as is one whose own mediaType
    contradicts its descriptor."""
    where = f"{desc['mediaType'] or 'document'} {desc['digest']}"
    if desc["mediaType"] in DOCKER_SCHEMA1:
        raise NotImplementedErr(f"{where}: Docker schema 1 manifests are not supported")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise InvalidArgument(f"{where} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{where} is not a JSON object")
    if doc.get("schemaVersion") == 1:
        raise NotImplementedErr(f"{where}: Docker schema 1 manifests are not supported")
    if doc.get("schemaVersion") != 2:
        raise InvalidArgument(f"{where}: schemaVersion {str(doc.get('schemaVersion'))[:20]!r} is not 2")
    has_index = "manifests" in doc
    has_manifest = "config" in doc or "layers" in doc
    if has_index and has_manifest:
        raise InvalidArgument(f"{where} is both an index (it has manifests) and a manifest (it has "
                              "config or layers); refusing an ambiguous document")
    declared = doc.get("mediaType")
    if declared is not None and not isinstance(declared, str):
        raise InvalidArgument(f"{where}: mediaType is not a string")
    media_type = desc["mediaType"]
    if not (is_index(media_type) or is_manifest(media_type)):
        # Resolved with an unhelpful Content-Type: take the document's word, then its shape.
        if declared in INDEX_TYPES or declared in MANIFEST_TYPES:
            media_type = declared
        else:
            media_type = OCI_INDEX if has_index else OCI_MANIFEST
    if declared is not None and (declared in INDEX_TYPES or declared in MANIFEST_TYPES) \
            and is_index(declared) != is_index(media_type):
        raise InvalidArgument(f"{where} declares mediaType {declared!r}, contradicting its descriptor")
    if is_index(media_type):
        manifests = doc.get("manifests")
        if not isinstance(manifests, list):
            raise InvalidArgument(f"{where}: manifests is not a list")
        return Document("index", media_type,
                        manifests=[check_descriptor(m, f"{where}: manifest {i}") for i, m in enumerate(manifests)])
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise InvalidArgument(f"{where}: layers is not a list")
    return Document("manifest", media_type, config=check_descriptor(doc.get("config"), f"{where}: config"),
                    layers=[check_descriptor(layer, f"{where}: layer {i}") for i, layer in enumerate(layers)])


# --- authentication -------------------------------------------------------------------------------

_CHALLENGE_TOKEN = re.compile(r'\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*')
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


def parse_challenges(headers: Iterable[str]) -> list[tuple[str, dict[str, str]]]:
    """WWW-Authenticate values -> [(scheme lower-cased, {param: value})] (RFC 7235)."""
    challenges = []
    for header in headers:
        pos, current = 0, None
        while pos < len(header):
            m = _CHALLENGE_TOKEN.match(header, pos)
            if not m:
                pos += 1
                continue
            word, pos = m.group(1), m.end()
            if pos < len(header) and header[pos] == "=" and current is not None:
                pos += 1
                q = _QUOTED.match(header, pos)
                if q:
                    value, pos = re.sub(r"\\(.)", r"\1", q.group(1)), q.end()
                else:
                    v = _CHALLENGE_TOKEN.match(header, pos)
                    value, pos = (v.group(1), v.end()) if v else ("", pos)
                current[1][word.lower()] = value
            else:
                current = (word.lower(), {})
                challenges.append(current)
            while pos < len(header) and header[pos] in ", \t":
                pos += 1
    return challenges


def parse_credentials(credentials) -> tuple[str, str] | None:
    """"user:password" (ctr's --user) or (user, password); None: anonymous."""
    if credentials is None or credentials == "":
        return None
    if isinstance(credentials, str):
        user, sep, secret = credentials.partition(":")
    elif isinstance(credentials, (tuple, list)) and len(credentials) == 2:
        user, secret = credentials
        sep = ":"
    else:
        raise InvalidArgument("credentials must be 'user:password'")
    if not sep or not isinstance(user, str) or not isinstance(secret, str) or not user \
            or any(not c.isprintable() for c in user + secret):
        raise InvalidArgument("credentials must be 'user:password' with a non-empty user")
    return user, secret


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    port = url.port or {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host, port


def _registry_error(resp: httpx.Response) -> str:
    """The registry's own error message, if its body has one (distribution's errors list)."""
    with contextlib.suppress(Exception):
        data = _read_limited(resp, MAX_ERROR_BODY, "error body", truncate=True)
        errors = json.loads(data).get("errors")
        if errors and isinstance(errors[0], dict):
            text = f"{errors[0].get('code', '')}: {errors[0].get('message', '')}".strip(": ")
            return "".join(c if c.isprintable() else "?" for c in text)[:200]
    return ""


def _read_limited(resp: httpx.Response, limit: int, what: str, truncate: bool = False,
                  too_big: type[BerthError] = ResourceExhausted) -> bytes:
    """The raw body, up to `limit` bytes: more raises `too_big` (or is dropped, with truncate)."""
    buf = bytearray()
    try:
        for chunk in resp.iter_raw(CHUNK):
            buf += chunk
            if len(buf) > limit:
                if truncate:
                    return bytes(buf[:limit])
                raise too_big(f"{what}: registry sent more than {limit} bytes")
    except httpx.HTTPError as e:
        raise Unavailable(f"{what}: reading the response failed: {e}") from None
    return bytes(buf)


# --- the registry client --------------------------------------------------------------------------

class _Cancelled(Exception):
    """Another part of the same pull failed; this one stops and leaves its ingest for a resume."""


class _RangeUnsatisfiable(Exception):
    """The registry cannot continue at our ingest's offset: start the blob again."""


class RegistryClient:
    """One registry host and repository, on httpx. Thread-safe: a pull's workers share it.

    Authentication follows the 401s (containerd's dockerAuthorizer): anonymous until challenged;
    `Basic` answered with the credentials; `Bearer` with a token fetched from the challenge's
    realm (service and scope from the challenge, plus this repository's pull or pull,push scope),
    sending the credentials to that realm as basic auth when there are any."""

    def __init__(self, host: str, repository: str, *, plain_http: bool = False, credentials=None,
                 push: bool = False, verify: bool | str | ssl.SSLContext = True, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None):
        self.host = host
        self.repository = repository
        self.plain_http = plain_http
        # containerd's default for localhost: HTTPS first, plain HTTP if the TLS handshake fails.
        self.fallback = not plain_http and is_localhost(host)
        scheme = "http" if plain_http else "https"
        self.base = httpx.URL(f"{scheme}://{host}/v2/{repository}")
        self.origin = _origin(self.base)
        self.credentials = parse_credentials(credentials)
        self.scope = f"repository:{repository}:{'pull,push' if push else 'pull'}"
        self._authorization: str | None = None
        self._auth_lock = threading.Lock()
        self._manifests: dict[str, bytes] = {}        # bodies a resolve had to GET
        if verify is True:
            verify = ssl.create_default_context()     # the system's CA store
        elif isinstance(verify, str):
            verify = ssl.create_default_context(cafile=verify)
        self.http = httpx.Client(verify=verify, trust_env=False, follow_redirects=False, transport=transport,
                                 timeout=httpx.Timeout(timeout, connect=min(timeout, 30.0)),
                                 headers={"User-Agent": USER_AGENT})

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "RegistryClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- requests ---------------------------------------------------------------------------------

    def _send(self, method: str, url: httpx.URL | str, what: str, headers: dict | None = None,
              body: bytes | Callable[[], Iterable[bytes]] | None = None) -> httpx.Response:
        """Send with our credentials on our own origin only, following redirects by hand (so no
        Authorization header follows one to another origin) and answering one 401 challenge.
        `body` is bytes or a factory of an iterable, called again if the request is resent. The
        response is streaming: the caller closes it."""
        url = httpx.URL(url)
        challenged = False
        for _ in range(MAX_REDIRECTS + 2):
            own = _origin(url) == self.origin
            sent = self._authorization if own else None
            hdrs = dict(headers or {})
            if sent:
                hdrs["Authorization"] = sent
            content = body() if callable(body) else body
            try:
                request = self.http.build_request(method, url, headers=hdrs, content=content)
                resp = self.http.send(request, stream=True)
            except httpx.TimeoutException:
                raise Unavailable(f"{what}: {url.host}:{url.port or ''} timed out") from None
            except httpx.ConnectError as e:
                if not (own and self.fallback and url.scheme == "https" and _speaks_plain_http(e)):
                    raise Unavailable(f"{what}: cannot reach {url.host}: {e}") from None
                url = self._downgrade(url)
                continue
            except httpx.HTTPError as e:
                raise Unavailable(f"{what}: cannot reach {url.host}: {e}") from None
            if resp.status_code in (301, 302, 303, 307, 308) and "location" in resp.headers:
                resp.close()
                target = url.join(resp.headers["location"])
                if target.scheme not in ("http", "https") or not target.host:
                    raise Unavailable(f"{what}: registry redirected to an unusable location")
                if url.scheme == "https" and target.scheme == "http":
                    raise Unavailable(f"{what}: registry redirected from HTTPS to plain HTTP ({target.host}); refusing")
                if resp.status_code == 303 or (resp.status_code in (301, 302) and method not in ("GET", "HEAD")):
                    method, body = "GET", None
                url = target
                continue
            if resp.status_code == 401 and own and not challenged:
                challenges = parse_challenges(resp.headers.get_list("www-authenticate"))
                resp.close()
                self._authorize(challenges, sent, what)
                challenged = True
                continue
            return resp
        raise Unavailable(f"{what}: more than {MAX_REDIRECTS} redirects")

    def _downgrade(self, url: httpx.URL) -> httpx.URL:
        with self._auth_lock:
            if self.base.scheme == "https":
                log.info("%s does not speak TLS; using plain HTTP as for any localhost registry", self.host)
                self.base = self.base.copy_with(scheme="http")
                self.origin = _origin(self.base)
                self.plain_http = True
        return url.copy_with(scheme="http")

    def _authorize(self, challenges: list[tuple[str, dict]], sent: str | None, what: str) -> None:
        with self._auth_lock:
            if self._authorization != sent:
                return                                # another worker answered it meanwhile
            schemes = dict(challenges)
            if "bearer" in schemes:
                self._authorization = "Bearer " + self._fetch_token(schemes["bearer"], what)
            elif "basic" in schemes:
                if self.credentials is None:
                    raise PermissionDenied(f"{what}: {self.host} requires authentication and no credentials were given")
                if sent is not None and sent.startswith("Basic "):
                    raise PermissionDenied(f"{what}: {self.host} rejected the credentials for user "
                                           f"{self.credentials[0]!r}")
                self._authorization = "Basic " + _basic(self.credentials)
            else:
                raise PermissionDenied(f"{what}: {self.host} answered 401 without a usable challenge")

    def _fetch_token(self, params: dict, what: str) -> str:
        realm = params.get("realm", "")
        try:
            url = httpx.URL(realm)
        except Exception:
            url = None
        if url is None or url.scheme not in ("http", "https") or not url.host:
            raise PermissionDenied(f"{what}: {self.host} named an unusable token realm {realm[:100]!r}")
        scopes = [s for s in params.get("scope", "").split(" ") if s]
        if self.scope not in scopes:
            scopes.append(self.scope)
        query = [("scope", s) for s in scopes]
        if params.get("service"):
            query.insert(0, ("service", params["service"]))
        headers = {}
        if self.credentials is not None:
            if url.scheme == "http" and not self.plain_http:
                raise PermissionDenied(f"{what}: {self.host} is HTTPS but its token realm {url.host} is plain "
                                       "HTTP; not sending credentials there")
            headers["Authorization"] = "Basic " + _basic(self.credentials)
        try:
            with self.http.stream("GET", url.copy_merge_params(query), headers=headers) as resp:
                if resp.status_code in (401, 403):
                    raise PermissionDenied(
                        f"{what}: token server {url.host} refused "
                        + ("the credentials" if self.credentials else "anonymous access; credentials are needed"))
                if resp.status_code != 200:
                    raise Unavailable(f"{what}: token server {url.host} answered {resp.status_code}")
                data = _read_limited(resp, MAX_TOKEN_RESPONSE, f"token from {url.host}")
        except httpx.HTTPError as e:
            raise Unavailable(f"{what}: cannot reach token server {url.host}: {e}") from None
        try:
            answer = json.loads(data)
            token = answer.get("token") or answer.get("access_token")
        except (ValueError, AttributeError, RecursionError):
            token = None
        if not isinstance(token, str) or not token or not token.isascii() or not token.isprintable() \
                or " " in token:
            raise PermissionDenied(f"{what}: token server {url.host} returned no usable token")
        return token

    def _raise_for(self, resp: httpx.Response, what: str) -> None:
        code = resp.status_code
        if 200 <= code < 300:
            return
        detail = _registry_error(resp) if resp.request.method != "HEAD" else ""
        resp.close()
        message = f"{what}: {self.host} answered {code} {resp.reason_phrase}" + (f" ({detail})" if detail else "")
        if code == 401:
            raise PermissionDenied(message + (": credentials rejected" if self.credentials else
                                              ": authentication required, no credentials given"))
        if code == 403:
            raise PermissionDenied(message)
        if code == 404:
            raise NotFound(message)
        if code in (408, 429) or code >= 500:
            raise Unavailable(message)
        if code == 400:
            raise InvalidArgument(message)
        if code == 405:
            raise NotImplementedErr(message)
        raise FailedPrecondition(message)

    # --- resolving and fetching ---------------------------------------------------------------------

    def resolve(self, ref: Reference) -> dict:
        """{mediaType, digest, size} of what `ref` names: HEAD, then GET if HEAD gave no digest
        or length (containerd's Resolve). A digest reference is verified against the content."""
        what = f"resolving {ref}"
        url = f"{self.base}/manifests/{ref.object}"
        accept = {"Accept": RESOLVE_ACCEPT, "Accept-Encoding": "identity"}
        with contextlib.closing(self._send("HEAD", url, what, accept)) as resp:
            self._raise_for(resp, what)
            header_digest = resp.headers.get("docker-content-digest")
            length = resp.headers.get("content-length")
            media_type = _media_type(resp)
        if header_digest is not None:
            _check_registry_digest(header_digest, what)
            if ref.digest and header_digest != ref.digest:
                raise FailedPrecondition(f"{what}: registry answered with digest {header_digest}")
        digest = ref.digest or header_digest
        size = int(length) if length is not None and length.isdigit() else None
        if size is not None and size > MAX_MANIFEST:
            raise ResourceExhausted(f"{what}: manifest of {size} bytes exceeds the {MAX_MANIFEST}-byte limit")
        if digest is None or size is None:
            with contextlib.closing(self._send("GET", url, what, accept)) as resp:
                self._raise_for(resp, what)
                media_type = _media_type(resp)
                header_digest = resp.headers.get("docker-content-digest")
                body = _read_limited(resp, MAX_MANIFEST, f"{what}: manifest")
            computed = "sha256:" + hashlib.sha256(body).hexdigest()
            if ref.digest and computed != ref.digest:
                raise FailedPrecondition(f"{what}: registry sent content with digest {computed}")
            if header_digest is not None and header_digest != computed:
                raise FailedPrecondition(f"{what}: registry said digest {header_digest[:80]} for content "
                                         f"whose digest is {computed}")
            digest, size = computed, len(body)
            self._manifests[digest] = body
        if media_type in DOCKER_SCHEMA1:
            raise NotImplementedErr(f"{what}: Docker schema 1 manifests are not supported")
        return {"mediaType": media_type, "digest": digest, "size": size}

    def fetch_manifest(self, desc: dict) -> bytes:
        """A manifest or index, verified against its descriptor before anyone parses it."""
        digest, size = desc["digest"], desc["size"]
        what = f"fetching {desc['mediaType'] or 'manifest'} {digest}"
        if size > MAX_MANIFEST:
            raise ResourceExhausted(f"{what}: {size} bytes exceeds the {MAX_MANIFEST}-byte manifest limit")
        body = self._manifests.pop(digest, None)
        if body is None:
            accept = ", ".join(dict.fromkeys([t for t in [desc["mediaType"]] if t] + [OCI_MANIFEST, OCI_INDEX,
                                                                                       DOCKER_MANIFEST, DOCKER_LIST]))
            with contextlib.closing(self._send("GET", f"{self.base}/manifests/{digest}", what,
                                               {"Accept": accept, "Accept-Encoding": "identity"})) as resp:
                self._raise_for(resp, what)
                _check_length(resp, size, what)
                body = _read_limited(resp, size, what, too_big=FailedPrecondition)
        _verify(body, desc, what)
        return body

    @contextlib.contextmanager
    def blob(self, desc: dict, offset: int = 0) -> Iterator[tuple[int, Iterator[bytes]]]:
        """Open a blob at `offset` (an HTTP Range request when it is not 0): yields (start, chunks),
        where start is where the body begins (0 if the registry ignored the Range). The registry's
        announced length and range are checked against the descriptor first."""
        digest, size = desc["digest"], desc["size"]
        what = f"fetching blob {digest}"
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        resp = self._send("GET", f"{self.base}/blobs/{digest}", what, headers)
        try:
            if resp.status_code == 416 and offset:
                raise _RangeUnsatisfiable()
            self._raise_for(resp, what)
            start = 0
            if resp.status_code == 206:
                m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", resp.headers.get("content-range", "").strip())
                if not offset or not m or int(m.group(1)) != offset:
                    raise _RangeUnsatisfiable()
                start = offset
            elif resp.status_code != 200:
                raise FailedPrecondition(f"{what}: unexpected status {resp.status_code}")
            _check_length(resp, size - start, what)
            yield start, _chunks(resp, what)
        finally:
            resp.close()

    # --- pushing ------------------------------------------------------------------------------------

    def blob_exists(self, desc: dict) -> bool:
        what = f"checking blob {desc['digest']}"
        with contextlib.closing(self._send("HEAD", f"{self.base}/blobs/{desc['digest']}", what)) as resp:
            if resp.status_code == 404:
                return False
            self._raise_for(resp, what)
            length = resp.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) != desc["size"]:
                raise FailedPrecondition(f"{what}: registry has it with size {length}, not {desc['size']}")
            return True

    def upload_blob(self, desc: dict, read: Callable[[int, int], bytes], chunk_size: int | None = None,
                    progress: Callable[[int], None] = lambda n: None) -> None:
        """POST an upload, then one streamed PUT (monolithic) or PATCHes of `chunk_size` and a
        closing PUT (chunked). `read(offset, n)` returns the blob's bytes."""
        digest, size = desc["digest"], desc["size"]
        what = f"pushing blob {digest}"
        with contextlib.closing(self._send("POST", f"{self.base}/blobs/uploads/", what,
                                           {"Content-Length": "0"}, b"")) as resp:
            self._raise_for(resp, what)
            if resp.status_code == 201:
                return
            location = self._location(resp, what)

        def stream(start: int, end: int) -> Callable[[], Iterator[bytes]]:
            def gen() -> Iterator[bytes]:
                pos = start
                while pos < end:
                    data = read(pos, min(CHUNK, end - pos))
                    if not data:
                        raise FailedPrecondition(f"{what}: local content ended at {pos} of {size} bytes")
                    pos += len(data)
                    progress(pos)
                    yield data
            return gen

        octet = {"Content-Type": "application/octet-stream"}
        if chunk_size and size > 0:
            for start in range(0, size, chunk_size):
                end = min(size, start + chunk_size)
                headers = dict(octet, **{"Content-Range": f"{start}-{end - 1}", "Content-Length": str(end - start)})
                with contextlib.closing(self._send("PATCH", location, what, headers, stream(start, end))) as resp:
                    self._raise_for(resp, what)
                    location = self._location(resp, what)
            put = dict(octet, **{"Content-Length": "0"})
            body = b""
        else:
            put = dict(octet, **{"Content-Length": str(size)})
            body = stream(0, size)
        with contextlib.closing(self._send("PUT", location.copy_add_param("digest", digest), what, put, body)) as resp:
            self._raise_for(resp, what)
            returned = resp.headers.get("docker-content-digest")
            if returned is not None and returned != digest:
                raise FailedPrecondition(f"{what}: registry stored it as {returned[:80]}")

    def put_manifest(self, reference: str, media_type: str, body: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        what = f"pushing {media_type} {digest} as {reference}"
        with contextlib.closing(self._send("PUT", f"{self.base}/manifests/{reference}", what,
                                           {"Content-Type": media_type}, body)) as resp:
            self._raise_for(resp, what)
            returned = resp.headers.get("docker-content-digest")
            if returned is not None and returned != digest:
                raise FailedPrecondition(f"{what}: registry stored it as {returned[:80]}")
        return digest

    def _location(self, resp: httpx.Response, what: str) -> httpx.URL:
        location = resp.headers.get("location")
        if not location:
            raise FailedPrecondition(f"{what}: registry gave no upload location")
        url = resp.url.join(location)
        if url.scheme not in ("http", "https"):
            raise FailedPrecondition(f"{what}: registry gave an unusable upload location")
        return url


def _basic(credentials: tuple[str, str]) -> str:
    return base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()


_NOT_TLS = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST")


def _speaks_plain_http(error: Exception) -> bool:
    """True when the server answered the TLS handshake in plain HTTP (containerd falls back only
    then; a certificate that does not verify is an error, never a reason to drop TLS)."""
    seen = error
    while seen is not None:
        if any(reason in str(seen) for reason in _NOT_TLS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _media_type(resp: httpx.Response) -> str:
    return resp.headers.get("content-type", "").split(";")[0].strip().lower()


def _check_registry_digest(digest: str, what: str) -> None:
    try:
        check_digest(digest)
    except InvalidArgument:
        raise InvalidArgument(f"{what}: registry sent an invalid digest {digest[:100]!r}") from None


def _check_length(resp: httpx.Response, expected: int, what: str) -> None:
    length = resp.headers.get("content-length")
    if length is None:
        return
    if not length.strip().isdigit():
        raise FailedPrecondition(f"{what}: registry sent an invalid Content-Length {length[:40]!r}")
    if int(length) != expected:
        raise FailedPrecondition(f"{what}: registry announced {int(length)} bytes where the descriptor "
                                 f"says {expected}")


def _verify(body: bytes, desc: dict, what: str) -> None:
    if len(body) != desc["size"]:
        raise FailedPrecondition(f"{what}: got {len(body)} bytes, descriptor says {desc['size']}")
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    if digest != desc["digest"]:
        raise FailedPrecondition(f"{what}: content has digest {digest}, not {desc['digest']}")


def _chunks(resp: httpx.Response, what: str) -> Iterator[bytes]:
    """The raw body as it arrives (no decoding: the bytes are what the digest covers)."""
    try:
        yield from resp.iter_raw()
    except httpx.HTTPError as e:
        raise Unavailable(f"{what}: the download broke off: {e}") from None


# --- progress -------------------------------------------------------------------------------------

class _Progress:
    """Serialises a pull's progress callback across its workers."""

    def __init__(self, callback: Callable[[dict], None] | None):
        self.callback = callback
        self.lock = threading.Lock()

    def __call__(self, ref: str, digest: str, status: str, offset: int = 0, total: int = 0) -> None:
        if self.callback is not None:
            with self.lock:
                self.callback({"ref": ref, "digest": digest, "status": status, "offset": offset, "total": total})


# --- pulling --------------------------------------------------------------------------------------

class Puller:
    """Pulls images into a content store (containerd's client.Pull without the unpack).

    `store` has the ContentStore methods (info, read, update, writer_open, write, commit, abort,
    writer_close), in-process or a proxy to the content actor. The caller holds a lease for the
    pull and creates the image record `pull` returns."""

    def __init__(self, store, *, concurrency: int = CONCURRENCY, verify: bool | str | ssl.SSLContext = True,
                 timeout: float = 60.0, transport: httpx.BaseTransport | None = None,
                 locked_ref_wait: float = LOCKED_REF_WAIT):
        self.store = store
        self.concurrency = concurrency
        self.client_options = {"verify": verify, "timeout": timeout, "transport": transport}
        self.locked_ref_wait = locked_ref_wait
        self._lock = threading.Lock()
        self._active: dict[int, str] = {}

    def stats(self) -> dict:
        with self._lock:
            return {"pulls": len(self._active), "refs": sorted(self._active.values())}

    def pull(self, ns: str, ref: str, platform: str | None = None, plain_http: bool = False,
             credentials=None, progress: Callable[[dict], None] | None = None,
             on_manifest: Callable[[dict, "Document"], None] | None = None) -> dict:
        """Fetch `ref` for `platform` (default: the host's) into the content store; returns the
        image record to create: {"name", "target": {mediaType, digest, size}}. `on_manifest` hears
        of the platform's manifest before its blobs are fetched (an unpacker starts there)."""
        parsed = parse_reference(ref)
        matcher = PlatformMatcher(platform)
        report = _Progress(progress)
        name = str(parsed)
        token = object()
        with self._lock:
            self._active[id(token)] = name
        try:
            with RegistryClient(parsed.endpoint, parsed.repository, plain_http=plain_http,
                                credentials=credentials, **self.client_options) as client:
                report(name, "", "resolving")
                root = client.resolve(parsed)
                target = _PullJob(self, ns, client, matcher, report, name, on_manifest).run(root)
                report(name, target["digest"], "done", target["size"], target["size"])
                return {"name": name, "target": target}
        finally:
            with self._lock:
                del self._active[id(token)]


class _PullJob:
    """One pull's walk: manifests in this thread, blobs on a small pool that this job owns."""

    def __init__(self, puller: Puller, ns: str, client: RegistryClient, matcher: PlatformMatcher,
                 report: _Progress, name: str, on_manifest=None):
        self.on_manifest = on_manifest
        self.store = puller.store
        self.puller = puller
        self.ns = ns
        self.client = client
        self.matcher = matcher
        self.report = report
        self.name = name
        self.cancel = threading.Event()
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None

    def run(self, root: dict) -> dict:
        with concurrent.futures.ThreadPoolExecutor(self.puller.concurrency, thread_name_prefix="pull") as pool:
            self.pool = pool
            try:
                return self._walk(root, 0)
            finally:
                self.cancel.set()           # anything still queued or running stops at its next chunk

    def _walk(self, desc: dict, depth: int) -> dict:
        """Fetch a manifest or index and everything under it; commit it last, with the GC labels
        for its children, so a stored manifest has its children stored too."""
        if depth > MAX_DEPTH:
            raise InvalidArgument(f"{self.name}: indexes nested more than {MAX_DEPTH} deep")
        data, existed = self._manifest_bytes(desc)
        doc = parse_document(data, desc)
        desc = dict(public(desc), mediaType=doc.media_type)
        if doc.kind == "index":
            chosen = self.matcher.select(doc.manifests)
            if not chosen:
                offered = sorted({format_platform(normalize_platform(m["platform"].get("os", ""),
                                                                     m["platform"].get("architecture", ""),
                                                                     m["platform"].get("variant", "")))
                                  for m in doc.manifests if "platform" in m})
                raise NotFound(f"{self.name}: no manifest for platform {self.matcher} in index {desc['digest']}"
                               + (f" (it has {', '.join(offered)})" if offered else ""))
            for child in chosen:
                self._walk(child, depth + 1)
            labels = gc_labels(chosen)
        else:
            children = [doc.config, *doc.layers]
            if self.on_manifest is not None:
                self.on_manifest(desc, doc)
            self._fetch_blobs([c for c in children if not is_non_distributable(c["mediaType"])])
            for skipped in (c for c in children if is_non_distributable(c["mediaType"])):
                log.info("%s: skipping non-distributable layer %s", self.name, skipped["digest"])
            labels = gc_labels(children)
        self._store_manifest(desc, data, labels, existed)
        return desc

    # --- manifests --------------------------------------------------------------------------------

    def _have(self, desc: dict) -> bool:
        try:
            info = self.store.info(self.ns, desc["digest"])
        except NotFound:
            return False
        if info["size"] != desc["size"]:
            raise FailedPrecondition(f"{self.name}: {desc['digest']} is stored with size {info['size']}, "
                                     f"but the descriptor says {desc['size']}")
        return True

    def _manifest_bytes(self, desc: dict) -> tuple[bytes, bool]:
        key = ref_key(desc) if desc["mediaType"] else f"manifest-{desc['digest']}"
        if desc["size"] > MAX_MANIFEST:
            raise ResourceExhausted(f"{self.name}: manifest {desc['digest']} of {desc['size']} bytes exceeds "
                                    f"the {MAX_MANIFEST}-byte limit")
        if self._have(desc):
            data = bytearray()
            while len(data) < desc["size"]:
                chunk = self.store.read(self.ns, desc["digest"], len(data), desc["size"] - len(data))
                if not chunk:
                    break
                data += chunk
            _verify(bytes(data), desc, f"reading stored {key}")
            return bytes(data), True
        self.report(key, desc["digest"], "downloading", 0, desc["size"])
        return self.client.fetch_manifest(desc), False

    def _store_manifest(self, desc: dict, data: bytes, labels: dict, existed: bool) -> None:
        key = ref_key(desc)
        if not existed and self._commit_bytes(key, desc, data, labels):
            self.report(key, desc["digest"], "done", len(data), len(data))
            return
        if labels:                                   # stored before (or by a concurrent pull)
            self.store.update(self.ns, desc["digest"], labels, [f"labels.{k}" for k in labels])
        self.report(key, desc["digest"], "exists", desc["size"], desc["size"])

    def _commit_bytes(self, key: str, desc: dict, data: bytes, labels: dict) -> bool:
        """Write verified bytes into the store with their labels; False if it already had them."""
        status = self._open_writer(key, desc)
        if status is None:
            return False
        try:
            if status["offset"]:                     # a leftover; manifests are small, start over
                self.store.abort(self.ns, key)
                if self._open_writer(key, desc) is None:
                    return False
            for pos in range(0, len(data), CHUNK):
                self.store.write(self.ns, key, pos, data[pos:pos + CHUNK])
            self.store.commit(self.ns, key, len(data), desc["digest"], labels)
            return True
        except AlreadyExists:
            return False
        except BaseException:
            with contextlib.suppress(BerthError):
                self.store.abort(self.ns, key)
            raise

    def _open_writer(self, key: str, desc: dict) -> dict | None:
        """writer_open, waiting (to a deadline) while another pull holds the same ref; None when
        the blob turned up meanwhile. A leftover ingest that disagrees about size is dropped."""
        deadline = time.monotonic() + self.puller.locked_ref_wait
        dropped = False
        while True:
            try:
                return self.store.writer_open(self.ns, key, desc["size"], desc["digest"])
            except AlreadyExists:
                return None
            except FailedPrecondition:
                if dropped:
                    raise
                self.store.abort(self.ns, key)       # its total or expected digest differ: not ours
                dropped = True
            except Unavailable:
                if self._have(desc):
                    return None
                if time.monotonic() > deadline:
                    raise Unavailable(f"{self.name}: {key} is being written by another pull") from None
                if self.cancel.wait(0.05):
                    raise _Cancelled() from None

    # --- blobs --------------------------------------------------------------------------------------

    def _fetch_blobs(self, descs: list[dict]) -> None:
        unique = []
        for d in {d["digest"]: d for d in descs}.values():
            if self._have(d):
                self.report(ref_key(d), d["digest"], "exists", d["size"], d["size"])
            else:
                self.report(ref_key(d), d["digest"], "waiting", 0, d["size"])
                unique.append(d)
        futures = [self.pool.submit(self._fetch_blob, d) for d in unique]
        done, pending = concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
        if pending:
            self.cancel.set()
            for f in pending:
                f.cancel()
            concurrent.futures.wait(pending)
        errors = [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]
        real = [e for e in errors if not isinstance(e, _Cancelled)]
        if real:
            raise real[0]
        if errors:
            raise Unavailable(f"{self.name}: pull cancelled")

    def _fetch_blob(self, desc: dict) -> None:
        key, digest, size = ref_key(desc), desc["digest"], desc["size"]
        if self._have(desc):
            self.report(key, digest, "exists", size, size)
            return
        failpoints.fail("transfer.fetch")
        for attempt in range(3):
            status = self._open_writer(key, desc)
            if status is None:
                self.report(key, digest, "exists", size, size)
                return
            offset = status["offset"]
            try:
                self._download(desc, key, offset)
                self.store.commit(self.ns, key, size, digest)
            except AlreadyExists:
                self.report(key, digest, "exists", size, size)
                return
            except _RangeUnsatisfiable:
                self.store.abort(self.ns, key)
                continue
            except FailedPrecondition as e:
                # Content that does not verify never stays: the ingest goes. If it was resumed, its
                # first part may be what was wrong, so try once more from the start.
                self.store.abort(self.ns, key)
                if offset and attempt == 0:
                    log.warning("%s: %s did not verify after resuming at %d; starting over: %s",
                                self.name, key, offset, e)
                    continue
                raise FailedPrecondition(f"{self.name}: {e}") from None
            except BaseException:
                # An interrupted download keeps its ingest: the next pull resumes at its offset.
                with contextlib.suppress(BerthError):
                    self.store.writer_close(self.ns, key)
                raise
            self.report(key, digest, "done", size, size)
            return
        raise FailedPrecondition(f"{self.name}: could not restart the download of {key}")

    def _download(self, desc: dict, key: str, offset: int) -> None:
        digest, size = desc["digest"], desc["size"]
        if offset > size:
            raise _RangeUnsatisfiable()
        if offset == size:
            return
        self.report(key, digest, "downloading", offset, size)
        written, pending = offset, bytearray()

        def flush() -> None:
            nonlocal written
            if pending:
                self.store.write(self.ns, key, written, bytes(pending))
                written += len(pending)
                pending.clear()
                self.report(key, digest, "downloading", written, size)

        with self.client.blob(desc, offset) as (start, chunks):
            pos = start
            try:
                for chunk in chunks:
                    if self.cancel.is_set():
                        raise _Cancelled()
                    if pos < offset:                 # the registry ignored our Range: skip ahead
                        skip = min(len(chunk), offset - pos)
                        chunk, pos = chunk[skip:], pos + skip
                        if not chunk:
                            continue
                    if written + len(pending) + len(chunk) > size:
                        raise FailedPrecondition(f"blob {digest}: registry sent more than the {size} bytes "
                                                 "its descriptor says")
                    pending += chunk
                    pos += len(chunk)
                    if len(pending) >= CHUNK:
                        flush()
            except (Unavailable, _Cancelled):
                flush()                              # keep what did arrive, for a resume
                raise
            flush()
        if written < size:
            raise FailedPrecondition(f"blob {digest}: registry sent {written} of its {size} bytes")


# --- pushing --------------------------------------------------------------------------------------

class Pusher:
    """Pushes an image from the content store (containerd's remotes.PushContent): blobs the
    registry lacks (HEAD first), then manifests, then indexes, the root last under the tag."""

    def __init__(self, store, *, concurrency: int = CONCURRENCY, chunk_size: int | None = None,
                 verify: bool | str | ssl.SSLContext = True, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None):
        self.store = store
        self.concurrency = concurrency
        self.chunk_size = chunk_size
        self.client_options = {"verify": verify, "timeout": timeout, "transport": transport}
        self._lock = threading.Lock()
        self._active: dict[int, str] = {}

    def stats(self) -> dict:
        with self._lock:
            return {"pushes": len(self._active), "refs": sorted(self._active.values())}

    def push(self, ns: str, target: dict, ref: str, plain_http: bool = False, credentials=None,
             progress: Callable[[dict], None] | None = None) -> dict:
        """Push the tree under `target` ({mediaType, digest, size}) as `ref`; returns the target."""
        parsed = parse_reference(ref)
        if parsed.digest:
            raise InvalidArgument(f"cannot push to a digest reference {ref!r}: give a tag")
        target = public(check_descriptor(target, "push target"))
        report = _Progress(progress)
        manifests, blobs = self._walk(ns, target)
        token = object()
        with self._lock:
            self._active[id(token)] = str(parsed)
        try:
            with RegistryClient(parsed.endpoint, parsed.repository, plain_http=plain_http, push=True,
                                credentials=credentials, **self.client_options) as client:
                for d in blobs:
                    report(ref_key(d), d["digest"], "waiting", 0, d["size"])
                with concurrent.futures.ThreadPoolExecutor(self.concurrency, thread_name_prefix="push") as pool:
                    futures = [pool.submit(self._push_blob, ns, client, d, report) for d in blobs]
                    for f in futures:
                        f.result()
                for desc, data in manifests:
                    reference = parsed.tag if desc["digest"] == target["digest"] else desc["digest"]
                    client.put_manifest(reference, desc["mediaType"], data)
                    report(ref_key(desc), desc["digest"], "done", desc["size"], desc["size"])
        finally:
            with self._lock:
                del self._active[id(token)]
        return target

    def _walk(self, ns: str, root: dict) -> tuple[list[tuple[dict, bytes]], list[dict]]:
        """Manifests children first (root last) with their bytes, and the distinct blobs."""
        manifests: list[tuple[dict, bytes]] = []
        blobs: dict[str, dict] = {}
        seen: set[str] = set()

        def visit(desc: dict, parent: str | None, depth: int) -> None:
            if depth > MAX_DEPTH:
                raise InvalidArgument(f"indexes nested more than {MAX_DEPTH} deep under {root['digest']}")
            if desc["digest"] in seen:
                return
            seen.add(desc["digest"])
            data = self._read(ns, desc, parent)
            doc = parse_document(data, desc)
            desc = dict(public(desc), mediaType=doc.media_type)
            if doc.kind == "index":
                for child in doc.manifests:
                    if is_manifest(child["mediaType"]) or is_index(child["mediaType"]):
                        visit(child, desc["digest"], depth + 1)
            else:
                for child in [doc.config, *doc.layers]:
                    if is_non_distributable(child["mediaType"]):
                        continue
                    self._require(ns, child, desc["digest"])
                    blobs.setdefault(child["digest"], public(child))
            manifests.append((desc, data))

        visit(root, None, 0)
        return manifests, list(blobs.values())

    def _require(self, ns: str, desc: dict, parent: str | None) -> None:
        try:
            info = self.store.info(ns, desc["digest"])
        except NotFound:
            raise NotFound(f"{desc['mediaType']} {desc['digest']}"
                           + (f" (referenced by {parent})" if parent else "")
                           + " is not in the content store; pull it (for every platform) before pushing") from None
        if info["size"] != desc["size"]:
            raise FailedPrecondition(f"{desc['digest']} is stored with size {info['size']}, "
                                     f"not the {desc['size']} its descriptor says")

    def _read(self, ns: str, desc: dict, parent: str | None) -> bytes:
        if desc["size"] > MAX_MANIFEST:
            raise ResourceExhausted(f"manifest {desc['digest']} of {desc['size']} bytes exceeds the "
                                    f"{MAX_MANIFEST}-byte limit")
        self._require(ns, desc, parent)
        data = bytearray()
        while len(data) < desc["size"]:
            chunk = self.store.read(ns, desc["digest"], len(data), desc["size"] - len(data))
            if not chunk:
                break
            data += chunk
        _verify(bytes(data), desc, f"reading stored {desc['digest']}")
        return bytes(data)

    def _push_blob(self, ns: str, client: RegistryClient, desc: dict, report: _Progress) -> None:
        key, digest, size = ref_key(desc), desc["digest"], desc["size"]
        if client.blob_exists(desc):
            report(key, digest, "exists", size, size)
            return
        report(key, digest, "uploading", 0, size)
        client.upload_blob(desc, lambda offset, n: self.store.read(ns, digest, offset, n), self.chunk_size,
                           lambda n: report(key, digest, "uploading", n, size))
        report(key, digest, "done", size, size)


# --- the actor ------------------------------------------------------------------------------


class ContentProxy:
    """The content store's methods, answered by the content actor over the bus; every call
    carries the transfer's lease, so what it writes is held from the moment it exists, and what
    it finds stored already (and may build on) is held before it looks."""

    def __init__(self, actor: "TransferActor", lease: str | None):
        from actors.content import process_identity     # content imports this module
        self.actor = actor
        self.lease = lease
        self.owner = process_identity()     # should this process die mid-write, its writers are free
        self.held: set[tuple[str, str]] = set()

    def _call(self, method: str, ns: str, args: dict, frames: list[bytes] = (), with_frames: bool = False):
        return self.actor.call("content", method, args, namespace=ns, lease=self.lease,
                               frames=frames, with_frames=with_frames)

    def info(self, ns: str, digest: str) -> dict:
        if self.lease and (ns, digest) not in self.held:        # once: a wait for a ref asks often
            self.actor.call("metadata", "add_lease_resource",
                            {"lease": self.lease, "type": "content", "id": digest}, namespace=ns)
            self.held.add((ns, digest))
        return self._call("info", ns, {"digest": digest})

    def read(self, ns: str, digest: str, offset: int = 0, size: int = -1) -> bytes:
        _, frames = self._call("read", ns, {"digest": digest, "offset": offset, "size": size}, with_frames=True)
        return frames[0] if frames else b""

    def update(self, ns: str, digest: str, labels: dict, fieldpaths: list[str] = ()) -> dict:
        return self._call("update", ns, {"digest": digest, "labels": labels, "fieldpaths": list(fieldpaths)})

    def writer_open(self, ns: str, ref: str, total: int | None = None, expected: str | None = None) -> dict:
        return self._call("writer_open", ns, {"ref": ref, "total": total, "expected": expected,
                                              "owner": self.owner})

    def write(self, ns: str, ref: str, offset: int, data: bytes) -> dict:
        return self._call("write", ns, {"ref": ref, "offset": offset}, frames=[data])

    def commit(self, ns: str, ref: str, size: int, expected: str, labels: dict | None = None) -> dict:
        return self._call("commit", ns, {"ref": ref, "size": size, "expected": expected, "labels": labels})

    def abort(self, ns: str, ref: str) -> None:
        self._call("abort", ns, {"ref": ref})

    def writer_close(self, ns: str, ref: str) -> None:
        self._call("writer_close", ns, {"ref": ref})


PULL_LEASE_EXPIRY = 3600.0       # a pull that dies leaves a lease that lapses by itself


def chain_ids(diff_ids: list[str]) -> list[str]:
    """OCI chain IDs: ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))."""
    chain: list[str] = []
    for diff_id in diff_ids:
        chain.append(diff_id if not chain else
                     "sha256:" + hashlib.sha256(f"{chain[-1]} {diff_id}".encode()).hexdigest())
    return chain


class Unpacker:
    """Applies a pull's layers into snapshots in order, each as soon as it (and its parent) is in
    the content store, so fetching and applying overlap. It runs on a thread of its own that
    `finish` joins; the pull's progress reports tell it which blobs have arrived."""

    def __init__(self, actor: "TransferActor", ns: str, lease: str, snapshotter: str,
                 store: ContentProxy, report: Callable[[dict], None]):
        self.actor, self.ns, self.lease, self.snapshotter = actor, ns, lease, snapshotter
        self.store, self.report = store, report
        self.arrived: dict[str, threading.Event] = {}
        self.lock = threading.Lock()
        self.cancelled = threading.Event()
        self.thread: threading.Thread | None = None
        self.outcome: dict = {}

    def _event(self, digest: str) -> threading.Event:
        with self.lock:
            return self.arrived.setdefault(digest, threading.Event())

    def progress(self, item: dict) -> None:
        if item.get("status") in ("done", "exists") and item.get("digest"):
            self._event(item["digest"]).set()

    def on_manifest(self, desc: dict, doc: "Document") -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, args=(doc,), name="unpack")
            self.thread.start()

    def _wait(self, digest: str) -> None:
        event = self._event(digest)
        while not event.wait(0.1):
            if self.cancelled.is_set():
                raise Unavailable("unpack cancelled: the pull failed")

    def _run(self, doc: "Document") -> None:
        try:
            self.outcome["chain"] = self._unpack(doc)
        except BaseException as e:
            self.outcome["error"] = e

    def _unpack(self, doc: "Document") -> str:
        self._wait(doc.config["digest"])
        config_bytes = bytearray()
        while len(config_bytes) < doc.config["size"]:
            chunk = self.store.read(self.ns, doc.config["digest"], len(config_bytes))
            if not chunk:
                break
            config_bytes += chunk
        try:
            diff_ids = json.loads(bytes(config_bytes))["rootfs"]["diff_ids"]
        except (ValueError, KeyError, TypeError):
            raise InvalidArgument(f"image config {doc.config['digest']} has no rootfs.diff_ids") from None
        if not isinstance(diff_ids, list) or len(diff_ids) != len(doc.layers):
            raise InvalidArgument(f"image config lists {len(diff_ids) if isinstance(diff_ids, list) else 'no'} "
                                  f"diff_ids for {len(doc.layers)} layers")
        for diff_id in diff_ids:
            check_digest(diff_id, "diff_id")
        parent = ""
        for layer, diff_id, chain_id in zip(doc.layers, diff_ids, chain_ids(diff_ids)):
            if is_non_distributable(layer["mediaType"]):
                raise NotImplementedErr(f"layer {layer['digest']} is non-distributable and was not "
                                        "fetched; it cannot be unpacked")
            self._wait(layer["digest"])
            key = f"unpack-{layer['digest']}"
            self.report({"ref": key, "digest": layer["digest"], "status": "unpacking",
                         "offset": 0, "total": layer["size"]})
            done = self.actor.call("snapshot", "unpack_layer",
                                   {"chain_id": chain_id, "layer": public(layer), "diff_id": diff_id,
                                    "parent": parent, "snapshotter": self.snapshotter},
                                   namespace=self.ns, lease=self.lease, timeout=3600)
            self.store.update(self.ns, layer["digest"], {UNCOMPRESSED: diff_id}, [f"labels.{UNCOMPRESSED}"])
            self.report({"ref": key, "digest": layer["digest"],
                         "status": "unpacked" if done["applied"] else "unpacked (reused)",
                         "offset": layer["size"], "total": layer["size"]})
            parent = chain_id
        label = GC_REF_SNAPSHOT + self.snapshotter
        self.store.update(self.ns, doc.config["digest"], {label: parent}, [f"labels.{label}"])
        return parent

    def cancel(self) -> None:
        self.cancelled.set()

    def finish(self) -> str | None:
        """The top chainID, once every layer is applied; the unpack's error if it failed."""
        if self.thread is None:
            return None
        self.thread.join()
        if "error" in self.outcome:
            raise self.outcome["error"]
        return self.outcome["chain"]


class TransferActor(Actor):
    """Pulls and pushes, each streaming progress to its client. A pull runs under a lease (the
    request's, or one of its own that it drops once the image record points at the content).

    A transfer leaves httpx, TLS contexts and a grown heap behind (about 15 MiB, where a fresh
    actor holds 3); once no transfer has run for `renew_after` seconds, the actor exits with
    `renew` set and the supervisor forks a fresh one from the template, as small as at start.
    Requests sent meanwhile wait in the router, as they do across a restart."""

    name = "transfer"
    pool_size = 8

    def __init__(self, verify=True, renew_after: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.verify = verify
        self.active = 0
        self.renew_after = renew_after
        self.clock = clock
        self.worked = False             # a transfer ran in this process
        self.idle_since = clock()       # when the last transfer ended
        self.renew = False              # set on the way out: the template exits with EXIT_RENEW

    def on_start(self) -> None:
        self.worker.every(min(1.0, max(0.05, self.renew_after / 4)), self._renew_when_idle)

    def stats(self) -> dict:
        return {"active": self.active, "worked": self.worked}

    def _renew_when_idle(self) -> None:
        """A timer on the loop; stops the worker only between requests: one the router sends
        after this is delivered again to the fresh actor."""
        if not self.worked or self.active or self.worker.in_flight:
            return
        if self.clock() - self.idle_since < self.renew_after or self.worker.sock.poll(0):
            return                      # not idle long enough, or a request is waiting for us
        log.info("idle for %.0fs after a transfer: exiting to be started afresh", self.renew_after)
        self.renew = True
        self.worker.stop()

    @method
    def active_transfers(self) -> dict:
        return self.stats()

    @method(blocking=True, stream=True)
    def pull(self, ns, call: Call, ref: str, platform: str | None = None, plain_http: bool = False,
             credentials: str | None = None, unpack: bool = True, snapshotter: str = "overlayfs",
             record: bool = True) -> Iterator[dict]:
        """Progress items `{"progress": {...}}`, then `{"image": record}` (`record=False`: fetch
        the content only, as `content fetch` does, and answer `{"image": {name, target}}`)."""
        parse_reference(ref)
        parse_platform(platform)

        def run(progress):
            lease = call.lease or self.call("metadata", "create_lease", {"expire": PULL_LEASE_EXPIRY},
                                            namespace=ns)["id"]
            try:
                store = ContentProxy(self, lease)
                unpacker = Unpacker(self, ns, lease, snapshotter, store, progress) if unpack else None

                def report(item):
                    progress(item)
                    if unpacker is not None:
                        unpacker.progress(item)
                try:
                    image = Puller(store, verify=self.verify).pull(
                        ns, ref, platform, plain_http, credentials, report,
                        unpacker.on_manifest if unpacker is not None else None)
                except BaseException:
                    if unpacker is not None:
                        unpacker.cancel()
                        with contextlib.suppress(BaseException):
                            unpacker.finish()
                    raise
                if unpacker is not None:
                    unpacker.finish()
                if not record:
                    return image
                return self.call("metadata", "put_image", {"name": image["name"], "target": image["target"]},
                                 namespace=ns)
            finally:
                if not call.lease:
                    self.call("metadata", "delete_lease", {"id": lease}, namespace=ns)
        result = yield from self._with_progress(run)
        yield {"image": result}

    @method(blocking=True, stream=True)
    def push(self, ns, call: Call, ref: str, image: str | None = None, plain_http: bool = False,
             credentials: str | None = None) -> Iterator[dict]:
        """Push local image `image` (default: `ref`) to the registry reference `ref`."""
        parse_reference(ref)
        record = self.call("metadata", "get_image", {"name": image or ref}, namespace=ns)

        def run(progress):
            pusher = Pusher(ContentProxy(self, call.lease), verify=self.verify)
            return pusher.push(ns, record["target"], ref, plain_http, credentials, progress)
        result = yield from self._with_progress(run)
        yield {"pushed": result}

    def _with_progress(self, work: Callable) -> Iterator[dict]:
        """Run `work(progress)` on a thread of its own and yield its progress reports as they
        come; returns its result (or raises its error) once it is done."""
        reports: queue.SimpleQueue = queue.SimpleQueue()
        outcome: dict = {}

        def run():
            try:
                outcome["result"] = work(reports.put)
            except BaseException as e:
                outcome["error"] = e
            finally:
                reports.put(None)
        self.active += 1
        self.worked = True
        thread = threading.Thread(target=run, name="transfer-job")
        thread.start()
        try:
            while (report := reports.get()) is not None:
                yield {"progress": report}
        finally:
            thread.join()
            self.active -= 1
            self.idle_since = self.clock()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]


def build(config) -> TransferActor:
    return TransferActor(renew_after=config.transfer_renew_after)
