"""Admin API: upload (hot swap), list, show and delete adapters, behind a bearer token.

The token is separate from any inference credential. Without one configured the routes are
off and say so (403); a missing token is a 401, a wrong one a 403, compared in constant time.
Besides the global --admin-token, a keys file may hold tenant admin keys that see and manage
only the adapters matching their patterns (server/auth.py).
An upload is validated by the registry before it becomes a version, so a bad file never
replaces the version being served; the new version is servable when the 201 returns.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, File, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from adapters.archive import archive_kind
from adapters.names import AdapterNameError, check_name, format_ref
from adapters.store import AdapterNotFoundError, StoreWriteError
from server.api_keys import check_adapter, may_list
from server.auth import admin_caller, check_admin_upload
from server.routes_common import ApiError, ServerContext, get_ctx
from server.schemas_tgi import TGIError


class VersionOut(BaseModel):
    name: str
    version: int
    ref: str
    sha256: str
    size: int
    created: float
    created_iso: str
    source: str
    adapter_len: int
    layers: list[int]
    gate_kind: str
    base_fingerprint: str
    param_count: int
    kind: str = "llama-adapter"


class AdapterOut(BaseModel):
    name: str
    latest: int
    versions: list[VersionOut]


class AdapterListOut(BaseModel):
    adapters: list[AdapterOut]


class DeletedOut(BaseModel):
    deleted: list[VersionOut]


async def require_admin(request: Request, ctx: ServerContext = Depends(get_ctx)) -> ServerContext:
    await admin_caller(request, ctx)
    if ctx.registry is None:
        raise ApiError(404, "this server has no adapter store", "not_found")
    return ctx


_ERRORS = {401: {"model": TGIError}, 403: {"model": TGIError}, 404: {"model": TGIError},
           413: {"model": TGIError}, 422: {"model": TGIError}, 503: {"model": TGIError},
           507: {"model": TGIError}}
router = APIRouter(prefix="/admin", tags=["admin"], responses=_ERRORS)


def _lookup_error(e: Exception) -> ApiError:
    if isinstance(e, AdapterNameError):
        return ApiError(422, str(e), "validation", "name")
    return ApiError(404, e.args[0] if e.args else str(e), "not_found", "name")


def _store_error(e: StoreWriteError) -> ApiError:
    """Nothing was stored: 507 when the store is full (retrying will not help until space is
    freed), 503 when it cannot be written at all (read-only mount, I/O error)."""
    if e.no_space:
        return ApiError(507, f"the adapter store is full: {e}; nothing was stored", "storage")
    return ApiError(503, f"the adapter store cannot be written: {e}; nothing was changed", "storage")


def _count(ctx: ServerContext, operation: str, status: int) -> None:
    ctx.metrics.admin_operations.labels(operation, str(status)).inc()


@router.put("/adapters/{name}", status_code=201, response_model=VersionOut)
async def upload_adapter(name: str, file: UploadFile = File(
                             ..., description="The adapter .safetensors, or a PEFT adapter folder as .zip / .tar(.gz)"),
                         allow_fingerprint_mismatch: bool = Query(
                             False, description="Accept an adapter trained on a differently-fingerprinted "
                                                "base of the same shape."),
                         ctx: ServerContext = Depends(require_admin)):
    """Store `file` as the next version of `name`; requests naming `name` use it from now on."""
    try:
        try:
            check_name(name)
        except AdapterNameError as e:
            raise ApiError(422, str(e), "validation", "name") from None
        check_admin_upload(name)
        if name == ctx.model_id:
            raise ApiError(422, f"{name!r} is the base model's id; pick another adapter name", "validation",
                           "name")
        head = await file.read(512)
        await file.seek(0)
        try:
            # Validation reads tensors and computes prefix K/V: keep it off the event loop.
            if archive_kind(head) is not None:
                info = await run_in_threadpool(ctx.registry.upload_peft_archive, name, await file.read(),
                                               allow_fingerprint_mismatch=allow_fingerprint_mismatch)
            else:   # the spooled file itself: a large LoRA is copied to the store, never read whole
                info = await run_in_threadpool(ctx.registry.upload, name, file.file, source="uploaded",
                                               allow_fingerprint_mismatch=allow_fingerprint_mismatch)
        except ValueError as e:   # AdapterValidationError and the format's own errors
            raise ApiError(422, f"invalid adapter upload: {e}", "validation", "file") from None
        except StoreWriteError as e:
            raise _store_error(e) from None
    except ApiError as e:
        _count(ctx, "upload", e.status)
        raise
    _count(ctx, "upload", 201)
    return JSONResponse(info.to_dict(), status_code=201)


@router.get("/adapters", response_model=AdapterListOut)
async def list_adapters(ctx: ServerContext = Depends(require_admin)):
    """Every adapter with all its versions."""
    _count(ctx, "list", 200)
    return {"adapters": [a.to_dict() for a in ctx.registry.list() if may_list(a.name)]}


@router.get("/adapters/{name}", response_model=AdapterOut)
async def show_adapter(name: str, ctx: ServerContext = Depends(require_admin)):
    """One adapter and all its versions."""
    try:
        check_adapter(name)   # a tenant admin's view: other tenants' adapters read as missing
        info = ctx.registry.info(name)
    except (AdapterNotFoundError, AdapterNameError) as e:
        err = _lookup_error(e)
        _count(ctx, "show", err.status)
        raise err from None
    _count(ctx, "show", 200)
    return info.to_dict()


@router.delete("/adapters/{name}", response_model=DeletedOut)
async def delete_adapter(name: str, version: int | None = Query(None, ge=1, description="Only this version."),
                         ctx: ServerContext = Depends(require_admin)):
    """Delete one version or all of them; requests already running keep their version until done."""
    try:
        check_adapter(name if version is None else format_ref(name, version))
        removed = await run_in_threadpool(ctx.registry.delete, name, version)
    except (AdapterNotFoundError, AdapterNameError, StoreWriteError) as e:
        err = _store_error(e) if isinstance(e, StoreWriteError) else _lookup_error(e)
        _count(ctx, "delete", err.status)
        raise err from None
    _count(ctx, "delete", 200)
    return {"deleted": [v.to_dict() for v in removed or []]}
