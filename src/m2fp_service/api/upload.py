"""Reads a multipart/form-data upload from the request stream, enforcing the size limit as it arrives.

Starlette's form parser would spool any file to disk whatever its size and only then let us look
at it; here the body is read chunk by chunk and the request is refused with ``UploadTooLarge``
(413) as soon as the declared ``Content-Length`` or the bytes received pass the limit, so a 1 GB
upload costs at most ``max_upload_bytes`` of memory and is never written anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from m2fp_service.errors import InvalidParameter, MissingField, UnsupportedMediaType, UploadTooLarge

FILE_FIELD = "image"
# Room for the multipart boundaries, part headers and small text fields next to the image.
FORM_OVERHEAD_BYTES = 64 * 1024
MAX_FIELD_BYTES = 4096
MAX_PARTS = 16


@dataclass
class Upload:
    """The image bytes, any other accepted file fields and the small text fields of one multipart request."""

    image: bytes
    filename: str | None
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)


@dataclass
class _Part:
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    name: str = ""
    filename: str | None = None
    data: bytearray = field(default_factory=bytearray)
    limit: int = MAX_FIELD_BYTES
    keep: bool = True  # False: a file under another name; its bytes are counted, not stored
    complete: bool = False


class _Collector:
    """python-multipart callbacks that keep the file parts named in ``file_fields`` (one each) and
    small text fields, within limits."""

    def __init__(self, max_image_bytes: int, file_fields: tuple[str, ...] = (FILE_FIELD,)) -> None:
        self.max_image_bytes = max_image_bytes
        self.file_fields = file_fields
        self.parts: list[_Part] = []
        self.files: dict[str, _Part] = {}
        self._header_name = b""
        self._header_value = b""
        self.error: Exception | None = None

    @property
    def current(self) -> _Part:
        return self.parts[-1]

    def on_part_begin(self) -> None:
        if len(self.parts) >= MAX_PARTS:
            raise InvalidParameter(f"too many form parts (limit {MAX_PARTS}); send the field '{FILE_FIELD}'")
        self.parts.append(_Part())

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]
        if len(self._header_value) > MAX_FIELD_BYTES:
            raise InvalidParameter("a multipart part header is too long")

    def on_header_end(self) -> None:
        self.current.headers.append((self._header_name.lower(), self._header_value))
        self._header_name = self._header_value = b""

    def on_headers_finished(self) -> None:
        part = self.current
        disposition = next((v for k, v in part.headers if k == b"content-disposition"), b"")
        _, options = parse_options_header(disposition)
        part.name = options.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in options:
            part.filename = options[b"filename"].decode("utf-8", "replace")
        if part.name in self.file_fields:
            if part.name in self.files:
                raise InvalidParameter(f"send one '{part.name}' per request, not several")
            self.files[part.name] = part
            part.limit = self.max_image_bytes
        elif part.filename is not None:
            part.keep = False

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self.current
        if not part.keep:
            return
        if len(part.data) + (end - start) > part.limit:
            if part.name in self.file_fields:
                raise too_large(self.max_image_bytes)
            raise InvalidParameter(f"form field '{part.name}' is longer than {MAX_FIELD_BYTES} bytes")
        part.data += data[start:end]

    def on_part_end(self) -> None:
        self.current.complete = True

    def callbacks(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in (
            "on_part_begin", "on_header_field", "on_header_value", "on_header_end",
            "on_headers_finished", "on_part_data", "on_part_end")}


def too_large(limit: int) -> UploadTooLarge:
    return UploadTooLarge(
        f"upload is larger than the {limit / 2**20:.1f} MiB limit (M2FP_MAX_UPLOAD_BYTES = {limit} bytes); "
        "send a smaller image"
    )


def _boundary(content_type: str | None) -> bytes:
    media, options = parse_options_header(content_type)
    if media != b"multipart/form-data":
        shown = media.decode("latin-1") or "none"
        raise UnsupportedMediaType(
            f"request Content-Type is {shown}; send multipart/form-data with the image in field '{FILE_FIELD}'"
        )
    boundary = options.get(b"boundary")
    if not boundary:
        raise InvalidParameter("multipart/form-data request without a boundary")
    return boundary


def max_body_bytes(max_image_bytes: int, files: int = 1) -> int:
    """Largest multipart body accepted with ``files`` file fields of at most ``max_image_bytes`` each."""
    return max_image_bytes * files + FORM_OVERHEAD_BYTES


def check_declared_length(request: Request, max_image_bytes: int, files: int = 1) -> None:
    """Refuses at once when ``Content-Length`` already says the body is too large."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body_bytes(max_image_bytes, files):
        raise too_large(max_image_bytes)


async def read_upload(request: Request, max_image_bytes: int, file_fields: tuple[str, ...] = (FILE_FIELD,)) -> Upload:
    """Streams and parses the multipart body; holds at most ``max_image_bytes`` per file field in memory.

    ``file_fields``: the file fields kept, the first one required (``image``); files under other
    names are counted against the size limit and dropped.

    Raises:
        UnsupportedMediaType: not multipart/form-data.
        UploadTooLarge: the image part or the whole body passes the limit (checked while reading).
        MissingField: no ``image`` part.
        InvalidParameter: a malformed or truncated multipart body, or too many / too long fields.
    """
    boundary = _boundary(request.headers.get("content-type"))
    check_declared_length(request, max_image_bytes, len(file_fields))
    collector = _Collector(max_image_bytes, file_fields)
    parser = MultipartParser(boundary, collector.callbacks())  # type: ignore[arg-type]
    max_body = max_body_bytes(max_image_bytes, len(file_fields))
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_body:
                raise too_large(max_image_bytes)
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise InvalidParameter(f"malformed multipart/form-data body: {exc}") from None
    except ClientDisconnect:
        raise InvalidParameter("the client disconnected before the upload was complete") from None
    main = file_fields[0]
    image = collector.files.get(main)
    if image is None:
        others = [p.name for p in collector.parts if p.filename is not None and p.name not in file_fields]
        got = f" (got a file in field {others[0]!r})" if others else ""
        raise MissingField(
            f"missing form field '{main}'{got}: send the picture as multipart/form-data field '{main}'"
        )
    if not all(p.complete for p in collector.files.values()):
        raise InvalidParameter("the multipart body ended before a file part was complete")
    kept = set(map(id, collector.files.values()))
    fields = {
        p.name: p.data.decode("utf-8", "replace") for p in collector.parts
        if id(p) not in kept and p.filename is None and p.complete
    }
    # An empty optional file with an empty name is what a browser form sends when no file was chosen.
    files = {name: bytes(p.data) for name, p in collector.files.items()
             if name != main and (p.data or p.filename not in ("", None))}
    return Upload(image=bytes(image.data), filename=image.filename, fields=fields, files=files)
