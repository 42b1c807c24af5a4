"""Fake local model servers (Ollama, LM Studio, vLLM, llama.cpp's llama-server, mlx_lm.server) answering the
discovery endpoints as the real ones do, and 404 elsewhere, as each real server does, for `tm detect-local`."""

from __future__ import annotations

from aiohttp import web

from tests.fakes.server import _ThreadedServer


def _not_found(request: web.Request) -> web.Response:
    return web.Response(status=404, text="Not Found")


class _Fake(_ThreadedServer):
    routes: dict[tuple[str, str], dict] = {}

    def __init__(self, routes: dict[tuple[str, str], dict], port: int = 0) -> None:
        super().__init__(port)
        self.routes = routes

    def _make_app(self) -> web.Application:
        app = web.Application()

        async def handle(request: web.Request) -> web.Response:
            body = self.routes.get((request.method, request.path))
            return _not_found(request) if body is None else web.json_response(body)

        app.router.add_route("*", "/{tail:.*}", handle)
        return app


def fake_ollama() -> _Fake:
    """`ollama serve` 0.5: /api/version, /api/tags (with details.quantization_level), /api/show."""
    return _Fake({
        ("GET", "/api/version"): {"version": "0.5.7"},
        ("GET", "/api/tags"): {"models": [
            {"name": "llama3.2:latest", "model": "llama3.2:latest", "modified_at": "2026-11-20T10:00:00Z",
             "size": 2019393189, "digest": "a80c4f17acd5",
             "details": {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
                         "parameter_size": "3.2B", "quantization_level": "Q4_K_M"}},
            {"name": "qwen2.5-coder:7b-instruct-q5_K_M", "model": "qwen2.5-coder:7b-instruct-q5_K_M",
             "modified_at": "2026-11-21T10:00:00Z", "size": 5444831936, "digest": "b1e9c2f0",
             "details": {"parent_model": "", "format": "gguf", "family": "qwen2", "families": ["qwen2"],
                         "parameter_size": "7.6B", "quantization_level": "Q5_K_M"}}]},
        # /api/show answers per model; one shape serves both here.
        ("POST", "/api/show"): {"license": "...", "details": {"format": "gguf"},
                                "model_info": {"general.architecture": "llama", "llama.context_length": 131072}},
        ("GET", "/v1/models"): {"object": "list", "data": [
            {"id": "llama3.2:latest", "object": "model", "created": 1732096800, "owned_by": "library"}]},
    })


def fake_lmstudio() -> _Fake:
    """LM Studio's server: its own REST API (/api/v0/models) beside the OpenAI one."""
    return _Fake({
        ("GET", "/api/v0/models"): {"object": "list", "data": [
            {"id": "qwen2.5-7b-instruct", "object": "model", "type": "llm", "publisher": "lmstudio-community",
             "arch": "qwen2", "compatibility_type": "gguf", "quantization": "Q4_K_M", "state": "loaded",
             "max_context_length": 32768},
            {"id": "text-embedding-nomic-embed-text-v1.5", "object": "model", "type": "embeddings",
             "publisher": "nomic-ai", "arch": "nomic-bert", "compatibility_type": "gguf", "quantization": "Q4_0",
             "state": "not-loaded", "max_context_length": 2048}]},
        ("GET", "/v1/models"): {"object": "list", "data": [
            {"id": "qwen2.5-7b-instruct", "object": "model", "owned_by": "organization_owner"}]},
    })


def fake_vllm() -> _Fake:
    """`vllm serve`: /version, and /v1/models owned_by vllm with max_model_len."""
    return _Fake({
        ("GET", "/version"): {"version": "0.6.4"},
        ("GET", "/health"): {},
        ("GET", "/v1/models"): {"object": "list", "data": [
            {"id": "meta-llama/Llama-3.1-8B-Instruct", "object": "model", "created": 1732096800, "owned_by": "vllm",
             "root": "meta-llama/Llama-3.1-8B-Instruct", "parent": None, "max_model_len": 16384,
             "permission": [{"id": "modelperm-1", "object": "model_permission", "allow_sampling": True}]}]},
    })


def fake_llamacpp() -> _Fake:
    """llama.cpp's llama-server: /health, /props, /v1/models owned_by llamacpp."""
    return _Fake({
        ("GET", "/health"): {"status": "ok"},
        ("GET", "/props"): {"default_generation_settings": {"n_ctx": 8192, "temperature": 0.8},
                            "total_slots": 1, "model_path": "/models/Mistral-7B-Instruct-v0.3-Q6_K.gguf",
                            "chat_template": "{{ messages }}", "build_info": "b4100-1234abcd"},
        ("GET", "/v1/models"): {"object": "list", "data": [
            {"id": "/models/Mistral-7B-Instruct-v0.3-Q6_K.gguf", "object": "model", "created": 1732096800,
             "owned_by": "llamacpp", "meta": {"vocab_type": 1, "n_vocab": 32768, "n_ctx_train": 32768}}]},
    })


def fake_mlx(*, with_cache: bool = True) -> _Fake:
    """mlx_lm.server: /health, and /v1/models listing its Hugging Face cache (which fails without one)."""
    routes = {("GET", "/health"): {"status": "ok"}}
    if with_cache:
        routes[("GET", "/v1/models")] = {"object": "list", "data": [
            {"id": "mlx-community/Llama-3.2-3B-Instruct-4bit", "object": "model", "created": 1732096800}]}
    return _Fake(routes)
