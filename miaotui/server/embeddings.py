"""`POST /v1/embeddings`: OpenAI's embeddings endpoint over the server's embedding model (`--embedding-model`). The
encoder runs on its own worker thread, one batch at a time, so the generation engine's loop is never blocked."""

from __future__ import annotations

import asyncio
import base64
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from fastapi import APIRouter, Request

from miaotui.engine.embedder import Embedder
from miaotui.errors import MiaotuiError
from miaotui.server.errors import APIError
from miaotui.server.protocol import EmbeddingRequest

router = APIRouter()


@dataclass
class EmbeddingService:
    embedder: Embedder
    name: str
    worker: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "miaotui-embed"))


@router.post("/embeddings", include_in_schema=False)
@router.post("/v1/embeddings")
async def embeddings(req: EmbeddingRequest, request: Request):
    service: EmbeddingService | None = request.app.state.embeddings
    s = request.app.state.miaotui
    if service is None:
        raise APIError(404, "this server has no embedding model (start it with --embedding-model)",
                       param="model", code="model_not_found")
    if req.model is not None and req.model not in (service.name, service.embedder.model_name):
        raise APIError(404, f"model {req.model!r} is not an embedding model here; this server embeds with "
                       f"{service.name!r}" + ("" if req.model != s.model_name else " (the other is for generation)"),
                       param="model", code="model_not_found")
    loop = asyncio.get_running_loop()
    try:
        outs = await loop.run_in_executor(service.worker, service.embedder.embed, req.inputs(), req.dimensions,
                                          req.truncate_prompt_tokens)
    except MiaotuiError as e:
        param = "dimensions" if "dimensions" in str(e) else "input"
        raise APIError(400, str(e), param=param) from None
    data = []
    for i, out in enumerate(outs):
        vector: list[float] | str = out.embedding
        if req.encoding_format == "base64":  # little-endian float32, as OpenAI's clients decode it
            vector = base64.b64encode(np.asarray(out.embedding, dtype="<f4").tobytes()).decode()
        data.append({"object": "embedding", "index": i, "embedding": vector})
    tokens = sum(o.prompt_tokens for o in outs)
    return {"object": "list", "data": data, "model": service.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
