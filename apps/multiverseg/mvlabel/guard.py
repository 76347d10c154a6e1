"""The gate in front of every endpoint the server has, MONAI Label's own included.

MONAI Label's routes parse their inputs themselves and run on the event loop; :class:`Guard` wraps its
router (an ASGI app) so that, before any route runs:

* the caller is who they say and may do this (:mod:`mvlabel.access`), when authentication is on;
* ids and tags in the query are names, never paths (``image``, ``id``, ``label``, ``tag``, ``session_id``);
* the JSON form fields (``params``, ``info``, ``wsi``) and JSON bodies are objects of the right shape, and
  no ``params`` key smuggles a path (``image``, ``label`` as a file) or a ``final`` tag into a route;
* an uploaded image is a readable image within the size limits (a corrupt or huge file never lands);
* bodies larger than ``max_body`` are refused (413);
* a route that names a task (batch inference, training, scoring) names one this app has (404), info
  edits leave what the server itself records alone, and routes this deployment cannot serve (the PACS
  proxy without a PACS, ``nvidia-smi`` without one, model files, which ``--conf weights`` sets) say so.

A refusal is a 4xx JSON ``{"detail": message}``. Routes that run the model or write files run on a worker
thread (their own event loop, the request's ``receive``/``send`` bridged back), so ``/info/`` and the other
quick routes answer while a volume is being segmented.
"""

from __future__ import annotations

import asyncio
import contextvars
import email.message
import errno
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import PurePath
from typing import Any, Callable, Optional
from urllib.parse import parse_qs, unquote

import anyio
from anyio.lowlevel import RunVar

from .access import PUBLIC, ROLE_NAMES, Identity, TokenCache, required_role
from .errors import MAX_MESSAGE, BadRequest, calling, shorten
from .imageio import MAX_LABEL_NAME, is_label_name

log = logging.getLogger(__name__)

# ids: file-name safe, no separators, short enough for a file name with its extension and history number
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_. +=,@()-]{0,199}$")
TAG = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
FINAL = "final"
JSON_FIELDS = ("params", "info", "wsi")
NO = ("0", "off", "f", "false", "n", "no")  # what FastAPI reads as a false bool; anything else it reads as true or refuses
RESULT_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")
# POST routes that start a background job for the task they name: (path, kind of task)
TASK_ROUTES = [(re.compile(r"^/batch/infer/([^/]+)$"), "infer"), (re.compile(r"^/train(?:/([^/]*))?$"), "train"),
               (re.compile(r"^/scoring(?:/([^/]*))?$"), "scoring")]
# a PACS series' identity, which next-sample answers carry and OHIF opens: the PACS's, never edited
DICOM_INFO = ("SeriesInstanceUID", "StudyInstanceUID", "PatientID", "Modality", "StudyDate", "StudyTime")
# info keys the server records itself (times, file names, who saved or edited, next-sample leases and scores,
# a series' identity): no info edit sets them
RESERVED_INFO = {"ts", "name", "user", "edited_by", "path", "ext", "strategy", "mvseg_scores", "mvseg_scored",
                 *DICOM_INFO}
# Seconds a client may leave the server waiting: for the next part of a request body, and to take the next
# part of an answer (a worker thread waits on it meanwhile).
BODY_IDLE_TIMEOUT = 60.0
SEND_TIMEOUT = 120.0
# routes that run the model, read big files, write or ask the PACS: off the event loop
OFF_LOOP = re.compile(r"^/(info|infer|activelearning|datastore|batch|scoring|train|session|proxy)(/|$)")
current_user: contextvars.ContextVar[str] = contextvars.ContextVar("mvseg_user", default="anonymous")
# who is asking, for requests that name no client_id: user and address (never one state for everyone)
current_client: contextvars.ContextVar[tuple] = contextvars.ContextVar("mvseg_client",
                                                                       default=("anonymous", "address", "?"))
PACS_DOWN = "the PACS did not answer (refused, timed out or unreachable); try again once it is back"
DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}
MAX_URL = 8192  # characters of path and query: a longer one is refused before it is parsed (or echoed back)
SEG_NEEDS_INFO = "output=dicom_seg needs params.label_info (each segment's name and idx)"
# routes whose fields MONAI Label reads from a form only: any other body would be dropped and defaults used
FORM_ROUTES = re.compile(r"^/(infer/(?!wsi/)[^/]+|infer/wsi_v2/[^/]+|datastore(/.*)?|session/?)$")
# files a route wrote for its answer only (MONAI Label's DICOM SEG output): removed once the answer is sent
_request_files: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("mvseg_request_files", default=None)


def remove_after_response(path: str) -> None:
    """Remove ``path`` once the current request's answer has been sent, or once the request failed (outside a
    request, e.g. in a batch job's process, the caller keeps it)."""
    files = _request_files.get()
    if files is not None:
        files.append(path)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def has_label(datastore, image_id: str, tag: str) -> bool:
    """Whether the image has a label of ``tag`` (MONAI Label's datastores raise for one they do not have; a PACS
    that does not answer is raised as such)."""
    try:
        return bool(datastore.get_label_uri(image_id, tag))
    except Exception as e:
        if pacs_unreachable(e):
            raise
        return False


def client_key(client_id: Any = None) -> tuple:
    """Whose interaction state or next-sample lease this is: the caller's user with the client's own id
    (a client_id never reaches another user's state), or user and address when the client names none. A
    tuple, user first: as one string, user 'carol/x' with client 'y' was user 'carol' with client 'x/y'."""
    return (current_user.get(), "client", str(client_id)) if client_id else current_client.get()


class Refusal(Exception):
    def __init__(self, status: int, message: str, headers: Optional[dict] = None):
        super().__init__(shorten(message))
        self.status = status
        self.headers = headers or {}


def check_name(value: str, what: str) -> None:
    if not NAME.match(value) or ".." in value:
        raise Refusal(422, f"'{what}' must be a name (letters, digits, '_', '-', '.'), not a path: {value!r}")


def check_tag(value: str, what: str = "tag") -> None:
    if not TAG.match(value):
        raise Refusal(422, f"'{what}' must be a plain tag name (letters, digits, '_', '-'): {value!r}")
    if value.lower() == FINAL and value != FINAL:  # the same folder as final on a case-insensitive disk
        raise Refusal(422, f"'{what}' {value!r} is 'final' in another case; write it '{FINAL}'")


def check_label_info(described: Any, what: str = "label_info") -> None:
    """``[{"name": text, "idx": 1..255}, ...]`` with distinct names and values (``id`` is read where ``idx``
    is missing, so it is checked alike)."""
    def value(d: dict):
        return d.get("idx", d.get("id", 1))

    ok = isinstance(described, list) and all(
        isinstance(d, dict) and is_label_name(d.get("name"))
        and isinstance(value(d), int) and not isinstance(value(d), bool) and 0 < value(d) < 256
        for d in described
    )
    if not ok:
        raise Refusal(422, f"'{what}' must be a list of {{\"name\": text, \"idx\": 1..255}}, names of at most "
                           f"{MAX_LABEL_NAME} printable characters without '/' or '\\'")
    for key, values in (("name", [d["name"] for d in described]), ("idx", [value(d) for d in described])):
        if len(set(values)) < len(values):
            raise Refusal(422, f"'{what}' names a label {key} twice: {values}")


def check_seg_label_info(described: Any) -> None:
    """``label_info`` for a DICOM SEG answer (``output=dicom_seg``): each segment's name (DICOM text: ASCII),
    its idx in the result, and optionally a colour ``[r, g, b]`` (0..255)."""
    if not described:
        raise Refusal(422, SEG_NEEDS_INFO)
    check_label_info(described)
    for d in described:
        color = d.get("color")
        if "idx" not in d or not d["name"].isascii() or (color is not None and not (
                isinstance(color, list) and len(color) == 3
                and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in color))):
            raise Refusal(422, "each entry of label_info for output=dicom_seg needs an ASCII 'name', its 'idx' "
                               "and, if any, a 'color' of three values 0..255")


def check_info(info: dict, path: str) -> None:
    """An info edit (``PUT /datastore/image/info``, ``/datastore/label/info``, ``/datastore/updatelabelinfo``)."""
    reserved = sorted(RESERVED_INFO & set(info))
    if reserved:
        raise Refusal(422, f"info keys {reserved} are recorded by the server and cannot be edited")
    if path.startswith("/datastore/image"):
        return
    if "label_info" in info:
        check_label_info(info["label_info"])


def _json_object(text: str, field: str) -> dict:
    if text == "" and field == "params":  # MONAI Label reads an empty 'params' as {}; every other text it parses
        return {}
    try:
        value = json.loads(text)
    except ValueError as e:
        raise Refusal(400, f"'{field}' is not valid JSON: {e}") from None
    except RecursionError:
        raise Refusal(400, f"'{field}' is nested too deeply") from None
    if not isinstance(value, dict):
        raise Refusal(422, f"'{field}' must be a JSON object, got {type(value).__name__}")
    try:  # JSON's \ud800-\udfff escapes make strings no file or answer can hold (the index became unreadable)
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise Refusal(422, f"'{field}' holds a lone surrogate escape (\\ud800-\\udfff), which is not text") from None
    return value


def check_params(params: dict, route: str) -> None:
    """Keys of a request's ``params`` that name files or tags."""
    for key in ("image", "session", "file"):
        if key in params:
            raise Refusal(422, f"'params.{key}' is not accepted: the image is the query's 'image' or an upload")
    label = params.get("label")
    if label is not None and not (isinstance(label, str) and (label == "" or NAME.match(label))):
        raise Refusal(422, f"'params.label' must be a label name, got {label!r}")
    if params.get("label_name") is not None and not isinstance(params["label_name"], str):
        raise Refusal(422, f"'label_name' must be a label name, got {params['label_name']!r}")
    names = params.get("labels")
    if names is not None and not (isinstance(names, str) or (isinstance(names, (list, dict))
                                                              and all(isinstance(n, str) for n in names))):
        raise Refusal(422, f"'labels' must be a label name or a list of them, got {str(names)[:60]!r}")
    tag = params.get("label_tag")
    if tag is not None:
        if not isinstance(tag, str):
            raise Refusal(422, "'params.label_tag' must be a tag name")
        check_tag(tag, "params.label_tag")
        if tag == FINAL and (params.get("save_label") or route.startswith("/batch")):
            raise Refusal(409, "inference never writes 'final' labels; save them with PUT /datastore/label")
    described = params.get("label_info")
    if described is not None:
        check_label_info(described)
    for key in ("result_extension", "client_id"):
        value = params.get(key)
        if value is not None and not (isinstance(value, str) and len(value) <= 255):
            raise Refusal(422, f"'{key}' must be text, got {value!r}")
    # the URL names the strategy or the model: a body naming another would win over it unseen
    for prefix, key in (("/activelearning/", "strategy"), ("/batch/infer/", "model"), ("/infer/wsi/", "model"),
                        ("/infer/wsi_v2/", "model"), ("/infer/", "model")):
        if route.startswith(prefix):
            named = unquote(route[len(prefix):]).strip("/")
            if named and key in params and params[key] != named:  # null too: MONAI Label would take it
                raise Refusal(422, f"the URL names {key} '{named}'; the body names '{str(params[key])[:60]}': name one")
            break
    if route.startswith("/batch/"):
        images = params.get("images")
        if images is not None and images not in ("all", "labeled", "unlabeled"):
            if not isinstance(images, list) or not images or not all(isinstance(i, str) for i in images):
                raise Refusal(422, "'images' must be all, labeled, unlabeled or a list of image ids (not empty)")
            for image in images:
                check_name(image, "images")
        for key in ("max_batch_size", "max_workers"):
            value = params.get(key)
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1e6):
                raise Refusal(422, f"'{key}' must be a whole number, got {value!r}")
    for key in ("foreground", "background"):
        points = params.get(key)
        if points not in (None, "") and not (
            isinstance(points, list) and all(
                isinstance(p, list) and all(isinstance(c, (int, float)) and not isinstance(c, bool)
                                            and abs(c) < 1e9 for c in p) for p in points)
        ):
            raise Refusal(422, f"'{key}' must be a list of points made of numbers")
    dtype = params.get("result_dtype")
    if dtype is not None and dtype not in RESULT_DTYPES:
        raise Refusal(422, f"'result_dtype' must be one of {', '.join(RESULT_DTYPES)}, got {dtype!r}")
    for key in ("scribbles_fg_label", "scribbles_bg_label", "slice"):
        value = params.get(key)
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                      and abs(value) < 1e9) and not (isinstance(value, str) and is_whole(value)):
            raise Refusal(422, f"'{key}' must be a number, got {value!r}")


def is_whole(text: str) -> bool:
    """Digits 0-9 only ('²' is a digit to str.isdigit, and no number to int)."""
    return text.isascii() and text.isdigit()


def check_wsi(wsi: dict) -> None:
    from monailabel.endpoints.wsi_infer import WSIInput
    from pydantic import ValidationError

    try:
        model = WSIInput.model_validate(wsi)
    except ValidationError as e:
        raise Refusal(422, f"'wsi' is not valid: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}") from None
    check_params(model.params or {}, "/infer/wsi")


def _body_kind(ctype: str) -> str:
    """How a body of this content type is read: "form", "json" (``application/json``, any
    ``application/*+json``, or none given: the guard then names it JSON for FastAPI) or "other"."""
    if not ctype.strip():
        return "json"
    message = email.message.Message()
    message["content-type"] = ctype
    kind, subtype = message.get_content_maintype(), message.get_content_subtype()
    if (kind, subtype) in (("multipart", "form-data"), ("application", "x-www-form-urlencoded")):
        return "form"
    if kind == "application" and (subtype == "json" or subtype.endswith("+json")):
        return "json"
    return "other"


BATCH_BUSY = "a batch job is already running on this server: try again once it has ended"


class Guard:
    """ASGI wrapper of MONAI Label's router (see the module docstring).

    Args:
        inner: the router's ASGI app. tokens: verified identities when authentication is on, else None.
        tasks: ``() -> {"infer": names, "train": names, "scoring": names}``, the app's task names.
        check_upload: ``(path) -> None``; raises :class:`BadRequest` for an unusable image upload.
        image_exists: ``(image id) -> bool``, for the routes that delete, read or edit an image's or label's
            info, and for batch jobs.
        max_body: largest request body (bytes).
        batch_lock: held while a request that starts a batch job is answered (a ``run_sync`` job: until it
            ends), so a second one is refused at once (429); MONAI Label refused a second job only while one
            ran in the background, and it checks that itself.
        label_exists: ``(image id, tag) -> bool``, for reads of a label's info (MONAI Label answered 200 {}
            for a tag the image has no label of).
    """

    def __init__(self, inner, tokens: Optional[TokenCache], check_upload: Callable[[str], None],
                 image_exists: Callable[[str], bool], max_body: int, on_pacs: bool = False,
                 tasks: Callable[[], dict] = dict, batch_lock: Optional[threading.Lock] = None,
                 label_exists: Callable[[str, str], bool] = lambda image, tag: True):
        self.inner = inner
        self.batch_lock = batch_lock
        self.label_exists = label_exists
        self.tasks = tasks  # () -> {"infer": names, "train": names, "scoring": names}
        self.on_pacs = on_pacs  # a DICOMweb datastore: output=dicom_seg and the proxy work
        self.tokens = tokens
        self.check_upload = check_upload
        self.image_exists = image_exists
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        method, path = scope["method"], scope["path"]
        spool, batch = None, False
        try:
            if len(path) + len(scope.get("query_string", b"")) > MAX_URL:
                raise Refusal(414, f"the URL is longer than {MAX_URL} characters")
            types = sum(name.lower() == b"content-type" for name, _ in scope.get("headers") or [])
            if types > 1:  # the guard and FastAPI could each read another one
                raise Refusal(400, f"a request has one Content-Type header, this one has {types}")
            identity = await self._authenticated(scope, method, path)
            if path.startswith("/proxy/"):
                self._check_proxy(method, path, (scope.get("raw_path") or b"").decode("latin-1"))
            query = _query(scope)
            self._check_query(method, path, query)
            if method == "DELETE" and path.rstrip("/") in ("/datastore", "/datastore/image"):
                await self._check_images_exist([(query.get("id") or [""])[0]])
            for route, key in (("/datastore/image/info", "image"), ("/datastore/label/info", "label")):
                if path.rstrip("/") == route and key in query:  # MONAI Label answered 200 {} for any id
                    await self._check_images_exist([query[key][0]])
            if method == "GET" and path.rstrip("/") == "/datastore/label/info" and "label" in query and "tag" in query:
                image, tag = query["label"][0], query["tag"][0]
                if not await anyio.to_thread.run_sync(self.label_exists, image, tag):
                    raise Refusal(404, f"image '{image}' has no '{tag}' label")
            uploads = False
            if method in ("POST", "PUT", "PATCH"):
                spool = await self._read_body(receive)
                uploads = await self._check_body(scope, path, query, spool)
                receive = _replay(spool, receive)
            named = (query.get("image") or [""])[0] or (query.get("session_id") or [""])[0]
            if method == "POST" and path.startswith("/infer/") and not (named or uploads):
                raise Refusal(422, "name an image (?image=ID) or upload one ('file')")
            batch = method == "POST" and path.startswith("/batch/infer") and self.batch_lock is not None
            if batch and not self.batch_lock.acquire(blocking=False):  # checked and taken in one step
                raise Refusal(429, BATCH_BUSY)
        except Exception as e:
            if spool is not None:
                spool.close()
            # existence checks ask the PACS; an upload is spooled to the temp folder
            refusal = (e if isinstance(e, Refusal) else Refusal(e.status, str(e)) if isinstance(e, BadRequest)
                       else self._not_the_callers(e, method, path))
            if refusal is None:
                raise
            return await _respond(send, refusal.status, str(refusal), refusal.headers)
        user = identity.username if identity else "anonymous"
        token = current_user.set(user)
        client = current_client.set((user, "address", str((scope.get("client") or ("?",))[0])))
        files = _request_files.set([])
        started = False

        held: list = []  # a 422 answer's messages, kept until its body is whole

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            if held or (message["type"] == "http.response.start" and message["status"] == 422):
                held.append(message)
                if message["type"] == "http.response.start" or message.get("more_body"):
                    return
                for brief in _brief_answer(held):
                    await send(brief)
                return
            await send(message)

        try:
            if OFF_LOOP.search(path):
                await _in_worker_thread(self.inner, scope, receive, tracked)
            else:
                await self.inner(scope, receive, tracked)
        except ClientStalled as e:  # returning unfinished, the server closes the connection
            log.warning("%s %s: %s; connection closed", method, path, e)
        except Exception as e:  # MONAI Label's "not found" and "invalid input" are the caller's mistakes
            status = _status_of(e)
            if status is None and (down := self._not_the_callers(e, method, path)) is not None:
                status, e = down.status, down
            if status is None or started:
                raise
            await _respond(send, status, str(getattr(e, "msg", e)) or type(e).__name__)
        finally:
            if batch:
                self.batch_lock.release()
            for written in _request_files.get():
                _remove(written)
            current_user.reset(token)
            current_client.reset(client)
            _request_files.reset(files)
            if spool is not None:
                spool.close()

    def _not_the_callers(self, error: Exception, method: str, path: str) -> Optional[Refusal]:
        """The answer to a failure of the PACS (503: it did not answer), of the server's disk (507/503:
        full or read-only) or of the identity provider at login (401: it refused; 503: it did not answer);
        None for any other error."""
        if path == "/auth/token":
            return _login_refused(error)
        if self.on_pacs and pacs_unreachable(error):
            log.warning("%s %s: the PACS did not answer: %s", method, path, error)
            return Refusal(503, PACS_DOWN)
        return storage_refused(error)

    # -- who ----------------------------------------------------------------------------------------

    async def _authenticated(self, scope, method: str, path: str) -> Optional[Identity]:
        """:meth:`_authenticate` off the event loop, on threads of its own: checking a new token may ask the
        identity provider for its keys, slowly, and neither other requests nor other routes' threads wait."""
        if self.tokens is None:
            return None
        return await anyio.to_thread.run_sync(self._authenticate, scope, method, path,
                                              limiter=_threads(_AUTH_LIMITER, AUTH_THREADS))

    def _authenticate(self, scope, method: str, path: str) -> Optional[Identity]:
        needed = required_role(method, path)
        if needed == PUBLIC:
            return None
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        if not header.lower().startswith("bearer "):
            raise Refusal(401, "a bearer token is required", {"WWW-Authenticate": "Bearer"})
        try:
            identity = self.tokens.identity(header[7:].strip())
        except Exception as e:  # invalid, expired, wrong audience, unknown key, provider unreachable
            log.info("token refused for %s %s: %s", method, path, e)
            raise Refusal(401, "the token is not valid", {"WWW-Authenticate": "Bearer"}) from None
        if identity.level < needed:
            raise Refusal(403, f"role '{ROLE_NAMES[needed]}' or above is required for {method} {path}")
        return identity

    # -- what ---------------------------------------------------------------------------------------

    def _check_query(self, method: str, path: str, query: dict[str, list[str]]) -> None:
        for key in ("image", "id", "label", "session_id"):
            for value in query.get(key, []):
                if value or not path.startswith("/infer"):  # infer may take an upload instead
                    check_name(value, key)
        for value in query.get("tag", []):
            check_tag(value)
        if path.startswith("/session") and any(v.strip().lower() not in NO for v in query.get("uncompress", [])):
            raise Refusal(422, "archives are not unpacked on this server (uncompress): upload the image files")
        if "dicom_seg" in query.get("output", []) and not self.on_pacs:
            raise Refusal(422, "output=dicom_seg needs a DICOMweb datastore; ask for image, json or all")
        self._check_route(method, path)
        if path.rstrip("/") == "/logs":
            for value in query.get("lines", []):
                if not (is_whole(value) and int(value) <= 1_000_000):
                    raise Refusal(422, f"'lines' must be a whole number up to 1000000, got {value[:32]!r}")

    def _check_proxy(self, method: str, path: str, raw_path: str) -> None:
        """OHIF reads the PACS through ``/proxy/dicom/[qido|wado/]...``: DICOMweb reads only. MONAI Label
        joins the path to the PACS URL as it comes, so a ``..`` reached the PACS's whole REST API (down to
        shutting it down), and a POST stored anything in it."""
        if not self.on_pacs:
            raise Refusal(404, "this server's datastore is a folder, not a PACS: there is nothing to proxy")
        if method not in ("GET", "HEAD"):
            raise Refusal(405, "the PACS is read-only through this server; labels are saved with PUT /datastore/label")
        seen = {path, raw_path}
        for _ in range(3):  # encoded dots, encoded twice
            seen |= {unquote(p) for p in seen}
        if any(part in (".", "..") for p in seen for part in re.split(r"[/\\]", p)):
            raise Refusal(404, "the proxy serves DICOMweb resources only, without '.' or '..' in the path")
        match = re.match(r"^/proxy/dicom/(?:(?:qido|wado)/)?([^/]*)", path)
        if not match or match.group(1) not in ("studies", "series", "instances"):
            raise Refusal(404, "the proxy serves DICOMweb studies, series and instances only")

    def _check_route(self, method: str, path: str) -> None:
        if method == "POST":
            for pattern, kind in TASK_ROUTES:
                match = pattern.match(path)
                if match:
                    names = list(self.tasks().get(kind, ()))
                    if not names or (match.group(1) and match.group(1) not in names):
                        have = f"this server has {', '.join(names)}" if names else "this server has none"
                        raise Refusal(404, f"unknown {kind} task '{match.group(1) or ''}'; {have}")
        if path.rstrip("/") == "/logs/gpu" and not shutil.which("nvidia-smi"):
            raise Refusal(404, "this server has no NVIDIA GPU (no nvidia-smi)")
        if path.startswith("/model/") and method in ("PUT", "DELETE"):
            raise Refusal(405, "model files are not replaced or deleted over HTTP; "
                               "the server's weights are set with --conf weights")

    async def _read_body(self, receive):
        spool = tempfile.SpooledTemporaryFile(max_size=16 << 20)
        size = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), BODY_IDLE_TIMEOUT)
            except asyncio.TimeoutError:
                spool.close()
                raise Refusal(408, f"no part of the request body came for {BODY_IDLE_TIMEOUT:.0f} s") from None
            if message["type"] == "http.disconnect":  # a cut-off body would run as a request with defaults
                spool.close()
                raise Refusal(400, "the client went away before the request body was complete")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                spool.close()
                raise Refusal(413, f"request body over {self.max_body >> 20} MiB")
            spool.write(chunk)
            if not message.get("more_body"):
                break
        spool.seek(0)
        return spool

    async def _check_images_exist(self, images: list[str]) -> None:
        """The images a delete or a batch job names are in the datastore (404 otherwise: a batch job of missing
        ones would start and fail in the background). Asked on a worker thread: on a PACS it asks the PACS."""
        missing = await anyio.to_thread.run_sync(lambda: [i for i in images if not self.image_exists(i)])
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            shown = ", ".join(repr(i) for i in missing[:5]) + more
            raise Refusal(404, f"not in the datastore: {shown}")

    async def _check_body(self, scope, path: str, query: dict[str, list[str]], spool) -> bool:
        """Check a request body's JSON fields and uploaded image; True when it uploads a file."""
        from starlette.requests import Request

        ctype = dict(scope.get("headers") or []).get(b"content-type", b"").decode("latin-1").lower()
        # MONAI Label refuses a DICOM SEG answer without label_info only after the model ran (and kept its file)
        seg_output = path.startswith("/infer/") and "dicom_seg" in query.get("output", [])
        kind = _body_kind(ctype)
        is_form = kind == "form"
        has_body = bool(spool.read(1))
        spool.seek(0)
        if has_body and not ctype.strip() and not FORM_ROUTES.match(path):
            # QuPath sends its JSON without a content type, which FastAPI then would not read as JSON
            scope["headers"] = [*(scope.get("headers") or []), (b"content-type", b"application/json")]
        if not is_form and FORM_ROUTES.match(path) and has_body:
            raise Refusal(415, f"{path} reads a multipart form (JSON goes in its 'params' field, a file in 'file'),"
                               f" not a body sent as {ctype or 'no content type'}")
        if kind == "other" and has_body:  # FastAPI would hand the raw bytes on: nothing here could check them
            raise Refusal(415, f"a request body is JSON (application/json) or a multipart form, not {ctype}")
        if seg_output and not is_form:
            raise Refusal(422, SEG_NEEDS_INFO)
        if seg_output and not (query.get("image") or [""])[0]:
            raise Refusal(422, "output=dicom_seg answers for a series of the PACS: name it (?image=SERIES_UID)")
        if kind == "json":
            body = spool.read()
            spool.seek(0)
            if body.strip():
                data = _json_object(body.decode("utf-8", "replace"), "body")
                if path.startswith(("/batch/", "/activelearning/")):  # the body is the job's or the request's params
                    check_params(data, path)
                if path.startswith("/batch/infer/") and isinstance(data.get("images"), list):
                    await self._check_images_exist(data["images"])
                if "params" in data:
                    if not isinstance(data["params"], dict):
                        raise Refusal(422, "'params' must be a JSON object")
                    check_params(data["params"], path)
                if path.startswith("/infer/wsi/"):
                    check_wsi(data)
            return False
        if not is_form:
            return False
        try:
            form = await Request(scope, _replay(spool, None)).form(max_files=8, max_fields=64)
        except Exception as e:
            raise Refusal(400, f"the form could not be parsed: {e}") from None
        try:
            for field in JSON_FIELDS:
                value = form.get(field)
                if isinstance(value, str):
                    data = _json_object(value, field)
                    if field == "wsi":
                        check_wsi(data)
                    elif field == "params":
                        check_params(data, path)
                        if seg_output:
                            check_seg_label_info(data.get("label_info"))
                        if path.startswith(("/datastore/image", "/datastore/updatelabelinfo")):  # info, by another name
                            check_info(data, path)
                    elif field == "info":
                        check_info(data, path)
            if seg_output and not isinstance(form.get("params"), str):
                raise Refusal(422, SEG_NEEDS_INFO)
            for field, upload in form.multi_items():  # MONAI Label makes temp files named after them
                if hasattr(upload, "read"):
                    name = _sent_name(upload)  # clients may send the whole local path (MONAI Label's own does)
                    if not name.isprintable() or len(name.encode()) > 200:
                        raise Refusal(422, f"an upload's file name ('{field}') must be printable and at most 200 bytes")
            label = form.get("label")
            if (path.startswith("/infer/") and hasattr(label, "read") and not (query.get("image") or [""])[0]
                    and "".join(PurePath(label.filename or "").suffixes) == ".bin"):  # as MONAI Label tells one
                raise Refusal(422, "a .bin labelmap (OHIF's scribbles) is read on the grid of a datastore volume: "
                                   "name it (?image=ID)")
            upload = form.get("file")
            if upload is not None and hasattr(upload, "read") and path.startswith(("/datastore", "/infer/")):
                await self._check_upload(upload)
                return True
            if path.startswith("/session"):  # Slicer's upload of an image that is not in the datastore
                files = [f for f in form.getlist("files") if hasattr(f, "read")]
                if len(files) > 1:
                    raise Refusal(422, f"a session holds one image file, got {len(files)}")
                for upload in files:  # MONAI Label stores it under its own name (checked above)
                    await self._check_upload(upload)
                return bool(files)
        finally:
            await form.close()
            spool.seek(0)
        return False

    async def _check_upload(self, upload) -> None:
        suffix = "".join(os.path.splitext(upload.filename or "")[1:]) or ".bin"
        name = (upload.filename or "").lower()
        suffix = ".nii.gz" if name.endswith(".nii.gz") else suffix
        fd, tmp = tempfile.mkstemp(suffix=suffix)
        try:
            with os.fdopen(fd, "wb") as f:
                while chunk := await upload.read(1 << 20):
                    f.write(chunk)
            await upload.seek(0)
            try:
                await anyio.to_thread.run_sync(self.check_upload, tmp)
            except BadRequest as e:  # named as the client sent it, not by the server's temp copy
                sent = _sent_name(upload)
                sent = repr(sent[:100]) if sent and sent.isprintable() else "the upload"
                message = calling(str(e), tmp, sent)
                raise Refusal(e.status, f"upload refused: {message}") from None
        finally:
            os.unlink(tmp)


def _sent_name(upload) -> str:
    """An upload's file name as the client sent it, without folders (Windows' too)."""
    return os.path.basename((upload.filename or "").replace("\\", "/"))


def _query(scope) -> dict[str, list[str]]:
    """A request's query, blank values kept; a parameter given twice is refused (400): this guard and FastAPI
    would read different ones (the first, the last)."""
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    repeated = sorted(key for key, values in query.items() if len(values) > 1)
    if repeated:
        raise Refusal(400, f"query parameters are given once each: {', '.join(repeated[:5])} came more than once")
    return query


def _brief_answer(messages: list) -> list:
    """A 422 answer (start and body messages) whose JSON quotes at most a short piece of each input: FastAPI's
    validation errors echo a field's whole value (a megabyte of text sent as a file)."""
    start, body = messages[0], b"".join(m.get("body", b"") for m in messages[1:])
    if len(body) <= MAX_MESSAGE:
        return messages
    try:
        answer = json.loads(body)
        for error in answer["detail"] if isinstance(answer.get("detail"), list) else []:
            if isinstance(error, dict) and "input" in error:
                error["input"] = shorten(str(error["input"]), 100)
        body = json.dumps(answer).encode()
    except (ValueError, AttributeError):
        return messages
    if len(body) > 4 * MAX_MESSAGE:
        body = json.dumps({"detail": shorten(body.decode(), MAX_MESSAGE)}).encode()
    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    return [{**start, "headers": headers}, {"type": "http.response.body", "body": body}]


def _status_of(error: Exception) -> Optional[int]:
    from monailabel.interfaces.exception import (
        ImageNotFoundException, LabelNotFoundException, MONAILabelError, MONAILabelException,
    )

    if isinstance(error, (ImageNotFoundException, LabelNotFoundException)):
        return 404
    if isinstance(error, MONAILabelException) and error.error == MONAILabelError.INVALID_INPUT:
        return 422
    if isinstance(error, BadRequest):
        return error.status
    return None


def _login_refused(error: Exception) -> Optional[Refusal]:
    """MONAI Label's ``POST /auth/token`` passes the identity provider's refusal on as an exception."""
    import requests

    if isinstance(error, requests.HTTPError) and error.response is not None and error.response.status_code < 500:
        return Refusal(401, "the identity provider refused the login: wrong user name or password")
    if isinstance(error, requests.RequestException):
        log.warning("login: the identity provider did not answer: %s", error)
        return Refusal(503, "the identity provider did not answer; try again later")
    return None


def storage_refused(error: Optional[BaseException]) -> Optional[Refusal]:
    """507 or 503 for a write the server's own disk refused (full, over quota or its file size limit;
    read-only or not permitted), found along the error's causes; None for any other error. The datastore
    writes all or nothing, so nothing was saved; the message names no path."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_FULL:
            return Refusal(507, f"the server's disk is full ({error.strerror}): nothing was saved; try again "
                                "once space is freed on the server")
        if isinstance(error, OSError) and error.errno in NOT_WRITABLE:
            return Refusal(503, f"the server's storage refused the write ({error.strerror}): nothing was saved; "
                                "the datastore must be writable by the server")
        error = error.__cause__ or error.__context__
    return None


def pacs_unreachable(error: BaseException) -> bool:
    """Whether ``error`` (or one it was raised from) is a request to the PACS that failed to connect, timed
    out, broke off mid-answer or was answered by a gateway that could not reach it (502, 503, 504)."""
    import http.client

    import requests
    import urllib3

    broken = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
              requests.exceptions.ContentDecodingError, urllib3.exceptions.ProtocolError,
              urllib3.exceptions.ReadTimeoutError, http.client.IncompleteRead)  # refused, hung, cut mid-answer
    while error is not None:
        if isinstance(error, broken):
            return True
        response = getattr(error, "response", None)
        if isinstance(error, requests.HTTPError) and response is not None and response.status_code in (502, 503, 504):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextmanager
def unless_the_pacs_is_down(then: str):
    """Run the block; a PACS that does not answer ends it with a warning (``then``: what happens instead)."""
    try:
        yield
    except Exception as e:
        if not pacs_unreachable(e):
            raise
        log.warning("the PACS did not answer (%s): %s", e, then)


def _replay(spool, receive):
    """A ``receive`` that hands the buffered body on, then the client's own messages (disconnect)."""
    done = False

    async def replay():
        nonlocal done
        if not done:
            done = True
            return {"type": "http.request", "body": spool.read(), "more_body": False}
        if receive is None:
            return {"type": "http.disconnect"}
        return await receive()

    return replay


async def _in_worker_thread(app, scope, receive, send) -> None:
    """Run an ASGI call on a worker thread's own event loop; ``receive``/``send`` stay on this loop."""
    loop = asyncio.get_running_loop()

    async def receive_there():
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(receive(), loop))

    async def send_there(message):
        sent = asyncio.run_coroutine_threadsafe(send(message), loop)
        try:  # a client that stops reading would hold this thread for good: one of a few dozen
            await asyncio.wait_for(asyncio.wrap_future(sent), SEND_TIMEOUT)
        except asyncio.TimeoutError:
            sent.cancel()
            raise ClientStalled(f"the client read nothing of the answer for {SEND_TIMEOUT:.0f} s") from None

    context = contextvars.copy_context()
    await anyio.to_thread.run_sync(lambda: context.run(asyncio.run, app(scope, receive_there, send_there)),
                                   limiter=_off_loop_threads())


class ClientStalled(Exception):
    """The client stopped reading the answer: its connection is given up (the response cannot be completed)."""


_OFF_LOOP_LIMITER = RunVar("mvseg_off_loop_limiter")
OFF_LOOP_THREADS = 40
_AUTH_LIMITER = RunVar("mvseg_auth_limiter")
AUTH_THREADS = 8


def _threads(pool: RunVar, size: int) -> anyio.CapacityLimiter:
    """The event loop's limiter ``pool`` of ``size`` worker threads, apart from its default ones."""
    try:
        return pool.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(size)
        pool.set(limiter)
        return limiter


def _off_loop_threads() -> anyio.CapacityLimiter:
    """The worker threads of the off-loop routes: requests that wait (on a PACS that hangs, on the model)
    never leave the quick routes' file reads (the viewer) without one."""
    return _threads(_OFF_LOOP_LIMITER, OFF_LOOP_THREADS)


async def _respond(send, status: int, message: str, headers: Optional[dict] = None) -> None:
    body = json.dumps({"detail": message}).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    head += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


def install(app_router, guard_factory: Callable[[Any], Guard]) -> Guard:
    """Wrap MONAI Label's router once (a second app in the same process replaces the first's guard)."""
    inner = app_router.middleware_stack
    if isinstance(inner, Guard):
        inner = inner.inner
    guard = guard_factory(inner)
    app_router.middleware_stack = guard
    return guard


def restrict_cors(app, origins: list[str]) -> None:
    """Cross-origin access only for the configured origins (``MONAI_LABEL_CORS_ORIGINS``), none otherwise.

    MONAI Label answers any origin, with credentials and every method, when none is configured; the bundled
    OHIF is served by the server itself and needs no cross-origin access. Its CORS middleware is already
    built when the app starts, so the one in the chain is replaced.
    """
    from starlette.middleware.cors import CORSMiddleware

    parent = app.middleware_stack
    while parent is not None and not isinstance(getattr(parent, "app", None), CORSMiddleware):
        parent = getattr(parent, "app", None)
    if parent is None:
        return
    parent.app = CORSMiddleware(
        parent.app.app, allow_origins=[o for o in origins if o != "*"], allow_credentials=True,
        allow_methods=["GET", "HEAD", "POST", "PUT", "DELETE"], allow_headers=["authorization", "content-type"],
    )
