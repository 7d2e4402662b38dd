"""Fetching the media a request names: data URIs, http(s) URLs and files under configured directories.

Remote fetching is the service making requests on a client's behalf, so it is bounded:
- a size cap (checked against Content-Length first, then while reading),
- one total timeout (DNS, connect, transfer),
- no private, loopback, link-local or otherwise non-global addresses unless `allow_private_addresses`: the host
  is resolved first, every address it resolves to is checked, and the connection is made only to the checked
  addresses (aiohttp asks our resolver), so a second DNS answer cannot swap in an internal address;
- redirects are followed by hand, each hop checked the same way.
Local files are read only under `allowed_local_dirs` (after resolving symlinks).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from common.errors import InvalidRequestError, MediaFetchError, MediaTooLargeError, OmniError


@dataclass(frozen=True)
class FetchConfig:
    max_bytes: int = 64 * 1024 * 1024
    timeout_s: float = 10.0
    allow_private_addresses: bool = False
    allowed_local_dirs: tuple[str, ...] = ()
    max_redirects: int = 3


def _too_large(size: int | None, cfg: FetchConfig, param: str) -> MediaTooLargeError:
    got = f" ({size} bytes)" if size is not None else ""
    return MediaTooLargeError(f"media is larger than the limit of {cfg.max_bytes} bytes{got}", param=param)


def decode_base64(data: str, cfg: FetchConfig, param: str) -> bytes:
    """Base64 text → bytes, refusing before decoding when the result would exceed the cap."""
    if len(data) * 3 // 4 > cfg.max_bytes + 3:
        raise _too_large(len(data) * 3 // 4, cfg, param)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidRequestError(f"invalid base64 data: {e}", param=param) from None


def _refused(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    return not ip.is_global or ip.is_multicast


def check_address(address: str, cfg: FetchConfig, host: str, param: str) -> None:
    if cfg.allow_private_addresses:
        return
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if _refused(ip):
        raise MediaFetchError(
            f"refusing to fetch {host!r}: it resolves to {ip}, a private, loopback or link-local address "
            "(the service can be configured to allow this)",
            param=param,
        )


class _CheckedResolver(AbstractResolver):
    """Resolves a host and refuses it unless every address it resolves to is allowed."""

    def __init__(self, cfg: FetchConfig, param: str):
        self.cfg = cfg
        self.param = param

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET):
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, family=family)
        except socket.gaierror as e:
            raise MediaFetchError(f"cannot resolve {host!r}: {e.strerror}", param=self.param) from None
        results: list[ResolveResult] = []
        for fam, _, proto, _, sockaddr in infos:
            check_address(sockaddr[0], self.cfg, host, self.param)
            results.append(
                ResolveResult(hostname=host, host=sockaddr[0], port=sockaddr[1], family=fam, proto=proto, flags=0)
            )
        return results

    async def close(self) -> None:
        pass


def _check_ip_literal(host: str, cfg: FetchConfig, param: str) -> None:
    """aiohttp does not call the resolver for an IP literal, so those are checked here."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return
    check_address(host, cfg, host, param)


async def _fetch_http(url: str, cfg: FetchConfig, param: str) -> bytes:
    connector = aiohttp.TCPConnector(resolver=_CheckedResolver(cfg, param), use_dns_cache=False, force_close=True)
    timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as session:
        for _ in range(cfg.max_redirects + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise MediaFetchError(f"cannot fetch {url!r}: only http(s) URLs", param=param)
            _check_ip_literal(parts.hostname, cfg, param)
            async with session.get(url, allow_redirects=False) as resp:
                if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                    url = urljoin(url, resp.headers["Location"])
                    continue
                if resp.status >= 400:
                    raise MediaFetchError(f"fetching {url!r} returned HTTP {resp.status}", param=param)
                if resp.content_length is not None and resp.content_length > cfg.max_bytes:
                    raise _too_large(resp.content_length, cfg, param)
                body = bytearray()
                async for piece in resp.content.iter_chunked(1 << 16):
                    body += piece
                    if len(body) > cfg.max_bytes:
                        raise _too_large(None, cfg, param)
                return bytes(body)
        raise MediaFetchError(f"fetching {url!r}: more than {cfg.max_redirects} redirects", param=param)


def _read_local(path_text: str, cfg: FetchConfig, param: str) -> bytes:
    if "\x00" in path_text:
        raise MediaFetchError(f"local file {path_text!r} holds a NUL byte", param=param)
    path = Path(path_text).resolve()
    allowed = [Path(d).resolve() for d in cfg.allowed_local_dirs]
    if not any(path.is_relative_to(d) for d in allowed):
        raise MediaFetchError(f"local file {path_text!r} is not under an allowed media directory", param=param)
    if not path.is_file():
        raise MediaFetchError(f"local file {path_text!r} does not exist", param=param)
    size = path.stat().st_size
    if size > cfg.max_bytes:
        raise _too_large(size, cfg, param)
    return path.read_bytes()


def _data_uri(url: str, cfg: FetchConfig, param: str) -> bytes:
    header, sep, data = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise InvalidRequestError("a data URI must look like data:<mime>;base64,<data>", param=param)
    return decode_base64(data, cfg, param)


async def fetch_media(url: str, cfg: FetchConfig, param: str) -> bytes:
    """The bytes `url` names, within the limits of `cfg`. `param` names the request field in errors."""
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError as e:  # e.g. "http://[::1" (an unclosed IPv6 literal)
        raise InvalidRequestError(f"{url[:200]!r} is not a valid URL: {e}", param=param) from None
    if scheme == "data":
        return _data_uri(url, cfg, param)
    if scheme in ("http", "https"):
        try:
            return await _fetch_http(url, cfg, param)
        except (asyncio.TimeoutError, TimeoutError):
            raise MediaFetchError(f"fetching {url!r} timed out after {cfg.timeout_s} s", param=param) from None
        except aiohttp.ClientError as e:
            raise MediaFetchError(f"cannot fetch {url!r}: {e}", param=param) from None
        except OmniError:
            raise
        except ValueError as e:  # a host IDNA cannot encode (a label over 63 characters), a redirect to a bad URL
            raise MediaFetchError(f"cannot fetch {url[:200]!r}: {e}", param=param) from None
    if scheme == "file":
        return await asyncio.to_thread(_read_local, unquote(urlsplit(url).path), cfg, param)
    if scheme == "" and url.startswith("/"):
        return await asyncio.to_thread(_read_local, url, cfg, param)
    raise MediaFetchError(f"unsupported URL scheme {scheme!r} (use data:, http(s): or file:)", param=param)
