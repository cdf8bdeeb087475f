"""Storage: one place that turns a URI into a filesystem.

Accepted URIs: `/plain/path`, `relative/path`, `file:///abs/path`, `s3://bucket/prefix`.
The S3 endpoint, region and credentials come only from the standard AWS environment
and config files (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_REGION/AWS_DEFAULT_REGION, ~/.aws/...). Nothing here prints or stores them.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs

from dakd.errors import DataError, StorageError

# Bounded retries against an S3 endpoint that does not answer, then a clear error.
S3_CONNECT_TIMEOUT_S = 5.0
S3_REQUEST_TIMEOUT_S = 30.0
S3_MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class Location:
    """A resolved URI: `fs` is a pyarrow filesystem, `path` the path within it."""

    uri: str
    fs: pafs.FileSystem
    path: str

    @property
    def scheme(self) -> str:
        return "s3" if isinstance(self.fs, pafs.S3FileSystem) else "file"

    def join(self, *parts: str) -> "Location":
        path = posixpath.join(self.path, *parts)
        return Location(uri=join_uri(self.uri, *parts), fs=self.fs, path=path)


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def join_uri(uri: str, *parts: str) -> str:
    uri = str(uri).rstrip("/")
    return "/".join([uri, *[p.strip("/") for p in parts]])


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def s3_filesystem(create_bucket: bool = False) -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem from the standard AWS environment (no secrets in code)."""
    endpoint = _endpoint()
    kwargs = dict(
        region=_region(),
        connect_timeout=S3_CONNECT_TIMEOUT_S,
        request_timeout=S3_REQUEST_TIMEOUT_S,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
    )
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    # never create buckets as a side effect of a write: a misspelled bucket is an error
    # (ensure_dir(..., create_bucket=True) is the one opt-in place that creates one)
    kwargs["allow_bucket_creation"] = create_bucket
    return pafs.S3FileSystem(**kwargs)


def fsspec_filesystem(uri: str):
    """An fsspec filesystem for libraries that need one (s3fs for s3://, local otherwise)."""
    if is_s3(uri):
        import s3fs

        endpoint = _endpoint()
        client_kwargs = {"region_name": _region()}
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        return s3fs.S3FileSystem(
            client_kwargs=client_kwargs,
            config_kwargs={"connect_timeout": S3_CONNECT_TIMEOUT_S, "retries": {"max_attempts": S3_MAX_ATTEMPTS}},
        )
    import fsspec

    return fsspec.filesystem("file")


def resolve(uri: str) -> Location:
    """URI -> Location(fs, path). Local paths become absolute."""
    uri = str(uri)
    if is_s3(uri):
        path = uri[len("s3://") :].rstrip("/")
        if not path:
            raise StorageError(f"{uri}: expected s3://bucket[/prefix]")
        return Location(uri=uri.rstrip("/"), fs=s3_filesystem(), path=path)
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    elif "://" in uri:
        raise StorageError(f"{uri}: unsupported URI scheme; expected a local path, file:// or s3://")
    path = os.path.abspath(os.path.expanduser(uri))
    return Location(uri=path, fs=pafs.LocalFileSystem(), path=path)


def _wrap(loc: Location, action: str, exc: Exception) -> StorageError:
    return StorageError(f"{loc.uri}: cannot {action} ({type(exc).__name__}: {exc})")


def exists(uri: str) -> bool:
    loc = resolve(uri)
    try:
        return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound
    except OSError as exc:
        raise _wrap(loc, "check", exc) from exc


def is_dir(uri: str) -> bool:
    loc = resolve(uri)
    try:
        return loc.fs.get_file_info(loc.path).type == pafs.FileType.Directory
    except OSError as exc:
        raise _wrap(loc, "check", exc) from exc


def list_files(uri: str, recursive: bool = True) -> list[str]:
    """Sorted URIs of the files under a directory URI ([] if it does not exist), written
    in the same form as `uri` (relative, absolute, file:// or s3://), so they can be
    compared with `join_uri(uri, ...)`."""
    loc = resolve(uri)
    try:
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=recursive, allow_not_found=True))
    except OSError as exc:
        raise _wrap(loc, "list", exc) from exc
    base = str(uri).rstrip("/")
    return sorted(join_uri(base, posixpath.relpath(i.path, loc.path)) for i in infos if i.type == pafs.FileType.File)


def read_bytes(uri: str) -> bytes:
    loc = resolve(uri)
    try:
        with loc.fs.open_input_stream(loc.path) as f:
            return f.read()
    except FileNotFoundError as exc:
        raise StorageError(f"{uri}: file not found") from exc
    except OSError as exc:
        raise _wrap(loc, "read", exc) from exc


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object. Local files are written to a temporary name and renamed,
    so a reader never sees a half-written file."""
    loc = resolve(uri)
    try:
        if loc.scheme == "file":
            os.makedirs(os.path.dirname(loc.path), exist_ok=True)
            tmp = f"{loc.path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, loc.path)
        else:
            with loc.fs.open_output_stream(loc.path) as f:
                f.write(data)
    except OSError as exc:
        raise _wrap(loc, "write", exc) from exc


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def delete_dir(uri: str) -> None:
    loc = resolve(uri)
    try:
        if loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound:
            loc.fs.delete_dir(loc.path)
    except OSError as exc:
        raise _wrap(loc, "delete", exc) from exc


def ensure_dir(uri: str, create_bucket: bool = False) -> None:
    """Create the folder `uri` (and parents). On S3 the bucket must exist: StorageError
    naming it otherwise, unless `create_bucket` (a job's opt-in `create_bucket` field)."""
    loc = resolve(uri)
    if loc.scheme == "s3":
        bucket = loc.path.split("/", 1)[0]
        try:
            missing = loc.fs.get_file_info(bucket).type == pafs.FileType.NotFound
        except OSError as exc:
            raise _wrap(loc, "check", exc) from exc
        if missing and not create_bucket:
            raise StorageError(f"{uri}: bucket {bucket!r} does not exist (check its spelling; dakd creates a bucket "
                               "only when asked: --set create_bucket=true)")
        if missing:
            try:
                s3_filesystem(create_bucket=True).create_dir(bucket)
            except OSError as exc:
                raise _wrap(loc, f"create bucket {bucket!r}", exc) from exc
    try:
        loc.fs.create_dir(loc.path, recursive=True)
    except OSError as exc:
        raise _wrap(loc, "create", exc) from exc


def check_writable(uri: str) -> None:
    """Raise StorageError naming `uri` unless a small object can be written and removed there."""
    probe = join_uri(uri, f".dakd-write-probe-{os.getpid()}")
    write_bytes(probe, b"ok")
    loc = resolve(probe)
    try:
        loc.fs.delete_file(loc.path)
    except OSError as exc:
        raise _wrap(loc, "delete", exc) from exc


def read_json_object(uri: str, what: str = "", damaged: str = "") -> dict:
    """The JSON object stored at `uri`; DataError naming it when it is not JSON or not an
    object (message: `what` + the problem + `damaged`, e.g. "manifest is " / "; the checkpoint is damaged")."""
    try:
        value = json.loads(read_text(uri))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(uri, f"{what}not valid JSON ({exc}){damaged}") from None
    if not isinstance(value, dict):
        raise DataError(uri, f"{what}a JSON {type(value).__name__}, expected an object{damaged}")
    return value
