"""``folk pull``: a model from the Hugging Face Hub or an Ollama registry into the hub.

* ``hf:ORG/REPO[@REVISION]`` (``--include GLOB``) and ``hf:ORG/REPO/FILE.gguf[@REVISION]``
  go through ``huggingface_hub`` itself: the revision is resolved to a commit once
  (``/api/models/ORG/REPO/revision/REV``) and every file is fetched at that commit into the
  user's Hugging Face cache (ranged GETs resume a dropped transfer; a file already cached
  is not fetched again). Each file is then checked against the hash the Hub's API lists
  for it (sha256 for LFS files, the git blob sha1 otherwise) and linked into the hub, not
  copied (:mod:`folklm.hub.sources`). The token is ``huggingface_hub``'s: ``$HF_TOKEN`` or
  the login file of ``hf auth login``.
* ``ollama:[NAMESPACE/]MODEL[:TAG]`` speaks the registry protocol
  (https://github.com/ollama/ollama/blob/main/server/images.go): the manifest
  ``/v2/NAMESPACE/MODEL/manifests/TAG``, then each blob ``/v2/NAMESPACE/MODEL/blobs/DIGEST``,
  resumed with a ``Range`` request from what an interrupted pull left in
  ``$FOLK_HOME/downloads``, and refused unless it hashes to its digest. The registry is
  ``--registry``, else ``$FOLK_OLLAMA_REGISTRY``, else ``https://registry.ollama.ai``;
  ``$FOLK_OLLAMA_TOKEN`` is sent as a bearer token to a private one.

Either way the entry records its source (URL, commit or manifest digest, each file's hash),
so its lineage starts at a public, checkable origin.
"""

from __future__ import annotations

import fcntl
import fnmatch
import hashlib
import http.client
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from folklm.errors import FolkError
from folklm.hub import ollama
from folklm.hub.catalogue import Entry
from folklm.hub.register import Derivation
from folklm.hub.sources import (
    Expected,
    Progress,
    check_file,
    hf_cache_dir,
    import_hf_snapshot,
    register_verified,
)
from folklm.hub.store import folk_home

DEFAULT_OLLAMA_REGISTRY = "https://registry.ollama.ai"
# Weights folklm will not load by default (pickles and formats of other runtimes).
_SKIPPED = (
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.h5",
    "*.msgpack",
    "*.onnx",
    "*.ot",
    "*.tflite",
    "*.mlmodel",
    "*.pkl",
    "*.npz",
    "*.joblib",
)
_RETRIES = 5


@dataclass
class Transfer:
    """One file moved over the network (or found already fetched)."""

    file: str
    size: int | None = None
    fetched: int = 0
    resumed_from: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        speed = self.fetched / self.seconds if self.seconds > 0 else None
        return {**vars(self), "bytes_per_s": round(speed) if speed else None}


@dataclass
class PullResult:
    """The new entry, each transfer, and how each file entered the hub."""

    entry: Entry
    source: str
    transfers: list[Transfer] = field(default_factory=list)
    placed: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "entry": self.entry.to_dict(),
            "transfers": [t.to_dict() for t in self.transfers],
            "placed": self.placed,
        }


class _Meter:
    """Keeps a :class:`Transfer` per file and forwards progress to the caller's callback."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.transfers: list[Transfer] = []
        self._start: dict[str, float] = {}

    def begin(self, file: str, size: int | None, have: int = 0) -> Transfer:
        t = Transfer(file, size, resumed_from=have)
        self.transfers.append(t)
        self._start[file] = time.perf_counter()
        if self.progress:
            self.progress(file, have, size)
        return t

    def update(self, t: Transfer, done: int) -> None:
        t.fetched = max(done - t.resumed_from, 0)
        t.seconds = time.perf_counter() - self._start[t.file]
        if self.progress:
            self.progress(t.file, done, t.size)


# -- Hugging Face -------------------------------------------------------------------------
def parse_hf(spec: str) -> tuple[str, str | None, str | None]:
    """``hf:ORG/REPO[/FILE.gguf][@REVISION]`` -> (repo id, file or None, revision or None)."""
    body = spec.removeprefix("hf:")
    body, at, revision = body.rpartition("@") if "@" in body else (body, "", "")
    parts = body.split("/")
    if len(parts) < 2 or not all(parts) or any(p in (".", "..") for p in parts):
        raise FolkError(f"invalid Hugging Face reference {spec!r}: expected hf:ORG/REPO[@REVISION]")
    file = "/".join(parts[2:]) or None
    if file is not None and not file.endswith(".gguf"):
        raise FolkError(
            f"invalid Hugging Face reference {spec!r}: a file must be a .gguf "
            "(use --include GLOB to pick files of a folder model)"
        )
    if at and not revision:
        raise FolkError(f"invalid Hugging Face reference {spec!r}: empty revision after '@'")
    return f"{parts[0]}/{parts[1]}", file, revision or None


def _hf_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _hf_error(
    e: Exception, repo: str, endpoint: str, token: str | None, file: str | None = None
) -> FolkError:
    """One line for what ``huggingface_hub`` raised."""
    # lazy: huggingface_hub loads only for a pull
    from huggingface_hub import errors

    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, errors.RepositoryNotFoundError) and not isinstance(e, errors.GatedRepoError):
        login = " with the token given" if token else "; for a private one set HF_TOKEN"
        return FolkError(
            f"hf:{repo}: no such repository at {endpoint}, or it is private (HTTP {status}){login}"
        )
    if isinstance(e, errors.GatedRepoError) or status in (401, 403):
        if token:
            return FolkError(
                f"hf:{repo}: access denied (HTTP {status}) with the token given; accept the "
                f"model's terms at {endpoint}/{repo} with that account, or use another token"
            )
        return FolkError(
            f"hf:{repo}: access denied (HTTP {status}): the repository is gated or private; "
            f"accept its terms at {endpoint}/{repo}, then set HF_TOKEN or run `hf auth login`"
        )
    if isinstance(e, errors.RevisionNotFoundError):
        return FolkError(f"hf:{repo}: no such revision at {endpoint}")
    if isinstance(e, errors.RemoteEntryNotFoundError):
        return FolkError(f"hf:{repo}: {file or 'a file'} not found at {endpoint}")
    if isinstance(e, errors.HfHubHTTPError):
        return FolkError(f"hf:{repo}: HTTP {status} from {endpoint}")
    first = " ".join(str(e).split())[:200]
    return FolkError(f"hf:{repo}: cannot download from {endpoint} ({type(e).__name__}: {first})")


def _select(siblings: dict[str, Any], file: str | None, include: list[str], repo: str) -> list[str]:
    names = sorted(siblings)
    if file is not None:
        if file not in siblings:
            raise FolkError(f"hf:{repo} has no file {file!r}")
        return [file] + [n for n in ("README.md",) if n in siblings]
    if include:
        chosen = [n for n in names if any(fnmatch.fnmatch(n, g) for g in include)]
        if not chosen:
            raise FolkError(f"hf:{repo}: no file matches --include {' '.join(include)}")
        return chosen
    top = [n for n in names if "/" not in n and not n.startswith(".")]
    top = [n for n in top if not any(fnmatch.fnmatch(n, g) for g in _SKIPPED)]
    ggufs = [n for n in top if n.endswith(".gguf")]
    if "config.json" in top:
        return [n for n in top if not n.endswith(".gguf")]
    if len(ggufs) == 1:
        return [ggufs[0]] + [n for n in ("README.md",) if n in siblings]
    if ggufs:
        raise FolkError(
            f"hf:{repo} has {len(ggufs)} GGUF files; pull one: hf:{repo}/{ggufs[0]} "
            f"(others: {', '.join(ggufs[1:4])}{' ...' if len(ggufs) > 4 else ''})"
        )
    raise FolkError(f"hf:{repo}: no config.json and no .gguf file: not a model folklm can pull")


def pull_hf(
    spec: str,
    name: str | None = None,
    license: str | None = None,
    *,
    include: list[str] | None = None,
    progress: Progress | None = None,
) -> PullResult:
    """Download ``hf:ORG/REPO[/FILE.gguf][@REVISION]`` and register it.

    Raises:
        FolkError: an unknown, gated or private repository (one line, naming the token
            to set), a file that does not hash to what the Hub lists; nothing is
            registered then.
    """
    # lazy: huggingface_hub (and its HTTP stack) loads only for a pull
    import huggingface_hub as hh

    repo, file, revision = parse_hf(spec)
    endpoint = _hf_endpoint()
    token = hh.get_token()
    try:
        info = hh.HfApi(endpoint=endpoint, token=token or False).model_info(
            repo, revision=revision or "main", files_metadata=True
        )
    except Exception as e:  # every huggingface_hub/httpx error becomes one line
        raise _hf_error(e, repo, endpoint, token) from None
    commit = info.sha
    if not commit:
        raise FolkError(f"hf:{repo}: {endpoint} did not say which commit {revision} is")
    siblings = {s.rfilename: s for s in info.siblings or []}
    chosen = _select(siblings, file, list(include or ()), repo)
    expected: dict[str, Expected] = {}
    records: dict[str, dict[str, Any]] = {}
    for rel in chosen:
        s = siblings[rel]
        lfs_sha = s.lfs.sha256 if s.lfs is not None else None
        expected[rel] = Expected(
            sha256=lfs_sha, git_sha1=None if lfs_sha else s.blob_id, size=s.size
        )
        records[rel] = {
            "url": f"{endpoint}/{repo}/resolve/{commit}/{rel}",
            "size": s.size,
            **({"sha256": lfs_sha} if lfs_sha else {"git_blob_sha1": s.blob_id}),
        }
    meter = _Meter(progress)
    cache = hf_cache_dir()
    for rel in chosen:
        t = meter.begin(rel, expected[rel].size)
        try:
            hh.hf_hub_download(
                repo,
                rel,
                revision=commit,
                cache_dir=cache,
                token=token or False,
                endpoint=endpoint,
                tqdm_class=_bar_class(meter, t),
            )
        except Exception as e:  # every huggingface_hub/httpx error becomes one line
            raise _hf_error(e, repo, endpoint, token, rel) from None
    storage = cache / f"models--{repo.replace('/', '--')}"
    _write_ref(storage, revision or "main", commit)
    snapshot = storage / "snapshots" / commit
    source_info = {
        "origin": "huggingface",
        "url": f"{endpoint}/{repo}",
        "repo": repo,
        "revision": revision or "main",
        "commit": commit,
        "files": records,
    }
    try:
        entry, placed = import_hf_snapshot(
            snapshot, name, license, only=chosen, expected=expected, source_info=source_info
        )
    except FolkError:
        _forget_bad_downloads(snapshot, expected)
        raise
    return PullResult(entry, f"hf:{repo}@{commit}", meter.transfers, placed)


def _forget_bad_downloads(snapshot: Path, expected: dict[str, Expected]) -> None:
    """Delete cached files that do not hash to what the Hub lists, so that the next pull
    fetches them again instead of finding them "already downloaded"."""
    for rel, e in expected.items():
        link = snapshot / rel
        if not link.exists():
            continue
        try:
            check_file(link, e, rel)
        except FolkError:
            Path(os.path.realpath(link)).unlink(missing_ok=True)
            link.unlink(missing_ok=True)


def _write_ref(storage: Path, revision: str, commit: str) -> None:
    """``refs/REVISION`` -> commit, as ``snapshot_download`` records it, so that
    ``folk import hf:ORG/REPO@REVISION`` finds the snapshot offline."""
    if revision == commit or ".." in revision:
        return
    ref = storage / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
    tmp.write_text(commit)
    os.replace(tmp, ref)


def _bar_class(meter: _Meter, t: Transfer):
    """A ``tqdm`` class for ``huggingface_hub``: its updates feed ``meter``, it prints nothing."""
    # lazy: tqdm comes with huggingface_hub, needed only for a pull
    from tqdm import tqdm

    class Bar(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self._done = int(kwargs.get("initial") or 0)
            if kwargs.get("total"):
                t.size = int(kwargs["total"])

        def update(self, n: float | None = 1) -> bool | None:
            self._done += int(n or 0)
            meter.update(t, self._done)
            return None

    return Bar


# -- Ollama registry ------------------------------------------------------------------------
def registry_base(registry: str | None = None) -> str:
    """The registry URL: ``registry``, else ``$FOLK_OLLAMA_REGISTRY``, else Ollama's."""
    value = (registry or os.environ.get("FOLK_OLLAMA_REGISTRY") or DEFAULT_OLLAMA_REGISTRY).strip()
    if "://" not in value:
        value = "https://" + value
    parsed = urlparse(value)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise FolkError(f"invalid Ollama registry {value!r}: expected https://HOST[:PORT]")
    return value.rstrip("/")


class _KeepTokenOnHost(urllib.request.HTTPRedirectHandler):
    """Follow redirects (registries send blobs to a CDN), but never carry the registry's
    token to another host: urllib's own handler would forward ``Authorization``."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urlparse(newurl).netloc != urlparse(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


_OPENER = urllib.request.build_opener(_KeepTokenOnHost)


def _request(url: str, accept: str | None = None, start: int = 0) -> urllib.request.Request:
    headers = {"User-Agent": "folklm"}
    if accept:
        headers["Accept"] = accept
    if start:
        headers["Range"] = f"bytes={start}-"
    if token := os.environ.get("FOLK_OLLAMA_TOKEN"):
        headers["Authorization"] = f"Bearer {token}"
    return urllib.request.Request(url, headers=headers)


def _http_error(e: urllib.error.HTTPError, what: str, base: str) -> FolkError:
    if e.code in (401, 403):
        return FolkError(
            f"{what}: the registry {base} refused access (HTTP {e.code}); for a private "
            "registry set FOLK_OLLAMA_TOKEN"
        )
    if e.code == 404:
        return FolkError(f"{what}: not found at {base} (HTTP 404): check the name and tag")
    return FolkError(f"{what}: HTTP {e.code} from {base}")


def _get_bytes(url: str, what: str, base: str, accept: str | None = None) -> bytes:
    try:
        with _OPENER.open(_request(url, accept), timeout=60) as resp:
            return resp.read()
    except urllib.error.HTTPError as e:
        raise _http_error(e, what, base) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise FolkError(f"{what}: cannot reach {base} ({reason})") from None


def fetch_blob(
    url: str,
    dest: Path,
    layer: ollama.Layer,
    meter: _Meter,
    what: str,
    base: str,
    sleep: Callable[[float], None] = time.sleep,
) -> Path:
    """Download one blob to ``dest``, resuming from what ``dest`` already holds, and
    check it; a blob that does not hash to its digest is deleted and refused."""
    have = dest.stat().st_size if dest.exists() else 0
    if have > layer.size:
        dest.unlink()
        have = 0
    t = meter.begin(layer.digest, layer.size, have)
    failures = 0
    while have < layer.size:
        try:
            with _OPENER.open(_request(url, start=have), timeout=60) as resp:
                if have and resp.status != 206:  # the server ignored the range: start over
                    have = 0
                    t.resumed_from = 0
                with open(dest, "ab" if have else "wb") as f:
                    while chunk := resp.read(1 << 20):
                        f.write(chunk)
                        have += len(chunk)
                        failures = 0
                        meter.update(t, have)
        except urllib.error.HTTPError as e:
            if e.code == 416:  # what we hold is not a prefix the server knows
                dest.unlink(missing_ok=True)
                have = 0
                continue
            raise _http_error(e, what, base) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            failures += 1
            if failures > _RETRIES:
                reason = getattr(e, "reason", e)
                raise FolkError(
                    f"{what}: the download of {layer.digest[:19]}… failed {failures} times "
                    f"({reason}); run the pull again to resume from {have} bytes"
                ) from None
            sleep(min(0.2 * 2**failures, 5.0))
        have = dest.stat().st_size if dest.exists() else 0
        if have > layer.size:
            break
    sha = hashlib.sha256()
    with open(dest, "rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
    if have != layer.size or sha.hexdigest() != layer.hex:
        dest.unlink(missing_ok=True)
        raise FolkError(
            f"{what}: blob {layer.digest[:19]}… hashes to sha256:{sha.hexdigest()[:12]}… "
            f"({have} bytes); refused (corrupted or tampered), nothing was imported"
        )
    return dest


def pull_ollama(
    spec: str,
    name: str | None = None,
    license: str | None = None,
    *,
    registry: str | None = None,
    progress: Progress | None = None,
) -> PullResult:
    """Download ``ollama:[NAMESPACE/]MODEL[:TAG]`` from a registry and register it.

    Raises:
        FolkError: unknown model, access refused, a blob that does not hash to its
            digest, or a model with an adapter/projector layer; nothing is registered.
    """
    base = registry_base(registry)
    ref = ollama.parse_name(spec, host=urlparse(base).netloc)
    what = f"ollama:{ref}"
    repo_url = f"{base}/v2/{ref.namespace}/{ref.model}"
    manifest_url = f"{repo_url}/manifests/{ref.tag}"
    raw = _get_bytes(manifest_url, what, base, accept=ollama.MANIFEST_TYPE)
    manifest = ollama.parse_manifest(raw, what)
    meter = _Meter(progress)
    texts: dict[str, str] = {}
    for layer in manifest.text_layers:
        t = meter.begin(layer.digest, layer.size)
        data = _get_bytes(f"{repo_url}/blobs/{layer.digest}", what, base)
        meter.update(t, len(data))
        ollama.check_bytes(data, layer, what)
        try:
            texts[layer.digest] = data.decode("utf-8")
        except UnicodeDecodeError:
            raise FolkError(f"{what}: {layer.media_type} layer is not UTF-8 text") from None
    config_raw = _get_bytes(f"{repo_url}/blobs/{manifest.config.digest}", what, base)
    ollama.check_bytes(config_raw, manifest.config, what)
    try:
        config = json.loads(config_raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FolkError(f"{what}: the config blob is not JSON") from None
    downloads = folk_home() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    model = manifest.model_layer
    partial = downloads / f"sha256-{model.hex}.partial"
    with open(partial.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two pulls of one blob never write one file
        blob = fetch_blob(f"{repo_url}/blobs/{model.digest}", partial, model, meter, what, base)
    info = ollama.source_record(
        manifest,
        texts,
        config if isinstance(config, dict) else {},
        origin="ollama-registry",
        where=manifest_url,
        ref=ref,
        manifest_digest="sha256:" + hashlib.sha256(raw).hexdigest(),
    )
    lic, lic_source = (license, None) if license else ollama.layer_license(manifest, texts)
    d = Derivation("import", license=lic, license_source=lic_source, source_info=info)
    entry, placed = register_verified(
        {ref.file_name: blob},
        {ref.file_name: Expected(sha256=model.hex, size=model.size)},
        name or ref.hub_name,
        d,
        what=what,
    )
    blob.unlink(missing_ok=True)  # the hub holds it now (a link or its own copy)
    partial.with_suffix(".lock").unlink(missing_ok=True)
    return PullResult(entry, f"{what}@{info['manifest_digest']}", meter.transfers, placed)
